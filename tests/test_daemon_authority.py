"""The running daemon is the one runtime authority on a node.

While `kdsr run` runs for a node, `kdsr drain`, `undrain`, `show` and
`reload` go through its control socket, so its health view, its metrics and
the kernel never disagree (an undrain done behind its back used to leave
`show` and `kdsr_server_in_table` saying "out"); and a second daemon for the
same node stops with the lock code and the first one's pid.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
from cli_in_process import install_kernel, run_kdsr
from test_health import Script, doc, slots_of

from kdsr.errors import EXIT_INVALID_INTENT, EXIT_LOCKED, LockedError
from kdsr.health import control, metrics
from kdsr.health import status as health_status
from kdsr.health.daemon import Runner
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore


class Daemon:
    """A Runner with its lock and control socket, its loop on a thread (as `kdsr run` has them)."""

    def __init__(self, tmp_path, kernel: FakeKernel) -> None:
        self.path = tmp_path / "intent.json"
        self.path.write_text(json.dumps(doc()))
        self.store = StateStore(tmp_path / "state")
        self.lines: list[str] = []

        def load():
            from kdsr.intent import load_intent

            return load_intent(self.path)

        self.runner = Runner(load, "lb1", kernel, self.store, emit=self.lines.append, probe_fn=Script())
        self.held: list[control.DaemonLock] = []
        self.runner.start(claim=lambda node: self.held.append(control.DaemonLock(self.store, node)))
        self.runner._stop_probes()  # every server stays up: no probe results to act on
        path = control.socket_path(self.store, "lb1")
        self.server = control.ControlServer(path, self.runner.submit)
        self.held[0].record(path)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.runner.step(poll=0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        self.held[0].release()

    def in_table(self, server: str) -> bool:
        return next(s["in_table"] for s in self.runner.view()["servers"] if s["server"] == server)


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    kernel = install_kernel(monkeypatch, FakeKernel())
    running = Daemon(tmp_path, kernel)
    yield running
    running.close()


def test_drain_and_undrain_go_through_the_running_daemon(daemon, tmp_path):
    applies = daemon.runner.counters.applies
    drained = run_kdsr(tmp_path, "drain", str(daemon.path), "s2", "--node", "lb1")
    assert drained.exit_code == 0, drained.output
    assert "Done by the running kdsr run" in drained.output
    # In the daemon's own loop: its view, its metrics and the kernel agree at once.
    assert daemon.runner.counters.applies == applies + 1
    assert slots_of(daemon.runner, "10.10.0.12") == 0 and not daemon.in_table("10.10.0.12")
    text = metrics.exposition(metrics.scrape_for(daemon.runner, None))
    assert 'kdsr_server_in_table{pool="web",server="10.10.0.12",server_node="s2"} 0.0' in text
    assert any("event=drain" in line and "server=s2" in line for line in daemon.lines)

    undrained = run_kdsr(tmp_path, "undrain", str(daemon.path), "s2", "--node", "lb1", "--json")
    assert undrained.exit_code == 0, undrained.output
    assert json.loads(undrained.output)["applied"]["writes"] >= 1
    assert slots_of(daemon.runner, "10.10.0.12") > 0 and daemon.in_table("10.10.0.12")
    view = health_status.read(daemon.store, "lb1")
    assert all(s["in_table"] for s in view["servers"]), view["servers"]
    text = metrics.exposition(metrics.scrape_for(daemon.runner, None))
    assert 'kdsr_server_in_table{pool="web",server="10.10.0.12",server_node="s2"} 1.0' in text


def test_a_refused_drain_comes_back_from_the_daemon_with_its_exit_code(daemon, tmp_path):
    for server in ("s1", "s2"):
        assert run_kdsr(tmp_path, "drain", str(daemon.path), server, "--node", "lb1").exit_code == 0
    refused = run_kdsr(tmp_path, "drain", str(daemon.path), "s3", "--node", "lb1")
    assert refused.exit_code == 4 and "--force" in refused.output, refused.output
    assert slots_of(daemon.runner, "10.10.0.13") > 0


def test_show_and_reload_go_through_the_daemon(daemon, tmp_path):
    shown = run_kdsr(tmp_path, "show", "--json")
    assert shown.exit_code == 0, shown.output
    shown_doc = json.loads(shown.output)
    assert any(t.startswith("netdev kdsr") for t in shown_doc["kernel"]["tables"])
    # The daemon knows its intent: weights and nodes without naming the intent.
    (web,) = [s for s in shown_doc["services"] if s["service"] == "web"]
    assert {(r["node"], r["weight"]) for r in web["servers"]} == {("s1", 1), ("s2", 1), ("s3", 1)}, web
    edited = doc()
    edited["pools"]["web"]["servers"][1]["weight"] = 3
    daemon.path.write_text(json.dumps(edited))
    reloaded = run_kdsr(tmp_path, "reload")
    assert reloaded.exit_code == 0, reloaded.output
    assert slots_of(daemon.runner, "10.10.0.12") > slots_of(daemon.runner, "10.10.0.11")
    edited["pools"]["web"]["servers"][1]["weight"] = -1
    daemon.path.write_text(json.dumps(edited))
    bad = run_kdsr(tmp_path, "reload")
    assert bad.exit_code == EXIT_INVALID_INTENT and "/pools/web/servers/1/weight" in bad.output, bad.output


def test_a_second_daemon_for_the_node_stops_with_the_lock_code_and_the_first_ones_pid(daemon):
    with pytest.raises(LockedError) as caught:
        control.DaemonLock(daemon.store, "lb1")
    assert caught.value.exit_code == EXIT_LOCKED
    assert f"(pid {os.getpid()})" in str(caught.value)


def test_without_a_daemon_the_cli_does_the_work_itself(tmp_path, monkeypatch):
    kernel = install_kernel(monkeypatch, FakeKernel())
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(doc()))
    assert run_kdsr(tmp_path, "apply", str(path), "--node", "lb1").exit_code == 0
    result = run_kdsr(tmp_path, "drain", str(path), "s2", "--node", "lb1")
    assert result.exit_code == 0 and "Done by the running" not in result.output
    assert control.running(StateStore(tmp_path / "state"), "lb1") is None
    assert kernel.writes


def test_an_answer_larger_than_a_request_may_be_comes_back_whole(tmp_path):
    """A drain's plan at thousands of changes, or `show` at 10,000 VIPs, is
    an answer of megabytes: the client reads it whole (only the daemon
    bounds what it reads: a request)."""
    store = StateStore(tmp_path / "state")
    lock = control.DaemonLock(store, "lb1")
    path = control.socket_path(store, "lb1")
    big = "x" * (3 * control.MAX_LINE)
    server = control.ControlServer(path, lambda message: {"ok": True, "text": big})
    lock.record(path)
    try:
        answer = control.request(store, "lb1", {"command": "show"}, timeout=30)
    finally:
        server.close()
        lock.release()
    assert answer is not None and answer["text"] == big
