"""VIP placement by BGP and the HA modes, with real BIRD on both sides (host tier).

client - router (BIRD, ECMP into its FIB, L4 multipath hash) - one segment with
lb1..lb3 (BIRD + kdsr, L2 DSR on the nft engine) and s1..s3 (kdsr server role,
responders).  kdsr writes each load balancer's BIRD fragment and reloads BIRD;
the router learns the VIP from the load balancers that announce it.  Timers:
hold 3 s, keepalive 1 s on every session (netns-lab/bgplab.py).

- Active-active on three load balancers: the router's FIB has three next hops,
  200 flows spread over all of them and are all answered.  One load balancer
  dies (link deleted, BIRD SIGKILLed: no Cease, the router notices at hold
  time): 100 open TCP connections keep exchanging data with the same server
  through the survivors (same Maglev table everywhere).
- Active-standby: only the active's path is in the FIB (the standby's longer
  AS path loses); the active's BIRD stops and the standby carries the open
  connections and new flows.
- Health-driven withdraw: lb1's probes are blocked at the servers, so in lb1's
  view every server is down: `kdsr run` on lb1 withdraws the VIP, lb2 keeps it;
  unblocked, lb1 announces it again.
- A neighbour BIRD refuses (IPv6 link-local without an interface): apply fails
  with BIRD's message and the intent path; BIRD and the fragment keep their
  previous config.
- A rebooted load balancer (a fresh network namespace, every file kept):
  BIRD starts from the fragment on disk, `kdsr run` 8 s later.  No new flow
  of a stream through the router fails, and the router uses it again only
  once kdsr's fast path is in (its announce routes, kdsr/compile/bird.py).
- Destroy while BIRD is stopped: exit 0, a note that BIRD was not running, an
  empty fragment BIRD parses, nothing of kdsr's left in the kernel.
"""

from __future__ import annotations

import calendar
import copy
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import bgplab
import pytest
from bgplab import HOLD_TIME, VIP, VIP_PREFIX

ROOT = Path(__file__).resolve().parents[2]
PORT = 80
LB_ADDRESS = {"lb1": "10.10.0.2", "lb2": "10.10.0.3", "lb3": "10.10.0.4"}
SERVER_ADDRESS = {"s1": "10.10.0.11", "s2": "10.10.0.12", "s3": "10.10.0.13"}
CONVERGE = 20  # s: a session comes up, BIRD exports, the router installs
HOLD = sys.executable, str(ROOT / "netns-lab" / "hold.py")
FLOWSTREAM = str(ROOT / "netns-lab" / "flowstream.py")
ANNOUNCE_TABLE = "1803550720"  # kdsr/naming.py ANNOUNCE_TABLE (0x6b800000)
KDSR_AFTER_BIRD = 8.0  # s: issue 29's measurement started `kdsr run` this long after BIRD

pytestmark = pytest.mark.skipif(bgplab.bird_unavailable_reason() is not None, reason="BIRD 2 is not installed")


def intent_for(lab: bgplab.BgpLab, announce: dict, health: dict | None = None) -> dict:
    load_balancers = {}
    for lb, address in LB_ADDRESS.items():
        paths = lab.bird_paths(lb)
        load_balancers[lb] = {
            "interface": "eth0",
            "addresses": [f"{address}/24", f"fd00:10::{address.rsplit('.', 1)[1]}/64"],
            "bgp": {
                "asn": bgplab.LB_ASN,
                "router_id": address,
                "hold_time": HOLD_TIME,
                "neighbors": [{"address": bgplab.ROUTER_ADDRESS, "asn": bgplab.ROUTER_ASN}],
                "bird": {k: str(paths[k]) for k in ("config", "fragment", "socket")},
            },
        }
    service = {"vip": VIP, "ports": PORT, "protocols": "tcp", "pool": "web", "announce": announce}
    if health:
        service["health"] = health
    return {
        "version": 1,
        "services": {"web": service},
        "pools": {"web": {"servers": [{"node": s} for s in SERVER_ADDRESS]}},
        "load_balancers": load_balancers,
        "servers": {s: {"interface": "eth0", "addresses": [f"{a}/24"]} for s, a in SERVER_ADDRESS.items()},
    }


