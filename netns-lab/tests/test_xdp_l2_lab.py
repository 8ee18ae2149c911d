"""The xdp engine's L2 DSR on the host kernel, with real packets and the real CLI.

client, lb, s1-s3 on a bridge (lab.L2Lab); examples/l2-web.json with every
service on `"engine": "xdp"` and the servers' MACs pinned.  kdsr's XDP
program runs natively on the LB's veth.  A frame it sends back out with
XDP_TX reaches the bridge only if the veth's peer runs an XDP program of its
own (veth_xdp_xmit drops it otherwise), so the lab attaches a plain XDP_PASS
program (bpf/xdp_pass.c) to the LB's port on the bridge: a lab artefact, not
something a balancer with a hardware NIC needs.  Likewise the client's veth
sends with its checksum offloaded, a promise XDP_TX loses: the lab turns
that offload off (netns-lab/txcsum.py).
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lab as netns_lab
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "l2-web.json"
PASS_OBJECT = ROOT / "build" / "xdp_pass.o"
VIP4, VIP4_MEDIA, VIP6 = "10.10.0.100", "10.10.0.101", "fd00:10::100"
NODES = {"lb": "lb1", "s1": "s1", "s2": "s2", "s3": "s3"}


def _intent(
    lab, engine: str, weights: dict[str, int] | None = None, pin_macs: bool = True, fields: str | None = None
) -> dict:
    doc = json.loads(EXAMPLE.read_text())
    doc = copy.deepcopy(doc)
    for service in doc["services"].values():
        service["dsr"] = {**service.get("dsr", {}), "mode": "l2", "engine": engine}
        if fields:
            service["hashing"] = {**service.get("hashing", {}), "fields": fields}
    for pool in doc["pools"].values():
        for member in pool["servers"]:
            if pin_macs:
                member["mac"] = lab.mac(member["node"])
            if weights and member["node"] in weights:
                member["weight"] = weights[member["node"]]
    return doc


class Deployment:
    def __init__(self, lab: netns_lab.L2Lab, workdir: Path):
        self.lab = lab
        self.state_dir = workdir / "state"
        self.workdir = workdir

    def write(self, name: str, doc: dict) -> Path:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(doc))
        return path

    def kdsr(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.state_dir), *args]
        result = self.lab.run(host, argv, check=False, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kdsr {' '.join(args)} in {host} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def xdp_on(self, host: str, ifname: str = "eth0") -> list[dict]:
        out = self.lab.run(host, ["bpftool", "-j", "net", "show", "dev", ifname]).stdout
        return json.loads(out)[0]["xdp"]


def _needs_bpf() -> str | None:
    for tool in ("bpftool", "clang"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode != 0:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    if not (ROOT / "build" / "kdsr_xdp.o").exists() or not PASS_OBJECT.exists():
        built = subprocess.run(["make", "-s", "bpf"], cwd=ROOT, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            return f"make bpf failed: {built.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def deployed(lab_available, tmp_path_factory):
    reason = _needs_bpf()
    if reason:
        pytest.fail(reason)
    workdir = tmp_path_factory.mktemp("xdpl2")
    with netns_lab.L2Lab(workdir=workdir / "lab") as lab:
        dep = Deployment(lab, workdir)
        lab.run(lab.SWITCH, ["ip", "link", "set", "dev", "plb", "xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp"])
        # The client's checksums must be finished on the wire (netns-lab/txcsum.py says why).
        lab.run("client", [sys.executable, str(ROOT / "netns-lab" / "txcsum.py"), "eth0"])
        for server in lab.SERVERS:
            lab.start_responder(server, tcp_ports=[80, 443, 53], udp_ports="53,80,5000-5010")
        intent = dep.write("xdp", _intent(lab, "xdp"))
        for host, node in NODES.items():
            dep.kdsr(host, "apply", str(intent), "--node", node)
        dep.intent = intent
        yield dep


def _assert_flows(report, vip: str, min_servers: int = 2) -> None:
    assert report.all_ok, report.describe_failures()
    assert len(report.by_server()) >= min_servers, report.by_server()
    for flow in report.flows:
        assert flow.server_saw_dst == vip, flow  # the server got the VIP as destination
        assert flow.reply_src == vip, flow  # and answered from it
        assert flow.server_saw_peer.startswith(("10.10.0.50", "fd00:10::50")), flow


def test_program_attached_natively(deployed):
    (prog,) = deployed.xdp_on("lb")
    assert prog["mode"] == "driver"
    name = json.loads(deployed.lab.run("lb", ["bpftool", "-j", "prog", "show", "id", str(prog["id"])]).stdout)["name"]
    assert name == "kdsr_xdp"


def test_second_apply_changes_nothing(deployed):
    out = deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1").stdout
    assert "No changes" in out
    plan = deployed.kdsr("lb", "plan", str(deployed.intent), "--node", "lb1", "--detailed-exitcode", check=False)
    assert plan.returncode == 0, plan.stdout


@pytest.mark.parametrize(
    ("vip", "proto", "port"),
    [(VIP4, "tcp", 80), (VIP4, "udp", 53), (VIP6, "tcp", 80), (VIP6, "udp", 80), (VIP4_MEDIA, "udp", 5007)],
)
def test_flows(deployed, vip, proto, port):
    lab = deployed.lab
    report = lab.probe(vip, proto, port, flows=100, first_sport=lab.next_sports(100))
    _assert_flows(report, vip)


def test_headers_on_the_wire_and_no_reply_through_lb(deployed):
    lab = deployed.lab
    macs = {s: lab.mac(s) for s in lab.SERVERS}
    with lab.capture("lb", "eth0", f"-p host {VIP4} or host {VIP6}") as lb_cap:
        with (
            lab.capture("s1", "eth0", f"dst host {VIP4} or dst host {VIP6}") as c1,
            lab.capture("s2", "eth0", f"dst host {VIP4} or dst host {VIP6}") as c2,
            lab.capture("s3", "eth0", f"dst host {VIP4} or dst host {VIP6}") as c3,
        ):
            r4 = lab.probe(VIP4, "udp", 53, flows=60, first_sport=lab.next_sports(60))
            r6 = lab.probe(VIP6, "udp", 80, flows=60, first_sport=lab.next_sports(60))
    assert r4.all_ok and r6.all_ok
    seen = 0
    for server, cap in {"s1": c1, "s2": c2, "s3": c3}.items():
        for packet in cap.packets:
            if packet.family not in ("ipv4", "ipv6"):
                continue
            seen += 1
            assert packet.dst_mac == macs[server], (server, packet)
            assert packet.src_mac == lab.mac("lb"), (server, packet)  # rewritten by the balancer
            assert packet.dst in (VIP4, VIP6), packet
    assert seen >= 120, f"servers captured {seen} requests, expected >= 120"
    # XDP sees frames before the capture tap: the LB's own capture shows neither
    # the requests it bounced nor any reply; a reply through the LB would be
    # received by the stack and shown.
    replies_at_lb = [p for p in lb_cap.packets if p.src in (VIP4, VIP6)]
    assert replies_at_lb == [], f"{len(replies_at_lb)} replies crossed the load balancer"


def test_show_reads_the_counters(deployed):
    lab = deployed.lab

    def counts() -> tuple[int, int, dict]:
        document = json.loads(deployed.kdsr("lb", "show", "--node", "lb1", "--json").stdout)
        report = document["kernel"]
        # The operator's view (a line per service) is built from the program's rows too.
        assert document["services"] and all(s["servers"] for s in document["services"]), document["services"]
        service = next(
            s
            for s in report["services"]
            if s.get("engine") == "xdp" and (s["vip"], s["port"]) == (VIP4, "53") and s["protocol"] == "udp"
        )
        servers = sum(s["packets"] for s in report["servers"] if s.get("engine") == "xdp" and "." in s["server"])
        return service["packets"], servers, report["xdp"][0]

    service_before, servers_before, _ = counts()
    report = lab.probe(VIP4, "udp", 53, flows=30, first_sport=lab.next_sports(30))
    assert report.all_ok
    service_after, servers_after, program = counts()
    assert service_after - service_before >= 30
    assert servers_after - servers_before >= 30
    assert program["mode"] == "driver"
    assert "xdp program kdsr_xdp on eth0 (driver)" in deployed.kdsr("lb", "show", "--node", "lb1").stdout


def test_servers_without_pinned_macs(deployed):
    """No MAC in the intent: bpf_fib_lookup() finds it in the neighbour table,
    where kdsr keeps a managed entry per server; forwarding goes on for the
    helper (and back off when no pool needs it)."""
    lab = deployed.lab
    unpinned = deployed.write("unpinned", _intent(lab, "xdp", pin_macs=False))
    deployed.kdsr("lb", "apply", str(unpinned), "--node", "lb1")
    neighbours = json.loads(lab.run("lb", ["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout)
    managed = {n["dst"] for n in neighbours if "managed" in n}
    assert managed == {"10.10.0.11", "10.10.0.12", "10.10.0.13", "fd00:10::11", "fd00:10::12", "fd00:10::13"}
    assert lab.run("lb", ["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"]).stdout.strip() == "1"
    for vip, proto, port in ((VIP4, "udp", 53), (VIP6, "tcp", 80)):
        report = lab.probe(vip, proto, port, flows=60, first_sport=lab.next_sports(60))
        _assert_flows(report, vip)
    assert "No changes" in deployed.kdsr("lb", "apply", str(unpinned), "--node", "lb1").stdout
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")
    neighbours = json.loads(lab.run("lb", ["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout)
    assert not [n for n in neighbours if "managed" in n]
    assert lab.run("lb", ["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"]).stdout.strip() == "0"


def test_drain_and_weight_change(deployed):
    lab = deployed.lab
    drained = deployed.write("drained", _intent(lab, "xdp", {"s3": 0}))
    deployed.kdsr("lb", "apply", str(drained), "--node", "lb1")
    report = lab.probe(VIP4, "udp", 53, flows=90, first_sport=lab.next_sports(90))
    assert report.all_ok, report.describe_failures()
    assert "s3" not in report.by_server(), report.by_server()
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")
    # `kdsr drain` / `undrain`: the same table change, recorded as the operator's
    deployed.kdsr("lb", "drain", str(deployed.intent), "s2", "--node", "lb1")
    report = lab.probe(VIP4, "udp", 53, flows=90, first_sport=lab.next_sports(90))
    assert report.all_ok, report.describe_failures()
    assert "s2" not in report.by_server(), report.by_server()
    deployed.kdsr("lb", "undrain", str(deployed.intent), "s2", "--node", "lb1")
    report = lab.probe(VIP4, "udp", 53, flows=90, first_sport=lab.next_sports(90))
    assert "s2" in report.by_server(), report.by_server()
    heavy = deployed.write("heavy", _intent(lab, "xdp", {"s1": 4}))
    deployed.kdsr("lb", "apply", str(heavy), "--node", "lb1")
    report = lab.probe(VIP4, "udp", 53, flows=150, first_sport=lab.next_sports(150))
    assert report.all_ok, report.describe_failures()
    shares = report.by_server()
    assert shares.get("s1", 0) > shares.get("s2", 0) and shares.get("s1", 0) > shares.get("s3", 0), shares
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")


REAPPLIES = 100


def _xdp_counts(deployed) -> tuple[int, int, dict]:
    """(packets the program took for tcp VIP4:80, packets it sent to v4 servers, its events)."""
    report = json.loads(deployed.kdsr("lb", "show", "--node", "lb1", "--json").stdout)["kernel"]
    service = sum(
        s["packets"]
        for s in report["services"]
        if s.get("engine") == "xdp" and (s["vip"], s["protocol"], s["port"]) == (VIP4, "tcp", "80")
    )
    rows = [s for s in report["servers"] if s.get("engine") == "xdp" and "." in s["server"]]
    return service, sum({s["server"]: s["packets"] for s in rows}.values()), report["xdp"][0]["events"]


def test_no_flow_lost_across_table_flips(deployed, tmp_path):
    """A new TCP flow every 50 ms while the LB's table is changed REAPPLIES
    times (drain s3, weight 2 on s1, back: every apply a table flip): the
    program sends every packet it takes for the VIP to a server (its own
    counters: service packets == server packets, no drop for want of a
    server), and the flows are answered.  A flow's timeout is below TCP's
    first SYN retransmission (1 s), so a SYN lost in a flip fails its flow
    with a timeout; on this shared machine a starved client can time out
    too, so a few timeouts are tolerated only while the program's counters
    show it lost nothing.  A flow whose slot changes server between its SYN
    and its data is reset by the new server (delivered, not lost):
    stateless balancing without flow pinning moves it, as the nft engine
    does; those are counted and must stay rare."""
    lab = deployed.lab
    variants = [
        deployed.write("flip-drain", _intent(lab, "xdp", {"s3": 0})),
        deployed.write("flip-weight", _intent(lab, "xdp", {"s1": 2})),
        deployed.intent,
    ]
    every, seconds = 0.1, 499.0  # at most (flowstream's 5,000 flows); stopped once the applies are done
    service_before, servers_before, events_before = _xdp_counts(deployed)
    out = tmp_path / "flows.jsonl"
    argv = [sys.executable, str(ROOT / "netns-lab" / "flowstream.py"), "--vip", VIP4, "--port", "80"]
    argv += ["--every", str(every), "--seconds", str(seconds), "--timeout", "0.9", "--out", str(out)]
    argv += ["--first-sport", str(lab.next_sports(int(seconds / every) + 1))]
    stream = lab.spawn("client", argv, tag="flowstream", ready_marker="READY", ready_timeout=60)
    began = time.time()
    applied = 0
    while applied < REAPPLIES and time.time() - began < seconds - 10:
        deployed.kdsr("lb", "apply", str(variants[applied % len(variants)]), "--node", "lb1")
        applied += 1
    ended = time.time()
    time.sleep(2)
    stream.stop(signal.SIGINT)  # flowstream closes its file on the way out
    # back to every server in the table, so `show` lists all three (a
    # drained server has no slot, hence no row); counters survive changes
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")
    service_after, servers_after, events_after = _xdp_counts(deployed)
    flows = [json.loads(line) for line in out.read_text().splitlines()]
    during = [f for f in flows if began <= f["t"] <= ended]
    failed = [f for f in flows if not f["ok"] and "reset" not in (f["error"] or "").lower()]
    moved = [f for f in flows if not f["ok"] and "reset" in (f["error"] or "").lower()]
    print(
        f"\n{applied} applies in {ended - began:.1f} s, {len(flows)} flows, {len(during)} during the applies, "
        f"{len(moved)} reset after moving mid-connection"
    )
    assert len(moved) * 50 <= len(flows), moved
    assert applied == REAPPLIES, f"only {applied} applies fitted in the stream"
    assert len(during) > 100
    took, sent = service_after - service_before, servers_after - servers_before
    print(f"the program took {took} packets for {VIP4}:80 and sent {sent} to servers; {len(failed)} flows timed out")
    assert took > len(flows) and took == sent
    for event in ("no_server", "no_neighbour"):
        assert events_after[event] == events_before[event], (event, events_before, events_after)
    assert len(failed) * 100 <= len(flows), f"{len(failed)} of {len(flows)} flows failed, {failed[:3]}"
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")


def _picks_per_engine(
    deployed, name: str, probes, fields: str | None = None, ipv6_ext: str = "", spread: bool = False
) -> dict:
    """One intent on the xdp engine, then on the nft engine; per engine, the
    server each flow of ``probes`` (vip, proto, port, flows, first sport)
    reached, every flow answered (``spread``: from the VIP, over 2+ servers)."""
    lab = deployed.lab
    picks: dict[str, dict] = {}
    for engine in ("xdp", "nft"):
        path = deployed.write(f"{name}-{engine}", _intent(lab, engine, fields=fields))
        deployed.kdsr("lb", "apply", str(path), "--node", "lb1")
        for vip, proto, port, count, first in probes:
            report = lab.probe(vip, proto, port, flows=count, first_sport=first, ipv6_ext=ipv6_ext)
            assert report.all_ok, (engine, report.describe_failures())
            if spread:
                _assert_flows(report, vip)
            picks.setdefault(engine, {}).update({(vip, proto, k): v for k, v in report.server_by_sport().items()})
    return picks


def test_xdp_and_nft_choose_the_same_server(deployed):
    """One intent on the xdp engine, then on the nft engine: every flow to the same server."""
    first = deployed.lab.next_sports(300)
    probes = [(VIP4, "udp", 53, 100, first), (VIP4, "tcp", 80, 100, first + 100), (VIP6, "udp", 80, 100, first + 200)]
    picks = _picks_per_engine(deployed, "same", probes)
    assert deployed.xdp_on("lb") == []  # switching engines took kdsr's program away
    assert picks["xdp"] == picks["nft"]
    assert len(set(picks["xdp"].values())) == 3
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")
    assert "No changes" in deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1").stdout


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_ipv6_extension_headers_are_balanced_like_nft(deployed, proto):
    """IPv6 flows whose every packet carries a hop-by-hop and a destination
    options header: the program walks them as nft does (``meta l4proto``,
    ``th dport``), so each flow is answered, through the xdp engine, by the
    server nft's table gives it."""
    probes = [(VIP6, proto, 80, 60, deployed.lab.next_sports(60))]
    picks = _picks_per_engine(deployed, "ext", probes, ipv6_ext="hop,dst", spread=True)
    assert picks["xdp"] == picks["nft"]
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")


