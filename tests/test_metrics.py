"""`kdsr run --metrics`: the exposition as Prometheus parses it (names,
types, labels, values), the kernel read off the scrape's path, and where the
server listens.  The daemon runs against the fake kernel with scripted
probe results (tests/test_health.py's fixture)."""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import socket
import threading
import time
import urllib.request

import pytest
from cli_in_process import install_kernel
from click.testing import CliRunner
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from test_health import daemon, doc, feed  # noqa: F401 (daemon: a pytest fixture)

from kdsr import operations
from kdsr.cli import main
from kdsr.commands import health as health_commands
from kdsr.errors import UsageError
from kdsr.health import counter_reader, metrics
from kdsr.kernel.fake import FakeKernel

SERVER_LABELS = {"pool", "server", "server_node"}


def scrape(runner, report: dict | None = None) -> dict:
    """name -> (type, [(sample name, labels, value)]), as Prometheus's text parser reads a scrape."""
    scrape = metrics.scrape_for(runner, None if report is None else (lambda: report), wait=10)
    families = text_string_to_metric_families(metrics.exposition(scrape))
    return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples]) for f in families}


def value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    (found,) = [v for n, lab, v in families[family][1] if n == (sample or family) and lab.items() >= labels.items()]
    return found


def started(runner):
    runner.start()
    runner._stop_probes()  # the tests feed results themselves
    return runner


def test_apply_and_drift_check_durations_are_histograms(daemon):  # noqa: F811
    started(daemon)
    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 3)  # s2 goes down: a second apply
    daemon.check_drift()
    families = scrape(daemon)
    kind, samples = families["kdsr_apply_duration_seconds"]
    assert kind == "histogram"
    applies = daemon.counters.applies  # the start, s2 down, and what the drift check applied
    assert applies >= 2
    assert value(families, "kdsr_apply_duration_seconds", "kdsr_apply_duration_seconds_count") == applies
    assert value(families, "kdsr_apply_duration_seconds", "kdsr_apply_duration_seconds_bucket", le="+Inf") == applies
    assert value(families, "kdsr_apply_duration_seconds", "kdsr_apply_duration_seconds_sum") > 0
    assert families["kdsr_drift_check_duration_seconds"][0] == "histogram"
    count = value(families, "kdsr_drift_check_duration_seconds", "kdsr_drift_check_duration_seconds_count")
    assert count == 1
    assert value(families, "kdsr_applies", "kdsr_applies_total", result="success") == applies
    assert value(families, "kdsr_applies", "kdsr_applies_total", result="failure") == 0


def test_pool_state_is_a_value_and_its_series_keep_their_labels(daemon):  # noqa: F811
    started(daemon)
    before = scrape(daemon)
    assert before["kdsr_pool_all_down"][1] == [("kdsr_pool_all_down", {"pool": "web"}, 0)] + [
        ("kdsr_pool_all_down", {"pool": "web6"}, 0)
    ]
    daemon.script.failing.update({"10.10.0.11", "10.10.0.12", "10.10.0.13"})
    feed(daemon, 3)
    after = scrape(daemon)
    assert value(after, "kdsr_pool_all_down", pool="web") == 1
    assert value(after, "kdsr_pool_dropping", pool="web") == 0  # all_down keeps them (the default)
    # The same series before and after: only the value changed.
    assert [lab for _n, lab, _v in after["kdsr_pool_all_down"][1]] == [
        lab for _n, lab, _v in before["kdsr_pool_all_down"][1]
    ]


def test_build_info_names_the_version(daemon):  # noqa: F811
    families = scrape(daemon)
    kind, samples = families["kdsr_build_info"]
    assert kind == "gauge"  # an info metric; the text format has no info type
    ((name, labels, one),) = samples
    assert name == "kdsr_build_info" and one == 1
    assert labels["version"] == importlib.metadata.version("kdsr") and labels["python"]


