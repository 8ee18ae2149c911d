"""Packet and byte counters only grow: a health event, a drain and undrain,
and a weight change move slots from server to server, and no counter of a
service or of a server goes back (Prometheus' rate() takes any drop for a
restart).  Real traffic through the L2 nft path, `kdsr run` on the load
balancer, `kdsr show --json` through it; on the full kernel also through
IPVS (the ipvs engine, L3 over GRE), whose own counters `kdsr show` reads.

Each round sends UDP flows of one datagram each to the service and reads
the counters; between rounds one change.  After every round:

- no server's and no service's packets or bytes are lower than before;
- each server's packets grew by at least the flows it answered in the round;
- the service's counters equal the sum of its servers' (one pool, one
  service: every packet the service map counts is counted by one server).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import healthlab
import l3lab
import lab as netns_lab
import pytest

ROOT = Path(__file__).resolve().parents[2]
VIP = "10.10.0.100"
PORT = 53
SERVERS = ("s1", "s2", "s3")
ADDRESS = {s: f"10.10.0.1{i}" for i, s in enumerate(SERVERS, 1)}
FLOWS = 60
MONITOR = {**healthlab.MONITOR, "mode": "plain", "port": 80}
INTENT = {
    "version": 1,
    "services": {"dns": {"vip": VIP, "ports": PORT, "protocols": "udp", "pool": "dns"}},
    "pools": {"dns": {"servers": [{"node": s} for s in SERVERS], "health": MONITOR}},
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24"]}},
    "servers": {s: {"interface": "eth0", "addresses": [f"{ADDRESS[s]}/24"]} for s in SERVERS},
}
# The ipvs engine's row: the same service through IPVS, L3 over GRE, in the
# routed lab (l3lab.py: the VIPs are routed to the load balancer, the servers
# are a hop away); a plain monitor (a dsr probe cannot leave a director whose
# VIP is local).
L3_VIP = "10.9.0.100"
L3_ADDRESS = dict(l3lab.SERVERS)
L3_IPVS_INTENT = {
    **INTENT,
    "services": {
        "dns": {
            "vip": L3_VIP,
            "ports": PORT,
            "protocols": "udp",
            "pool": "dns",
            "dsr": {"mode": "l3-gre", "engine": "ipvs"},
        }
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.2.0.2/24"]}},
    "servers": {s: {"interface": "eth0", "addresses": [f"{L3_ADDRESS[s]}/24"]} for s in SERVERS},
}


def _counters(hl: healthlab.HealthLab) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Per server address (packets, bytes) and the service's (packets, bytes), from `kdsr show INTENT --json`."""
    vip, engine = hl.vip, hl.engine  # type: ignore[attr-defined]
    state = str(hl.state_dir / "lb")
    argv = [sys.executable, "-m", "kdsr", "--state-dir", state, "show", str(hl.intent_path), "--json"]
    result = hl.lab.run("lb", argv, check=False, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    report = doc.get("kernel", doc)  # (a report of kdsr before `show` per service had it at the top)
    servers: dict[str, list[int]] = {}
    for row in report["servers"]:
        entry = servers.setdefault(row["server"], [0, 0])
        entry[0] += row["packets"]
        entry[1] += row["bytes"]
    ports = [r for r in report["services"] if r["vip"] == vip and r["port"] == str(PORT)]
    assert len(ports) == 1, report["services"]
    assert (ports[0]["service"], ports[0]["pool"]) == ("dns", "dns"), ports
    if engine == "ipvs":
        # IPVS's own rows: every one marked so, with connections (one per flow).
        assert all(r.get("engine") == "ipvs" for r in [*ports, *report["servers"]]), report
        assert ports[0]["connections"] >= hl.sent, (ports[0], hl.sent)  # type: ignore[attr-defined]
        (service,) = [s for s in doc["services"] if s["vip"] == vip]
        assert service["engine"] == "ipvs" and service["connections"] == ports[0]["connections"], service
    return {a: (p, b) for a, (p, b) in servers.items()}, (ports[0]["packets"], ports[0]["bytes"])


@contextlib.contextmanager
def _lab(tmp_path: Path, daemon: bool, engine: str = "nft"):
    if engine == "ipvs":
        built = l3lab.L3Lab(workdir=tmp_path / "lab")
        intent, vip, addresses = L3_IPVS_INTENT, L3_VIP, L3_ADDRESS
    else:
        built = netns_lab.L2Lab(workdir=tmp_path / "lab", vips=(VIP,))
        intent, vip, addresses = INTENT, VIP, ADDRESS
    with built as lab:
        if engine == "ipvs":
            for host in ("lb", *SERVERS):
                lab.run(host, ["modprobe", "-a", "ip_vs", "ip_vs_mh", "ip_gre"])
        hl = healthlab.HealthLab(lab, tmp_path, intent=intent)
        hl.vip, hl.engine, hl.address, hl.sent = vip, engine, addresses, 0  # type: ignore[attr-defined]
        for server in SERVERS:
            hl.start_responder(server)  # tcp/80: what the monitor checks
            lab.start_responder(server, udp_ports=[PORT], max_seconds=900, log_path=tmp_path / f"{server}-udp.jsonl")
            hl.kdsr(server, "apply", str(hl.intent_path), "--node", server)
        if daemon:
            hl.start_daemon()
        else:
            hl.kdsr("lb", "apply", str(hl.intent_path), "--node", "lb1")
        try:
            yield hl
        finally:
            healthlab.teardown(hl)


@pytest.fixture
def counting_lab(lab_available, tmp_path):
    with _lab(tmp_path, daemon=True) as hl:
        yield hl


def _rounds(hl: healthlab.HealthLab):
    """A function that sends a round of flows and checks the counters against the last round's."""
    lab = hl.lab
    vip, addresses = hl.vip, hl.address  # type: ignore[attr-defined]
    history: list[tuple[str, dict, tuple[int, int]]] = [("start", *_counters(hl))]

    def send_and_check(after: str) -> None:
        report = lab.probe(vip, "udp", PORT, flows=FLOWS, first_sport=lab.next_sports(FLOWS), timeout=2.0)
        assert report.all_ok, f"after {after}: {report.describe_failures()}"
        hl.sent += FLOWS  # type: ignore[attr-defined]
        answered = report.by_server()
        servers, service = _counters(hl)
        _label, before, service_before = history[-1]
        for address, (packets, nbytes) in before.items():
            now = servers.get(address, (0, 0))
            assert now[0] >= packets and now[1] >= nbytes, (
                f"after {after}, server {address}'s counters went back: {packets} -> {now[0]} packets, "
                f"{nbytes} -> {now[1]} bytes; all: {history} then {servers}"
            )
        for server, flows in answered.items():
            grown = servers[addresses[server]][0] - before.get(addresses[server], (0, 0))[0]
            assert grown >= flows, f"after {after}: {server} answered {flows} flows, its counter grew by {grown}"
        assert service[0] >= service_before[0] + FLOWS and service[1] > service_before[1], (
            after,
            service_before,
            service,
        )
        assert service == (sum(p for p, _b in servers.values()), sum(b for _p, b in servers.values())), (
            f"after {after}: the service counted {service}, its servers {servers}"
        )
        history.append((after, servers, service))

    return send_and_check, history


def test_counters_never_go_back_across_health_drain_and_weight_changes(counting_lab):
    hl = counting_lab
    send_and_check, history = _rounds(hl)
    send_and_check("the first traffic")

    # A health event: s1's checked listener stops; kdsr run takes it out, then back in.
    hl.responders["s1"].stop()
    hl.wait_for(lambda: hl.state_of("dns", ADDRESS["s1"]) == "down", 30, "s1 down")
    send_and_check("s1 went down")
    hl.start_responder("s1")
    hl.wait_for(lambda: hl.state_of("dns", ADDRESS["s1"]) == "up", 30, "s1 up again")
    send_and_check("s1 came back")

    hl.kdsr("lb", "drain", str(hl.intent_path), "s2", "--node", "lb1")
    send_and_check("drain s2")
    hl.kdsr("lb", "undrain", str(hl.intent_path), "s2", "--node", "lb1")
    send_and_check("undrain s2")

    heavier = copy.deepcopy(INTENT)
    heavier["pools"]["dns"]["servers"][2]["weight"] = 3
    hl.intent_path.write_text(json.dumps(heavier, indent=1))
    hl.kdsr("lb", "reload", "--node", "lb1")
    time.sleep(0.2)
    send_and_check("weight 3 for s3")

    # And the rounds reached every server (else a reset could hide behind a 0).
    assert all(history[-1][1].get(ADDRESS[s], (0, 0))[0] > 0 for s in SERVERS), history[-1]


@pytest.mark.full_kernel
@pytest.mark.parametrize("engine", ["nft", "ipvs"])
def test_counters_never_go_back_on_the_full_kernel(lab_available, tmp_path, engine):
    """The same on Debian's 6.1 kernel (the guest tier), without the daemon:
    drains and a weight change by the CLI; nft (L2) and IPVS (L3 over GRE:
    a drain and a weight are IPVS weights, edited in place)."""
    with _lab(tmp_path, daemon=False, engine=engine) as hl:
        send_and_check, history = _rounds(hl)
        send_and_check("the first traffic")
        hl.kdsr("lb", "drain", str(hl.intent_path), "s2", "--node", "lb1")
        send_and_check("drain s2")
        hl.kdsr("lb", "undrain", str(hl.intent_path), "s2", "--node", "lb1")
        send_and_check("undrain s2")
        heavier = json.loads(hl.intent_path.read_text())
        heavier["pools"]["dns"]["servers"][2]["weight"] = 3
        hl.intent_path.write_text(json.dumps(heavier, indent=1))
        hl.kdsr("lb", "apply", str(hl.intent_path), "--node", "lb1")
        send_and_check("weight 3 for s3")
        assert all(history[-1][1].get(hl.address[s], (0, 0))[0] > 0 for s in SERVERS), history[-1]
