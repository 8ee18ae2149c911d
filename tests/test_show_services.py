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
    "selector",
    "packets",
    "bytes",
    "rate",
    "serving",
    "no_server",
    "servers",
}
SERVER_KEYS = {"server", "node", "state", "reason", "weight", "slots", "share", "packets", "bytes", "rate"}
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
    kernel.counts[("services-v4", (vip, proto, (port, port)))] = (packets, packets * 100)


def test_each_service_with_its_pool_servers_states_weights_shares_and_counters(tmp_path, kernel, applied):
    _count(kernel, "10.10.0.100", "tcp", 80, 30)
    _count(kernel, "10.10.0.100", "tcp", 443, 12)
    kernel.counts[(servers_map_name("web", 4), int(ip_address(S1)))] = (20, 2000)
    kernel.counts[(servers_map_name("web", 4), int(ip_address(S2)))] = (22, 2200)
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
    rows = {r["server"]: r for r in web["servers"]}
    assert set(rows) == {S1, S2, S3} and all(set(r) == SERVER_KEYS for r in rows.values())
    assert {r["node"] for r in rows.values()} == {"s1", "s2", "s3"}
    assert all(r["state"] == "up" and r["reason"] == "no health check" and r["weight"] == 1 for r in rows.values())
    assert sum(r["slots"] for r in rows.values()) == 4093
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
    kernel.counts[(servers_map_name("web", 4), int(ip_address(S1)))] = (200, 20000)
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
    assert service_view.read_listing(kernel.nft_listing("netdev", "kdsr"))["servers"] == report["servers"]
