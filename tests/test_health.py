"""Health monitoring without a lab: the rise/fall state machine, the effective
intent, probe targets and paths, the daemon driven by scripted probe results
against the fake kernel, metrics, and real probes to loopback listeners."""

from __future__ import annotations

import copy
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from click.testing import CliRunner

from kdsr import naming, operations
from kdsr.cli import main
from kdsr.compile import compile_node
from kdsr.compile.effective import POOL_ALL_DOWN_DROPPED, POOL_ALL_DOWN_KEPT, POOL_DEGRADED, effective_intent
from kdsr.compile.targets import targets_for
from kdsr.errors import IntentError
from kdsr.health import metrics
from kdsr.health import status as health_status
from kdsr.health.daemon import Runner, log_line
from kdsr.health.probes import Result, probe, status_matches
from kdsr.health.state import DOWN, UP, TargetState
from kdsr.intent import parse_intent
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore
from kdsr.service_view import table_slots

BASE = {
    "version": 1,
    "services": {
        "web": {"vip": "10.10.0.100", "ports": [80, 443], "protocols": "tcp", "pool": "web"},
        "web6": {"vip": "fd00:10::100", "ports": 80, "pool": "web6"},
    },
    "pools": {
        "web": {
            "servers": [{"node": "s1"}, {"node": "s2"}, {"node": "s3"}],
            "health": {"type": "tcp", "port": 80, "interval": 1, "timeout": 0.5, "rise": 2, "fall": 3},
        },
        "web6": {"servers": [{"address": "fd00:10::11"}, {"address": "fd00:10::12"}]},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24", "fd00:10::2/64"]}},
    "servers": {
        "s1": {"interface": "eth0", "addresses": ["10.10.0.11/24"]},
        "s2": {"interface": "eth0", "addresses": ["10.10.0.12/24"]},
        "s3": {"interface": "eth0", "addresses": ["10.10.0.13/24"]},
    },
}


def doc(mutate=None) -> dict:
    d = copy.deepcopy(BASE)
    if mutate:
        mutate(d)
    return d


def intent(mutate=None):
    return parse_intent(json.dumps(doc(mutate)), "health.json")


# --- state machine -------------------------------------------------------------


def test_down_after_fall_failures_in_a_row_and_up_after_rise_successes():
    state = TargetState(rise=2, fall=3)
    results = [False, False, True, False, False, False, True, True]
    changes = [state.record(ok, "refused", 0.001, float(i)) for i, ok in enumerate(results)]
    assert changes == [False, False, False, False, False, True, False, True]
    assert state.state == UP and state.transitions == 2 and state.since == 7.0


@pytest.mark.parametrize(("rise", "fall"), [(1, 1), (2, 3), (3, 2)])
def test_a_flapping_server_changes_at_most_once_per_rise_or_fall_window(rise, fall):
    state = TargetState(rise=rise, fall=fall)
    # 100 probes of a server whose answers alternate in runs of one to three.
    pattern = [True, False, False, True, True, True, False, True, False, False, False]
    results = [pattern[i % len(pattern)] for i in range(100)]
    change_at = [i for i, ok in enumerate(results) if state.record(ok, "x", 0.0, float(i))]
    window = min(rise, fall)
    assert all(b - a >= window for a, b in zip(change_at, change_at[1:], strict=False)), change_at


# --- effective intent ----------------------------------------------------------


def weights(it, pool: str) -> dict[str, int]:
    return {str(m.address): m.weight for m in it.pool(pool).members}


def test_down_and_drained_servers_keep_their_place_at_weight_zero():
    eff = effective_intent(intent(), frozenset({("web", "10.10.0.12")}), frozenset({"fd00:10::11"}))
    assert weights(eff.intent, "web") == {"10.10.0.11": 1, "10.10.0.12": 0, "10.10.0.13": 1}
    assert weights(eff.intent, "web6") == {"fd00:10::11": 0, "fd00:10::12": 1}
    assert eff.pools == {"web": POOL_DEGRADED, "web6": "ok"}
    # A drain by node name works too.
    eff = effective_intent(intent(), drained=frozenset({"s3"}))
    assert weights(eff.intent, "web")["10.10.0.13"] == 0


def test_table_size_does_not_change_when_a_server_goes_down():
    before = {s.name: s.table_size for s in compile_selectors(intent())}
    down = effective_intent(intent(), frozenset({("web", "10.10.0.12")})).intent
    assert {s.name: s.table_size for s in compile_selectors(down)} == before


def compile_selectors(it):
    from kdsr.compile.selectors import selectors_for

    return selectors_for(it)


@pytest.mark.parametrize(("all_down", "expected"), [("keep", POOL_ALL_DOWN_KEPT), ("drop", POOL_ALL_DOWN_DROPPED)])
def test_every_server_down_follows_the_pools_all_down(all_down, expected):
    it = intent(lambda d: d["pools"]["web"].update(all_down=all_down))
    down = frozenset(("web", f"10.10.0.1{i}") for i in (1, 2, 3))
    eff = effective_intent(it, down)
    assert eff.pools["web"] == expected
    kept = set(weights(eff.intent, "web").values()) == {1}
    assert kept == (all_down == "keep")


def test_drained_servers_stay_out_when_the_rest_are_down_and_all_down_keeps():
    down = frozenset({("web", "10.10.0.11"), ("web", "10.10.0.12")})
    eff = effective_intent(intent(), down, frozenset({"s3"}))
    assert eff.pools["web"] == POOL_ALL_DOWN_KEPT
    assert weights(eff.intent, "web") == {"10.10.0.11": 1, "10.10.0.12": 1, "10.10.0.13": 0}


# --- targets and paths ---------------------------------------------------------


def test_dsr_targets_probe_the_vip_with_a_per_server_mark():
    targets = targets_for(intent())
    assert [(t.server, t.address, t.port) for t in targets] == [
        ("10.10.0.11", "10.10.0.100", 80),
        ("10.10.0.12", "10.10.0.100", 80),
        ("10.10.0.13", "10.10.0.100", 80),
    ]
    assert [t.mark for t in targets] == [naming.probe_mark(t.server) for t in targets]
    assert len({t.mark for t in targets}) == 3 and all(naming.is_kdsr_mark(t.mark) for t in targets)


def test_plain_targets_probe_the_servers_own_address_unmarked():
    it = intent(lambda d: d["pools"]["web"]["health"].update(mode="plain", port=8080))
    assert [(t.address, t.port, t.mark) for t in targets_for(it)] == [
        ("10.10.0.11", 8080, 0),
        ("10.10.0.12", 8080, 0),
        ("10.10.0.13", 8080, 0),
    ]


def test_l3_dsr_targets_use_the_servers_tunnel_marks():
    def l3(d):
        d["services"]["web"]["dsr"] = {"mode": "l3-gre"}

    targets = targets_for(intent(l3))
    assert [t.mark for t in targets] == [naming.tunnel_mark("l3-gre", t.server) for t in targets]


def test_l2_dsr_monitors_compile_to_a_route_via_each_server_and_a_rule():
    desired = compile_node(intent(), "lb1")
    routes = {r.ident for r in desired.routes}
    assert routes == {
        f"ipv4 table {naming.probe_mark(a):#x} default via {a} dev eth0"
        for a in ("10.10.0.11", "10.10.0.12", "10.10.0.13")
    }
    assert {r.fwmark for r in desired.rules} == {naming.probe_mark(f"10.10.0.1{i}") for i in (1, 2, 3)}
    # Without monitors, no routes at all.
    plain = compile_node(intent(lambda d: d["pools"]["web"].pop("health")), "lb1")
    assert not plain.routes and not plain.rules


# --- the daemon against the fake kernel ------------------------------------------


class Script:
    """Probe results by server address; anything unscripted succeeds."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def __call__(self, target) -> Result:
        if target.server in self.failing:
            return Result(False, 0.001, "connection refused")
        return Result(True, 0.001)


@pytest.fixture
def daemon(tmp_path):
    kernel = FakeKernel()
    kernel.sysctl.values.update(
        {f"net/ipv4/conf/{s}/{n}": "0" for s in ("all", "eth0") for n in ("arp_ignore", "arp_announce")}
    )
    store = StateStore(tmp_path / "state")
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc()))
    lines: list[str] = []
    script = Script()

    def load():
        from kdsr.intent import load_intent

        return load_intent(path)

    runner = Runner(load, "lb1", kernel, store, emit=lines.append, probe_fn=script)
    runner.path, runner.lines, runner.script = path, lines, script  # type: ignore[attr-defined]
    return runner


def feed(runner: Runner, rounds: int) -> None:
    """Probe every target ``rounds`` times, synchronously, and let the runner act after each round."""
    for _ in range(rounds):
        for key, target in runner.targets.items():
            runner.results.put((runner._generation, key, runner._probe(target)))
        runner.step(poll=0)


def slots_of(runner: Runner, server: str) -> int:
    table = runner.kernel.nft.read_table("netdev", "kdsr")
    return sum(servers.count(server) for name, servers in table_slots(table).items() if name.startswith("pool-web-"))


def test_daemon_takes_a_failing_server_out_in_one_transaction_and_brings_it_back(daemon):
    daemon.start()
    daemon._stop_probes()  # the test feeds results itself
    assert slots_of(daemon, "10.10.0.12") > 0
    writes = daemon.kernel.writes
    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 2)
    assert daemon.kernel.writes == writes  # fall is 3
    feed(daemon, 1)
    assert daemon.kernel.writes == writes + 1  # one nft transaction
    assert slots_of(daemon, "10.10.0.12") == 0
    assert any("event=health" in line and "server=10.10.0.12" in line and "state=down" in line for line in daemon.lines)
    view = health_status.read(daemon.store, "lb1")
    assert {(s["server"], s["state"], s["in_table"]) for s in view["servers"]} >= {("10.10.0.12", DOWN, False)}
    # A manual plan while the daemon is alive sees the same table: no change.
    assert operations.prepare(intent(), "lb1", daemon.kernel, daemon.store).plan.empty
    daemon.script.failing.clear()
    feed(daemon, 2)
    assert slots_of(daemon, "10.10.0.12") > 0 and daemon.kernel.writes == writes + 2


def test_a_kdsr_apply_next_in_line_for_the_lock_sees_the_server_the_daemon_took_out(daemon, monkeypatch):
    # `kdsr apply` plans under the store lock with the down set of the
    # daemon's status.  Were the status written after the lock is let go, an
    # apply waiting for it would put the dead server back, and the daemon,
    # having nothing new to act on, would leave it there.
    daemon.start()
    daemon._stop_probes()
    next_in_line = []
    lock = daemon.store.lock

    class ThenAnApply:
        def __init__(self, wait: float = 0.0) -> None:
            self.held = lock(wait)

        def __enter__(self):
            self.held.__enter__()
            return self

        def __exit__(self, *exc):
            self.held.__exit__(*exc)
            next_in_line.append(operations.prepare(intent(), "lb1", daemon.kernel, daemon.store).plan)

    monkeypatch.setattr(daemon.store, "lock", ThenAnApply)
    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 3)
    assert slots_of(daemon, "10.10.0.12") == 0
    assert next_in_line and next_in_line[-1].empty, next_in_line[-1].changes


def test_daemon_flapping_server_makes_at_most_one_table_change_per_window(daemon):
    daemon.start()
    daemon._stop_probes()
    writes = daemon.kernel.writes
    for i in range(30):  # alternate every probe: never 3 failures or 2 successes in a row... except by design
        (daemon.script.failing.add if i % 2 else daemon.script.failing.discard)("10.10.0.11")
        feed(daemon, 1)
    assert daemon.kernel.writes == writes


def test_daemon_reload_with_a_bad_intent_keeps_the_old_one(daemon):
    daemon.start()
    daemon._stop_probes()
    daemon.path.write_text("{ not json")
    daemon.reload()
    assert any("event=reload-failed" in line for line in daemon.lines)
    assert daemon.intent is not None and daemon.targets
    daemon._stop_probes()


def test_daemon_restart_keeps_a_down_server_down(daemon, tmp_path):
    daemon.start()
    daemon._stop_probes()
    daemon.script.failing.add("10.10.0.13")
    feed(daemon, 3)
    assert slots_of(daemon, "10.10.0.13") == 0
    writes = daemon.kernel.writes
    again = Runner(lambda: daemon._load(), "lb1", daemon.kernel, daemon.store, emit=[].append, probe_fn=daemon.script)
    again.start()
    again._stop_probes()
    assert daemon.kernel.writes == writes, "restarting re-added the down server (a flap)"
    assert again.states[next(k for k, t in again.targets.items() if t.server == "10.10.0.13")].state == DOWN


def test_daemon_refuses_a_bad_intent_before_touching_anything(tmp_path):
    kernel = FakeKernel()
    path = tmp_path / "bad.json"
    bad = doc(lambda d: d["pools"]["web"]["health"].update(timeout=5))
    path.write_text(json.dumps(bad))
    from kdsr.errors import IntentError
    from kdsr.intent import load_intent

    runner = Runner(lambda: load_intent(path), "lb1", kernel, StateStore(tmp_path / "s"), emit=[].append)
    with pytest.raises(IntentError) as caught:
        runner.start()
    assert "/pools/web/health/timeout" in str(caught.value)
    assert kernel.writes == 0


def test_drain_and_undrain_through_the_cli_functions(daemon):
    from kdsr.commands.health import set_drain

    it = intent()
    operations.apply(operations.prepare(it, "lb1", daemon.kernel, daemon.store), daemon.kernel, daemon.store)
    set_drain(it, "lb1", "s2", True, daemon.kernel, daemon.store, 0)
    assert slots_of(daemon, "10.10.0.12") == 0 and daemon.store.load("lb1").drained == {"s2"}
    # Apply honours the drain: a second apply of the intent changes nothing.
    assert operations.prepare(it, "lb1", daemon.kernel, daemon.store).plan.empty
    set_drain(it, "lb1", "s2", False, daemon.kernel, daemon.store, 0)
    assert slots_of(daemon, "10.10.0.12") > 0 and not daemon.store.load("lb1").drained


def test_drain_of_an_unknown_server_is_a_usage_error(tmp_path):
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc()))
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path / "s"), "drain", str(path), "s9", "--node", "lb1"])
    assert result.exit_code == 4 and "s9" in result.output and "Members: 10.10.0.11" not in result.output


# --- metrics and logs ----------------------------------------------------------


def test_metrics_render_health_applies_and_kernel_counters(daemon):
    daemon.start()
    daemon._stop_probes()
    daemon.script.failing.add("10.10.0.12")
    feed(daemon, 3)
    report = {"services": [{"vip": "10.10.0.100", "protocol": "tcp", "port": "80", "packets": 7}], "servers": []}
    text = metrics.exposition(metrics.scrape_for(daemon, lambda: report, wait=10))
    assert 'kdsr_server_up{pool="web",server="10.10.0.12",server_node="s2"} 0.0' in text
    assert 'kdsr_server_up{pool="web",server="10.10.0.11",server_node="s1"} 1.0' in text
    assert 'kdsr_applies_total{result="success"} 2.0' in text
    assert 'kdsr_service_packets_total{port="80",protocol="tcp",service="web",vip="10.10.0.100"} 7.0' in text
    assert all(line.startswith(("#", "kdsr_", "process_", "python_")) for line in text.splitlines())


def test_metrics_server_answers_on_loopback(daemon):
    server = metrics.bind("127.0.0.1:0", metrics.scrape_for(daemon, None))
    metrics.start(server)
    try:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b"".join(iter(lambda: conn.recv(4096), b""))
        assert reply.startswith(b"HTTP/1.0 200") and b"\nkdsr_build_info{" in reply
    finally:
        server.shutdown()
        server.server_close()


def test_log_lines_are_one_line_and_quote_what_needs_it():
    line = log_line("health", server="10.0.0.1", error='connect "refused"\nnext')
    assert "\n" not in line and line.split()[1] == "event=health"
    assert 'error="connect \\"refused\\"\\nnext"' in line


# --- real probes to loopback ---------------------------------------------------


def loopback_target(kind: str, port: int, **monitor):
    d = doc(lambda d: d["pools"]["web"].update(health={"type": kind, "mode": "plain", "port": port, **monitor}))
    target = targets_for(parse_intent(json.dumps(d), "t.json"))[0]
    import dataclasses

    return dataclasses.replace(target, address="127.0.0.1")


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_probe_passes_on_a_listener_and_fails_refused_without():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert probe(loopback_target("tcp", listener.getsockname()[1])).ok
    result = probe(loopback_target("tcp", free_port()))
    assert not result.ok and result.error == "connection refused"


def test_udp_probe_checks_the_reply():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def answer():
            for _ in range(2):
                data, peer = server.recvfrom(100)
                server.sendto(b"pong " + data, peer)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert probe(loopback_target("udp", port, send="ping", expect="pong")).ok
        bad = probe(loopback_target("udp", port, send="ping", expect="nope"))
        assert not bad.ok and "nope" in bad.error
        thread.join(timeout=2)
    silent = probe(loopback_target("udp", free_port(socket.SOCK_DGRAM), timeout=0.2, interval=1))
    assert not silent.ok


def test_http_probe_checks_status_and_body():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = 200 if self.path == "/ok" else 503
            body = b"healthy" if code == 200 else b"no"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert probe(loopback_target("http", port, path="/ok", body="healthy")).ok
        assert probe(loopback_target("http", port, path="/down")).error == "status 503"
        assert probe(loopback_target("http", port, path="/ok", body="nope")).error.startswith("body lacks")
        assert probe(loopback_target("http", port, path="/down", status=[503])).ok
    finally:
        server.shutdown()
        server.server_close()


def test_status_classes_and_codes():
    assert status_matches(204, ("2xx",)) and status_matches(301, ("2xx", "3xx"))
    assert not status_matches(404, ("2xx", "3xx")) and status_matches(404, ("404",))


def test_an_l2_probe_mark_colliding_with_another_is_an_error(monkeypatch):
    # The 23-bit digests practically never collide; force it to see the check.
    monkeypatch.setattr(naming, "probe_mark", lambda address: naming.MARK_BASE | 7)
    with pytest.raises(IntentError) as info:
        intent()
    text = str(info.value)
    assert "same mark and routing table" in text and "l2 health probe route" in text
    assert "/pools/web/servers/1" in text


def test_probe_marks_are_checked_only_where_probes_route(monkeypatch):
    monkeypatch.setattr(naming, "probe_mark", lambda address: naming.MARK_BASE | 7)
    intent(lambda d: [p.pop("health", None) for p in d["pools"].values()])  # no monitor: no probe routes


def test_a_failing_receipt_hook_neither_fails_the_apply_nor_stops_the_daemon(tmp_path):
    """kdsr run's receipt is a cache: any error recording it is logged and the apply stands."""
    from kdsr.intent import load_intent

    kernel = FakeKernel()
    kernel.sysctl.values.update(
        {f"net/ipv4/conf/{s}/{n}": "0" for s in ("all", "eth0") for n in ("arp_ignore", "arp_announce")}
    )
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc()))
    lines: list[str] = []

    def failing(prepared):
        raise RuntimeError("netlink said no")

    runner = Runner(
        lambda: load_intent(path),
        "lb1",
        kernel,
        StateStore(tmp_path / "s"),
        emit=lines.append,
        probe_fn=Script(),
        verified=failing,
    )
    runner.start()
    runner._stop_probes()
    assert runner.counters.applies == 1 and runner.counters.apply_failures == 0
    assert kernel.writes > 0
    assert any("event=receipt-failed" in line and "netlink said no" in line for line in lines), lines


