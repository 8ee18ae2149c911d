"""`kdsr run` under systemd: the sd_notify protocol against a fake service
manager (a datagram socket standing in for $NOTIFY_SOCKET), alone and driven
by the daemon against the fake kernel."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest

from kdsr.health.daemon import Runner
from kdsr.health.notify import STATUS_MAX, Notifier, watchdog_interval
from kdsr.health.probes import Result
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "l2-web.json"


class FakeServiceManager:
    """The receiving end of $NOTIFY_SOCKET: a path or an abstract name."""

    def __init__(self, tmp_path: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"kdsr-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            path = tmp_path / "notify"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.sock.settimeout(0)

    def env(self, **more: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **more}

    def messages(self) -> list[dict[str, str]]:
        """Every datagram received so far, each as its KEY=value pairs."""
        found = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return found
            found.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path):
    fake = FakeServiceManager(tmp_path)
    yield fake
    fake.close()


def test_ready_status_reloading_stopping_as_datagrams_to_a_path(manager):
    notifier = Notifier.from_environment(manager.env())
    notifier.verified("verified (start): 8 changes applied")
    notifier.verified("verified (health): 1 change applied")
    notifier.verified("verified (health): 1 change applied")  # no change: nothing sent
    notifier.reloading_started()
    notifier.reload_finished("reload failed, the running intent stays: bad.json: /x: no")
    notifier.stopping()
    got = manager.messages()
    assert got[0] == {"READY": "1", "STATUS": "verified (start): 8 changes applied"}
    assert got[1] == {"STATUS": "verified (health): 1 change applied"}
    assert got[2]["RELOADING"] == "1" and int(got[2]["MONOTONIC_USEC"]) > 0
    # MONOTONIC_USEC is CLOCK_MONOTONIC, as systemd 253's Type=notify-reload checks it.
    assert abs(int(got[2]["MONOTONIC_USEC"]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
    assert got[3] == {"READY": "1", "STATUS": "reload failed, the running intent stays: bad.json: /x: no"}
    assert got[4]["STOPPING"] == "1"
    assert len(got) == 5


def test_an_abstract_socket_name_is_used_as_such(tmp_path):
    fake = FakeServiceManager(tmp_path, abstract=True)
    try:
        Notifier.from_environment(fake.env()).verified("ok")
        assert fake.messages() == [{"READY": "1", "STATUS": "ok"}]
    finally:
        fake.close()


def test_without_notify_socket_every_call_is_a_no_op():
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_seconds is None
    notifier.verified("x")
    notifier.watchdog()
    notifier.reloading_started()
    notifier.stopping()
    assert not notifier.ready


def test_a_message_that_cannot_be_sent_is_dropped_and_ready_is_tried_again(tmp_path):
    path = tmp_path / "gone"
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    notifier.verified("first")  # nobody listens: dropped, no exception
    assert not notifier.ready
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fake.bind(str(path))
    try:
        notifier.verified("second")
        assert fake.recv(4096) == b"READY=1\nSTATUS=second"
        assert notifier.ready
    finally:
        fake.close()


def test_status_is_one_line_and_bounded(manager):
    notifier = Notifier.from_environment(manager.env())
    notifier.status("apply failed:\nline one\nline two " + "x" * 500)
    (message,) = manager.messages()
    assert "\n" not in message["STATUS"] and len(message["STATUS"]) == STATUS_MAX
    assert message["STATUS"].startswith("apply failed: line one line two x")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_comes_from_watchdog_usec_for_this_pid_only(env, expected):
    assert watchdog_interval(env, 4242) == expected


def test_watchdog_pings_at_most_four_times_per_interval(manager, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("kdsr.health.notify.time.monotonic", lambda: clock[0])
    notifier = Notifier.from_environment(manager.env(WATCHDOG_USEC="2000000"))
    for _ in range(10):  # a loop turning every 0.1 s for 1 s
        notifier.watchdog()
        clock[0] += 0.1
    assert [m for m in manager.messages()] == [{"WATCHDOG": "1"}, {"WATCHDOG": "1"}]
    assert notifier.watchdog_due_in() == pytest.approx(0.0)


# --- driven by the daemon ------------------------------------------------------------


class AllUp:
    def __call__(self, target) -> Result:
        return Result(True, 0.001)


def runner_for(tmp_path, manager, **env: str) -> Runner:
    from kdsr.intent import load_intent

    path = tmp_path / "intent.json"
    path.write_text(EXAMPLE.read_text())
    return Runner(
        lambda: load_intent(path),
        "lb1",
        FakeKernel(),
        StateStore(tmp_path / "state"),
        emit=[].append,
        probe_fn=AllUp(),
        notifier=Notifier.from_environment(manager.env(**env)),
    )


def test_the_daemon_is_ready_once_its_first_apply_is_verified(tmp_path, manager):
    runner = runner_for(tmp_path, manager)
    runner.start()
    runner._stop_probes()
    (ready,) = manager.messages()
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("verified (start): ") and runner.counters.applies == 1


def test_a_failed_first_apply_is_not_ready_until_a_retry_is_verified(tmp_path, manager):
    runner = runner_for(tmp_path, manager)
    runner.kernel.fail_at = 1  # the first kernel write fails; the rollback succeeds
    runner.start()
    runner._stop_probes()
    got = manager.messages()
    assert [m.get("READY") for m in got] == [None], got
    assert got[0]["STATUS"].startswith("apply failed (start), retrying every 5 s: ")
    runner._last_failed_apply -= 10  # the retry is due
    runner.step(poll=0)
    (ready,) = manager.messages()
    assert ready["READY"] == "1" and ready["STATUS"].startswith("verified (health): ")


def test_each_turn_of_the_loop_feeds_the_watchdog(tmp_path, manager):
    runner = runner_for(tmp_path, manager, WATCHDOG_USEC="400000")
    runner.start()
    runner._stop_probes()
    manager.messages()
    started = time.monotonic()
    while time.monotonic() - started < 0.5:  # 0.5 s of 0.05 s turns; a ping is due every 0.1 s
        runner.step(poll=0.05)
    pings = [m for m in manager.messages() if m == {"WATCHDOG": "1"}]
    assert 3 <= len(pings) <= 6, pings


def test_a_reload_is_reloading_then_ready_and_a_failed_one_too(tmp_path, manager):
    runner = runner_for(tmp_path, manager)
    runner.start()
    runner._stop_probes()
    manager.messages()
    edited = json.loads(EXAMPLE.read_text())
    edited["pools"]["web"]["servers"][2]["weight"] = 0
    (tmp_path / "intent.json").write_text(json.dumps(edited))
    runner.reload()
    runner._stop_probes()
    reloading, ready = manager.messages()
    assert reloading["RELOADING"] == "1"
    assert ready["READY"] == "1" and ready["STATUS"].startswith("verified (reload): ")
    (tmp_path / "intent.json").write_text("{ not json")
    runner.reload()
    reloading, ready = manager.messages()
    assert reloading["RELOADING"] == "1"
    assert ready["READY"] == "1" and ready["STATUS"].startswith("reload failed, the running intent stays: ")


def test_stopping_is_said_before_the_daemon_exits(tmp_path, manager):
    runner = runner_for(tmp_path, manager)
    runner.start()
    manager.messages()
    runner.request_stop()
    assert runner.run_forever(poll=0.01) == 0
    (stopping,) = manager.messages()
    assert stopping["STOPPING"] == "1"


def test_a_loop_sleeping_until_its_next_duty_wakes_for_the_watchdog(tmp_path, manager):
    """The loop sleeps until something is due (a status write every 2 s); a
    watchdog shorter than that is one of its duties."""
    runner = runner_for(tmp_path, manager, WATCHDOG_USEC="400000")
    runner.start()
    runner._stop_probes()
    manager.messages()
    started = time.monotonic()
    turns = 0
    while time.monotonic() - started < 0.6:
        runner.step()  # no poll: as run_forever calls it
        turns += 1
    pings = [m for m in manager.messages() if m == {"WATCHDOG": "1"}]
    assert len(pings) >= 4 and turns >= 4, (turns, pings)


def test_a_held_ready_waits_for_release_and_for_a_verified_apply(manager):
    """`kdsr run` holds READY=1 until its control socket and metrics listen."""
    notifier = Notifier.from_environment(manager.env(), held=True)
    notifier.verified("verified (start): 8 changes applied")
    assert manager.messages() == [] and not notifier.ready
    notifier.release()
    assert manager.messages() == [{"READY": "1", "STATUS": "verified (start): 8 changes applied"}]
    # Released before any verified apply: READY=1 comes with the first one.
    later = Notifier.from_environment(manager.env(), held=True)
    later.status("apply failed (start), retrying every 5 s: EBUSY")
    later.release()
    assert manager.messages() == [{"STATUS": "apply failed (start), retrying every 5 s: EBUSY"}]
    later.verified("verified (health): 8 changes applied")
    assert manager.messages() == [{"READY": "1", "STATUS": "verified (health): 8 changes applied"}]
