"""VIP ownership by VRRP on a segment without a router, with real keepalived
(host tier).

client, lb1..lb3 (keepalived + kdsr, L2 DSR on the nft engine) and s1..s3
(kdsr server role, responders) on one bridge.  The client has no route for
the VIP: it finds it by ARP / neighbour discovery, answered by whichever load
balancer keepalived made its owner (netns-lab/vrrplab.py).  kdsr writes each
load balancer's keepalived fragment, reloads keepalived, and opens each VIP's
gate (its track file) once the fast path is read back.

- 200 IPv4 flows (and 60 IPv6) all answered from the VIP, through the owner
  only: the standby's fast path counts none of them, and no packet from the
  VIP crosses either load balancer (the replies bypass them; the owner's own
  stack, which has the VIP as a local address, answers nothing, not even a
  reset).
- The owner dies (eth0 deleted, keepalived and `kdsr run` SIGKILLed): the
  standby owns the VIP within the master-down interval; 100 held TCP
  connections keep exchanging data with the same server, and a new flow
  every 20 ms through the failover counts the flows lost.
- Health: the owner's probes to every server are dropped in its own
  namespace: its `kdsr run` closes the gate and the standby takes the VIP;
  unblocked, the owner takes it back (preempt), and a VIP with preempt
  false stays where it is.
- A rebooted load balancer (fresh namespace, track directory emptied):
  keepalived starts from the fragment on disk with every gate closed; the
  VIP comes back to it only once `kdsr run` has verified its fast path; a
  new flow every 20 ms meanwhile: none fails.
- A first apply with keepalived stopped is exit 7 and writes nothing.
- Three load balancers with unicast advertisements, VIP2 in another order:
  each VIP is owned by the first of its own list (N+M), `kdsr show` says so; a gate closed by hand is drift; destroy
  on every node leaves no VIP, no fragment, no gate, no kdsr table, and
  keepalived's own config byte for byte as it was.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import vrrplab
from vrrplab import VIP, VIP6

ROOT = Path(__file__).resolve().parents[2]
PORT = 80
VIP2 = "10.10.0.101"  # preempt false
ADVERT = 0.5  # s, advert_interval of every VIP here
# VRRPv3 (RFC 5798): a backup takes over after 3 intervals plus a skew of
# (256 - priority) / 256 intervals without an advertisement.
MASTER_DOWN = 3 * ADVERT + (256 - 190) / 256 * ADVERT
SERVER_ADDRESS = {"s1": "10.10.0.11", "s2": "10.10.0.12", "s3": "10.10.0.13"}
HOLD = sys.executable, str(ROOT / "netns-lab" / "hold.py")
FLOWSTREAM = str(ROOT / "netns-lab" / "flowstream.py")
CONVERGE = 15.0

pytestmark = pytest.mark.skipif(
    vrrplab.keepalived_unavailable_reason() is not None, reason="keepalived is not installed"
)


def intent_for(
    lab: vrrplab.VrrpLab,
    lbs=("lb1", "lb2"),
    health: dict | None = None,
    unicast: bool = False,
    sticky_order: tuple[str, ...] | None = None,
    sticky_preempt: bool = False,
) -> dict:
    """``sticky_order``: the VRRP group of VIP2 (default ``lbs``), to give it
    another owner; ``sticky_preempt``: whether it preempts (default not)."""

    def announce(router_id: int, preempt: bool = True, order: tuple[str, ...] = lbs) -> dict:
        found = {"mode": "vrrp", "virtual_router_id": router_id, "load_balancers": list(order)}
        found["advert_interval"] = ADVERT
        if not preempt:
            found["preempt"] = False
        if unicast:
            found["unicast"] = True
        return found

    load_balancers = {}
    for lb in lbs:
        paths = lab.keepalived_paths(lb)
        host = lab.HOSTS[lb]
        load_balancers[lb] = {
            "interface": "eth0",
            "addresses": [host.ipv4, host.ipv6],
            "vrrp": {"keepalived": {k: str(paths[k]) for k in ("config", "fragment", "pid_file", "track_dir")}},
        }
    services = {
        "web": {"vip": VIP, "ports": PORT, "protocols": "tcp", "pool": "web", "announce": announce(51)},
        "web6": {"vip": VIP6, "ports": PORT, "protocols": "tcp", "pool": "web6", "announce": announce(51)},
        "sticky": {
            "vip": VIP2,
            "ports": PORT,
            "protocols": "tcp",
            "pool": "web",
            "announce": announce(52, sticky_preempt, sticky_order or lbs),
        },
    }
    pools = {
        "web": {"servers": [{"node": s} for s in SERVER_ADDRESS]},
        "web6": {"servers": [{"node": s, "address": lab.HOSTS[s].addr6} for s in SERVER_ADDRESS]},
    }
    if health:
        for pool in pools.values():
            pool["health"] = health
    return {
        "version": 1,
        "services": services,
        "pools": pools,
        "load_balancers": load_balancers,
        "servers": {
            s: {"interface": "eth0", "addresses": [lab.HOSTS[s].ipv4, lab.HOSTS[s].ipv6]} for s in SERVER_ADDRESS
        },
    }


class Vrrp:
    def __init__(self, lab: vrrplab.VrrpLab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.intent_path = workdir / "intent.json"
        self.daemons: dict = {}

    def write(self, doc: dict) -> Path:
        self.intent_path.write_text(json.dumps(doc, indent=1))
        return self.intent_path

    def kdsr(self, host: str, *args: str, check: bool = True):
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.workdir / "state" / host), *args]
        result = self.lab.run(host, argv, check=False, cwd=ROOT, timeout=300)
        if check:
            assert result.returncode == 0, f"kdsr {' '.join(args)} in {host}: {result.stdout}\n{result.stderr}"
        return result

    def servers(self, doc: dict) -> None:
        path = self.write(doc)
        for server in SERVER_ADDRESS:
            self.lab.start_responder(server, tcp_ports=[PORT], max_seconds=600)
            self.kdsr(server, "apply", str(path), "--node", server)

    def run_daemon(self, lb: str) -> None:
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.workdir / "state" / lb), "run"]
        self.daemons[lb] = self.lab.spawn(lb, [*argv, str(self.intent_path), "--node", lb], tag=f"kdsr-run-{lb}")

    def probe(self, flows: int, vip: str = VIP):
        return self.lab.probe(vip, "tcp", PORT, flows, self.lab.next_sports(flows), timeout=2.0)

    def hold(self, connections: int, go: Path):
        first = self.lab.next_sports(connections, base=40000)
        argv = [*HOLD, "--vip", VIP, "--port", str(PORT), "--connections", str(connections)]
        argv += ["--first-sport", str(first), "--go-file", str(go), "--deadline", "120", "--timeout", "5"]
        return self.lab.spawn("client", argv, tag="hold", ready_marker="READY", ready_timeout=60)

    def vip_packets(self, lb: str, vip: str = VIP) -> int:
        """Packets kdsr's fast path on ``lb`` forwarded for ``vip`` (kdsr show)."""
        shown = json.loads(self.kdsr(lb, "show", "--json").stdout)
        return sum(s["packets"] for s in shown["services"] if s["vip"] == vip)

    def stop_daemons(self) -> None:
        for proc in self.daemons.values():
            if proc.running():
                proc.stop()


