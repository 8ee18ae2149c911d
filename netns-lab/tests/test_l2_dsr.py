"""L2 DSR on the host kernel, proven with real packets and the real CLI.

One lab for the module: client, lb, s1-s3 on a bridge.  Foreign state is put
in place first (an `inet filter` table and a foreign `netdev` table on the
LB's interface, a foreign address on a server's `lo`, foreign sysctl values);
kdsr applies examples/l2-web.json to every node; the tests send traffic and
look at headers; the last test destroys and compares the foreign state byte
for byte.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lab as netns_lab
import pytest

from kdsr.kernel import nft_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "l2-web.json"
VIP4, VIP4_MEDIA, VIP6 = "10.10.0.100", "10.10.0.101", "fd00:10::100"
NODES = {"lb": "lb1", "s1": "s1", "s2": "s2", "s3": "s3"}
FOREIGN_NFT = """
table inet filter {
    chain input { type filter hook input priority 0; policy accept; counter; }
}
table netdev guard {
    chain edge { type filter hook ingress device "eth0" priority 0; policy accept; counter; }
}
"""


class Deployment:
    def __init__(self, lab: netns_lab.L2Lab, state_dir: Path, workdir: Path):
        self.lab = lab
        self.state_dir = state_dir
        self.workdir = workdir
        self.before: dict[str, str] = {}

    def kdsr(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.state_dir), *args]
        result = self.lab.run(host, argv, check=False, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kdsr {' '.join(args)} in {host} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def snapshot(self, host: str) -> str:
        """Everything of a host's kernel state that kdsr could touch, as text."""
        # -s (stateless): counters of foreign rules move with traffic, their config must not.
        parts = [self.lab.run(host, ["nft", "-s", "list", "ruleset"]).stdout]
        parts.append(self.lab.run(host, ["ip", "-d", "addr", "show", "dev", "lo"]).stdout)
        for key in ("all", "eth0"):
            for name in ("arp_ignore", "arp_announce"):
                parts.append(self.lab.run(host, ["sysctl", f"net.ipv4.conf.{key}.{name}"]).stdout)
        return "\n".join(parts)

    def nft_events(self, host: str, action) -> str:
        """What `nft monitor` prints in `host` while `action()` runs."""
        mon = self.lab.spawn(host, ["timeout", "60", "nft", "monitor"], tag="nft-monitor")
        time.sleep(0.3)  # let the monitor subscribe before the action
        try:
            action()
            time.sleep(0.3)
        finally:
            mon.stop(signal.SIGTERM)
        return mon.stdout()