# --- wake-ups, drift and the log's clock ---------------------------------------


def test_log_timestamps_come_from_one_reading_of_the_clock(monkeypatch):
    """The clock read at x.9995 s and again 0.8 ms later: the stamp is
    x.999, not (from the second reading's milliseconds) x.000."""
    import time as real_time

    from kdsr.health import daemon as daemon_module

    second = 1_767_225_599  # 2025-12-31T23:59:59Z
    readings = iter([second * 10**9 + 999_500_000, (second + 1) * 10**9 + 300_000])

    class Clock:
        """The `time` module with a clock that moves between two readings."""

        strftime = staticmethod(real_time.strftime)

        @staticmethod
        def time_ns() -> int:
            return next(readings)

        @staticmethod
        def time() -> float:
            return next(readings) / 1e9

        @staticmethod
        def gmtime(seconds=None):
            return real_time.gmtime(Clock.time() if seconds is None else seconds)

    monkeypatch.setattr(daemon_module, "time", Clock)
    assert log_line("x").split()[0] == "ts=2025-12-31T23:59:59.999Z"


def test_timestamps_cut_to_the_millisecond():
    from kdsr.health.daemon import timestamp

    assert timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(1_999_999_999) == "1970-01-01T00:00:01.999Z"
    assert timestamp(2_000_000_000) == "1970-01-01T00:00:02.000Z"