class Bgp:
    def __init__(self, lab: bgplab.BgpLab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.intent_path = workdir / "intent.json"
        self.daemons: dict = {}

    def write(self, doc: dict, name: str = "intent.json") -> Path:
        path = self.workdir / name
        path.write_text(json.dumps(doc, indent=1))
        return path

    def kdsr(self, host: str, *args: str, check: bool = True):
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.workdir / "state" / host), *args]
        result = self.lab.run(host, argv, check=False, cwd=ROOT, timeout=300)
        if check:
            assert result.returncode == 0, f"kdsr {' '.join(args)} in {host}: {result.stdout}\n{result.stderr}"
        return result

    def deploy(self, doc: dict, lbs=tuple(LB_ADDRESS)) -> None:
        path = self.write(doc)
        for server in SERVER_ADDRESS:
            self.lab.start_responder(server, tcp_ports=[PORT], max_seconds=600)
            self.kdsr(server, "apply", str(path), "--node", server)
        for lb in lbs:
            self.kdsr(lb, "apply", str(path), "--node", lb)

    def hold(self, connections: int, go: Path):
        """hold.py in the client: ``connections`` open TCP connections, used
        again once ``go`` exists; returns (process, their source ports)."""
        first = self.lab.next_sports(connections, base=40000)
        argv = [*HOLD, "--vip", VIP, "--port", str(PORT), "--connections", str(connections)]
        argv += ["--first-sport", str(first), "--go-file", str(go), "--deadline", "120", "--timeout", "5"]
        proc = self.lab.spawn("client", argv, tag="hold", ready_marker="READY", ready_timeout=60)
        return proc, range(first, first + connections)

    def probe(self, flows: int):
        return self.lab.probe(VIP, "tcp", PORT, flows, self.lab.next_sports(flows), timeout=2.0)


def held(proc) -> dict:
    proc.popen.wait(timeout=130)
    return json.loads(proc.stdout().splitlines()[-1])


@pytest.fixture
def bgp(lab_available, tmp_path):
    # Short workdir: BIRD's control socket path must fit a unix socket.
    with bgplab.BgpLab() as lab:
        yield Bgp(lab, Path(lab.workdir))


def _nexthops(*lbs: str) -> set[str]:
    return {LB_ADDRESS[lb] for lb in lbs}


def test_active_active_ecmp_and_a_dead_load_balancer_keeps_open_connections(bgp):
    bgp.deploy(intent_for(bgp.lab, {"mode": "active-active"}))
    took = bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2", "lb3"), CONVERGE)
    print(f"\nrouter FIB: {VIP_PREFIX} via 3 load balancers {took:.2f} s after the last apply")
    choices = bgp.lab.ecmp_choices(VIP, range(30000, 30200), dport=PORT)
    per_lb = {lb: sum(1 for g in choices.values() if g == a) for lb, a in LB_ADDRESS.items()}
    print(f"ECMP choice for 200 source ports: {per_lb}")
    assert all(count > 0 for count in per_lb.values()), per_lb
    report = bgp.probe(200)
    assert report.all_ok, report.describe_failures()
    assert set(report.by_server()) == set(SERVER_ADDRESS), report.by_server()

    go = bgp.workdir / "go-after-kill"
    holder, sports = bgp.hold(100, go)
    path_of = bgp.lab.ecmp_choices(VIP, sports, dport=PORT)  # the load balancer each came through
    killed = time.monotonic()
    bgp.lab.kill_lb("lb1")
    recovered = bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb2", "lb3"), HOLD_TIME + 5)
    go.touch()
    result = held(holder)
    connections = result["connections"]
    via_lb1 = [c for c in connections if path_of.get(c["sport"]) == LB_ADDRESS["lb1"]]
    kept = [c for c in connections if c["ok"] and c["after"] == c["before"]]
    print(
        f"lb1 killed: router down to 2 next hops after {recovered:.2f} s (hold time {HOLD_TIME} s); "
        f"{len(kept)}/100 open connections exchanged again with the same server "
        f"({len(via_lb1)} had come through lb1); {time.monotonic() - killed:.1f} s from kill to the last reply"
    )
    assert via_lb1, "no held connection went through the killed load balancer: the test proved nothing"
    assert len(kept) >= 99, [c for c in connections if c not in kept][:3]
    again = bgp.probe(100)
    assert again.all_ok, again.describe_failures()


