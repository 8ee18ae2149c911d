"""A load balancer forwards only frames addressed to it (host kernel, L2 `nft`).

Two load balancers, lb1 and lb2, both apply the same intent (each its own
--node), with two servers on one bridge.  The client routes the VIPs to a
next hop that nobody on the bridge is (10.10.0.254 / fd00:10::254) and pins
that next hop's MAC with a permanent neighbour entry, so every datagram it
sends leaves with exactly the destination MAC the case names.  The bridge is
made to flood those frames to every port:

- ``lb1-flooded``: addressed to lb1's MAC, with learning off on lb1's bridge
  port and that port's learned entries flushed, so the bridge never knows
  where lb1 is (a switch that forgot a balancer's MAC) and floods each frame
  to lb2 and the servers too; the servers' ports still learn, so what a
  balancer forwards to a server goes to that server only;
- ``unknown-mac``: addressed to a MAC no host owns (a next hop that died),
  which a learning bridge floods to every port;
- ``hub``: addressed to lb1's MAC with learning off on every port: every
  unicast frame goes everywhere (a hub, a promiscuous virtual switch), the
  frames the balancers forward to servers included.

Each case sends COUNT numbered UDP datagrams (netns-lab/udpcount.py) to
each VIP and counts what the servers' sockets received.  A capture on lb2
(on lb1 for the unknown MAC) shows the frames did arrive there, so a zero
means "seen and left alone", not "never seen".

A last test upgrades a node from the table kdsr wrote before this check
existed: one in-place chain update in one transaction, no datagram lost
while it happens, and a second apply changes nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import releases
from lab import Host, L2Lab

ROOT = Path(__file__).resolve().parents[2]
UDPCOUNT = ROOT / "netns-lab" / "udpcount.py"
PYTHON = sys.executable or "python3"
VIPS = {4: "10.10.0.100", 6: "fd00:10::100"}
PORT = 5999
COUNT = 10
NEXT_HOP = {4: "10.10.0.254", 6: "fd00:10::254"}
UNOWNED_MAC = "02:00:5e:10:00:99"  # locally administered; no host in the lab has it
NODES = {"lb1": "lb1", "lb2": "lb2", "s1": "s1", "s2": "s2"}
# main before the load balancer asked whether a frame was addressed to it.
RELEASE_WITHOUT_CHECK = "b0868eb"


class TwoBalancerLab(L2Lab):
    """client, lb1, lb2, s1, s2 on one bridge; the client has no VIP routes
    until a case sets them."""

    HOSTS = {
        "client": Host("client", "10.10.0.50/24", "fd00:10::50/64"),
        "lb1": Host("lb1", "10.10.0.2/24", "fd00:10::2/64"),
        "lb2": Host("lb2", "10.10.0.3/24", "fd00:10::3/64"),
        "s1": Host("s1", "10.10.0.11/24", "fd00:10::11/64"),
        "s2": Host("s2", "10.10.0.12/24", "fd00:10::12/64"),
    }
    SERVERS = ("s1", "s2")
    LOAD_BALANCERS = ("lb1", "lb2")

    def _client_routes(self) -> None:
        pass

    def port(self, host: str) -> str:
        return f"p{host}"  # L2Lab._attach names each host's bridge port so

    def learning(self, host: str, on: bool) -> None:
        """Learning on or off on ``host``'s bridge port; off also forgets what the port learned."""
        self.run(
            self.SWITCH,
            ["ip", "link", "set", "dev", self.port(host), "type", "bridge_slave", "learning", "on" if on else "off"],
        )
        if not on:
            self.run(self.SWITCH, ["ip", "link", "set", "dev", self.port(host), "type", "bridge_slave", "fdb_flush"])


def intent() -> dict:
    servers = {
        s: {"interface": "eth0", "addresses": [h.ipv4, h.ipv6]} for s, h in TwoBalancerLab.HOSTS.items() if s[0] == "s"
    }
    return {
        "version": 1,
        "services": {
            "flood4": {
                "vip": VIPS[4],
                "ports": PORT,
                "protocols": "udp",
                "pool": "web",
                "dsr": {"mode": "l2", "engine": "nft"},
            },
            "flood6": {"vip": VIPS[6], "ports": PORT, "protocols": "udp", "pool": "web6"},
        },
        "pools": {
            "web": {"servers": [{"node": s} for s in servers]},
            "web6": {"servers": [{"node": s, "address": TwoBalancerLab.HOSTS[s].addr6} for s in servers]},
        },
        "load_balancers": {
            lb: {"interface": "eth0", "addresses": [h.ipv4, h.ipv6]}
            for lb, h in TwoBalancerLab.HOSTS.items()
            if lb.startswith("lb")
        },
        "servers": servers,
    }