@pytest.fixture
def vrrp(lab_available, tmp_path):
    with vrrplab.VrrpLab(workdir=tmp_path / "lab") as lab:
        site = Vrrp(lab, tmp_path)
        try:
            yield site
        finally:
            site.stop_daemons()


def test_the_owner_answers_for_the_vip_and_a_killed_owner_loses_no_connection(vrrp):
    doc = intent_for(vrrp.lab, health={"type": "tcp", "mode": "plain", "interval": 0.5, "timeout": 0.3})
    vrrp.servers(doc)
    # keepalived not running yet: exit 7 with the fix, and nothing written.
    refused = vrrp.kdsr("lb1", "apply", str(vrrp.intent_path), "--node", "lb1", check=False)
    print(f"\napply with keepalived stopped: exit {refused.returncode}: {refused.stderr.strip()}")
    assert refused.returncode == 7, refused.stderr
    assert "keepalived is not running" in refused.stderr and "systemctl start keepalived" in refused.stderr
    assert not vrrp.lab.keepalived_paths("lb1")["fragment"].exists()
    for lb in ("lb1", "lb2"):
        vrrp.lab.start_keepalived(lb)
        vrrp.run_daemon(lb)
    took = vrrp.lab.wait_owner(VIP, "lb1", CONVERGE)
    vrrp.lab.wait_owner(VIP6, "lb1", CONVERGE)
    print(f"lb1 owns {VIP} and {VIP6} {took:.2f} s after both daemons started")
    assert vrrp.lab.client_neighbour(VIP) is None  # nothing told the client yet: no route, no entry

    before = {lb: vrrp.vip_packets(lb) for lb in ("lb1", "lb2")}
    vips = f"-p (host {VIP} or host {VIP6}) and tcp port {PORT}"
    with vrrp.lab.capture("lb1", "eth0", vips) as at_lb1, vrrp.lab.capture("lb2", "eth0", vips) as at_lb2:
        report = vrrp.probe(200)
        six = vrrp.probe(60, VIP6)
    assert report.all_ok, report.describe_failures()
    assert set(report.by_server()) == set(SERVER_ADDRESS), report.by_server()
    assert six.all_ok, six.describe_failures()
    assert vrrp.lab.client_neighbour(VIP) == vrrp.lab.mac("lb1")
    forwarded = {lb: vrrp.vip_packets(lb) - before[lb] for lb in ("lb1", "lb2")}
    requests = [p for p in at_lb1.packets if p.dst in (VIP, VIP6) and p.dst_mac == vrrp.lab.mac("lb1")]
    replies = [p for p in at_lb1.packets + at_lb2.packets if p.src in (VIP, VIP6)]
    print(
        f"200 IPv4 flows {report.by_server()}, 60 IPv6 flows {six.by_server()}; fast path packets for {VIP}: "
        f"{forwarded}; at lb1's eth0: {len(requests)} request frames to its MAC, {len(replies)} replies "
        f"at either load balancer; lb2's eth0 saw {len(at_lb2.packets)} VIP packets"
    )
    assert forwarded["lb2"] == 0 and forwarded["lb1"] >= 200 * 3  # SYN, ACK, data, FIN at least
    assert len(requests) >= 260 * 3 and at_lb2.packets == []
    # Nothing from the VIP at either load balancer: the servers' replies
    # bypass them, and lb1's own stack, which has the VIP as a local address,
    # never answered a frame (no SYN-ACK, no reset): netdev ingress took every
    # one before the stack.
    assert replies == [], f"{len(replies)} packets from the VIP at a load balancer: {replies[:3]}"

    # The owner dies under 100 open connections and a new flow every 20 ms.
    go = vrrp.workdir / "go-after-kill"
    holder = vrrp.hold(100, go)
    every, seconds = 0.02, 6.0
    stream_out = vrrp.workdir / "failover-flows.jsonl"
    argv = [sys.executable, FLOWSTREAM, "--vip", VIP, "--port", str(PORT), "--every", str(every)]
    argv += ["--seconds", str(seconds), "--timeout", "3", "--out", str(stream_out)]
    argv += ["--first-sport", str(vrrp.lab.next_sports(int(seconds / every) + 1))]
    stream = vrrp.lab.spawn("client", argv, tag="flowstream", ready_marker="READY", ready_timeout=60)
    time.sleep(1.0)
    killed_wall, killed = time.time(), time.monotonic()
    vrrp.lab.kill_lb("lb1", also=(vrrp.daemons["lb1"],))
    failover = vrrp.lab.wait_owner(VIP, "lb2", 10)
    vrrp.lab.wait_owner(VIP6, "lb2", 10)
    go.touch()
    holder.popen.wait(timeout=130)
    stream.popen.wait(timeout=seconds + 60)
    result = json.loads(holder.stdout().splitlines()[-1])
    kept = [c for c in result["connections"] if c["ok"] and c["after"] == c["before"]]
    flows = [json.loads(line) for line in stream_out.read_text().splitlines()]
    lost = [f for f in flows if not f["ok"]]
    during = [f for f in flows if f["t"] >= killed_wall - 0.1]
    print(
        f"lb1 killed: lb2 owns {VIP} after {failover:.2f} s (master-down interval {MASTER_DOWN:.2f} s at "
        f"advert {ADVERT} s); {len(kept)}/100 open connections exchanged again with the same server; "
        f"{len(lost)} of {len(flows)} new flows failed ({len(during)} started after the kill; each had 3 s, "
        f"so a SYN lost in the gap was retransmitted, not counted lost); "
        f"{time.monotonic() - killed:.1f} s from kill to the last reply"
    )
    assert failover <= MASTER_DOWN + 1.5, f"failover took {failover:.2f} s"
    assert len(kept) >= 99, [c for c in result["connections"] if c not in kept][:3]
    again = vrrp.probe(100)
    assert again.all_ok, again.describe_failures()
    assert vrrp.lab.client_neighbour(VIP) == vrrp.lab.mac("lb2")  # lb2's gratuitous ARP moved the client
    six = vrrp.probe(30, VIP6)
    assert six.all_ok, six.describe_failures()