@pytest.fixture
def signals(daemon):
    """The daemon started, probes stopped, its signal handlers installed (and restored after)."""
    import signal

    daemon.start()
    daemon._stop_probes()
    daemon.install_signals()
    try:
        yield signal
    finally:
        daemon.restore_signals()
        daemon._stop_probes()


def _signal_soon(number: int, after: float = 0.3) -> threading.Thread:
    import os

    thread = threading.Thread(target=lambda: (threading.Event().wait(after), os.kill(os.getpid(), number)))
    thread.start()
    return thread


def test_a_sighup_wakes_the_loop_at_once_not_after_its_poll(daemon, signals):
    """The loop's longest sleep is 10 s here; the reload starts as soon as SIGHUP lands."""
    import time

    sender = _signal_soon(signals.SIGHUP)
    started = time.monotonic()
    daemon.step(poll=10)
    took = time.monotonic() - started
    sender.join()
    assert any("event=reloaded" in line for line in daemon.lines), daemon.lines
    assert took < 3, f"SIGHUP handled {took:.2f} s after it was sent 0.3 s into a 10 s poll"


def test_sigterm_stops_the_loop_at_once_and_run_forever_returns_0(daemon, signals):
    import time

    sender = _signal_soon(signals.SIGTERM)
    started = time.monotonic()
    assert daemon.run_forever() == 0
    sender.join()
    assert time.monotonic() - started < 1.5
    assert daemon.lines[-1].split()[1] == "event=stopped"


