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
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
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
        fragment = bgp.lab.bird_paths("lb1")["fragment"].read_text()
        assert f"route {VIP_PREFIX}" not in fragment, fragment
        report = bgp.probe(60)
        assert report.all_ok, report.describe_failures()
        _block_probes_from(bgp, "lb1", False)
        back = bgp.lab.wait_nexthops(VIP_PREFIX, _nexthops("lb1", "lb2"), 20)
        print(
            f"\nlb1 saw every server down: withdrawn, router on lb2 alone after {took:.2f} s "
            f"(interval 0.5 s x fall 2 + timeout 0.3 s + apply + BGP); announced again {back:.2f} s after unblocking"
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