def test_a_rebooted_load_balancer_owns_the_vip_only_once_its_fast_path_is_in(vrrp):
    """keepalived starts from the fragment on disk with the track directory
    emptied by the boot: it makes every gate 1 and stays in FAULT, so the
    preferred lb1 does not take the VIP back until its `kdsr run` has built
    and verified the fast path.  Without the gate, lb1 would preempt at once
    and its own stack would answer the VIP's flows (with resets)."""
    vrrp.servers(intent_for(vrrp.lab))
    for lb in ("lb1", "lb2"):
        vrrp.lab.start_keepalived(lb)
        vrrp.run_daemon(lb)
        vrrp.lab.wait_owner(VIP, "lb1", CONVERGE)
    vrrp.lab.reboot_lb("lb1")
    vrrp.lab.wait_owner(VIP, "lb2", 10)
    every, seconds, kdsr_after = 0.02, 14.0, 4.0
    out = vrrp.workdir / "reboot-flows.jsonl"
    argv = [sys.executable, FLOWSTREAM, "--vip", VIP, "--port", str(PORT), "--every", str(every)]
    argv += ["--seconds", str(seconds), "--timeout", "3", "--out", str(out)]
    argv += ["--first-sport", str(vrrp.lab.next_sports(int(seconds / every) + 1))]
    stream = vrrp.lab.spawn("client", argv, tag="flowstream", ready_marker="READY", ready_timeout=60)
    time.sleep(1)
    started = time.monotonic()
    vrrp.lab.start_keepalived("lb1")
    gates = vrrp.lab.keepalived_paths("lb1")["track_dir"]
    time.sleep(kdsr_after)  # more than the master-down interval: lb1 would have preempted by now
    assert vrrp.lab.owner_of(VIP) == "lb2", "lb1 took the VIP before kdsr built its fast path"
    assert {p.name: p.read_text().strip() for p in gates.iterdir()} == {
        "kdsr-vrrp-v4_51": "1",
        "kdsr-vrrp-v4_52": "1",
        "kdsr-vrrp-v6_51": "1",
    }
    assert "Entering FAULT STATE" in vrrp.lab.keepalived_log("lb1") or "entering FAULT state" in (
        vrrp.lab.keepalived_log("lb1")
    )
    vrrp.run_daemon("lb1")
    back = vrrp.lab.wait_owner(VIP, "lb1", 30)
    since_keepalived = time.monotonic() - started
    has_table = vrrp.lab.run("lb1", ["nft", "list", "table", "netdev", "kdsr"], check=False).returncode == 0
    stream.popen.wait(timeout=seconds + 60)
    flows = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [f for f in flows if not f["ok"]]
    print(
        f"\nreboot: lb1's keepalived up {kdsr_after:g} s with every gate 1 (lb2 kept the VIP); `kdsr run` then "
        f"gave lb1 the VIP back {back:.2f} s after its start ({since_keepalived:.1f} s after keepalived's); "
        f"{len(failed)} of {len(flows)} new flows failed"
    )
    assert has_table
    assert not failed, failed[:3]