def test_every_per_server_series_has_the_same_labels_and_names_pools_not_tables(daemon):  # noqa: F811
    started(daemon)
    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 3)
    report = operations.show(daemon.kernel, daemon.store, "lb1")
    selector = next(s["selector"] for s in report["servers"] if s["server"] == "10.10.0.11")
    assert selector.startswith("pool-web-v4-")  # an nft map: the metrics name the pool instead
    for row in report["servers"]:
        row["packets"], row["bytes"] = 7, 7 * 1500
    for row in report["services"]:
        row["packets"], row["bytes"] = 3, 3 * 60
    families = scrape(daemon, report)
    per_server = [name for name in families if name.startswith("kdsr_server_")]
    assert set(per_server) >= {"kdsr_server_up", "kdsr_server_in_table", "kdsr_server_packets", "kdsr_server_bytes"}
    for name in per_server:
        for _sample, labels, _v in families[name][1]:
            assert set(labels) == SERVER_LABELS, (name, labels)
    for name in (n for n in families if n.startswith("kdsr_check_")):
        for _sample, labels, _v in families[name][1]:
            assert set(labels) == SERVER_LABELS | {"check"}, (name, labels)
    s1 = {"pool": "web", "server": "10.10.0.11", "server_node": "s1"}
    assert families["kdsr_server_packets"][0] == "counter"
    assert value(families, "kdsr_server_packets", "kdsr_server_packets_total", **s1) == 7
    assert value(families, "kdsr_server_bytes", "kdsr_server_bytes_total", **s1) == 7 * 1500
    assert value(families, "kdsr_server_up", server="10.10.0.12") == 0
    assert value(families, "kdsr_server_in_table", server="10.10.0.12") == 0
    # Members no monitor checks (pool web6) are in the table series too.
    assert value(families, "kdsr_server_in_table", pool="web6", server="fd00:10::11", server_node="") == 1
    web80 = {"service": "web", "vip": "10.10.0.100", "protocol": "tcp", "port": "80"}
    assert value(families, "kdsr_service_packets", "kdsr_service_packets_total", **web80) == 3
    assert value(families, "kdsr_service_bytes", "kdsr_service_bytes_total", **web80) == 180
    text = json.dumps(families)
    assert selector not in text and '"table"' not in text


def test_rows_that_name_their_pool_and_service_are_taken_as_named(daemon):  # noqa: F811
    """The counter report may name pool and service itself (named counters);
    a servers map shared by pinned selectors counts once."""
    started(daemon)
    report = {
        "services": [{"vip": "10.10.0.100", "protocol": "tcp", "port": "80", "service": "web", "packets": 5}],
        "servers": [
            {"selector": "pool-web-v4-aaaaaa", "pool": "web", "server": "10.10.0.11", "packets": 4, "bytes": 40,
             "counted_in": "servers-web-v4"},
            {"selector": "pool-web-v4-bbbbbb", "pool": "web", "server": "10.10.0.11", "packets": 4, "bytes": 40,
             "counted_in": "servers-web-v4"},
        ],
    }  # fmt: skip
    families = scrape(daemon, report)
    assert value(families, "kdsr_server_packets", "kdsr_server_packets_total", server="10.10.0.11") == 4
    assert value(families, "kdsr_service_packets", "kdsr_service_packets_total", service="web") == 5
    assert value(families, "kdsr_service_bytes", "kdsr_service_bytes_total", service="web") == 0


def _on_xdp(d: dict) -> None:
    for service in d["services"].values():
        service["dsr"] = {"mode": "l2", "engine": "xdp"}


