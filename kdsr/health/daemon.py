"""``kdsr run``: apply the intent, probe every server, apply what health changes.

One thread per probe target (bounded by the intent: servers x monitors)
sleeps a jittered interval, probes, queues the result and wakes the main
thread.  The main thread owns all state: it counts results (rise/fall), and
when a server changes state it recomputes the effective intent (down servers
at weight 0) and applies the difference through the same prepare/apply path
as `kdsr apply`, under the same lock: one nft transaction per change.

The main thread sleeps in select() on one end of a socket pair until
something is due: a probe thread writes a byte to the other end after each
result, and the kernel's signal handler writes the signal's number there
(``signal.set_wakeup_fd``), whichever thread the signal lands on.  A Python
signal handler only sets flags: it runs between two bytecodes of the main
thread, so taking a lock there (``queue.Queue.put``, ``Event.set``) could
wait forever for a lock the interrupted code holds.

Signals: SIGTERM/SIGINT stop the probes and exit, leaving the kernel as the
last apply made it (no flap on restart: the next start restores the health
view it finds); SIGHUP reloads the intent, and an intent that fails to load
keeps the old one running.

Drift: every ``check_interval`` seconds the daemon checks that the kernel
is still what it last verified, the receipt's way (kdsr/receipt.py: the
nftables tokens, which any commit by anyone moves, and a diff of what has no
generation), and when it is not, plans in full and applies what differs.

Logs: one line per event on stderr, ``ts=... event=... key=value``
(journald-friendly, greppable), or JSON (kdsr/health/logs.py).

Under systemd (kdsr/health/notify.py): READY=1 after the first verified
apply, WATCHDOG=1 each turn of the main loop, RELOADING=1 and READY=1
around a reload, STOPPING=1 on the way out, STATUS= all along.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import random
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kdsr import collector, operations, receipt
from kdsr.compile import CompileCache
from kdsr.compile.effective import POOL_OK, effective_intent
from kdsr.compile.targets import Target, targets_for
from kdsr.diff import Plan
from kdsr.errors import KdsrError, UsageError
from kdsr.health import CHECK_INTERVAL, control
from kdsr.health import status as health_status
from kdsr.health.drain import refuse_unserving, resolve_server
from kdsr.health.metrics import DaemonMetrics
from kdsr.health.notify import Notifier
from kdsr.health.probes import Result, probe
from kdsr.health.state import DOWN, UP, TargetState
from kdsr.intent.model import Intent
from kdsr.kernel import Kernel, KernelError
from kdsr.kernel.state import StateStore
from kdsr.model import Desired
from kdsr.plan_format import SYMBOL, applied_json, render_json, render_text
from kdsr.wording import counted

STATUS_EVERY = 2.0  # seconds between status writes when nothing changes
RETRY_FAILED_APPLY = 5.0  # seconds before a failed apply is tried again
DRIFT_CHANGES_LOGGED = 8  # changes named in a drift-repaired line; the rest are counted
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._-:/[]@+" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def timestamp(ns: int) -> str:
    """UTC to the millisecond, cut (not rounded) from one reading in
    nanoseconds: a stamp never shows a later time than the event's."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1_000_000:03d}Z"


