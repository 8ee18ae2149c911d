"""``kdsr run``: apply the intent, probe every server, apply what health changes.

One thread per probe target (bounded by the intent: servers x monitors)
sleeps a jittered interval, probes, and queues the result.  The main thread
owns all state: it counts results (rise/fall), and when a server changes
state it recomputes the effective intent (down servers at weight 0) and
applies the difference through the same prepare/apply path as `kdsr apply`,
under the same lock: one nft transaction per change.

Signals: SIGTERM/SIGINT stop the probes and exit, leaving the kernel as the
last apply made it (no flap on restart: the next start restores the health
view it finds); SIGHUP reloads the intent, and an intent that fails to load
keeps the old one running.

Logs: one line per event on stderr, ``ts=... event=... key=value``
(journald-friendly, greppable), or JSON (kdsr/health/logs.py).

Under systemd (kdsr/health/notify.py): READY=1 after the first verified
apply, WATCHDOG=1 each turn of the main loop, RELOADING=1 and READY=1
around a reload, STOPPING=1 on the way out, STATUS= all along.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kdsr import collector, operations
from kdsr.errors import KdsrError, UsageError
from kdsr.health import status as health_status
from kdsr.health.effective import POOL_OK, effective_intent
from kdsr.health.notify import Notifier
from kdsr.health.probes import Result, probe
from kdsr.health.state import DOWN, UP, TargetState
from kdsr.health.targets import Target, targets_for
from kdsr.intent.model import Intent
from kdsr.kernel import Kernel
from kdsr.kernel.state import StateStore
from kdsr.wording import counted

STATUS_EVERY = 2.0  # seconds between status writes when nothing changes
RETRY_FAILED_APPLY = 5.0  # seconds before a failed apply is tried again


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._-:/[]@+" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def log_line(event: str, **fields: object) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z"
    parts = [f"ts={stamp}", f"event={event}"] + [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


@dataclass
class Counters:
    applies: int = 0
    apply_failures: int = 0
    apply_seconds_total: float = 0.0
    last_apply_seconds: float = 0.0
    changes_applied: int = 0
    started: float = field(default_factory=time.time)


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
        log_format: Callable[..., str] = log_line,
        notifier: Notifier | None = None,
    ) -> None:
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
        self.results: queue.Queue = queue.Queue()
        self._generation = 0
        self._threads_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stopping = threading.Event()
        self._reload = threading.Event()
        self._dirty = False
        self._last_failed_apply = 0.0
        self._last_status = 0.0
        self.lock = threading.Lock()  # guards the views the metrics thread reads

    # --- events ----------------------------------------------------------------

    def log(self, event: str, **fields: object) -> None:
        self._emit(self._format(event, node=self.node or None, **fields))

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Load, apply and start probing.  Raises KdsrError (nothing touched) on a bad intent."""
        intent = self._load()
        self.node = operations.select_node(intent, self._node_arg, self.kernel)
        if intent.load_balancer(self.node) is None:
            raise UsageError(
                f"{intent.source}: kdsr run probes servers from a load balancer; {self.node} is a server node. "
                "Run it on a load balancer (a server needs only `kdsr apply`)."
            )
        self._install(intent, restore=health_status.read(self.store, self.node))
        self.log("started", pid=os.getpid(), intent=intent.source, targets=len(self.targets))
        self.apply("start")
        collector.settle()  # the intent and its table stay: keep them out of later collections
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

    def run_forever(self, poll: float = 0.2) -> int:
        while not self.stopping.is_set():
            self.step(poll)
        self.shutdown()
        return 0

    def step(self, poll: float = 0.2) -> None:
        """Take the results that arrived (waiting up to ``poll`` s), apply a change, publish."""
        self.notify.watchdog()  # each turn: a loop stuck in an apply or a lock stops feeding it
        try:
            self._take(self.results.get(timeout=poll))
            while True:
                self._take(self.results.get_nowait())
        except queue.Empty:
            pass
        if self._reload.is_set():
            self._reload.clear()
            self.reload()
        now = time.monotonic()
        if self._dirty and (not self._last_failed_apply or now - self._last_failed_apply >= RETRY_FAILED_APPLY):
            self.apply("health")
        if now - self._last_status >= STATUS_EVERY:
            self.publish()

    def shutdown(self) -> None:
        self.notify.stopping()
        self._stop_probes()
        self.publish()
        self.log("stopped", reason="signal", kernel="left as the last apply made it")

    def request_stop(self, *_args: object) -> None:
        self.stopping.set()

    def request_reload(self, *_args: object) -> None:
        self._reload.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # --- probes ----------------------------------------------------------------

    def _start_probes(self) -> None:
        self._generation += 1
        self._threads_stop = threading.Event()
        self._threads = []
        for target in self.targets.values():
            thread = threading.Thread(
                target=self._probe_loop,
                args=(target, self._generation, self._threads_stop),
                name=f"probe {target.key}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _stop_probes(self) -> None:
        self._threads_stop.set()
        for thread in self._threads:
            thread.join(timeout=max(t.monitor.timeout for t in self.targets.values()) + 1 if self.targets else 1)
        self._threads = []

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
        assert self.intent is not None
        started = time.monotonic()
        self._dirty = False
        down = self.down()
        try:
            with self.store.lock(self.wait):
                prepared = operations.prepare(self.intent, self.node, self.kernel, self.store, self.adopt, down=down)
                changes = len(prepared.plan.changes)
                if changes:
                    operations.apply(prepared, self.kernel, self.store)
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
                    self.counters.changes_applied += changes
                    self.counters.last_apply_seconds = elapsed
                    self.counters.apply_seconds_total += elapsed
                self.publish()
        except (KdsrError, OSError) as exc:
            self.counters.apply_failures += 1
            self._dirty, self._last_failed_apply = True, time.monotonic()
            self.log("apply-failed", reason=reason, error=str(exc), retry_in=f"{RETRY_FAILED_APPLY:g}s")
            self.notify.status(f"apply failed ({reason}), retrying every {RETRY_FAILED_APPLY:g} s: {exc}")
            self.publish()
            return False
        self._last_failed_apply = 0.0
        out = sorted(f"{pool}:{server}" for pool, servers in effective.out.items() for server in servers)
        self.log("applied", reason=reason, changes=changes, seconds=f"{elapsed:.3f}", out=",".join(out) or "-")
        for pool, condition in sorted(effective.pools.items()):
            if condition not in (POOL_OK, "degraded"):
                self.log("pool", pool=pool, state=condition)
        applied = counted(changes, "change")
        self.notify.verified(f"verified ({reason}): {applied} applied; out of the tables: {', '.join(out) or 'none'}")
        return True

    def _record_verified(self, prepared: operations.Prepared) -> None:
        """The hook's failure is only a full plan for the next `kdsr apply`:
        whatever it raises (a netlink error reading this host's addresses,
        a state file), the apply stands and the daemon carries on."""
        assert self._verified is not None
        try:
            self._verified(prepared)
        except Exception as exc:  # noqa: BLE001 - a receipt is a cache, never worth stopping the daemon
            self.log("receipt-failed", error=str(exc))

    def reload(self) -> None:
        self.notify.reloading_started()
        try:
            with collector.paused():  # the new document and model are large and acyclic (kdsr/collector.py)
                intent = self._load()
            if operations.select_node(intent, self.node, self.kernel) != self.node:
                raise KdsrError(f"{intent.source}: node {self.node} is no longer in the intent")
        except KdsrError as exc:
            self.log("reload-failed", error=str(exc).replace("\n", "; "), keeping="the running intent")
            self.notify.reload_finished(f"reload failed, the running intent stays: {exc}")
            return
        self._stop_probes()
        self._install(intent)
        self.log("reloaded", intent=intent.source, targets=len(self.targets))
        if not self.apply("reload"):  # else READY=1 went with the verified apply
            self.notify.reload_finished(f"reloaded; its apply failed, retrying every {RETRY_FAILED_APPLY:g} s")
        collector.settle()  # frees the replaced intent's state, keeps the new one out of collections
        self._start_probes()

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