@pytest.mark.parametrize("fields", ["five-tuple", "source-ip"])
def test_xdp_and_nft_agree_on_other_hash_fields(deployed, fields):
    """nft's jhash over five fields (address, address, l4proto, port, port:
    each in its own register) and over the source address alone, computed
    by the program: the same server, flow by flow, IPv4 and IPv6."""
    first = deployed.lab.next_sports(120)
    probes = [(VIP4, "udp", 53, 60, first), (VIP6, "tcp", 80, 60, first + 60)]
    picks = _picks_per_engine(deployed, fields, probes, fields=fields)
    assert picks["xdp"] == picks["nft"]
    if fields == "five-tuple":
        assert len(set(picks["xdp"].values())) == 3
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1")


METRICS = "127.0.0.1:9469"


def test_kdsr_run_metrics_count_the_programs_traffic(deployed):
    """`kdsr run --metrics` on the balancer: the program's counters under the
    nft engine's metric names and labels, growing with real traffic."""
    from prometheus_client.parser import text_string_to_metric_families

    lab = deployed.lab
    argv = [sys.executable, "-m", "kdsr", "--state-dir", str(deployed.state_dir), "run", str(deployed.intent)]
    daemon = lab.spawn("lb", argv + ["--node", "lb1", "--metrics", METRICS], tag="kdsr-run")
    code = (
        f"import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics', timeout=10).read().decode())"
    )

    def scrape() -> dict[tuple[str, frozenset], float]:
        text = lab.run("lb", [sys.executable, "-c", code], timeout=30).stdout
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def total(samples, name: str, **labels: str) -> float:
        return sum(v for (n, lab_), v in samples.items() if n == name and dict(lab_).items() >= labels.items())

    try:
        deadline = time.monotonic() + 60
        while "event=metrics" not in daemon.stderr() and time.monotonic() < deadline:
            assert daemon.running(), daemon.stderr()
            time.sleep(0.1)
        assert "event=metrics" in daemon.stderr(), daemon.stderr()
        dns = {"service": "dns", "vip": VIP4, "protocol": "udp", "port": "53"}
        before = scrape()
        report = lab.probe(VIP4, "udp", 53, flows=30, first_sport=lab.next_sports(30))
        assert report.all_ok, report.describe_failures()
        # A scrape serves a read at most metrics.KERNEL_FRESH old (or, were
        # reads slow, the last one): the traffic shows within a few.
        for _ in range(20):
            time.sleep(0.5)
            after = scrape()
            grown = total(after, "kdsr_service_packets_total", **dns) - total(
                before, "kdsr_service_packets_total", **dns
            )
            if grown >= 30:
                break
        assert grown >= 30, (grown, after.get(("kdsr_kernel_read_duration_seconds", frozenset())))
        assert after[("kdsr_kernel_read_errors_total", frozenset())] == 0
        print(f"\nkernel read for the metrics: {after[('kdsr_kernel_read_duration_seconds', frozenset())]:.3f} s")
        servers = {dict(labels)["server_node"] for (n, labels) in after if n == "kdsr_server_packets_total"}
        assert {"s1", "s2", "s3"} <= servers, servers
        assert {frozenset(dict(labels)) for (n, labels) in after if n == "kdsr_server_packets_total"} == {
            frozenset({"pool", "server", "server_node"})
        }
        sent = total(after, "kdsr_server_packets_total", pool="web") - total(
            before, "kdsr_server_packets_total", pool="web"
        )
        assert sent >= 30, sent
        assert total(after, "kdsr_server_bytes_total", pool="web") > total(
            before, "kdsr_server_bytes_total", pool="web"
        )
    finally:
        daemon.stop(signal.SIGTERM)
    assert "No changes" in deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1").stdout