def _events(log: str, event: str) -> list[dict]:
    """The fields of the daemon's ``event`` lines, with their wall-clock time as "t"."""
    found = []
    for line in log.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("event") == event and "ts" in fields:
            stamp = calendar.timegm(time.strptime(fields["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + float(fields["ts"][19:-1])
            found.append({**fields, "t": stamp})
    return found


def _block_probes(vrrp: Vrrp, lb: str, on: bool) -> None:
    """``lb`` drops its own probes to every server (its output hook): its
    health checks fail; client traffic, forwarded at netdev ingress, does not."""
    if on:
        servers = ", ".join(SERVER_ADDRESS.values())
        servers6 = ", ".join(vrrp.lab.HOSTS[s].addr6 for s in SERVER_ADDRESS)
        batch = (
            "table inet labblock {\n chain output {\n  type filter hook output priority 0; policy accept;\n"
            f"  ip daddr {{ {servers} }} tcp dport {PORT} drop\n"
            f"  ip6 daddr {{ {servers6} }} tcp dport {PORT} drop\n }}\n}}\n"
        )
        vrrp.lab.run(lb, ["nft", "-f", "-"], input=batch)
    else:
        vrrp.lab.run(lb, ["nft", "delete", "table", "inet", "labblock"])


def test_health_gives_the_vip_up_and_takes_it_back_per_preempt(vrrp):
    health = {"type": "tcp", "mode": "plain", "interval": 0.5, "timeout": 0.3, "fall": 2, "rise": 2}
    vrrp.servers(intent_for(vrrp.lab, health=health))
    # lb1 first: the preempt-false VIP stays with whoever owned it first.
    for lb in ("lb1", "lb2"):
        vrrp.lab.start_keepalived(lb)
        vrrp.run_daemon(lb)
        for vip in (VIP, VIP2, VIP6):
            vrrp.lab.wait_owner(vip, "lb1", CONVERGE)
    blocked_wall = time.time()
    _block_probes(vrrp, "lb1", True)
    took = vrrp.lab.wait_owner(VIP, "lb2", 20)
    moved_wall = time.time()
    vrrp.lab.wait_owner(VIP2, "lb2", 5)
    vrrp.lab.wait_owner(VIP6, "lb2", 5)
    gate = Path(vrrp.lab.keepalived_paths("lb1")["track_dir"]) / "kdsr-vrrp-v4_51"
    assert gate.read_text().strip() == "1"
    report = vrrp.probe(60)
    assert report.all_ok, report.describe_failures()
    assert "Entering FAULT STATE" in vrrp.lab.keepalived_log("lb1")
    _block_probes(vrrp, "lb1", False)
    back = vrrp.lab.wait_owner(VIP, "lb1", 20)
    vrrp.lab.wait_owner(VIP6, "lb1", 5)
    time.sleep(3 * ADVERT + 1)
    print(
        f"\nlb1's probes blocked: lb2 owns {VIP} {took:.2f} s later (interval 0.5 s x fall 2 + timeout 0.3 s, "
        f"then the gate); unblocked: lb1 takes it back {back:.2f} s later (preempt); {VIP2} (preempt false) "
        f"stays on {vrrp.lab.owner_of(VIP2)}"
    )
    log = vrrp.daemons["lb1"].stderr()
    downs = [e for e in _events(log, "health") if e.get("state") == "down" and blocked_wall <= e["t"] <= moved_wall]
    applied = [e for e in _events(log, "applied") if blocked_wall <= e["t"] <= moved_wall]
    if downs and applied:
        print(
            f"lb1's daemon: first server down {downs[0]['t'] - blocked_wall:.2f} s after the block, last "
            f"{downs[-1]['t'] - blocked_wall:.2f} s; {len(applied)} applies, the last logged "
            f"{applied[-1]['t'] - blocked_wall:.2f} s after the block ({applied[-1].get('seconds', '?')} s); "
            f"{VIP} on lb2 {moved_wall - blocked_wall:.2f} s after it"
        )
    assert vrrp.lab.owner_of(VIP2) == "lb2"
    assert gate.read_text().strip() == "0"
    report = vrrp.probe(60)
    assert report.all_ok, report.describe_failures()


def test_destroy_on_every_node_leaves_no_vip_no_fragment_and_keepaliveds_config_as_it_was(vrrp):
    lbs = ("lb1", "lb2", "lb3")
    # Advertisements to the peers' addresses; VIP2 prefers lb2 (N+M: each VIP its own order).
    doc = intent_for(vrrp.lab, lbs=lbs, unicast=True, sticky_order=("lb2", "lb3", "lb1"), sticky_preempt=True)
    vrrp.servers(doc)
    configs = {}
    for lb in lbs:
        configs[lb] = hashlib.sha256(vrrp.lab.keepalived_paths(lb)["config"].read_bytes()).hexdigest()
        vrrp.lab.start_keepalived(lb)
        vrrp.kdsr(lb, "apply", str(vrrp.intent_path), "--node", lb)
    vrrp.lab.wait_owner(VIP, "lb1", CONVERGE)
    vrrp.lab.wait_owner(VIP6, "lb1", CONVERGE)
    vrrp.lab.wait_owner(VIP2, "lb2", CONVERGE)
    before = vrrp.vip_packets("lb2", VIP2)
    on_lb2 = vrrp.probe(30, VIP2)
    assert on_lb2.all_ok, on_lb2.describe_failures()
    assert vrrp.vip_packets("lb2", VIP2) - before >= 30 * 3
    report = vrrp.probe(30)
    assert report.all_ok, report.describe_failures()
    six = vrrp.probe(30, VIP6)
    assert six.all_ok, six.describe_failures()
    assert "unicast_peer" in vrrp.lab.keepalived_paths("lb1")["fragment"].read_text()
    shown = json.loads(vrrp.kdsr("lb1", "show", "--json").stdout)["vrrp"]
    assert {(v["vip"], v["gate"], v["owned_here"]) for v in shown} == {
        (f"{VIP}/32", "0", True),
        (f"{VIP2}/32", "0", False),
        (f"{VIP6}/128", "0", True),
    }
    plan = vrrp.kdsr("lb2", "plan", str(vrrp.intent_path), "--node", "lb2", "--detailed-exitcode", check=False)
    assert plan.returncode == 0, plan.stdout
    # Drift: a gate closed by hand gives lb1's VIPs up and is planned back.
    gate = Path(vrrp.lab.keepalived_paths("lb1")["track_dir"]) / "kdsr-vrrp-v4_51"
    gate.write_text("1\n")
    vrrp.lab.wait_owner(VIP, "lb2", 10)
    plan = vrrp.kdsr("lb1", "plan", str(vrrp.intent_path), "--node", "lb1", "--detailed-exitcode", check=False)
    assert plan.returncode == 2 and f"~ vrrp gate {gate}" in plan.stdout, plan.stdout
    vrrp.kdsr("lb1", "apply", str(vrrp.intent_path), "--node", "lb1")
    vrrp.lab.wait_owner(VIP, "lb1", 10)
    # lb3 with keepalived stopped: destroy removes the fragment without a reload, and says so.
    vrrp.lab.keepalived("lb3").stop(signal.SIGTERM)
    for lb in lbs:
        result = vrrp.kdsr(lb, "destroy", "--node", lb, "--auto-approve")
        print(f"\nkdsr destroy on {lb}: exit {result.returncode}\n{result.stdout.strip()}")
        if lb == "lb3":
            assert "keepalived is not running" in result.stdout, result.stdout
    for vip in (VIP, VIP2, VIP6):
        vrrp.lab.wait_owner(vip, None, 10)
    for lb in lbs:
        paths = vrrp.lab.keepalived_paths(lb)
        assert not paths["fragment"].exists()
        assert list(paths["track_dir"].iterdir()) == []
        assert hashlib.sha256(paths["config"].read_bytes()).hexdigest() == configs[lb]
        assert vrrp.lab.run(lb, ["nft", "list", "table", "netdev", "kdsr"], check=False).returncode != 0
        again = vrrp.kdsr(lb, "destroy", "--node", lb, "--dry-run")
        assert "No changes" in again.stdout, again.stdout
    for lb in ("lb1", "lb2"):
        assert vrrp.lab.keepalived(lb).running()
        test = vrrp.lab.run(lb, [vrrplab.KEEPALIVED, "-t", "-f", str(vrrp.lab.keepalived_paths(lb)["config"])])
        assert test.returncode == 0