def test_a_probe_result_wakes_the_loop(daemon):
    """Probe threads wake the main thread: a step with a 10 s poll returns
    with the first results (interval 1 s, first round spread over it)."""
    import time

    daemon.start()
    daemon._stop_probes()
    daemon._start_probes()
    try:
        started = time.monotonic()
        daemon.step(poll=10)
        took = time.monotonic() - started
    finally:
        daemon._stop_probes()
    assert took < 3 and any(s.probes for s in daemon.states.values()), took


def drift_runner(tmp_path, check_interval: float = 30.0):
    """A daemon against the fake kernel with an nftables generation, started, probes stopped."""
    from generation_kernel import GenerationKernel

    from kdsr.intent import load_intent

    kernel = GenerationKernel()
    kernel.sysctl.values.update(
        {f"net/ipv4/conf/{s}/{n}": "0" for s in ("all", "eth0") for n in ("arp_ignore", "arp_announce")}
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc()))
    lines: list[str] = []
    runner = Runner(
        lambda: load_intent(path),
        "lb1",
        kernel,
        StateStore(tmp_path / "state"),
        emit=lines.append,
        probe_fn=Script(),
        check_interval=check_interval,
    )
    runner.lines = lines  # type: ignore[attr-defined]
    runner.start()
    runner._stop_probes()
    return runner


