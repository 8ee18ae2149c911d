"""`kdsr show` per service, against the validating fake kernel: the view
(VIP, ports, pool, each server's state and why, weight, share, counters),
the filters, rates from two reads, "no server", the summary of a large
table, and the JSON document's shape (README "kdsr show")."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path

import pytest
from cli_in_process import install_kernel, run_kdsr

from kdsr import operations, service_view
from kdsr.compile import CompileCache, lb_ipvs
from kdsr.compile.lb_nft_l2 import servers_map_name
from kdsr.intent import load_intent, parse_intent
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "l2-web.json"
S1, S2, S3 = "10.10.0.11", "10.10.0.12", "10.10.0.13"

# The documented keys (README "kdsr show"): a change here is a change of the format.
DOCUMENT_KEYS = {"format", "interval", "services", "kernel"}
SERVICE_KEYS = {
    "service",
    "vip",
    "ports",
    "pool",
    "engine",
    "selector",
    "packets",
    "bytes",
    "connections",
    "rate",
    "serving",
    "no_server",
    "servers",
}
SERVER_KEYS = {
    "server",
    "node",
    "state",
    "reason",
    "weight",
    "slots",
    "share",
    "packets",
    "bytes",
    "connections",
    "rate",
}
PORT_KEYS = {"protocol", "port", "packets", "bytes", "connections"}
PORT_ROW_KEYS = {"vip", "protocol", "port", "service", "pool", "selector", "packets", "bytes", "source"}
SERVER_ROW_KEYS = {"pool", "family", "server", "selector", "slots", "packets", "bytes", "counted_in"}


@pytest.fixture
def kernel(monkeypatch):
    return install_kernel(monkeypatch, FakeKernel())


@pytest.fixture
def applied(tmp_path, kernel):
    path = tmp_path / "intent.json"
    path.write_text(EXAMPLE.read_text())
    assert run_kdsr(tmp_path, "apply", str(path), "--node", "lb1").exit_code == 0
    return path


def _service(doc: dict, name: str) -> dict:
    (found,) = [s for s in doc["services"] if s["service"] == name]
    return found


def _count(kernel: FakeKernel, vip: str, proto: str, port: int, packets: int) -> None:
    kernel.nft.counts[("services-v4", (vip, proto, (port, port)))] = (packets, packets * 100)


def test_each_service_with_its_pool_servers_states_weights_shares_and_counters(tmp_path, kernel, applied):
    _count(kernel, "10.10.0.100", "tcp", 80, 30)
    _count(kernel, "10.10.0.100", "tcp", 443, 12)
    kernel.nft.counts[(servers_map_name("web", 4), int(ip_address(S1)))] = (20, 2000)
    kernel.nft.counts[(servers_map_name("web", 4), int(ip_address(S2)))] = (22, 2200)
    shown = run_kdsr(tmp_path, "show", str(applied), "--json")
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert set(doc) == DOCUMENT_KEYS and doc["format"] == 1 and doc["interval"] is None
    assert [s["service"] for s in doc["services"]] == ["dns", "media", "web", "web6"]
    web = _service(doc, "web")
    assert set(web) == SERVICE_KEYS
    assert (web["vip"], web["pool"], web["packets"], web["bytes"], web["rate"]) == (
        "10.10.0.100",
        "web",
        42,
        4200,
        None,
    )
    assert [(p["protocol"], p["port"], p["packets"]) for p in web["ports"]] == [("tcp", "80", 30), ("tcp", "443", 12)]
    assert all(set(p) == PORT_KEYS and p["connections"] is None for p in web["ports"])
    # nft keeps no connection table: no connection count, rather than a 0.
    assert (web["engine"], web["connections"]) == ("nft", None)
    rows = {r["server"]: r for r in web["servers"]}
    assert set(rows) == {S1, S2, S3} and all(set(r) == SERVER_KEYS for r in rows.values())
    assert {r["node"] for r in rows.values()} == {"s1", "s2", "s3"}
    assert all(r["state"] == "up" and r["reason"] == "no health check" and r["weight"] == 1 for r in rows.values())
    assert sum(r["slots"] for r in rows.values()) == 4093 and all(r["connections"] is None for r in rows.values())
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-3
    assert (rows[S1]["packets"], rows[S2]["bytes"], rows[S3]["packets"]) == (20, 2200, 0)
    kernel_report = doc["kernel"]
    assert all(set(r) == PORT_ROW_KEYS for r in kernel_report["services"])
    assert all(set(r) == SERVER_ROW_KEYS for r in kernel_report["servers"])
    assert web["serving"] == 3 and not web["no_server"]
    text = run_kdsr(tmp_path, "show", str(applied)).output
    line = next(x for x in text.splitlines() if x.startswith("web "))
    assert "10.10.0.100" in line and "tcp/80,443" in line and " web " in line and "3/3 up" in line, line
    assert "4.2k" in line, line
    s1 = next(x for x in text.splitlines() if x.strip().startswith(f"{S1} (s1)") and "weight 1" in x)
    assert " up " in s1 and "%" in s1 and "(no health check)" in s1, s1


def test_drained_and_down_servers_say_why(tmp_path, kernel, applied):
    assert run_kdsr(tmp_path, "drain", str(applied), "s2", "--node", "lb1").exit_code == 0
    store = StateStore(tmp_path / "state")
    report = operations.show(kernel, store, "lb1", load_intent(applied))
    report["health"] = [
        {"pool": "web", "server": S3, "state": "down", "last_error": "connection refused", "daemon": True}
    ]
    web = _service(operations.show_document(report), "web")
    rows = {r["server"]: r for r in web["servers"]}
    assert (rows[S2]["state"], rows[S2]["reason"], rows[S2]["slots"]) == ("drained", "kdsr drain s2", 0)
    assert rows[S3]["state"] == "down" and rows[S3]["reason"].startswith("connection refused")
    assert rows[S1]["state"] == "up"


def test_a_service_with_no_serving_server_says_so(tmp_path, kernel):
    doc = json.loads(EXAMPLE.read_text())
    for member in doc["pools"]["web6"]["servers"]:
        member["weight"] = 0
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc))
    assert run_kdsr(tmp_path, "apply", str(path), "--node", "lb1").exit_code == 0
    shown = json.loads(run_kdsr(tmp_path, "show", str(path), "--json").output)
    web6 = _service(shown, "web6")
    assert web6["no_server"] and web6["serving"] == 0
    assert {r["state"] for r in web6["servers"]} == {"drained"} and len(web6["servers"]) == 3
    text = run_kdsr(tmp_path, "show", str(path)).output
    line = next(x for x in text.splitlines() if x.startswith("web6 "))
    assert "no server" in line, line
    assert "Warning: no server takes the flows of web6." in text


def test_filters_by_service_vip_and_server(tmp_path, kernel, applied):
    def names(*args: str) -> list[str]:
        out = run_kdsr(tmp_path, "show", "--json", *args)
        assert out.exit_code == 0, out.output
        return [s["service"] for s in json.loads(out.output)["services"]]

    assert names("--service", "web*") == ["web", "web6"]
    assert names("--service", "dns", "--service", "media") == ["dns", "media"]
    assert names("--vip", "10.10.0.101") == ["media"]
    assert names("--vip", "fd00:10::100") == ["web6"]
    assert names("--service", "nothing") == []
    by_server = json.loads(run_kdsr(tmp_path, "show", "--json", "--server", "fd00:10::12").output)["services"]
    assert [(s["service"], [r["server"] for r in s["servers"]]) for s in by_server] == [("web6", ["fd00:10::12"])]
    # A node name needs the intent (or the daemon's) to be known.
    by_node = json.loads(run_kdsr(tmp_path, "show", str(applied), "--json", "--server", "s3").output)["services"]
    assert {s["service"] for s in by_node} == {"dns", "media", "web", "web6"}
    assert {r["server"] for s in by_node for r in s["servers"]} == {S3, "fd00:10::13"}
    text = run_kdsr(tmp_path, "show", "--service", "nothing").output
    assert "no service matches the filter" in text


def test_rates_come_from_two_reads(kernel, tmp_path, applied):
    store = StateStore(tmp_path / "state")
    before = operations.show(kernel, store, "lb1")
    _count(kernel, "10.10.0.100", "tcp", 80, 200)
    kernel.nft.counts[(servers_map_name("web", 4), int(ip_address(S1)))] = (200, 20000)
    after = operations.show(kernel, store, "lb1")
    doc = operations.show_document(after, None, before, 2.0)
    web = _service(doc, "web")
    assert web["rate"] == {"packets": 100.0, "bytes": 10000.0}
    rows = {r["server"]: r for r in web["servers"]}
    assert rows[S1]["rate"] == {"packets": 100.0, "bytes": 10000.0} and rows[S2]["rate"]["packets"] == 0
    text = operations.format_show(after, doc)
    assert "100 pps 80.0kbit/s" in text, text


def test_rate_option_reads_twice(monkeypatch, tmp_path, kernel, applied):
    slept = []
    monkeypatch.setattr("kdsr.cli.time.sleep", slept.append)
    doc = json.loads(run_kdsr(tmp_path, "show", "--json", "--interval", "1.5").output)
    assert slept == [1.5] and doc["interval"] is not None and _service(doc, "web")["rate"] is not None


def test_a_large_table_prints_a_line_per_service_and_servers_under_a_filter(tmp_path, kernel):
    doc = {
        "version": 1,
        "services": {
            f"v{i}": {"vip": f"10.10.1.{i}", "ports": 80, "protocols": "tcp", "pool": "web"} for i in range(25)
        },
        "pools": {"web": {"servers": [{"address": S1}, {"address": S2}]}},
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24"]}},
    }
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc))
    parse_intent(json.dumps(doc), "intent.json")
    assert run_kdsr(tmp_path, "apply", str(path), "--node", "lb1").exit_code == 0
    text = run_kdsr(tmp_path, "show").output
    assert sum(1 for x in text.splitlines() if x.startswith("v")) == 25
    assert S1 not in text and "(25 services: --service, --vip or --server show their servers)" in text
    detail = run_kdsr(tmp_path, "show", "--vip", "10.10.1.7").output
    assert sum(1 for x in detail.splitlines() if x.startswith("v")) == 1
    assert sum(1 for x in detail.splitlines() if x.strip().startswith((S1, S2))) == 2


def test_the_kernel_report_keeps_the_rows_the_metrics_read(kernel, tmp_path, applied):
    """kdsr/health/metrics.py reads services (vip, protocol, port, packets) and
    servers (selector, server, packets); pool, service and bytes are there too."""
    report = operations.show(kernel, StateStore(tmp_path / "state"), "lb1")
    assert {(r["vip"], r["protocol"], r["port"]) for r in report["services"]} >= {("10.10.0.100", "tcp", "80")}
    rows = [r for r in report["servers"] if r["pool"] == "web"]
    assert {r["server"] for r in rows} == {S1, S2, S3}
    assert all(r["selector"].startswith("pool-web-v4-") and r["counted_in"] == "servers-web-v4" for r in rows)
    assert service_view.read_listing(kernel.nft.listing("netdev", "kdsr"))["servers"] == report["servers"]


def test_an_nft_node_runs_no_ipvs_read(kernel, tmp_path, applied):
    report = operations.show(kernel, StateStore(tmp_path / "state"), "lb1")
    assert report["ipvs"] is None and kernel.ipvs.stats_reads == 0
    assert "ipvs" not in operations.format_show(report).lower()


# --- the ipvs engine: IPVS's own counters ----------------------------------------

IPVS_EXAMPLE = ROOT / "examples" / "l3-gre-ipvs.json"  # web tcp/80,443, dns tcp+udp/53, media udp/5000-5010: pool web
L3 = {"s1": "10.3.0.11", "s2": "10.3.0.12", "s3": "10.3.0.13"}
IPVS_ROW_KEYS = {"connections", "engine"}


@pytest.fixture
def ipvs_applied(tmp_path, kernel):
    kernel.sysctl.values.update(
        {f"net/ipv4/vs/{k}": "0" for k in ("expire_nodest_conn", "sloppy_tcp", "schedule_icmp")}
    )
    kernel.sysctl.values["net/ipv6/conf/all/forwarding"] = "0"
    path = tmp_path / "ipvs.json"
    path.write_text(IPVS_EXAMPLE.read_text())
    applied = run_kdsr(tmp_path, "apply", str(path), "--node", "lb1")
    assert applied.exit_code == 0, applied.output
    return path


def _media_ident() -> str:
    from kdsr import naming  # noqa: PLC0415

    return f"fwmark {naming.ipvs_fwmark(4, 'udp', '10.9.0.101', 5000, 5010):#x} ipv4"


def _ipvs_count(kernel: FakeKernel) -> None:
    """IPVS counters (connections, packets, bytes) on three services of pool web."""
    media = _media_ident()
    kernel.ipvs.counts.update(
        {
            "tcp 10.9.0.100:80": (3, 30, 3000),
            ("tcp 10.9.0.100:80", "10.3.0.11:80"): (2, 20, 2000),
            ("tcp 10.9.0.100:80", "10.3.0.12:80"): (1, 10, 1000),
            "tcp 10.9.0.100:443": (1, 10, 1000),
            ("tcp 10.9.0.100:443", "10.3.0.11:443"): (1, 10, 1000),
            media: (5, 5, 500),
            (media, "10.3.0.11:0"): (4, 4, 400),
            (media, "10.3.0.13:0"): (1, 1, 100),
        }
    )


def test_ipvs_services_show_ipvs_own_counters_per_service_port_and_server(tmp_path, kernel, ipvs_applied):
    _ipvs_count(kernel)
    shown = run_kdsr(tmp_path, "show", str(ipvs_applied), "--json")
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert [s["service"] for s in doc["services"]] == ["dns", "media", "web"]
    assert kernel.ipvs.stats_reads == 1  # one read for the five IPVS services
    web = _service(doc, "web")
    assert set(web) == SERVICE_KEYS and all(set(p) == PORT_KEYS for p in web["ports"])
    assert (web["vip"], web["pool"], web["engine"], web["packets"], web["bytes"], web["connections"]) == (
        "10.9.0.100",
        "web",
        "ipvs",
        40,
        4000,
        4,
    )
    assert [(p["protocol"], p["port"], p["packets"], p["connections"]) for p in web["ports"]] == [
        ("tcp", "80", 30, 3),
        ("tcp", "443", 10, 1),
    ]
    rows = {r["server"]: r for r in web["servers"]}
    assert set(rows) == set(L3.values()) and all(set(r) == SERVER_KEYS for r in rows.values())
    # A server's counters are its pool's: its destinations in every IPVS service of pool web.
    assert (rows[L3["s1"]]["packets"], rows[L3["s1"]]["bytes"], rows[L3["s1"]]["connections"]) == (34, 3400, 7)
    assert (rows[L3["s2"]]["packets"], rows[L3["s3"]]["packets"], rows[L3["s3"]]["connections"]) == (10, 1, 1)
    # Share: of the destinations' IPVS weights (mh fills its table in proportion).
    assert all(r["state"] == "up" and r["weight"] == 1 and r["slots"] == 1 for r in rows.values())
    assert all(abs(r["share"] - 1 / 3) < 1e-3 for r in rows.values()) and web["serving"] == 3
    assert {r["node"] for r in rows.values()} == {"s1", "s2", "s3"}
    media = _service(doc, "media")
    assert (media["vip"], media["ports"][0]["protocol"], media["ports"][0]["port"], media["packets"]) == (
        "10.9.0.101",
        "udp",
        "5000-5010",
        5,
    )
    dns = _service(doc, "dns")
    assert [(p["protocol"], p["port"]) for p in dns["ports"]] == [("tcp", "53"), ("udp", "53")]
    assert dns["packets"] == 0 and dns["connections"] == 0
    report = doc["kernel"]
    assert report["ipvs"] == {"services": 5, "missing": [], "named": True}
    assert all(set(r) == PORT_ROW_KEYS | IPVS_ROW_KEYS and r["engine"] == "ipvs" for r in report["services"])
    assert all(set(r) == SERVER_ROW_KEYS | IPVS_ROW_KEYS for r in report["servers"])
    assert {r["source"] for r in report["services"] if r["service"] == "web"} == {
        "/services/web/ports/0",
        "/services/web/ports/1",
    }
    text = run_kdsr(tmp_path, "show", str(ipvs_applied)).output
    assert "IPVS: 5 services of kdsr's, with IPVS's own counters" in text, text
    line = next(x for x in text.splitlines() if x.startswith("web "))
    assert "10.9.0.100" in line and "tcp/80,443" in line and " web " in line and "3/3 up" in line, line
    s1 = next(x for x in text.splitlines() if x.strip().startswith(f"{L3['s1']} (s1)") and "media" not in x)
    assert "34 pkts" in s1 and "3.4k B" in s1 and "7 conns" in s1 and "33.3%" in s1, s1
    assert "inbound only (DSR replies do not cross the load balancer)" in text


def test_ipvs_counters_go_on_across_drains_and_weight_changes(tmp_path, kernel, ipvs_applied):
    """IPVS edits a destination in place for a drain or a weight (the fake,
    like the kernel, drops a deleted destination's counters): `kdsr show`
    reads the same counters before and after, and the new shares."""
    _ipvs_count(kernel)

    def web() -> dict:
        shown = run_kdsr(tmp_path, "show", str(ipvs_applied), "--json")
        assert shown.exit_code == 0, shown.output
        return _service(json.loads(shown.output), "web")

    def counters(service: dict) -> dict:
        return {r["server"]: (r["packets"], r["bytes"], r["connections"]) for r in service["servers"]}

    before = web()
    drained = run_kdsr(tmp_path, "drain", str(ipvs_applied), "s2", "--node", "lb1")
    assert drained.exit_code == 0, drained.output
    after = web()
    rows = {r["server"]: r for r in after["servers"]}
    assert (rows[L3["s2"]]["state"], rows[L3["s2"]]["reason"], rows[L3["s2"]]["share"]) == (
        "drained",
        "kdsr drain s2",
        0.0,
    )
    assert rows[L3["s1"]]["share"] == 0.5 and after["serving"] == 2
    assert counters(after) == counters(before) and after["packets"] == before["packets"] == 40
    assert run_kdsr(tmp_path, "undrain", str(ipvs_applied), "s2", "--node", "lb1").exit_code == 0
    doc = json.loads(ipvs_applied.read_text())
    doc["pools"]["web"]["servers"][2]["weight"] = 2
    ipvs_applied.write_text(json.dumps(doc))
    assert run_kdsr(tmp_path, "apply", str(ipvs_applied), "--node", "lb1").exit_code == 0
    heavier = web()
    rows = {r["server"]: r for r in heavier["servers"]}
    assert (rows[L3["s3"]]["weight"], rows[L3["s3"]]["slots"], rows[L3["s3"]]["share"]) == (2, 2, 0.5)
    assert counters(heavier) == counters(before)


def test_ipvs_services_without_the_intent_name_what_the_kernel_can(tmp_path, kernel, ipvs_applied):
    """IPVS holds no names: without the intent (and no kdsr run), single ports
    show under their VIP; a port range under the service its mark map's
    element names; the text says how to get the rest."""
    _ipvs_count(kernel)
    doc = json.loads(run_kdsr(tmp_path, "show", "--json").output)
    assert [s["service"] for s in doc["services"]] == ["10.9.0.100", "media"]
    by_vip = _service(doc, "10.9.0.100")
    assert _listens_of(by_vip) == [("tcp", "53"), ("tcp", "80"), ("tcp", "443"), ("udp", "53")]
    assert by_vip["pool"] == "" and by_vip["packets"] == 40
    media = _service(doc, "media")
    assert (media["vip"], media["ports"][0]["port"], media["packets"]) == ("10.9.0.101", "5000-5010", 5)
    assert doc["kernel"]["ipvs"]["named"] is False
    text = run_kdsr(tmp_path, "show").output
    assert "pass the intent: kdsr show INTENT" in text and "IPVS holds no names" in text


def _listens_of(service: dict) -> list[tuple[str, str]]:
    return [(p["protocol"], p["port"]) for p in service["ports"]]


def test_an_ipvs_service_missing_from_the_kernel_is_named(tmp_path, kernel, ipvs_applied):
    svc = kernel.ipvs.services["tcp 10.9.0.100:443"]
    kernel.ipvs.service("-D", svc)  # behind kdsr's back
    doc = json.loads(run_kdsr(tmp_path, "show", str(ipvs_applied), "--json").output)
    assert doc["kernel"]["ipvs"] == {"services": 4, "missing": ["tcp 10.9.0.100:443"], "named": True}
    assert _listens_of(_service(doc, "web")) == [("tcp", "80")]
    text = run_kdsr(tmp_path, "show", str(ipvs_applied)).output
    assert "MISSING from the kernel: tcp 10.9.0.100:443" in text, text


def test_a_pool_on_two_engines_adds_both_engines_counters(tmp_path, kernel):
    """Service web on IPVS (L2, DR), media on nft, both pool web: a server's
    counters are the pool's, both engines' added (not one row hiding the other)."""
    kernel.sysctl.values.update(
        {f"net/ipv4/vs/{k}": "0" for k in ("expire_nodest_conn", "sloppy_tcp", "schedule_icmp")}
    )
    doc = json.loads(EXAMPLE.read_text())
    doc["services"]["web"]["dsr"] = {"mode": "l2", "engine": "ipvs"}
    doc["services"]["web"]["ports"] = 80
    doc["pools"]["web"].pop("health", None)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(doc))
    applied = run_kdsr(tmp_path, "apply", str(path), "--node", "lb1")
    assert applied.exit_code == 0, applied.output
    kernel.ipvs.counts[("tcp 10.10.0.100:80", f"{S1}:80")] = (2, 20, 2000)
    kernel.nft.counts[(servers_map_name("web", 4), int(ip_address(S1)))] = (5, 500)
    shown = json.loads(run_kdsr(tmp_path, "show", str(path), "--json").output)
    for name in ("web", "media"):
        rows = {r["server"]: r for r in _service(shown, name)["servers"]}
        assert (rows[S1]["packets"], rows[S1]["bytes"], rows[S1]["connections"]) == (25, 2500, 2), name
    assert _service(shown, "web")["engine"] == "ipvs" and _service(shown, "media")["engine"] == "nft"


def test_the_ipvs_labels_name_every_ipvs_service_compile_makes():
    """lb_ipvs.service_labels (what names IPVS services in show and the
    metrics) has an entry for each IPVS service compile makes, under its
    ident, with its pointer: single ports and port ranges (fwmark), both families."""
    doc = json.loads(IPVS_EXAMPLE.read_text())
    doc["services"]["web6"] = {
        "vip": "fd00:9::100",
        "ports": [443, "8000-8009"],
        "protocols": "both",
        "pool": "web6",
        "dsr": {"mode": "l3-ip6tnl", "engine": "ipvs"},
    }
    doc["pools"]["web6"] = {"servers": [{"address": "fd00:3::11"}, {"address": "fd00:3::12"}]}
    nft = {"vip": "10.9.0.102", "ports": 80, "protocols": "tcp", "pool": "web", "dsr": {"mode": "l3-gre"}}
    doc["services"]["plain"] = nft
    intent = parse_intent(json.dumps(doc), "ipvs.json")
    services, _marks = lb_ipvs.services_for(intent, CompileCache())
    labels = lb_ipvs.service_labels(intent)
    assert set(labels) == {s.ident for s in services} and len(labels) == 9
    assert all(labels[s.ident]["source"] == s.pointer for s in services)
    assert {(v["service"], v["protocol"], v["port"]) for v in labels.values() if v["vip"] == "fd00:9::100"} == {
        ("web6", p, port) for p in ("tcp", "udp") for port in ("443", "8000-8009")
    }


def test_ipvs_counters_survive_the_re_adds_that_keep_mh_s_order(tmp_path, kernel, ipvs_applied):
    """A server added to the pool: kdsr deletes and adds back the destinations
    before it (the kernel adds at the head of the list, and mh's table
    depends on the order); the kernel hands each back from its trash with
    its counters (seen on Debian's 6.1: a destination deleted and added back
    at once kept them), so `kdsr show` reads them on; a service made again
    starts from 0 (seen there too)."""
    _ipvs_count(kernel)
    doc = json.loads(ipvs_applied.read_text())
    doc["pools"]["web"]["servers"].append({"address": "10.3.0.14"})
    ipvs_applied.write_text(json.dumps(doc))
    assert run_kdsr(tmp_path, "apply", str(ipvs_applied), "--node", "lb1").exit_code == 0
    assert any(op.startswith("ipvs dest del tcp 10.9.0.100:80 10.3.0.11:80") for op in kernel.ops)
    web = _service(json.loads(run_kdsr(tmp_path, "show", str(ipvs_applied), "--json").output), "web")
    rows = {r["server"]: r for r in web["servers"]}
    assert (rows[L3["s1"]]["packets"], rows[L3["s1"]]["connections"], rows["10.3.0.14"]["packets"]) == (34, 7, 0)
    assert abs(rows["10.3.0.14"]["share"] - 0.25) < 1e-9
    web80 = lb_ipvs_service(ipvs_applied, "tcp 10.9.0.100:80")
    kernel.ipvs.service("-D", web80)
    kernel.ipvs.service("-A", web80)
    for dest in reversed(web80.dests):
        kernel.ipvs.dest("-a", web80, dest)
    web = _service(json.loads(run_kdsr(tmp_path, "show", str(ipvs_applied), "--json").output), "web")
    assert {p["port"]: p["packets"] for p in web["ports"]} == {"80": 0, "443": 10}


def lb_ipvs_service(path, ident: str):
    services, _marks = lb_ipvs.services_for(load_intent(path), CompileCache())
    (found,) = [s for s in services if s.ident == ident]
    return found


def test_a_member_s_rows_add_up_once_per_counter():
    """services_view adds up a member's rows (a pool on two engines), but a
    counter shown in several rows (the xdp program's per-server counter, a
    row per selector of the pool) counts once."""

    def row(selector: str, counted_in: str, packets: int, engine: str, connections=None) -> dict:
        return {
            "pool": "web",
            "family": 4,
            "server": S1,
            "selector": selector,
            "slots": 1,
            "packets": packets,
            "bytes": packets * 10,
            "counted_in": counted_in,
            "engine": engine,
            **({"connections": connections} if connections is not None else {}),
        }

    report = {
        "services": [
            {"vip": "10.10.0.100", "protocol": "tcp", "port": "80", "service": "web", "pool": "web",
             "selector": "pool-web-v4-aaaaaa", "packets": 9, "bytes": 90, "source": "/services/web/ports/0",
             "engine": "xdp"},
        ],
        "servers": [
            row("pool-web-v4-aaaaaa", "xdp on eth0", 7, "xdp"),
            row("pool-web-v4-bbbbbb", "xdp on eth0", 7, "xdp"),
            row("", "", 5, "ipvs", connections=2),
        ],
        "selectors": {"pool-web-v4-aaaaaa": {"pool": "web", "family": 4, "size": 1, "slots": {S1: 1}}},
    }  # fmt: skip
    (web,) = service_view.services_view(report)
    (s1,) = web["servers"]
    assert (s1["packets"], s1["bytes"], s1["connections"]) == (12, 120, 2)


def test_slots_of_tables_made_before_server_ids_name_their_servers():
    """An upgrade's plan reads the table an older kdsr made: slots that hold
    the address itself, or a goto to the member's own chain, name the same
    servers as slots that hold server ids (no server "removed" and "added")."""
    from kdsr.model import NftMap, NftTable, element
    from kdsr.service_view import table_slots

    addresses = NftMap("pool-web-v4-60e94c", ("mark",), "ipv4_addr", elements=((0, element(S1)), (1, element(S2))))
    gotos = NftMap(
        "pool-web6-v6-60e94c",
        ("mark",),
        "verdict",
        elements=((0, element(("goto", "server-web6-v6-fd00-10--11"))),),
    )
    ids = NftMap("pool-api-v4-60e94c", ("mark",), "mark", elements=((0, element(int(ip_address(S3)))),))
    table = NftTable("netdev", "kdsr", (), (addresses, gotos, ids))
    assert table_slots(table) == {
        "pool-web-v4-60e94c": [S1, S2],
        "pool-web6-v6-60e94c": ["fd00:10::11"],
        "pool-api-v4-60e94c": [S3],  # no servers map read: an IPv4 id is the address
    }