def test_active_standby_sends_only_to_the_active_and_fails_over(bgp):
    announce = {"mode": "active-standby", "load_balancers": ["lb1", "lb2"], "prepend": 2}
    bgp.deploy(intent_for(bgp.lab, announce), lbs=("lb1", "lb2"))
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1"), CONVERGE)
    # The standby's route is there, with the longer path, and not used.
    deadline = time.monotonic() + CONVERGE
    while time.monotonic() < deadline:
        routes = bgp.lab.birdc("router", "show", "route", VIP_PREFIX, "all")
        if LB_ADDRESS["lb2"] in routes:
            break
        time.sleep(0.2)
    assert "65001 65001 65001" in routes and LB_ADDRESS["lb2"] in routes, routes
    report = bgp.probe(60)
    assert report.all_ok, report.describe_failures()

    go = bgp.workdir / "go-after-failover"
    holder, _sports = bgp.hold(50, go)
    stopped = time.monotonic()
    bgp.lab.stop_bird("lb1")
    took = bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb2"), HOLD_TIME + 5)
    go.touch()
    result = held(holder)
    kept = [c for c in result["connections"] if c["ok"] and c["after"] == c["before"]]
    print(f"\nactive lb1's BIRD stopped: router on the standby lb2 after {took:.2f} s; {len(kept)}/50 kept")
    assert len(kept) == 50, [c for c in result["connections"] if c not in kept][:3]
    again = bgp.probe(60)
    assert again.all_ok, again.describe_failures()
    assert time.monotonic() - stopped < 60


def _block_probes_from(bgp: Bgp, lb: str, on: bool) -> None:
    """Servers drop TCP to the service from ``lb``'s address: lb's health
    probes fail, client traffic (from 10.20.0.2) does not."""
    for server in SERVER_ADDRESS:
        if on:
            batch = (
                "table inet labblock {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
                f"  ip saddr {LB_ADDRESS[lb]} tcp dport {PORT} drop\n }}\n}}\n"
            )
            bgp.lab.run(server, ["nft", "-f", "-"], input=batch)
        else:
            bgp.lab.run(server, ["nft", "delete", "table", "inet", "labblock"])


def test_health_withdraws_the_vip_on_the_load_balancer_that_sees_no_server(bgp):
    health = {"type": "tcp", "interval": 0.5, "timeout": 0.3, "fall": 2, "rise": 2}
    doc = intent_for(bgp.lab, {"mode": "active-active", "load_balancers": ["lb1", "lb2"]}, health)
    bgp.deploy(doc, lbs=("lb1", "lb2"))
    path = str(bgp.intent_path)
    for lb in ("lb1", "lb2"):
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(bgp.workdir / "state" / lb), "run", path]
        bgp.daemons[lb] = bgp.lab.spawn(lb, [*argv, "--node", lb], tag=f"kdsr-run-{lb}")
    try:
        bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2"), CONVERGE)
        blocked = time.monotonic()
        _block_probes_from(bgp, "lb1", True)
        took = bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb2"), 20)
        withdrawn_at = time.time()
        assert _announce_routes(bgp, "lb1") == [], "lb1 withdrew, but its announce route is still there"
        report = bgp.probe(60)
        assert report.all_ok, report.describe_failures()
        _block_probes_from(bgp, "lb1", False)
        back = bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2"), 20)
        log = bgp.daemons["lb1"].stderr()
        decided = _last_event(log, "health", before=withdrawn_at, state="down")
        applied = _last_event(log, "applied", before=withdrawn_at)
        print(
            f"\nlb1 saw every server down: withdrawn, router on lb2 alone after {took:.2f} s "
            f"(interval 0.5 s x fall 2 + timeout 0.3 s + apply + BGP); announced again {back:.2f} s after unblocking"
            f"\nfrom the last server's down event to the router's FIB without lb1: at most "
            f"{withdrawn_at - decided['t']:.2f} s (polled every {bgplab.POLL} s); that apply took "
            f"{applied.get('seconds', '?')} s"
        )
        assert time.monotonic() - blocked < 60
    finally:
        for proc in bgp.daemons.values():
            proc.stop()


def test_a_neighbor_bird_refuses_fails_the_apply_and_keeps_birds_config(bgp):
    doc = intent_for(bgp.lab, {"mode": "active-active", "load_balancers": ["lb1"]})
    bgp.deploy(doc, lbs=("lb1",))
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1"), CONVERGE)
    fragment = bgp.lab.bird_paths("lb1")["fragment"]
    before = hashlib.sha256(fragment.read_bytes()).hexdigest()
    protocols_before = _kdsr_protocols(bgp)
    bad = copy.deepcopy(doc)
    bad["load_balancers"]["lb1"]["bgp"]["neighbors"].append({"address": "fe80::1", "asn": 65000})
    result = bgp.kdsr("lb1", "apply", str(bgp.write(bad, "bad.json")), "--node", "lb1", check=False)
    print(f"\nkdsr apply with a link-local neighbour: exit {result.returncode}: {result.stderr.strip()}")
    assert result.returncode == 6, result.stderr
    assert "BIRD rejected the config" in result.stderr and "Link-local" in result.stderr, result.stderr
    assert "/load_balancers/lb1/bgp/neighbors/1" in result.stderr, result.stderr
    assert hashlib.sha256(fragment.read_bytes()).hexdigest() == before
    assert _kdsr_protocols(bgp) == protocols_before
    assert bgp.lab.router_nexthops(VIP_PREFIX) == _nexthops("lb1")
    plan = bgp.kdsr("lb1", "plan", str(bgp.intent_path), "--node", "lb1", "--detailed-exitcode", check=False)
    assert plan.returncode == 0, plan.stdout