def test_a_drift_check_with_nothing_changed_lists_no_table_and_writes_nothing(tmp_path):
    runner = drift_runner(tmp_path)
    kernel = runner.kernel
    reads, writes = kernel.table_reads, kernel.writes
    runner.check_drift()
    assert (kernel.table_reads, kernel.writes) == (reads, writes)
    assert runner.counters.drift_checks == 1 and runner.counters.drift_repairs == 0
    assert not [line for line in runner.lines if "event=drift" in line]


def test_hand_deleted_service_and_slot_elements_are_repaired_logged_and_counted(tmp_path):
    runner = drift_runner(tmp_path)
    kernel = runner.kernel
    service = kernel.delete_element("netdev", "kdsr", "services-v4")
    slot_map = next(name for name in kernel.nft.tables[("netdev", "kdsr")].maps if name.startswith("pool-web-v4-"))
    slot = kernel.delete_element("netdev", "kdsr", slot_map)
    writes = kernel.writes
    runner.check_drift()
    assert kernel.writes == writes + 1  # one nft transaction
    maps = kernel.nft.tables[("netdev", "kdsr")].maps
    assert service in maps["services-v4"][1] and slot in maps[slot_map][1]
    (line,) = [line for line in runner.lines if "event=drift-repaired" in line]
    assert "changes=2" in line and f"{slot_map}[{slot}]" in line and "services-v4[10.10.0.100 . tcp . " in line, line
    assert runner.counters.drift_repairs == 1
    text = metrics.exposition(metrics.scrape_for(runner, None))
    assert "kdsr_drift_repairs_total 1.0" in text and "kdsr_drift_check_duration_seconds_count 1.0" in text
    # Repaired and verified again: the next check is the cheap one.
    reads = kernel.table_reads
    runner.check_drift()
    assert kernel.table_reads == reads and runner.counters.drift_repairs == 1