def test_foreign_program_refused_and_destroy_leaves_nothing(deployed):
    lab = deployed.lab
    deployed.kdsr("lb", "destroy", "--node", "lb1")
    assert deployed.xdp_on("lb") == []
    maps = json.loads(lab.run("lb", ["bpftool", "-j", "map", "show"]).stdout)
    ours = {"services", "ranges", "selectors", "slots", "servers", "server_stats", "service_stats"}
    # bpftool lists every map of the host (BPF objects are not per namespace):
    # none of kdsr's may be left with no program holding it.
    progs = json.loads(lab.run("lb", ["bpftool", "-j", "prog", "show"]).stdout)
    held = {m for p in progs for m in p.get("map_ids", [])}
    assert not [m for m in maps if m.get("name") in ours and m["id"] not in held]
    # a foreign XDP program on the interface: apply refuses (exit 8) and leaves it
    lab.run("lb", ["ip", "link", "set", "dev", "eth0", "xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp"])
    result = deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1", check=False)
    assert result.returncode == 8, result.stdout + result.stderr
    assert "xdp_pass" in result.stdout + result.stderr
    (prog,) = deployed.xdp_on("lb")
    name = json.loads(lab.run("lb", ["bpftool", "-j", "prog", "show", "id", str(prog["id"])]).stdout)["name"]
    assert name == "xdp_pass"
    # --adopt replaces it
    deployed.kdsr("lb", "apply", str(deployed.intent), "--node", "lb1", "--adopt")
    report = lab.probe(VIP4, "udp", 53, flows=30, first_sport=lab.next_sports(30))
    assert report.all_ok, report.describe_failures()
    deployed.kdsr("lb", "destroy", "--node", "lb1")
    assert deployed.xdp_on("lb") == []