def test_the_xdp_engines_counters_are_the_same_series_and_a_drained_server_keeps_its_own(tmp_path):
    """`kdsr run --metrics` with every service on the xdp engine: the
    program's per-CPU counters, summed, under the nft engine's metric names
    and labels; a server that goes down leaves the table but keeps its
    series and its count (monotonic), as an nft per-member chain does."""
    from test_health import Script

    from kdsr.commands import health as health_command
    from kdsr.health.daemon import Runner
    from kdsr.intent import load_intent
    from kdsr.kernel.state import StateStore
    from kdsr.kernel.xdp import COUNTER, service_key

    kernel = FakeKernel()
    kernel.sysctl.values.update({f"net/{f}/conf/eth0/forwarding": "0" for f in ("ipv4", "ipv6")})
    kernel.sysctl.values.update(
        {f"net/ipv4/conf/{s}/{n}": "0" for s in ("all", "eth0") for n in ("arp_ignore", "arp_announce")}
    )
    store = StateStore(tmp_path / "state")
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc(_on_xdp)))
    script = Script()
    runner = Runner(lambda: load_intent(path), "lb1", kernel, store, emit=lambda line: None, probe_fn=script)
    started(runner)
    info = kernel.xdp.io.attached["eth0"]
    maps, cpus = kernel.xdp.io.maps, kernel.xdp.io.cpus()
    maps[info.maps["service_stats"]][service_key("10.10.0.100", "tcp", 80)] = COUNTER.pack(3, 180) * cpus
    for index in maps[info.maps["servers"]]:
        maps[info.maps["server_stats"]][index] = COUNTER.pack(7, 700) * cpus

    def scrape_daemon() -> dict:
        server, scraped = health_command._bind_metrics(runner, kernel, store, "127.0.0.1:0")
        try:
            families = text_string_to_metric_families(metrics.exposition(scraped))
            return {f.name: (f.type, [(x.name, x.labels, x.value) for x in f.samples]) for f in families}
        finally:
            server.server_close()

    families = scrape_daemon()
    s2 = {"pool": "web", "server": "10.10.0.12", "server_node": "s2"}
    for name in ("kdsr_server_packets", "kdsr_server_bytes"):
        assert families[name][0] == "counter"
        assert {frozenset(labels) for _n, labels, _v in families[name][1]} == {frozenset(SERVER_LABELS)}
    assert value(families, "kdsr_server_packets", "kdsr_server_packets_total", **s2) == 7 * cpus
    assert value(families, "kdsr_server_bytes", "kdsr_server_bytes_total", **s2) == 700 * cpus
    assert value(families, "kdsr_server_packets", "kdsr_server_packets_total", server="fd00:10::11") == 7 * cpus
    web80 = {"service": "web", "vip": "10.10.0.100", "protocol": "tcp", "port": "80"}
    assert value(families, "kdsr_service_packets", "kdsr_service_packets_total", **web80) == 3 * cpus
    assert value(families, "kdsr_service_bytes", "kdsr_service_bytes_total", **web80) == 180 * cpus

    script.failing.add("10.10.0.12")
    feed(runner, 3)  # s2 down: its slots go to s1 and s3
    families = scrape_daemon()
    assert value(families, "kdsr_server_in_table", **s2) == 0
    assert value(families, "kdsr_server_packets", "kdsr_server_packets_total", **s2) == 7 * cpus
    report = operations.show(kernel, store, "lb1")  # what the metrics read (no intent): a row with no pool
    assert [(r["pool"], r["slots"], r["packets"]) for r in report["servers"] if r["server"] == "10.10.0.12"] == [
        ("", 0, 7 * cpus)
    ]
    named = operations.show(kernel, store, "lb1", runner.intent)  # `kdsr show INTENT`, the daemon: its pool
    assert [(r["pool"], r["slots"]) for r in named["servers"] if r["server"] == "10.10.0.12"] == [("web", 0)]


def test_probe_failures_and_reload_results_are_counted(daemon):  # noqa: F811
    started(daemon)
    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 2)
    families = scrape(daemon)
    assert families["kdsr_check_probe_failures"][0] == "counter"
    failures = "kdsr_check_probe_failures_total"
    assert value(families, "kdsr_check_probe_failures", failures, server="10.10.0.12") == 2
    assert value(families, "kdsr_check_probe_failures", failures, server="10.10.0.11") == 0
    assert value(families, "kdsr_check_probes", "kdsr_check_probes_total", server="10.10.0.12") == 2

    daemon.path.write_text("{not json")
    assert daemon.reload() is not None
    daemon.path.write_text(json.dumps(doc()))
    assert daemon.reload() is None
    daemon._stop_probes()
    families = scrape(daemon)
    assert value(families, "kdsr_reloads", "kdsr_reloads_total", result="failure") == 1
    assert value(families, "kdsr_reloads", "kdsr_reloads_total", result="success") == 1