def test_a_hand_deleted_probe_route_is_repaired(tmp_path):
    """Routes have no generation: the check reads and diffs them each time."""
    runner = drift_runner(tmp_path)
    route = runner.kernel.links.routes.pop()
    runner.check_drift()
    assert route in runner.kernel.links.routes
    (line,) = [line for line in runner.lines if "event=drift-repaired" in line]
    assert "changes=1" in line and "+ route " in line, line


def test_another_programs_commit_costs_one_full_plan_and_repairs_nothing(tmp_path):
    runner = drift_runner(tmp_path)
    kernel = runner.kernel
    kernel.hand_edit()  # a commit to some other table moves the generation too
    reads, writes = kernel.table_reads, kernel.writes
    runner.check_drift()
    assert kernel.table_reads == reads + 1 and kernel.writes == writes
    assert runner.counters.drift_repairs == 0 and not [line for line in runner.lines if "event=drift" in line]
    runner.check_drift()
    assert kernel.table_reads == reads + 1, "verified again at the new generation: no further listing"


def test_the_loop_checks_for_drift_every_interval_and_0_turns_it_off(tmp_path):
    import time

    runner = drift_runner(tmp_path / "on", check_interval=0.2)
    runner.kernel.delete_element("netdev", "kdsr", "services-v4")
    started = time.monotonic()
    while not runner.counters.drift_repairs and time.monotonic() - started < 5:
        runner.step(poll=1)
    assert runner.counters.drift_repairs == 1 and time.monotonic() - started < 2

    off = drift_runner(tmp_path / "off", check_interval=0)
    off.kernel.delete_element("netdev", "kdsr", "services-v4")
    for _ in range(3):
        off.step(poll=0.1)
    assert off.counters.drift_checks == 0 and off.counters.drift_repairs == 0