@pytest.fixture(scope="module")
def deployed(lab_available, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("l2dsr")
    with netns_lab.L2Lab(workdir=workdir / "lab") as lab:
        dep = Deployment(lab, workdir / "state", workdir)
        # Foreign state kdsr must leave alone.
        lab.run("lb", ["nft", "-f", "-"], input=FOREIGN_NFT)
        lab.run("s1", ["ip", "addr", "add", "192.0.2.77/32", "dev", "lo", "label", "lo:app"])
        lab.sysctl("s1", "net.ipv4.conf.all.arp_announce", 1)
        lab.sysctl("s2", "net.ipv4.conf.eth0.arp_ignore", 2)  # stricter than ours: max() keeps it
        for host in NODES:
            dep.before[host] = dep.snapshot(host)
        for server in lab.SERVERS:
            lab.start_responder(server, tcp_ports=[80, 443, 53], udp_ports="53,80,5000-5010")
        for host, node in NODES.items():
            dep.kdsr(host, "apply", str(EXAMPLE), "--node", node)
        yield dep


def _assert_flows(report, vip: str, min_servers: int = 2) -> None:
    assert report.all_ok, report.describe_failures()
    assert len(report.by_server()) >= min_servers, report.by_server()
    for flow in report.flows:
        assert flow.server_saw_dst == vip, flow  # the server got the VIP as destination
        assert flow.reply_src == vip, flow  # and answered from it
        assert flow.server_saw_peer.startswith(("10.10.0.50", "fd00:10::50")), flow  # no SNAT


def test_second_apply_changes_nothing(deployed):
    outputs = []
    events = deployed.nft_events(
        "lb", lambda: outputs.append(deployed.kdsr("lb", "apply", str(EXAMPLE), "--node", "lb1").stdout)
    )
    assert "No changes" in outputs[0]
    assert events.strip() == "", f"a no-op apply wrote to nftables:\n{events}"
    for server in ("s1", "s2", "s3"):
        assert "No changes" in deployed.kdsr(server, "apply", str(EXAMPLE), "--node", server).stdout
    plan = deployed.kdsr("lb", "plan", str(EXAMPLE), "--node", "lb1", "--detailed-exitcode")
    assert plan.returncode == 0


@pytest.mark.parametrize(("proto", "port"), [("tcp", 80), ("udp", 53)])
def test_200_flows(deployed, proto, port):
    lab = deployed.lab
    report = lab.probe(VIP4, proto, port, flows=200, first_sport=lab.next_sports(200))
    _assert_flows(report, VIP4)


def test_udp_port_range_service(deployed):
    lab = deployed.lab
    report = lab.probe(VIP4_MEDIA, "udp", 5007, flows=60, first_sport=lab.next_sports(60))
    _assert_flows(report, VIP4_MEDIA)


def test_port_outside_the_service_is_not_balanced(deployed):
    lab = deployed.lab
    report = lab.probe(VIP4_MEDIA, "udp", 5011, flows=3, first_sport=lab.next_sports(3), timeout=0.5)
    assert not any(f.ok for f in report.flows)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv6_flows(deployed, proto):
    lab = deployed.lab
    report = lab.probe(VIP6, proto, 80, flows=200, first_sport=lab.next_sports(200))
    _assert_flows(report, VIP6)


def test_headers_on_the_wire_and_no_reply_through_lb(deployed):
    lab = deployed.lab
    macs = {s: lab.mac(s) for s in lab.SERVERS}
    captures = {}
    with lab.capture("lb", "eth0", f"-p host {VIP4} or host {VIP6}") as lb_cap:
        with (
            lab.capture("s1", "eth0", f"dst host {VIP4} or dst host {VIP6}") as c1,
            lab.capture("s2", "eth0", f"dst host {VIP4} or dst host {VIP6}") as c2,
            lab.capture("s3", "eth0", f"dst host {VIP4} or dst host {VIP6}") as c3,
        ):
            captures = {"s1": c1, "s2": c2, "s3": c3}
            r4 = lab.probe(VIP4, "udp", 53, flows=60, first_sport=lab.next_sports(60))
            r6 = lab.probe(VIP6, "udp", 80, flows=60, first_sport=lab.next_sports(60))
    assert r4.all_ok and r6.all_ok
    seen = 0
    for server, cap in captures.items():
        for packet in cap.packets:
            if packet.family not in ("ipv4", "ipv6"):
                continue
            seen += 1
            assert packet.dst_mac == macs[server], (server, packet)  # delivered by MAC to this server
            assert packet.dst in (VIP4, VIP6), packet  # IP header unchanged
            assert packet.src in ("10.10.0.50", "fd00:10::50"), packet
    assert seen >= 120, f"servers captured {seen} requests, expected >= 120"
    replies_at_lb = [p for p in lb_cap.packets if p.src in (VIP4, VIP6)]
    requests_at_lb = [p for p in lb_cap.packets if p.dst in (VIP4, VIP6)]
    assert requests_at_lb, "the capture at the LB saw no requests: the test proves nothing"
    assert replies_at_lb == [], f"{len(replies_at_lb)} replies crossed the load balancer"


def test_same_flow_same_server(deployed):
    lab = deployed.lab
    first = lab.next_sports(50)
    a = lab.probe(VIP4, "udp", 53, flows=50, first_sport=first)
    b = lab.probe(VIP4, "udp", 53, flows=50, first_sport=first)
    assert a.all_ok and b.all_ok
    assert a.server_by_sport() == b.server_by_sport()


def _neighbour_answers(lab, vip: str, family: str) -> bool:
    """Route the VIP on-link from the client and see whether anyone answers ARP/ND for it."""
    flag = "-6" if family == "6" else "-4"
    prefix = "/128" if family == "6" else "/32"
    lab.run("client", ["ip", flag, "route", "replace", vip + prefix, "dev", "eth0"])
    try:
        lab.run("client", ["ping", flag, "-c", "2", "-W", "1", vip], check=False, timeout=10)
        neigh = lab.run("client", ["ip", flag, "neigh", "show", vip]).stdout
        return "lladdr" in neigh
    finally:
        lab.run("client", ["ip", flag, "neigh", "flush", "to", vip], check=False)
        via = "10.10.0.2" if family == "4" else "fd00:10::2"
        lab.run("client", ["ip", flag, "route", "replace", vip + prefix, "via", via])


def test_servers_stay_silent_about_the_vip(deployed):
    lab = deployed.lab
    assert not _neighbour_answers(lab, VIP4, "4"), "a server answered ARP for the VIP (ARP flux)"
    assert not _neighbour_answers(lab, VIP6, "6"), "a server answered neighbour discovery for the VIP"


def test_show_counts_packets(deployed):
    lab = deployed.lab
    lab.probe(VIP4, "tcp", 443, flows=10, first_sport=lab.next_sports(10))
    report = json.loads(deployed.kdsr("lb", "show", "--json").stdout)["kernel"]
    https = [s for s in report["services"] if s["vip"] == VIP4 and s["protocol"] == "tcp" and s["port"] == "443"]
    assert https and https[0]["packets"] >= 10
    assert sum(s["packets"] for s in report["servers"]) > 0
    server_report = json.loads(deployed.kdsr("s1", "show", "--json", "--node", "s1").stdout)["kernel"]
    assert {a["address"] for a in server_report["addresses"]} >= {"10.10.0.100/32", "fd00:10::100/128"}


def test_weight_change_is_an_element_diff(deployed):
    doc = json.loads(EXAMPLE.read_text())
    doc["pools"]["web"]["servers"][0]["weight"] = 3
    changed = deployed.workdir / "heavier.json"
    changed.write_text(json.dumps(doc))
    plan = json.loads(deployed.kdsr("lb", "plan", str(changed), "--node", "lb1", "--json").stdout)
    kinds = {c["kind"] for c in plan["changes"]}
    assert kinds == {"nft element"}, kinds
    assert 0 < len(plan["changes"]) < 4093  # fewer than the table's slots
    lab = deployed.lab
    first = lab.next_sports(100)
    events = deployed.nft_events("lb", lambda: deployed.kdsr("lb", "apply", str(changed), "--node", "lb1"))
    lines = [line for line in events.splitlines() if line.strip() and not line.startswith("#")]
    assert lines, "nft monitor saw nothing: the no-op check above would prove nothing either"
    assert all(line.startswith(("add element", "delete element")) for line in lines), lines[:5]
    heavy = lab.probe(VIP4, "udp", 53, flows=100, first_sport=first)
    assert heavy.all_ok
    counts = heavy.by_server()
    assert counts.get("s1", 0) > max(counts.get("s2", 0), counts.get("s3", 0)), counts
    deployed.kdsr("lb", "apply", str(EXAMPLE), "--node", "lb1")
    assert "No changes" in deployed.kdsr("lb", "plan", str(EXAMPLE), "--node", "lb1").stdout


def test_bad_intent_changes_nothing(deployed):
    doc = json.loads(EXAMPLE.read_text())
    doc["services"]["web"]["ports"] = [0]
    doc["services"]["dns"]["vip"] = "10.10.0.11"  # equal to a server address
    bad = deployed.workdir / "bad.json"
    bad.write_text(json.dumps(doc))
    before = deployed.snapshot("lb")
    result = deployed.kdsr("lb", "apply", str(bad), "--node", "lb1", check=False)
    assert result.returncode == 3, result.stderr
    assert "/services/web/ports/0" in result.stderr and "/services/dns/vip" in result.stderr
    assert deployed.snapshot("lb") == before


def _plan_exit(deployed, host: str) -> tuple[int, str]:
    result = deployed.kdsr(host, "plan", str(EXAMPLE), "--node", NODES[host], "--detailed-exitcode", check=False)
    return result.returncode, result.stdout + result.stderr


def test_drift_is_planned_exactly_and_repaired_foreign_state_untouched(deployed):
    """Someone flushes the LB's ruleset, resets a server's sysctl and removes
    a server's VIP: `plan --detailed-exitcode` exits 2 and names exactly
    that, `apply` restores it, and the next plan is empty (exit 0)."""
    lab = deployed.lab
    drifts = {
        "lb": (["nft", "flush", "ruleset"], "+ nft table netdev kdsr", "Plan: 12 to add, 0 to change"),
        "s1": (["sysctl", "-w", "net.ipv4.conf.eth0.arp_ignore=0"], "net.ipv4.conf.eth0.arp_ignore", "1 to change"),
        "s2": (["ip", "addr", "del", f"{VIP4}/32", "dev", "lo"], f"{VIP4}/32", "Plan: 1 to add, 0 to change"),
    }
    for host, (command, names, summary) in drifts.items():
        assert _plan_exit(deployed, host)[0] == 0
        lab.run(host, command)
        try:
            code, text = _plan_exit(deployed, host)
        finally:
            if host == "lb":
                # The flush took the foreign tables too; they are not kdsr's
                # to restore.  Their owner puts them back (before kdsr, so the
                # listing order matches the snapshot the destroy test compares).
                lab.run("lb", ["nft", "-f", "-"], input=FOREIGN_NFT)
        assert code == 2 and names in text and summary in text and "to destroy" in text, text
        assert "guard" not in text and "inet filter" not in text, text
        deployed.kdsr(host, "apply", str(EXAMPLE), "--node", NODES[host])
        code, text = _plan_exit(deployed, host)
        assert code == 0, text
    # The foreign address on s1's lo and the foreign sysctls survived the repairs.
    assert "192.0.2.77" in lab.run("s1", ["ip", "addr", "show", "dev", "lo"]).stdout
    assert lab.run("s2", ["sysctl", "-n", "net.ipv4.conf.eth0.arp_ignore"]).stdout.strip() == "2"
    report = lab.probe(VIP4, "tcp", 80, flows=30, first_sport=lab.next_sports(30))
    _assert_flows(report, VIP4, min_servers=3)


def test_a_saved_plan_is_refused_once_the_kernel_drifts(deployed):
    """`plan --out` then `apply --plan-file`: on the lb the reviewed weight
    change goes in as saved; on s1 a sysctl reset after the review makes the
    saved plan stale (exit 10, the drift named, nothing written), and a plan
    saved again applies and converges."""
    lab = deployed.lab
    doc = json.loads(EXAMPLE.read_text())
    doc["pools"]["web"]["servers"][1]["weight"] = 2
    doc["services"]["extra"] = {"vip": "10.10.0.120", "ports": 80, "protocols": "tcp", "pool": "web"}
    changed = deployed.workdir / "reviewed.json"
    changed.write_text(json.dumps(doc))
    lb_plan, s1_plan = deployed.workdir / "lb1.plan", deployed.workdir / "s1.plan"
    deployed.kdsr("lb", "plan", str(changed), "--node", "lb1", "--out", str(lb_plan))
    deployed.kdsr("s1", "plan", str(changed), "--node", "s1", "--out", str(s1_plan))
    changed.write_text(EXAMPLE.read_text())  # an edit after the review: the saved plans carry their intent

    deployed.kdsr("lb", "apply", "--plan-file", str(lb_plan))
    assert _plan_exit(deployed, "lb")[0] == 2  # the lb runs the reviewed intent, not the edited file
    assert "10.10.0.120" in lab.run("lb", ["nft", "list", "table", "netdev", "kdsr"]).stdout

    lab.run("s1", ["sysctl", "-w", "net.ipv4.conf.all.arp_ignore=0"])
    before = deployed.snapshot("s1")
    stale = deployed.kdsr("s1", "apply", "--plan-file", str(s1_plan), check=False)
    assert stale.returncode == 10, stale.stdout + stale.stderr
    assert "is stale" in stale.stderr and "sysctl net.ipv4.conf.all.arp_ignore" in stale.stderr, stale.stderr
    assert deployed.snapshot("s1") == before  # nothing written

    again = deployed.workdir / "reviewed-again.json"
    again.write_text(json.dumps(doc))
    deployed.kdsr("s1", "plan", str(again), "--node", "s1", "--out", str(s1_plan))
    deployed.kdsr("s1", "apply", "--plan-file", str(s1_plan))
    assert lab.run("s1", ["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]).stdout.strip() == "1"
    lab.run("client", ["ip", "route", "add", "10.10.0.120/32", "via", "10.10.0.2"])
    try:
        # Only s1 holds the new VIP so far: its share of the flows is answered, by s1.
        report = lab.probe("10.10.0.120", "tcp", 80, flows=30, first_sport=lab.next_sports(30), timeout=0.5)
    finally:
        lab.run("client", ["ip", "route", "del", "10.10.0.120/32"])
    assert set(report.by_server()) == {"s1"}, report.by_server()
    for host in ("lb", "s1"):
        deployed.kdsr(host, "apply", str(EXAMPLE), "--node", NODES[host])
        assert _plan_exit(deployed, host)[0] == 0


def test_golden_batches_are_accepted_by_the_kernel(deployed):
    """Every golden nft batch passes the real kernel's check (libnftables dry run)."""
    for path in sorted((ROOT / "tests" / "golden").glob("*/*.nft.json")):
        doc = json.loads(path.read_text())
        ifname = next(
            c["add"]["chain"]["dev"]
            for c in doc["nftables"]
            if "chain" in c.get("add", {}) and "dev" in c["add"]["chain"]
        )
        lab = deployed.lab
        lab.run("client", ["ip", "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p"], check=False)
        try:
            commands = doc["nftables"]
            if nft_text.needs_text(commands):
                # Flow pinning's map statements have no JSON form in
                # libnftables before 1.0.9: kdsr sends such a batch as text.
                result = lab.run("client", ["nft", "-c", "-f", "-"], input=nft_text.render(commands), check=False)
            else:
                result = lab.run("client", ["nft", "-c", "-j", "-f", "-"], input=path.read_text(), check=False)
            assert result.returncode == 0, f"{path}: {result.stderr}"
        finally:
            lab.run("client", ["ip", "link", "del", ifname], check=False)


def test_destroy_restores_foreign_state_byte_for_byte(deployed):
    for host, node in NODES.items():
        deployed.kdsr(host, "destroy", "--node", node)
    for host in NODES:
        assert deployed.snapshot(host) == deployed.before[host], f"{host} differs after destroy"
    # And traffic to the VIP is no longer balanced.
    lab = deployed.lab
    report = lab.probe(VIP4, "udp", 53, flows=3, first_sport=lab.next_sports(3), timeout=0.5)
    assert not any(f.ok for f in report.flows)