def test_a_scrape_never_waits_long_for_a_slow_kernel_read_and_reads_never_pile_up():
    """The kernel read runs beside the scrapes: a scrape waits for it a
    bounded time, then serves the last read; once reads are slow, a scrape
    takes the last read at once and the next read starts after it."""
    release = threading.Event()
    reads = []

    def read() -> dict:
        reads.append(time.monotonic())
        if len(reads) == 2:
            release.wait(10)
        return {"n": len(reads)}

    rendered = []

    def encoder(collector) -> bytes:  # what the reading thread renders, once per read
        rendered.append(collector["n"])
        return str(collector["n"]).encode()

    counters = metrics.KernelCounters(read, lambda report: report, wait=0.5, fresh=0.0)
    assert counters.exposition("text", encoder) == b"1"  # a quick read: the scrape waited for it
    started = time.monotonic()
    assert counters.exposition("text", encoder) == b"1"  # read 2 hangs: at most `wait`, then read 1
    assert 0.4 < time.monotonic() - started < 3
    started = time.monotonic()
    assert counters.exposition("text", encoder) == b"1"  # read 2 is under way for longer than `wait`
    assert time.monotonic() - started < 0.3 and len(reads) == 2  # no second reader, no second wait
    release.set()
    deadline = time.monotonic() + 10
    while counters.read_seconds < 0.5 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert counters.exposition("text", encoder) == b"2"  # slow reads now: the last one, at once
    assert time.monotonic() - started < 0.3 and len(reads) == 2
    counters.refresh()  # after the answer: the next read
    deadline = time.monotonic() + 10
    while int(counters.exposition("text", encoder)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rendered == list(range(1, len(reads) + 1))  # each read rendered once, in the reading thread


def test_an_openmetrics_scrape_is_one_document_with_the_kernel_counters_in_it(daemon):  # noqa: F811
    started(daemon)
    report = operations.show(daemon.kernel, daemon.store, "lb1")
    scrape = metrics.scrape_for(daemon, lambda: report, wait=10)
    body, content_type = scrape.body("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.count("# EOF") == 1 and text.endswith("# EOF\n")
    families = {f.name: f.type for f in openmetrics_families(text)}
    assert families["kdsr_build"] == "info" and families["kdsr_apply_duration_seconds"] == "histogram"
    assert families["kdsr_service_packets"] == "counter" and families["kdsr_server_up"] == "gauge"


def _get(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return b"".join(iter(lambda: conn.recv(65536), b""))


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("listen", [":0", "[::]:0"])
def test_an_empty_or_wildcard_host_listens_on_every_address(daemon, listen):  # noqa: F811
    server = metrics.bind(listen, metrics.scrape_for(daemon, None))
    metrics.start(server)
    try:
        host, port = server.server_address[:2]
        if _ipv6():
            assert host == "::" and server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            assert metrics.listening(server) == f"[::]:{port}"
            assert _get("::1", port).startswith(b"HTTP/1.0 200")
        else:
            assert host == "0.0.0.0"
        reply = _get("127.0.0.1", port)
        assert reply.startswith(b"HTTP/1.0 200") and b"kdsr_build_info" in reply
    finally:
        server.shutdown()
        server.server_close()


def test_a_loopback_address_listens_there_only_and_serves_metrics_on_their_path(daemon):  # noqa: F811
    server = metrics.bind("127.0.0.1:0", metrics.scrape_for(daemon, None))
    metrics.start(server)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"kdsr_build_info", "kdsr_applies", "kdsr_server_up", "process_start_time_seconds"} <= names
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(answer.read()).decode().startswith("# HELP")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "listen, hint",
    [("9469", "ADDRESS:PORT"), ("127.0.0.1:http", "ADDRESS:PORT"), ("::1:9469", "[::1]:9469"), (":70000", "PORT")],
)
def test_a_bad_metrics_address_is_a_usage_error_before_anything_is_applied(tmp_path, monkeypatch, listen, hint):
    with pytest.raises(UsageError) as error:
        metrics.parse_listen(listen)
    assert hint in str(error.value)
    kernel = install_kernel(monkeypatch, FakeKernel())
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc()))
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path / "s"), "run", str(path), "--metrics", listen])
    assert result.exit_code == 4, result.output
    assert "--metrics" in result.output and "Traceback" not in result.output
    assert kernel.writes == 0