def log_line(event: str, **fields: object) -> str:
    stamp = timestamp(time.time_ns())  # one reading of the clock: seconds and milliseconds agree
    parts = [f"ts={stamp}", f"event={event}"] + [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


@dataclass
class Counters:
    applies: int = 0
    apply_failures: int = 0
    apply_seconds_total: float = 0.0
    last_apply_seconds: float = 0.0
    drift_checks: int = 0
    drift_check_seconds_total: float = 0.0
    drift_repairs: int = 0
    started: float = field(default_factory=time.time)


def summary(plan: Plan, limit: int = DRIFT_CHANGES_LOGGED) -> str:
    """The plan's changes on one line, as the plan text names them (at most ``limit``)."""
    named = [f"{SYMBOL[c.action]} {c.kind} {c.ident}" for c in plan.changes[:limit]]
    if len(plan.changes) > limit:
        named.append(f"and {len(plan.changes) - limit} more")
    return "; ".join(named)


def plan_json(plan: Plan) -> dict:
    return json.loads(render_json(plan, ""))


class Runner:
    def __init__(
        self,
        load: Callable[[], Intent],
        node: str | None,
        kernel: Kernel,
        store: StateStore,
        wait: float = 10.0,
        adopt: bool = False,
        emit: Callable[[str], None] | None = None,
        probe_fn: Callable[[Target], Result] = probe,
        verified: Callable[[operations.Prepared], None] | None = None,
        check_interval: float = CHECK_INTERVAL,
        log_format: Callable[..., str] = log_line,
        notifier: Notifier | None = None,
        compile_cache: CompileCache | None = None,
    ) -> None:
        """``check_interval``: seconds between drift checks; 0: none."""
        self._load = load
        # Called under the store's lock each time the kernel was verified
        # against the intent (an apply read back, or nothing to change):
        # `kdsr run` records its receipt there (kdsr/receipt.py), so that the
        # next `kdsr apply` of the same file need not plan in full.
        self._verified = verified
        self._node_arg = node
        self.kernel = kernel
        self.store = store
        self.wait = wait
        self.adopt = adopt
        self._emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self._format = log_format  # kdsr/health/logs.py: text or JSON, journald priorities
        # The service manager's protocol (`kdsr run` passes the one of its environment).
        self.notify = notifier if notifier is not None else Notifier(None)
        self._probe = probe_fn
        self.intent: Intent | None = None
        self.node = ""
        self.targets: dict[str, Target] = {}
        self.states: dict[str, TargetState] = {}
        self.pools: dict[str, str] = {}
        self.out: dict[str, tuple[str, ...]] = {}
        self.counters = Counters()
        self.metrics = DaemonMetrics()  # served by `kdsr run --metrics` (kdsr/health/metrics.py)
        self.results: queue.Queue = queue.Queue()
        self._generation = 0
        self._threads_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._retired: list[threading.Thread] = []  # probes of a replaced intent, finishing their last probe
        self.stopping = threading.Event()  # set by the main thread once it has seen a stop request
        # Set by signal handlers and other threads, read by the main thread:
        # plain assignments, no lock (see the module's docstring).
        self._stop_requested = False
        self._reload_requested = False
        # Probe threads and signals wake the main thread through this pair.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signals_installed: dict[int, object] | None = None
        self._old_wakeup_fd = -1
        self.check_interval = check_interval
        self._next_check = 0.0
        # What the last verification vouched for: nftables tokens and the
        # desired state without its tables (kdsr/receipt.py); None: the
        # next drift check plans in full.
        self._verified_at: tuple[dict[str, str], Desired] | None = None
        self._dirty = False
        self._last_failed_apply = 0.0
        self._last_status = 0.0
        self.lock = threading.Lock()  # guards the views the metrics thread reads
        # Control requests (kdsr/health/control.py): (message, answer slot,
        # done event), handed from the control thread to the main thread.
        self.requests: queue.Queue = queue.Queue()
        self.last_applied: tuple[Plan | None, object | None] = (None, None)  # the last apply's plan and result
        # What compile reuses from one apply to the next: after a health
        # event or a reload, only what the change reached is built again.
        self.compile_cache = compile_cache if compile_cache is not None else CompileCache()

    # --- events ----------------------------------------------------------------

    def log(self, event: str, **fields: object) -> None:
        self._emit(self._format(event, node=self.node or None, **fields))

    # --- lifecycle -------------------------------------------------------------

    def start(self, claim: Callable[[str], None] | None = None) -> None:
        """Load, apply and start probing.  Raises KdsrError (nothing touched)
        on a bad intent.  ``claim``: called with the node before the first
        apply (`kdsr run` takes the node's one-daemon lock there)."""
        intent = self._load()
        self.node = operations.select_node(intent, self._node_arg, self.kernel)
        if intent.load_balancer(self.node) is None:
            raise UsageError(
                f"{intent.source}: kdsr run probes servers from a load balancer; {self.node} is a server node. "
                "Run it on a load balancer (a server needs only `kdsr apply`)."
            )
        if claim is not None:
            claim(self.node)
        self._install(intent, restore=health_status.read(self.store, self.node))
        self.log("started", pid=os.getpid(), intent=intent.source, targets=len(self.targets))
        self.apply("start")
        collector.settle()  # the intent and its table stay: keep them out of later collections
        self._next_check = time.monotonic() + self.check_interval
        self._start_probes()

    def _install(self, intent: Intent, restore: dict | None = None) -> None:
        targets = {t.key: t for t in targets_for(intent)}
        previous = {s["key"]: s for s in (restore or {}).get("targets", [])}
        states = {}
        for key, target in targets.items():
            old = self.states.get(key)
            state = old or TargetState(rise=target.monitor.rise, fall=target.monitor.fall)
            state.rise, state.fall = target.monitor.rise, target.monitor.fall
            if old is None and previous.get(key, {}).get("state") == DOWN:
                # Restarted while the server was down: stay down until it rises.
                state.state, state.since = DOWN, previous[key].get("since", 0.0)
            states[key] = state
        with self.lock:
            self.intent, self.targets, self.states = intent, targets, states

    def run_forever(self, poll: float | None = None) -> int:
        while not self.stopping.is_set():
            self.step(poll)
        self.shutdown()
        return 0

    def step(self, poll: float | None = None) -> None:
        """Sleep until woken (a probe result, a signal) or until something is
        due, ``poll`` s at most; then take the results, reload, apply a
        change, check for drift, publish."""
        self._sleep(self._due_in() if poll is None else min(poll, self._due_in()))
        self.notify.watchdog()  # each turn: a loop stuck in an apply or a lock stops feeding it
        while True:
            try:
                self._take(self.results.get_nowait())
            except queue.Empty:
                break
        while True:
            try:
                self._serve(*self.requests.get_nowait())
            except queue.Empty:
                break
        if self._stop_requested:
            self.stopping.set()
            return
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        now = time.monotonic()
        if self._dirty and (not self._last_failed_apply or now - self._last_failed_apply >= RETRY_FAILED_APPLY):
            self.apply("health")
        elif self.check_interval > 0 and now >= self._next_check and not self._dirty and self.intent is not None:
            self.check_drift()
        if time.monotonic() - self._last_status >= STATUS_EVERY:
            self.publish()

    def _due_in(self) -> float:
        """Seconds until the next timed duty: a status write, a failed apply's retry, a drift check,
        systemd's watchdog."""
        due = self._last_status + STATUS_EVERY
        watchdog = self.notify.watchdog_due_in()
        if watchdog is not None:
            due = min(due, time.monotonic() + watchdog)
        if self._dirty:
            due = min(due, self._last_failed_apply + RETRY_FAILED_APPLY)
        elif self.check_interval > 0:
            due = min(due, self._next_check)
        return max(0.0, due - time.monotonic())

    def _sleep(self, seconds: float) -> None:
        """Wait for a byte on the wake socket (``seconds`` at most, none when
        results are queued), then read every byte there: a signal number
        (from the kernel's handler, ``signal.set_wakeup_fd``) or 0 (a probe
        result, a request from another thread)."""
        quiet = self.results.empty() and self.requests.empty()
        if seconds > 0 and quiet and not (self._stop_requested or self._reload_requested):
            select.select([self._wake_r], [], [], seconds)
        while True:
            try:
                data = self._wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            for number in data:
                self._note_signal(number)

    def _note_signal(self, number: int) -> None:
        if number in STOP_SIGNALS:
            self._stop_requested = True
        elif number == signal.SIGHUP:
            self._reload_requested = True

    def _wake(self) -> None:
        """Wake the main thread; from any thread.  A full socket buffer
        means it has bytes to wake on already."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def shutdown(self) -> None:
        self.notify.stopping()
        while True:  # nobody will answer these now
            try:
                _message, answer, done = self.requests.get_nowait()
            except queue.Empty:
                break
            answer.update(ok=False, error=f"kdsr run for node {self.node} is stopping", exit_code=1)
            done.set()
        self._stop_probes()
        self.publish()
        self.log("stopped", reason="signal", kernel="left as the last apply made it")

    def request_stop(self, *_args: object) -> None:
        """Stop (from another thread)."""
        self._stop_requested = True
        self._wake()

    def _on_signal(self, number: int, _frame: object) -> None:
        # Runs in the main thread between two bytecodes: flags only (see the
        # module's docstring).  The wake-up fd has woken the loop already.
        self._note_signal(number)

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads; each wakes the main loop at
        once.  From the main thread (Python runs signal handlers there)."""
        previous = {}
        for number in (*STOP_SIGNALS, signal.SIGHUP):
            previous[number] = signal.signal(number, self._on_signal)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signals_installed = previous

    def restore_signals(self) -> None:
        """The handlers and wake-up fd as they were before ``install_signals``."""
        if self._signals_installed is None:
            return
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for number, handler in self._signals_installed.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._signals_installed = None

    # --- probes ----------------------------------------------------------------

    def _start_probes(self) -> None:
        self._generation += 1
        self._threads_stop = threading.Event()
        self._threads = []
        self._retired = [thread for thread in self._retired if thread.is_alive()]
        for target in self.targets.values():
            thread = threading.Thread(
                target=self._probe_loop,
                args=(target, self._generation, self._threads_stop),
                name=f"probe {target.key}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _stop_probes(self, wait: bool = True) -> None:
        """Tell the probe threads to stop.  ``wait``: until each has (a probe
        under way finishes first); else they finish on their own, and what
        they queue is dropped (it is of an older generation)."""
        self._threads_stop.set()
        if not wait:
            self._retired += self._threads
            self._threads = []
            return
        timeout = max((t.monitor.timeout for t in self.targets.values()), default=0) + 1
        for thread in self._threads + self._retired:
            thread.join(timeout=timeout)
        self._threads, self._retired = [], []

    def _probe_loop(self, target: Target, generation: int, stop: threading.Event) -> None:
        monitor = target.monitor
        # Seeded by server: the checks of one server (one per pool and
        # monitor) fire together, so a dead server fails them in the same
        # round and costs one apply, not one per pool.  Servers are spread
        # over the interval.
        rng = random.Random(f"{target.server}|{monitor.interval}|{os.getpid()}")
        delay = rng.uniform(0, monitor.interval)
        while not stop.wait(delay):
            result = self._probe(target)
            self.results.put((generation, target.key, result))
            self._wake()
            wait = monitor.interval * (1 + rng.uniform(-monitor.jitter, monitor.jitter))
            delay = max(wait - result.latency, 0.01)

    def _take(self, item: tuple[int, str, Result]) -> None:
        generation, key, result = item
        if generation != self._generation or key not in self.targets:
            return  # a probe of the intent before a reload
        target, state = self.targets[key], self.states[key]
        with self.lock:
            changed = state.record(result.ok, result.error, result.latency, time.time())
        if changed:
            self._dirty = True
            self.log(
                "health",
                pool=target.pool,
                server=target.server,
                server_node=target.node,
                state=state.state,
                check=target.label,
                error=None if state.state == UP else state.last_error,
            )

    # --- apply -----------------------------------------------------------------

    def down(self) -> frozenset[tuple[str, str]]:
        return frozenset((t.pool, t.server) for k, t in self.targets.items() if self.states[k].state == DOWN)

    def apply(self, reason: str) -> bool:
        """Plan in full and apply what differs; ``reason`` "drift": a drift
        check found the kernel changed (logged only when kdsr's objects had)."""
        assert self.intent is not None
        started = time.monotonic()
        self._dirty = False
        self._verified_at = None
        down = self.down()
        try:
            with self.store.lock(self.wait):
                prepared = operations.prepare(
                    self.intent, self.node, self.kernel, self.store, self.adopt, down=down, cache=self.compile_cache
                )
                changes = len(prepared.plan.changes)
                result = operations.apply(prepared, self.kernel, self.store) if changes else None
                self.last_applied = (prepared.plan, result)
                self._remember_verified(prepared)
                if self._verified is not None:
                    self._record_verified(prepared)
                # Published before the lock is let go: a `kdsr apply` waiting
                # for it takes the down set from this status.  The last one
                # would have it put back the server just taken out, and
                # nothing here would take it out again.
                effective = effective_intent(self.intent, down, frozenset(self.store.load(self.node).drained))
                elapsed = time.monotonic() - started
                with self.lock:
                    self.pools, self.out = effective.pools, effective.out
                    self.counters.applies += 1
                    self.counters.last_apply_seconds = elapsed
                    self.counters.apply_seconds_total += elapsed
                self.metrics.applied(elapsed, changes)
                self.publish()
        except (KdsrError, KernelError, OSError) as exc:
            self.counters.apply_failures += 1
            self.metrics.apply_failed()
            self._dirty, self._last_failed_apply = True, time.monotonic()
            self.log("apply-failed", reason=reason, error=str(exc), retry_in=f"{RETRY_FAILED_APPLY:g}s")
            self.notify.status(f"apply failed ({reason}), retrying every {RETRY_FAILED_APPLY:g} s: {exc}")
            self.publish()
            return False
        self._last_failed_apply = 0.0
        if reason == "drift":
            if changes:  # else another program's nftables commit moved the generation, and nothing of kdsr's
                with self.lock:
                    self.counters.drift_repairs += 1
                self.metrics.drift_repaired()
                self.log("drift-repaired", changes=changes, seconds=f"{elapsed:.3f}", repaired=summary(prepared.plan))
            return True
        out = sorted(f"{pool}:{server}" for pool, servers in effective.out.items() for server in servers)
        self.log("applied", reason=reason, changes=changes, seconds=f"{elapsed:.3f}", out=",".join(out) or "-")
        for pool, condition in sorted(effective.pools.items()):
            if condition not in (POOL_OK, "degraded"):
                self.log("pool", pool=pool, state=condition)
        applied = counted(changes, "change")
        self.notify.verified(f"verified ({reason}): {applied} applied; out of the tables: {', '.join(out) or 'none'}")
        return True

    def _remember_verified(self, prepared: operations.Prepared) -> None:
        """Under the lock, right after the kernel was verified against
        ``prepared``: what the next drift check compares with."""
        try:
            tokens = receipt.verified_tokens(self.kernel, prepared.desired, self.store.load(self.node))
        except (KdsrError, KernelError, OSError):
            tokens = None
        if tokens is not None:
            self._verified_at = (tokens, dataclasses.replace(prepared.desired, tables=()))

    def check_drift(self) -> None:
        """Is the kernel still what the last apply verified?  Cheap when it
        is: the nftables tokens (no table listing) and a read of what has no
        generation.  When it may not be (or no token could vouch for the
        last apply), plan in full under the lock and apply what differs."""
        started = time.monotonic()
        try:
            held = self._verified_at is not None and self._still_verified(*self._verified_at)
        except (KdsrError, KernelError, OSError):
            held = False  # the full plan reads again, and reports what fails
        elapsed = time.monotonic() - started
        with self.lock:
            self.counters.drift_checks += 1
            self.counters.drift_check_seconds_total += elapsed
        self.metrics.drift_checked(elapsed)
        if not held:
            self.apply("drift")
        self._next_check = time.monotonic() + self.check_interval

    def _still_verified(self, tokens: dict[str, str], rest: Desired) -> bool:
        return receipt.still_verified(self.kernel, tokens, rest, self.store.load(self.node)) is not None

    def _record_verified(self, prepared: operations.Prepared) -> None:
        """The hook's failure is only a full plan for the next `kdsr apply`:
        whatever it raises (a netlink error reading this host's addresses,
        a state file), the apply stands and the daemon carries on."""
        assert self._verified is not None
        try:
            self._verified(prepared)
        except Exception as exc:  # noqa: BLE001 - a receipt is a cache, never worth stopping the daemon
            self.log("receipt-failed", error=str(exc))

    # --- control requests (kdsr/health/control.py) --------------------------------

    def submit(self, message: dict) -> dict:
        """From the control thread: have the main thread handle ``message``, and wait for its answer."""
        answer: dict = {}
        done = threading.Event()
        self.requests.put((message, answer, done))
        self._wake()
        if not done.wait(control.ANSWER_TIMEOUT):
            return {"ok": False, "error": f"kdsr run for node {self.node} did not answer in time", "exit_code": 1}
        return answer

    def _serve(self, message: dict, answer: dict, done: threading.Event) -> None:
        try:
            command = message.get("command")
            if command in ("drain", "undrain"):
                answer.update(self._drain(message, command == "drain"))
            elif command == "show":
                answer.update(ok=True, report=operations.show(self.kernel, self.store, self.node, self.intent))
            elif command == "reload":
                error = self.reload()
                answer.update(ok=error is None, error=error or "", exit_code=3)
            else:
                answer.update(ok=False, error=f"unknown request {command!r}", exit_code=4)
        except (KdsrError, KernelError, OSError) as exc:
            answer.update(ok=False, error=str(exc), exit_code=getattr(exc, "exit_code", 1))
        finally:
            done.set()

    def _drain(self, message: dict, drained: bool) -> dict:
        """A drain or undrain on the daemon's own loop: recorded, applied
        and in its view and metrics before the answer goes back."""
        assert self.intent is not None
        server = resolve_server(self.intent, str(message.get("server", "")))
        before = frozenset(self.store.load(self.node).drained)
        after = before | {server} if drained else before - {server}
        if drained and not message.get("force"):
            refuse_unserving(self.intent, self.node, self.down(), before, server)
        if message.get("dry_run"):
            with self.store.lock(self.wait):
                prepared = operations.prepare(
                    self.intent,
                    self.node,
                    self.kernel,
                    self.store,
                    self.adopt,
                    down=self.down(),
                    drained=after,
                    cache=self.compile_cache,
                )
            return {
                "ok": True,
                "node": self.node,
                "server": server,
                "plan": plan_json(prepared.plan),
                "text": render_text(prepared.plan, self.intent.source),
                "applied": None,
            }
        with self.store.lock(self.wait):
            state = self.store.load(self.node)
            state.drained = set(after)
            self.store.save(state)
        what = "drain" if drained else "undrain"
        self.log(what, server=server)
        if not self.apply(what):
            raise KdsrError(f"the {what} was recorded but its apply failed; kdsr run retries it")
        plan, result = self.last_applied
        return {
            "ok": True,
            "node": self.node,
            "server": server,
            "plan": plan_json(plan),
            "text": render_text(plan, self.intent.source),
            "applied": applied_json(result),
            "steps": len(result.steps) if result is not None else 0,
            "writes": result.writes if result is not None else 0,
        }

    def reload(self) -> str | None:
        """Load the intent again and apply it; the error (the old intent stays) or None."""
        self.notify.reloading_started()
        try:
            with collector.paused():  # the new document and model are large and acyclic (kdsr/collector.py)
                intent = self._load()
            if operations.select_node(intent, self.node, self.kernel) != self.node:
                raise KdsrError(f"{intent.source}: node {self.node} is no longer in the intent")
        except KdsrError as exc:
            self.log("reload-failed", error=str(exc).replace("\n", "; "), keeping="the running intent")
            self.metrics.reloaded(False)
            self.notify.reload_finished(f"reload failed, the running intent stays: {exc}")
            return str(exc)
        # The old probes finish on their own: a probe under way (up to its
        # timeout) does not hold up the new intent's apply.
        self._stop_probes(wait=False)
        self._install(intent)
        self.log("reloaded", intent=intent.source, targets=len(self.targets))
        applied = self.apply("reload")
        self.metrics.reloaded(applied)
        if not applied:  # else READY=1 went with the verified apply
            self.notify.reload_finished(f"reloaded; its apply failed, retrying every {RETRY_FAILED_APPLY:g} s")
        collector.settle()  # frees the replaced intent's state, keeps the new one out of collections
        self._start_probes()
        return None

    # --- views -----------------------------------------------------------------

    def view(self) -> dict:
        """The health view: per target and per server (all its targets up -> up)."""
        with self.lock:
            targets, servers = [], {}
            for key, target in sorted(self.targets.items()):
                state = self.states[key]
                targets.append(
                    {"key": key, "pool": target.pool, "server": target.server, "check": target.label, **state.to_json()}
                )
                entry = servers.setdefault(
                    (target.pool, target.server),
                    {
                        "pool": target.pool,
                        "server": target.server,
                        "node": target.node,
                        "state": UP,
                        "since": 0.0,
                        "last_error": "",
                        "checks": 0,
                    },
                )
                entry["checks"] += 1
                if state.state == DOWN:
                    entry["state"] = DOWN
                    entry["last_error"] = state.last_error
                entry["since"] = max(entry["since"], state.since)
            drained = sorted(self.store.load(self.node).drained) if self.node else []
            for (pool, server), entry in servers.items():
                entry["in_table"] = server not in self.out.get(pool, ())
            return {
                "pid": os.getpid(),
                "node": self.node,
                "intent": self.intent.source if self.intent else "",
                "updated": time.time(),
                "servers": [servers[k] for k in sorted(servers)],
                "targets": targets,
                "pools": dict(sorted(self.pools.items())),
                "drained": drained,
                "applies": self.counters.applies,
                "apply_failures": self.counters.apply_failures,
            }

    def publish(self) -> None:
        self._last_status = time.monotonic()
        if self.node:
            health_status.write(self.store, self.node, self.view())