@pytest.mark.parametrize("example", ["l3-gre-ipvs", "l3-ipip"])
def test_a_hand_removed_ipvs_destination_or_tunnel_link_is_repaired(tmp_path, example):
    """What has no nftables generation is read at each check: an IPVS
    destination (ipvs engine) or a tunnel link (nft engine, L3) removed by
    hand is back after the next one."""
    import dataclasses
    from pathlib import Path

    from generation_kernel import GenerationKernel

    from kdsr.intent import load_intent

    kernel = GenerationKernel()
    kernel.sysctl.values.update(
        {k: "0" for k in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")}
        | {f"net/ipv4/vs/{k}": "0" for k in ("expire_nodest_conn", "sloppy_tcp", "schedule_icmp")}
    )
    path = Path(__file__).resolve().parent.parent / "examples" / f"{example}.json"
    lines: list[str] = []
    runner = Runner(lambda: load_intent(path), "lb1", kernel, StateStore(tmp_path / "s"), emit=lines.append)
    runner.start()
    runner._stop_probes()
    if example.endswith("ipvs"):
        ident, service = next(iter(kernel.ipvs.services.items()))
        kernel.ipvs.services[ident] = dataclasses.replace(service, dests=service.dests[1:])
        what = "ipvs"
    else:
        name = next(iter(kernel.links.tunnels))
        kernel.links.link_del(name)
        what = f"link {name}"
    runner.check_drift()
    (line,) = [line for line in lines if "event=drift-repaired" in line]
    assert what in line, line
    assert operations.prepare(load_intent(path), "lb1", kernel, runner.store).plan.empty
    assert runner.counters.drift_repairs == 1