def test_a_metrics_port_another_program_holds_stops_kdsr_run_before_its_first_apply(tmp_path, monkeypatch):
    kernel = install_kernel(monkeypatch, FakeKernel())
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc()))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--state-dir", str(tmp_path / "s"), "run", str(path), "--node", "lb1", "--metrics", f"127.0.0.1:{port}"]
        result = CliRunner().invoke(main, argv)
    assert result.exit_code == 4, result.output
    assert f"--metrics 127.0.0.1:{port}: cannot listen there" in result.output and "Traceback" not in result.output
    assert kernel.writes == 0


def test_the_counter_reader_child_reports_its_failure_and_is_bounded(tmp_path, monkeypatch):
    """kdsr/health/counter_reader.py: a child that fails is an error with its
    last line; one that takes too long is stopped (by its pid) and is an error."""
    monkeypatch.setattr(
        counter_reader,
        "_command",
        lambda state_dir, node: ["/bin/sh", "-c", "echo one >&2; echo 'no table here' >&2; exit 3"],
    )
    with pytest.raises(counter_reader.CounterReadError, match="no table here"):
        counter_reader.read(str(tmp_path), "lb1")
    monkeypatch.setattr(counter_reader, "_command", lambda state_dir, node: ["/bin/sh", "-c", "sleep 30"])
    with pytest.raises(counter_reader.CounterReadError, match="longer than 0.5 s"):
        counter_reader.read(str(tmp_path), "lb1", timeout=0.5)
    monkeypatch.setattr(
        counter_reader,
        "_command",
        lambda state_dir, node: ["/bin/sh", "-c", 'echo \'{"services": [], "servers": []}\''],
    )
    assert counter_reader.read(str(tmp_path), "lb1") == {"services": [], "servers": []}


def test_in_table_is_encoded_again_only_when_the_intent_or_the_members_out_change(daemon):  # noqa: F811
    """kdsr_server_in_table is 16,000 samples at 10,000 VIPs x 16 servers:
    a scrape reuses its rendering until the intent or the members taken
    out change, and then shows the change."""
    runner = started(daemon)
    scrape = metrics.scrape_for(runner, None)
    encodes = []
    real = metrics.InTableCollector.collect
    runner.out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics.InTableCollector, "collect", lambda self: encodes.append(1) or real(self))
        first = metrics.exposition(scrape)
        again = metrics.exposition(scrape)
        # (the rest of a scrape is live: probe counts and latencies may move between two)
        in_table = [line for line in first.splitlines() if "in_table" in line]
        assert len(encodes) == 1 and in_table == [line for line in again.splitlines() if "in_table" in line]
        runner.out = {"web": ("10.10.0.12",)}  # health took it out: a new object
        taken_out = metrics.exposition(scrape)
        assert len(encodes) == 2
    line = 'kdsr_server_in_table{pool="web",server="10.10.0.12"'
    assert f'{line},server_node="s2"}} 1.0' in first and f'{line},server_node="s2"}} 0.0' in taken_out


# --- the ipvs engine: IPVS's own counters -------------------------------------------


def _on_ipvs(d: dict) -> None:
    """Service web (tcp/80, 443) on IPVS (L2, DR), its pool checked by plain probes."""
    d["services"]["web"]["dsr"] = {"mode": "l2", "engine": "ipvs"}
    d["pools"]["web"]["health"]["mode"] = "plain"