def _kdsr_protocols(bgp: Bgp) -> list[str]:
    out = bgp.lab.birdc("lb1", "show", "protocols")
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith("kdsr_"))


def _announce_routes(bgp: Bgp, lb: str) -> list[str]:
    """The routes in kdsr's announce table on ``lb``, both families."""
    found = []
    for family in ("-4", "-6"):
        result = bgp.lab.run(lb, ["ip", family, "route", "show", "table", ANNOUNCE_TABLE], check=False)
        # IPv6 has no table until a route is put in it: "FIB table does not exist".
        assert result.returncode == 0 or "does not exist" in result.stderr, result.stderr
        found += [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return found


def _last_event(log: str, event: str, before: float, **match: str) -> dict:
    """The fields of the daemon's last ``event`` line logged before ``before``
    (wall clock) whose fields include ``match``, with its time as "t"."""
    found: dict = {"t": float("nan")}
    for line in log.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("event") != event or any(fields.get(k) != v for k, v in match.items()):
            continue
        stamp = calendar.timegm(time.strptime(fields["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + float(fields["ts"][19:-1])
        if stamp <= before:
            found = {**fields, "t": stamp}
    return found


def _has_kdsr_table(bgp: Bgp, lb: str) -> bool:
    return bgp.lab.run(lb, ["nft", "list", "table", "netdev", "kdsr"], check=False).returncode == 0


def test_a_rebooted_load_balancer_announces_only_once_its_fast_path_is_in(bgp):
    bgp.deploy(intent_for(bgp.lab, {"mode": "active-active"}))
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2", "lb3"), CONVERGE)
    bgp.lab.reboot_lb("lb1")
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb2", "lb3"), HOLD_TIME + 5)
    assert not _has_kdsr_table(bgp, "lb1") and bgp.lab.bird_paths("lb1")["fragment"].exists()

    # A new TCP flow every 20 ms from the client, through the router, for
    # the whole boot: BIRD first, kdsr 8 s later, then a while with lb1 back.
    every, seconds = 0.02, KDSR_AFTER_BIRD + 14
    out = bgp.workdir / "reboot-flows.jsonl"
    argv = [sys.executable, FLOWSTREAM, "--vip", VIP, "--port", str(PORT), "--every", str(every)]
    argv += ["--seconds", str(seconds), "--timeout", "0.9", "--out", str(out)]
    argv += ["--first-sport", str(bgp.lab.next_sports(int(seconds / every) + 1))]
    # Meanwhile, every 50 ms: is lb1 a next hop on the router; has lb1 kdsr's table.
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + seconds + 60
        while not stop.is_set() and time.monotonic() < deadline:
            now = time.time()
            if "table" not in seen and _has_kdsr_table(bgp, "lb1"):
                seen["table"] = now
            if "fib" not in seen and LB_ADDRESS["lb1"] in bgp.lab.router_nexthops(VIP_PREFIX):
                seen["fib"] = time.time()
            stop.wait(bgplab.POLL)

    watcher = threading.Thread(target=watch, daemon=True)
    stream = bgp.lab.spawn("client", argv, tag="flowstream", ready_marker="READY", ready_timeout=60)
    watcher.start()
    try:
        time.sleep(1)
        bird_started = time.time()
        bgp.lab.start_bird("lb1")
        time.sleep(max(0.0, bird_started + KDSR_AFTER_BIRD - time.time()))
        kdsr_started = time.time()
        run = [sys.executable, "-m", "kdsr", "--state-dir", str(bgp.workdir / "state" / "lb1"), "run"]
        bgp.daemons["lb1"] = bgp.lab.spawn("lb1", [*run, str(bgp.intent_path), "--node", "lb1"], tag="kdsr-run")
        bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2", "lb3"), 20)
        stream.popen.wait(timeout=seconds + 60)
    finally:
        stop.set()
        watcher.join(timeout=10)
    flows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = sorted((f for f in flows if not f["ok"]), key=lambda f: f["t"])
    table, fib = seen.get("table", float("nan")), seen.get("fib", float("nan"))
    back = [f for f in flows if f["t"] > fib]
    path = bgp.lab.ecmp_choices(VIP, [f["sport"] for f in back], dport=PORT)
    via_lb1 = [f for f in back if path[f["sport"]] == LB_ADDRESS["lb1"]]
    when = f", the first {failed[0]['t'] - bird_started:.2f} s after BIRD's start" if failed else ""
    print(
        f"\nreboot: BIRD started, kdsr run {kdsr_started - bird_started:.1f} s later; lb1's table in "
        f"{table - bird_started:.2f} s after BIRD's start, lb1 in the router's FIB {fib - bird_started:.2f} s "
        f"after it ({fib - table:+.2f} s from the table); {len(failed)} of {len(flows)} new flows failed{when}; "
        f"{len(via_lb1)} of the {len(back)} flows after that went through lb1"
    )
    assert not failed, f"{len(failed)} of {len(flows)} new flows failed: {failed[:3]}"
    assert fib > table > kdsr_started, seen
    assert via_lb1 and all(f["ok"] for f in via_lb1)
    # The announce route routes nothing: no rule looks its table up, the main table has no VIP.
    assert _announce_routes(bgp, "lb1") == [f"blackhole {VIP} proto static"]
    assert ANNOUNCE_TABLE not in bgp.lab.run("lb1", ["ip", "rule"]).stdout
    assert VIP not in bgp.lab.run("lb1", ["ip", "route", "show", "table", "all"]).stdout.replace(
        f"blackhole {VIP} table {ANNOUNCE_TABLE}", ""
    )
    bgp.daemons["lb1"].stop()
    plan = bgp.kdsr("lb1", "plan", str(bgp.intent_path), "--node", "lb1", "--detailed-exitcode", check=False)
    assert plan.returncode == 0, plan.stdout
    # Drift: the announce route deleted by hand withdraws lb1, and is planned back.
    bgp.lab.run("lb1", ["ip", "route", "del", "blackhole", VIP_PREFIX, "table", ANNOUNCE_TABLE])
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb2", "lb3"), 5)
    plan = bgp.kdsr("lb1", "plan", str(bgp.intent_path), "--node", "lb1", "--detailed-exitcode", check=False)
    assert plan.returncode == 2 and f"+ announce route {VIP_PREFIX}" in plan.stdout, plan.stdout
    bgp.kdsr("lb1", "apply", str(bgp.intent_path), "--node", "lb1")
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2", "lb3"), 5)


def test_destroy_with_bird_stopped_empties_the_fragment_and_removes_everything(bgp):
    doc = intent_for(bgp.lab, {"mode": "active-active", "load_balancers": ["lb1"]})
    bgp.deploy(doc, lbs=("lb1",))
    bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1"), CONVERGE)
    assert _has_kdsr_table(bgp, "lb1")
    bgp.lab.stop_bird("lb1")
    result = bgp.kdsr("lb1", "destroy", "--node", "lb1", "--auto-approve", check=False)
    print(f"\nkdsr destroy with BIRD stopped: exit {result.returncode}\n{result.stdout.strip()}{result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    paths = bgp.lab.bird_paths("lb1")
    assert f"Note: BIRD was not running (no answer on {paths['socket']})" in result.stdout, result.stdout
    fragment = paths["fragment"].read_text()
    assert "protocol" not in fragment and "router id" not in fragment, fragment
    parse = bgp.lab.run("lb1", [bgplab.BIRD, "-p", "-c", str(paths["config"])], check=False)
    assert parse.returncode == 0, parse.stdout + parse.stderr
    assert not _has_kdsr_table(bgp, "lb1")
    assert _announce_routes(bgp, "lb1") == []
    assert ":kdsr" not in bgp.lab.run("lb1", ["ip", "addr"]).stdout  # kdsr labels what it adds
    assert "no reload (BIRD is not running)" in result.stdout, result.stdout
    again = bgp.kdsr("lb1", "destroy", "--node", "lb1", "--dry-run")
    assert "No changes" in again.stdout, again.stdout
    # BIRD started again runs the empty fragment: nothing of kdsr's, nothing announced.
    bgp.lab.start_bird("lb1")
    assert _kdsr_protocols(bgp) == []
    time.sleep(HOLD_TIME)
    assert bgp.lab.router_nexthops(VIP_PREFIX) == set()