class Deployment:
    def __init__(self, lab: TwoBalancerLab, workdir: Path):
        self.lab, self.workdir = lab, workdir
        self.intent = workdir / "intent.json"
        self.intent.write_text(json.dumps(intent(), indent=1))

    def kdsr(self, host: str, *args: str, release: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
        argv = [PYTHON, "-m", "kdsr", "--state-dir", str(self.workdir / "state" / host), *args]
        result = self.lab.run(host, argv, check=False, cwd=release, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kdsr {' '.join(args)} in {host} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def apply(self, host: str, release: Path = ROOT) -> subprocess.CompletedProcess:
        return self.kdsr(host, "apply", str(self.intent), "--node", NODES[host], release=release)

    def sinks(self, vip: str, tag: str) -> dict[str, tuple]:
        """A udpcount sink on every server for ``vip``: server -> (process, output file)."""
        started = {}
        for s in self.lab.SERVERS:
            out = self.workdir / f"{tag}-{s}.json"
            argv = [PYTHON, str(UDPCOUNT), "sink", "--bind", vip, "--port", str(PORT), "--name", s]
            argv += ["--max-seconds", "60", "--out", str(out)]
            started[s] = (self.lab.spawn(s, argv, tag="sink", ready_marker="ready"), out)
        return started

    def sender(self, vip: str, count: int, rate: float, first_sport: int, span: int, out: Path) -> list[str]:
        argv = [PYTHON, str(UDPCOUNT), "send", "--vip", vip, "--port", str(PORT), "--count", str(count)]
        argv += ["--rate", str(rate), "--first-sport", str(first_sport), "--span", str(span), "--max-seconds", "30"]
        return argv + ["--stop-file", str(self.workdir / "never"), "--out", str(out)]

    @staticmethod
    def received(sinks: dict[str, tuple]) -> dict[str, list[int]]:
        """Stop the sinks; the sequence numbers each server's socket received."""
        time.sleep(0.5)  # let the last datagrams (and any copies of them) land
        for proc, _out in sinks.values():
            proc.stop(signal.SIGTERM)
        return {s: json.loads(out.read_text())["seqs"] for s, (_proc, out) in sinks.items()}

    def send_counted(self, family: int) -> dict[str, list[int]]:
        """Send COUNT numbered datagrams to the VIP of ``family``; what each server's socket received."""
        tag = f"v{family}-{time.monotonic_ns()}"
        sinks = self.sinks(VIPS[family], tag)
        sent = self.workdir / f"{tag}-sent.json"
        self.lab.run("client", self.sender(VIPS[family], COUNT, 200.0, 30000, COUNT, sent), timeout=60)
        assert json.loads(sent.read_text())["sent"] == COUNT
        return self.received(sinks)

    def route_vips_to(self, mac: str) -> None:
        """The client's VIP routes via a next hop whose MAC is pinned to ``mac``."""
        for family in (4, 6):
            flag = f"-{family}"
            self.lab.run(
                "client",
                ["ip", flag, "neigh", "replace", NEXT_HOP[family], "lladdr", mac, "dev", "eth0", "nud", "permanent"],
            )
            prefix = "/32" if family == 4 else "/128"
            self.lab.run("client", ["ip", flag, "route", "replace", VIPS[family] + prefix, "via", NEXT_HOP[family]])


@pytest.fixture(scope="module")
def deployed(lab_available, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flood")
    with TwoBalancerLab(workdir=workdir / "lab") as lab:
        dep = Deployment(lab, workdir)
        for host in NODES:
            dep.apply(host)
        yield dep


def _received(counts: dict[str, list[int]]) -> list[int]:
    return sorted(seq for seqs in counts.values() for seq in seqs)


CASES = {
    # case: (destination MAC owner, ports with learning off, host whose capture must see the frames, expected)
    "lb1-flooded": ("lb1", ("lb1",), "lb2", list(range(COUNT))),
    "unknown-mac": (None, (), "lb1", []),
    "hub": ("lb1", ("client", "lb1", "lb2", "s1", "s2"), "lb2", list(range(COUNT))),
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", list(CASES))
def test_flooded_frames_are_forwarded_once_by_their_balancer_or_by_none(deployed, case, family):
    lab = deployed.lab
    owner, not_learning, witness, expected = CASES[case]
    mac = lab.mac(owner) if owner else UNOWNED_MAC
    deployed.route_vips_to(mac)
    for host in not_learning:
        lab.learning(host, False)
    try:
        proto = "ip" if family == 4 else "ip6"
        with lab.capture(witness, "eth0", f"ether dst {mac} and {proto} dst {VIPS[family]} and udp port {PORT}") as cap:
            counts = deployed.send_counted(family)
    finally:
        for host in not_learning:
            lab.learning(host, True)
    # The frames did reach a balancer they were not addressed to (else this proves nothing).
    assert len(cap.packets) == COUNT, f"{witness} saw {len(cap.packets)} of {COUNT} flooded frames"
    received = _received(counts)
    print(
        f"\n{case} v{family}: servers received {len(received)} of {COUNT} sent: "
        + ", ".join(f"{s} {len(v)}" for s, v in counts.items())
    )
    assert received == expected, (
        f"{case} v{family}: the servers received {len(received)} datagrams, expected {len(expected)}"
    )


unpack_release = releases.unpack_or_skip


def test_upgrade_from_a_table_without_the_check_is_one_in_place_transaction(deployed, tmp_path):
    """lb2 runs the table kdsr wrote before the check (RELEASE_WITHOUT_CHECK);
    the new kdsr plans in-place chain updates (the ingress chain gains the
    check; the selector chains' rules, whose comments named the pool's first
    service, now name the pool and look the server up in its servers map),
    the pools' servers maps (server id -> address, counted per element) and
    the slot maps made again as server-id maps, and nothing else; the plan's
    summary names each slot's server the same before and after; it applies them in one transaction while datagrams
    stream through lb2 (each arrives exactly once), and a second apply
    changes nothing."""
    lab = deployed.lab
    old = unpack_release(RELEASE_WITHOUT_CHECK, tmp_path / "old")
    where = lab.run("lb2", [PYTHON, "-c", "import kdsr; print(kdsr.__file__)"], cwd=old).stdout.strip()
    assert where.startswith(str(old)), f"the old release did not shadow this checkout: {where}"
    deployed.kdsr("lb2", "destroy", "--node", "lb2")
    deployed.apply("lb2", release=old)
    assert "pkttype" not in lab.run("lb2", ["nft", "list", "chain", "netdev", "kdsr", "ingress"]).stdout

    plan = deployed.kdsr("lb2", "plan", str(deployed.intent), "--node", "lb2")
    print(f"\nupgrade plan:\n{plan.stdout}")
    assert "~ nft chain netdev kdsr/ingress" in plan.stdout, plan.stdout
    # The old slot maps held addresses: the summary reads them as servers, so
    # no server is "removed" and "added" by the new shape.
    assert " removed " not in plan.stdout and "id " not in plan.stdout, plan.stdout
    assert " to destroy." in plan.stdout and ", 0 to destroy." in plan.stdout, plan.stdout
    as_json = deployed.kdsr("lb2", "plan", str(deployed.intent), "--node", "lb2", "--json").stdout
    changes = json.loads(as_json)["changes"]
    assert ("update", "nft chain", "netdev kdsr/ingress") in [(c["action"], c["kind"], c["id"]) for c in changes]
    for c in changes:
        name = c["id"].split("/", 1)[1]
        assert (
            (c["action"], c["kind"]) == ("update", "nft chain")
            or ((c["action"], c["kind"]) == ("create", "nft map") and name.startswith("servers-"))
            or ((c["action"], c["kind"]) == ("replace", "nft map") and name.startswith("pool-"))
        ), c

    deployed.route_vips_to(lab.mac("lb2"))
    rate, seconds = 400.0, 6.0
    sinks = deployed.sinks(VIPS[4], "upgrade")
    sent_path = deployed.workdir / "upgrade-sent.json"
    argv = deployed.sender(VIPS[4], int(rate * seconds), rate, 20000, 10000, sent_path)
    sender = lab.spawn("client", argv, tag="sender")
    time.sleep(1.5)
    monitor = lab.spawn("lb2", ["timeout", "60", "nft", "monitor"], tag="nft-monitor")
    time.sleep(0.3)
    try:
        applied = deployed.apply("lb2")
        time.sleep(0.3)
    finally:
        monitor.stop(signal.SIGTERM)
    events = [line for line in monitor.stdout().splitlines() if line.strip()]
    sender.popen.wait(timeout=60)
    sent = json.loads(sent_path.read_text())["sent"]
    received = _received(deployed.received(sinks))
    print(f"upgrade apply: {applied.stdout.strip().splitlines()[-1]}")
    print("nft monitor during the apply:\n" + "\n".join(events))
    print(f"datagrams: {sent} sent at {rate:g}/s, {len(received)} received")
    assert received == list(range(sent)), f"{sent} sent, {len(received)} received, {len(set(received))} distinct"
    # One transaction: the chains' old rules go and the new ones come, the
    # servers maps are added and the slot maps made again, nothing else.
    writes = [e for e in events if not e.startswith("#")]
    allowed = (
        "delete rule netdev kdsr ",
        "add rule netdev kdsr ",
        "delete set netdev kdsr pool-",  # (nft monitor says "set" for a map)
        "add map netdev kdsr pool-",
        "add element netdev kdsr pool-",
        "add map netdev kdsr servers-",
        "add element netdev kdsr servers-",
    )
    assert writes and all(e.startswith(allowed) for e in writes), events
    assert sum(e.startswith("# new generation") for e in events) == 1, events
    assert "meta pkttype != host accept" in lab.run("lb2", ["nft", "list", "chain", "netdev", "kdsr", "ingress"]).stdout
    assert "No changes" in deployed.apply("lb2").stdout
    # A write by someone else moves the ruleset generation, so kdsr's cached
    # read and receipt no longer count: this plan reads the table back from
    # the kernel and still finds the new rule equal to the compiled one.
    lab.run("lb2", ["nft", "add table inet scratch; delete table inet scratch"])
    plan = deployed.kdsr("lb2", "plan", str(deployed.intent), "--node", "lb2", "--detailed-exitcode", check=False)
    assert plan.returncode == 0 and "No changes" in plan.stdout, plan.stdout + plan.stderr