def _kdsr_maps(deployed) -> dict[str, int]:
    """Map name -> id of the program on the LB's eth0, as bpftool sees them."""
    (prog,) = deployed.xdp_on("lb")
    info = json.loads(deployed.lab.run("lb", ["bpftool", "-j", "prog", "show", "id", str(prog["id"])]).stdout)
    maps = {}
    for map_id in info["map_ids"]:
        shown = json.loads(deployed.lab.run("lb", ["bpftool", "-j", "map", "show", "id", str(map_id)]).stdout)
        maps[shown["name"]] = map_id
    return maps


def _hex(raw: bytes) -> list[str]:
    """bpftool's `hex` data: one argument per byte."""
    return [f"{b:02x}" for b in raw]


def _bpf_lookup(deployed, map_id: int, key: bytes) -> bytes | None:
    argv = ["bpftool", "-j", "map", "lookup", "id", str(map_id), "key", "hex", *_hex(key)]
    found = deployed.lab.run("lb", argv, check=False)
    if found.returncode != 0:
        return None
    return bytes(int(b, 16) for b in json.loads(found.stdout)["value"])


def test_kdsr_run_repairs_hand_edits_of_its_maps(deployed):
    """`kdsr run` keeps what it decoded of the maps from one read to the
    next: a hand edit between two drift checks (a services element deleted,
    one slot of an active table overwritten, both with bpftool) must still
    be found and repaired, and the flows reach every server again."""
    import struct

    lab = deployed.lab
    argv = [sys.executable, "-m", "kdsr", "--state-dir", str(deployed.state_dir), "run", str(deployed.intent)]
    daemon = lab.spawn("lb", argv + ["--node", "lb1", "--check-interval", "1"], tag="kdsr-run-drift")

    def wait_log(text: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while daemon.stderr().count(text) < count and time.monotonic() < deadline:
            assert daemon.running(), daemon.stderr()
            time.sleep(0.2)
        assert daemon.stderr().count(text) >= count, daemon.stderr()

    try:
        wait_log("event=started", 1)
        time.sleep(3)  # a few drift checks with nothing to find: the daemon's decoding is warm
        assert "event=drift-repaired" not in daemon.stderr(), daemon.stderr()
        maps = _kdsr_maps(deployed)
        # struct svc_key (bpf/kdsr_xdp.c): address (16 bytes), family, protocol, port
        service = struct.pack("<16sBBH", bytes([10, 10, 0, 100]), 4, 6, 80)
        assert _bpf_lookup(deployed, maps["services"], service) is not None
        lab.run("lb", ["bpftool", "map", "delete", "id", str(maps["services"]), "key", "hex", *_hex(service)])
        assert _bpf_lookup(deployed, maps["services"], service) is None
        wait_log("event=drift-repaired", 1, timeout=30)
        assert _bpf_lookup(deployed, maps["services"], service) is not None, daemon.stderr()

        # struct selector: active, size, seed, fields, base[2], ...: the first slot of the active table
        active, size, _seed, _fields, base0, base1 = struct.unpack_from(
            "<6I", _bpf_lookup(deployed, maps["selectors"], struct.pack("<I", 0))
        )
        assert size > 0
        slot = struct.pack("<I", (base0, base1)[active & 1])
        held = _bpf_lookup(deployed, maps["slots"], slot)
        assert held != b"\xff\xff\xff\xff"
        update = ["bpftool", "map", "update", "id", str(maps["slots"]), "key", "hex", *_hex(slot)]
        lab.run("lb", [*update, "value", "hex", "ff", "ff", "ff", "ff"])
        wait_log("event=drift-repaired", 2, timeout=30)
        # The repair writes the table into the other region and flips: the
        # selector's active table holds the server again at its first slot.
        active, _size, _seed, _fields, base0, base1 = struct.unpack_from(
            "<6I", _bpf_lookup(deployed, maps["selectors"], struct.pack("<I", 0))
        )
        assert _bpf_lookup(deployed, maps["slots"], struct.pack("<I", (base0, base1)[active & 1])) == held
        repaired = [line for line in daemon.stderr().splitlines() if "event=drift-repaired" in line]
        assert len(repaired) == 2, repaired
    finally:
        daemon.stop(signal.SIGTERM)
    report = lab.probe(VIP4, "tcp", 80, flows=30, first_sport=lab.next_sports(30))
    _assert_flows(report, VIP4)
    plan = deployed.kdsr("lb", "plan", str(deployed.intent), "--node", "lb1", "--detailed-exitcode", check=False)
    assert plan.returncode == 0, plan.stdout