def test_ipvs_counters_are_series_named_by_the_daemon_s_intent_and_survive_a_health_event(daemon):  # noqa: F811
    """kdsr run --metrics on the ipvs engine: the read (commands/health.py's,
    as the counter reader child makes it) names IPVS services and pools
    with the intent the daemon runs; a server health takes out is weight 0,
    edited in place, so its counters do not go back."""
    daemon.path.write_text(json.dumps(doc(_on_ipvs)))
    daemon.kernel.sysctl.values.update(
        {f"net/ipv4/vs/{k}": "0" for k in ("expire_nodest_conn", "sloppy_tcp", "schedule_icmp")}
    )
    started(daemon)
    assert set(daemon.kernel.ipvs.services) == {"tcp 10.10.0.100:80", "tcp 10.10.0.100:443"}
    daemon.kernel.ipvs.counts.update(
        {
            "tcp 10.10.0.100:80": (5, 50, 5000),
            ("tcp 10.10.0.100:80", "10.10.0.11:80"): (3, 30, 3000),
            ("tcp 10.10.0.100:80", "10.10.0.12:80"): (2, 20, 2000),
            ("tcp 10.10.0.100:443", "10.10.0.12:443"): (1, 7, 700),
        }
    )
    server, scrape = health_commands._bind_metrics(daemon, daemon.kernel, daemon.store, "127.0.0.1:0")
    server.server_close()  # never served: the scrapes below render in this thread
    scrape.kernel.wait, scrape.kernel.fresh = 10.0, 0.0

    def families() -> dict:
        parsed = text_string_to_metric_families(metrics.exposition(scrape))
        return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples]) for f in parsed}

    first = families()
    web80 = {"service": "web", "vip": "10.10.0.100", "protocol": "tcp", "port": "80"}
    assert value(first, "kdsr_service_packets", "kdsr_service_packets_total", **web80) == 50
    assert value(first, "kdsr_service_bytes", "kdsr_service_bytes_total", **web80) == 5000
    assert value(first, "kdsr_service_connections", "kdsr_service_connections_total", **web80) == 5
    s2 = {"pool": "web", "server": "10.10.0.12", "server_node": "s2"}
    assert value(first, "kdsr_server_packets", "kdsr_server_packets_total", **s2) == 27  # both services of the pool
    assert value(first, "kdsr_server_connections", "kdsr_server_connections_total", **s2) == 3
    for name in ("kdsr_server_packets", "kdsr_server_bytes", "kdsr_server_connections"):
        assert all(set(labels) == SERVER_LABELS for _s, labels, _v in first[name][1]), name
    # nft services keep no connection table: no connection series for them.
    assert {lab["service"] for _s, lab, _v in first["kdsr_service_connections"][1]} == {"web"}

    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 3)
    weights = {d.address: d.weight for d in daemon.kernel.ipvs.services["tcp 10.10.0.100:80"].dests}
    assert weights["10.10.0.12"] == 0  # taken out: weight 0, the same destination
    daemon.kernel.ipvs.counts[("tcp 10.10.0.100:80", "10.10.0.11:80")] = (4, 40, 4000)
    second = families()
    assert value(second, "kdsr_server_packets", "kdsr_server_packets_total", **s2) == 27
    assert value(second, "kdsr_server_packets", "kdsr_server_packets_total", server="10.10.0.11") == 40


def test_the_counter_reader_child_gets_the_ipvs_labels_on_stdin(tmp_path, monkeypatch, capsys):
    """The daemon hands the child lb_ipvs.service_labels of its intent on
    stdin (IPVS holds no names); the child passes them to operations.show."""
    labels = {"tcp 10.10.0.100:80": {"service": "web", "pool": "web", "vip": "10.10.0.100"}}
    assert counter_reader._command("/s", "lb1")[-1] == "--ipvs-labels"
    monkeypatch.setattr(counter_reader, "_command", lambda state_dir, node: ["/bin/sh", "-c", "cat"])
    assert counter_reader.read(str(tmp_path), "lb1", ipvs_labels=labels) == labels
    seen = {}

    def show(kernel, store, node, intent=None, ipvs_labels=None):
        seen.update(node=node, labels=ipvs_labels)
        return {"services": []}

    monkeypatch.setattr(counter_reader.operations, "show", show)
    monkeypatch.setattr(counter_reader, "SystemKernel", FakeKernel)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(labels)))
    assert counter_reader.main([str(tmp_path), "lb1", "--ipvs-labels"]) == 0
    assert seen == {"node": "lb1", "labels": labels} and json.loads(capsys.readouterr().out) == {"services": []}
