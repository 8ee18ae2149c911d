#!/usr/bin/env python3
"""Control-plane bench: what a large intent costs kdsr, step by step, with the
kernel doing the real work in a throw-away network namespace.

    .venv/bin/python bench/control_plane.py [--sizes 100,1000,10000] [--servers 16]
        [--engine nft|ipvs|xdp] [--json bench/results/control_plane.json]

As root.  Not a timed test: it prints a table and writes the same figures as
JSON; the goals column says which of the issue's goals a figure meets.

Per size it generates an intent (N VIPs, ports 80 and 443 over TCP, pools of
``--servers`` servers drawn from 64 server nodes, N/10 distinct pools, at most
1,000), makes a namespace ``kdsrbench-<pid>-<N>`` with the load balancer's
interface in it, and runs one fresh Python process inside it (``--inner``), so
every size starts cold and its peak memory is its own.  That process drives
the library the CLI uses, step by step:

- **full apply** (empty kernel): load+validate, compile, read, diff, apply
  (the nft transaction, or the IPVS commands), read-back;
- **no-op re-apply** as a new ``kdsr apply`` process would do it (a new kernel
  handle, nothing cached), and the same through the real CLI, process start
  included; then the no-op **by receipt** (kdsr/receipt.py: the intent's
  bytes, the nftables tokens and what has no generation are checked, nothing
  validated or compiled), in process and through the CLI;
- **one server down (health)** and **back up**: what the health daemon
  (``kdsr run``) does after a probe changes state.  The intent is in memory,
  the effective intent shares its services, and the table read is reused
  while the nftables generation says it is current
  (kdsr/kernel/nft_generation.py);
- **one weight change** and **one server removed** from one pool: an edited
  intent file reloaded by that same running process, as ``kdsr run`` does on
  SIGHUP (kdsr/intent/reload.py: only the changed entries are validated and
  built; the cross-object checks run on the whole file), then applied.  The
  goal line counts the reload's load+validate; a second line gives the change
  without it.  The CLI figure for the same edit, with a changed file, is
  printed alongside (it has to load and compile the whole intent again).

On ``--engine xdp`` the writes are map elements (each one ``bpf()`` call:
a table's slots, a service, a server), the hand edit the drift check repairs
is one service element deleted with ``bpftool``, and the load balancer's
interface is a veth, which runs the program natively.

Memory: the peak RSS of each step (``/proc/self/clear_refs`` resets the
high-water mark before it) and of the whole process.  Writes: kernel write
calls (one nft transaction counts one) and the map elements sent.

Then every path a user takes, each in a process of its own, with its peak
RSS (``wait4``; a running daemon's high-water mark, reset before each
event): ``kdsr apply`` (a no-op planned in full, by receipt, after another
program's nftables transaction, which makes kdsr list its table, and the
two edits), ``kdsr plan`` after such a transaction, ``kdsr show`` with and
without ``--json``, ``kdsr run`` (its start after such a transaction, an
edit reloaded on SIGHUP, a drift check that repairs an element deleted by
hand, ``show --json`` answered by it, and that client; the process its
``--metrics`` starts to read the counters), ``kdsr destroy``,
and a full apply through the CLI into the emptied kernel.  Rows over the
memory goal are flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LB_INTERFACE = "eth0"
LB_ADDRESS = "10.200.0.2/16"
SERVER_NODES = 64
MAX_POOLS = 1000
# Issue 7's goals.
GOAL_FULL_APPLY_S = 10.0
GOAL_NOOP_FRACTION = 0.05
GOAL_CHANGE_S = 0.150
# The single changes held to that goal: health events (the intent in memory)
# and edits of the intent reloaded into a running process.
CHANGES = ("one server down (health)", "the server back up (health)", "one weight change", "one server removed")
GOAL_CHANGE_FRACTION = 1 / 50
GOAL_MEMORY_MB = 500.0
GOAL_NFT_F_RATIO = 3.0
NFT_F_ROUNDS = 3
INNER_TIMEOUT_S = 900


# ---------------------------------------------------------------- intents
def bench_intent(vips: int, servers: int, engine: str) -> dict:
    """N VIPs over N/10 pools (1,000 at most) of ``servers`` members each."""
    pools = max(1, min(MAX_POOLS, vips // 10))
    doc: dict = {
        "version": 1,
        "services": {},
        "pools": {},
        "load_balancers": {"lb1": {"interface": LB_INTERFACE, "addresses": [LB_ADDRESS]}},
        "servers": {},
    }
    for n in range(SERVER_NODES):
        doc["servers"][f"s{n}"] = {"interface": "eth0", "addresses": [f"10.200.{1 + n // 250}.{1 + n % 250}/16"]}
    for p in range(pools):
        # A stride of 7 over 64 nodes: pools overlap but no two are equal.
        members = [{"node": f"s{(p * 7 + k) % SERVER_NODES}"} for k in range(servers)]
        if p % 2:
            members = [{"node": f"s{(p * 3 + k * 5) % SERVER_NODES}"} for k in range(servers)]
        doc["pools"][f"p{p}"] = {"servers": members}
    for v in range(vips):
        doc["services"][f"v{v}"] = {
            "vip": f"10.{100 + v // 65536}.{(v // 256) % 256}.{v % 256}",
            "ports": [80, 443],
            "protocols": "tcp",
            "pool": f"p{v % pools}",
            "dsr": {"mode": "l2", "engine": engine},
        }
    return doc


def with_weight(doc: dict, pool: str, index: int, weight: int) -> dict:
    doc = json.loads(json.dumps(doc))
    doc["pools"][pool]["servers"][index]["weight"] = weight
    return doc


def without_member(doc: dict, pool: str, index: int) -> dict:
    doc = json.loads(json.dumps(doc))
    del doc["pools"][pool]["servers"][index]
    return doc


# ---------------------------------------------------------------- measuring (inner)
def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


@dataclasses.dataclass
class Step:
    name: str
    seconds: float = 0.0
    peak_mb: float = 0.0
    writes: int = 0
    elements: int = 0


class Recorder:
    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._open: list[Step] = []  # steps under way, outermost first

    def _fold_peak(self) -> None:
        """The high-water mark so far, into every step under way (a step that
        starts inside another resets the mark)."""
        peak = _status_kb("VmHWM") / 1024
        for record in self._open:
            record.peak_mb = max(record.peak_mb, peak)

    @contextlib.contextmanager
    def step(self, name: str):
        self._fold_peak()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        record = Step(name)
        self._open.append(record)
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            self._fold_peak()
            self._open.remove(record)
            self.steps.append(record)


def elements_sent(plan) -> int:
    """Map elements the plan's nft batches add or delete (new maps count theirs)."""
    count = 0
    for td in plan.tables:
        count += sum(len(keys) for keys in td.elements_delete.values())
        count += sum(len(items) for items in td.elements_add.values())
        count += sum(len(m.elements) for m in td.maps_add)
        count += sum(len(new.elements) for _old, new in td.maps_replace)
    return count


def ipvs_entries(plan) -> int:
    return sum(1 for c in plan.changes if c.kind.startswith("ipvs"))


def xdp_elements(plan) -> int:
    """Map elements the plan's xdp changes write: a table's slots (a changed
    table is written whole, into the inactive region) and its descriptor,
    one per service or server."""
    count = 0
    for c in plan.changes:
        if not c.kind.startswith("xdp") or c.kind == "xdp program":
            continue
        table = getattr(c.after, "size", 0) if c.kind == "xdp selector" and c.after is not None else 0
        count += 1 + table
    return count


def run_pipeline(
    rec: Recorder,
    label: str,
    path: str | None,
    intent,
    store,
    fresh_kernel: bool,
    kernel=None,
    down=frozenset(),
    receipt_of=None,
    cache=None,
):
    """load (when ``path``) -> compile -> read -> diff -> apply -> read-back, each a step.
    ``down``: (pool, server) pairs health took out, as the daemon passes them.
    ``receipt_of``: (file, text, warnings, context) of the daemon's intent,
    ``context`` the daemon's cli.Context (kept, as kdsr run keeps its own):
    then the receipt ``kdsr run`` records after each verified apply is a step too.
    ``cache``: the daemon's CompileCache, kept from one step to the next
    (None: compile from nothing, as a new ``kdsr apply`` process does)."""
    from kdsr import apply as apply_module
    from kdsr import collector, operations
    from kdsr.compile import compile_node
    from kdsr.compile.effective import effective_intent, unserved_vips
    from kdsr.diff import diff
    from kdsr.intent import load_intent
    from kdsr.kernel.observe import keep_unchanged, observe
    from kdsr.kernel.system import SystemKernel

    if fresh_kernel or kernel is None:
        kernel = SystemKernel(store.directory)
    if path is not None:
        with rec.step(f"{label}: load+validate"):
            intent = load_intent(path)
    state = store.load("lb1")
    # As operations.prepare and operations.apply do: no cyclic collection
    # while the state is built and applied (kdsr/collector.py).
    with collector.paused():
        with rec.step(f"{label}: compile"):
            effective = effective_intent(intent, down, frozenset(state.drained))
            desired = compile_node(effective.intent, "lb1", withdraw=unserved_vips(effective, cache), cache=cache)
        with rec.step(f"{label}: read"):
            observed = observe(kernel, desired, state)
        with rec.step(f"{label}: diff"):
            plan = diff(desired, observed)
            keep_unchanged(kernel, desired, observed, plan.tables)  # as operations.prepare does
            # The plan's service-level summary, as operations.prepare makes it.
            plan.service_changes = operations.service_changes(plan, effective, down, frozenset(state.drained))
    read_back = rec.step(f"{label}: read-back")
    original = apply_module._read_back

    def timed_read_back(*args, **kwargs):
        with read_back:
            return original(*args, **kwargs)

    apply_module._read_back = timed_read_back
    try:
        writes_before = kernel.writes
        with collector.paused(), rec.step(f"{label}: apply") as step:
            apply_module.apply_plan(plan, desired, kernel, store, state)
    finally:
        apply_module._read_back = original
    step.writes = kernel.writes - writes_before
    step.elements = elements_sent(plan) + ipvs_entries(plan) + xdp_elements(plan)
    # The apply step's time includes the read-back's: take it out.
    back = next((s for s in rec.steps if s.name == f"{label}: read-back"), Step(f"{label}: read-back"))
    step.seconds -= back.seconds
    # Report the read-back after the apply that ran it.
    rec.steps = [s for s in rec.steps if s is not back] + [back]
    if receipt_of is not None:
        from kdsr import cli

        source, text, warnings, context = receipt_of
        prepared = operations.Prepared(intent=intent, node="lb1", desired=desired, state=state, plan=plan, down=down)
        with rec.step(f"{label}: receipt"):
            cli._record_receipt(context, kernel, source, text, "lb1", prepared, warnings)
    return intent, kernel


def noop_by_receipt(rec: Recorder, path: str, store, engine: str) -> bool:
    """A new ``kdsr apply``'s no-op when the receipt holds (kdsr/receipt.py):
    read the file, check the inputs digest and the nftables tokens, diff what
    has no generation.  No validate, no compile."""
    from kdsr import receipt
    from kdsr.intent.load import read_intent_text
    from kdsr.kernel.system import SystemKernel

    kernel = SystemKernel(store.directory)
    with rec.step("no-op, receipt: read+check+diff") as step:
        found = receipt.unchanged(store, kernel, path, read_intent_text(path).encode(), "lb1")
    if found is None and engine == "xdp":
        # Reported, not fatal: on xdp a receipt does not serve (its desired
        # state does not decode), so every no-op is planned in full.
        rec.steps.remove(step)
        return False
    if found is None or not found.plan.empty:
        raise SystemExit("the receipt written by the CLI's no-op did not serve the next one")
    step.writes = kernel.writes
    return True


@dataclasses.dataclass
class CliRun:
    seconds: float
    peak_mb: float
    stdout: str

    @property
    def last_line(self) -> str:
        return self.stdout.strip().splitlines()[-1] if self.stdout.strip() else ""


# Starts a command and writes its peak RSS (KB) to a file.  The peak a
# child's wait4 reports counts the memory of the process that forked it, up
# to its exec: this process is large, the launcher is not.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_pid, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def cli(state_dir: str, *args: str) -> CliRun:
    """One ``kdsr`` process of this checkout: its wall time, and its peak
    RSS as the kernel counted it (``wait4``, in a small launcher)."""
    return launch([sys.executable, "-m", "kdsr", "--state-dir", state_dir, *args])


def launch(argv: list[str]) -> CliRun:
    """``argv`` run from this checkout (see ``cli``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as peak:
        start = time.perf_counter()
        command = [sys.executable, "-c", LAUNCHER, peak.name, *argv]
        proc = subprocess.run(command, cwd=REPO, stdout=out, stderr=err, timeout=INNER_TIMEOUT_S, check=False)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode not in (0, 2):  # 2: changes pending (plan --detailed-exitcode)
            raise SystemExit(f"{' '.join(argv[1:])} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
        return CliRun(seconds, float(Path(peak.name).read_text()) / 1024, out.read().decode())


def cli_apply(path: str, state_dir: str) -> CliRun:
    return cli(state_dir, "apply", path, "--node", "lb1")


def foreign_transaction() -> None:
    """Another program's nftables transaction (on a table of its own): the
    ruleset generation moves, so kdsr lists its table again."""
    other = "add table inet kdsrbench_other; delete table inet kdsrbench_other"
    subprocess.run(["nft", other], check=True, capture_output=True, timeout=30)


def delete_a_slot(engine: str) -> None:
    """A hand edit of kdsr's own table: slot 0 of pool p0's IPv4 map goes
    (nft), or one service's element of kdsr's XDP program (xdp)."""
    if engine == "xdp":
        delete_an_xdp_service()
        return
    maps = subprocess.run(["nft", "-t", "list", "maps", "netdev"], check=True, capture_output=True, text=True).stdout
    name = re.search(r"map (pool-p0-v4-\S+) \{", maps).group(1)
    subprocess.run(["nft", "delete", "element", "netdev", "kdsr", name, "{ 0 }"], check=True, timeout=30)


def bpftool(*argv: str):
    out = subprocess.run(["bpftool", "-j", *argv], check=True, capture_output=True, text=True, timeout=60).stdout
    return json.loads(out) if out.strip() else None


def delete_an_xdp_service() -> None:
    """The first key of the ``services`` map of the program on the load
    balancer's interface, deleted with bpftool (another tool's hand edit)."""
    (dev,) = bpftool("net", "show", "dev", LB_INTERFACE)
    prog = bpftool("prog", "show", "id", str(dev["xdp"][0]["id"]))
    for map_id in prog["map_ids"]:
        if bpftool("map", "show", "id", str(map_id))["name"] == "services":
            key = bpftool("map", "getnext", "id", str(map_id))["next_key"]
            subprocess.run(["bpftool", "map", "delete", "id", str(map_id), "key", *key], check=True, timeout=60)
            return
    raise SystemExit("no services map on kdsr's XDP program")


class Daemon:
    """A real ``kdsr run`` of this checkout, its log, and its high-water mark."""

    def __init__(self, state_dir: str, intent: Path, log: Path) -> None:
        self.log = log
        argv = [sys.executable, "-m", "kdsr", "--state-dir", state_dir, "run", str(intent), "--node", "lb1"]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(argv + ["--check-interval", "1"], cwd=REPO, stdout=fh, stderr=fh)

    def wait_for(self, event: str, count: int, timeout: float = 300) -> None:
        """Until the log has ``count`` lines of ``event`` (``event=...`` and its first fields)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.read_text().count(event) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"kdsr run: no {event!r} (x{count}); its log ends:\n{self.log.read_text()[-3000:]}")

    def peak_mb(self) -> float:
        """The high-water mark since the last ``reset``."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
        return 0.0

    def reset(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def measure_paths(
    intent: str, weight_file: Path, state_dir: str, work: Path, paths: dict[str, dict], engine: str
) -> None:
    """The paths no step above takes, each in a process of its own (the module's docstring)."""

    def path(name: str, seconds: float, peak_mb: float) -> None:
        paths[name] = {"seconds": seconds, "peak_mb": peak_mb}

    def run(name: str, *args: str) -> None:
        done = cli(state_dir, *args)
        path(name, done.seconds, done.peak_mb)

    foreign_transaction()
    run("kdsr apply, no-op after another program's nft transaction", "apply", intent, "--node", "lb1")
    foreign_transaction()
    run("kdsr plan after another program's nft transaction", "plan", intent, "--node", "lb1")
    run("kdsr show", "show")
    run("kdsr show --json", "show", "--json")
    # What `kdsr run --metrics` starts for each read of the kernel counters.
    done = launch([sys.executable, "-m", "kdsr.health.counter_reader", state_dir, "lb1"])
    path("kdsr run --metrics: a read of the counters (its own process)", done.seconds, done.peak_mb)

    daemon_file = work / "run-intent.json"
    daemon_file.write_text(Path(intent).read_text())
    foreign_transaction()
    start = time.perf_counter()
    daemon = Daemon(state_dir, daemon_file, work / "run.log")
    try:
        daemon.wait_for("event=applied node=lb1 reason=start", 1)
        path("kdsr run: start after another program's nft transaction", time.perf_counter() - start, daemon.peak_mb())
        daemon.reset()
        daemon_file.write_text(weight_file.read_text())
        start = time.perf_counter()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("event=applied node=lb1 reason=reload", 1)
        path("kdsr run: an edit reloaded on SIGHUP", time.perf_counter() - start, daemon.peak_mb())
        daemon.reset()
        start = time.perf_counter()
        delete_a_slot(engine)
        daemon.wait_for("event=drift-repaired", 1)
        path("kdsr run: drift check repairing a hand edit", time.perf_counter() - start, daemon.peak_mb())
        daemon.reset()
        client = cli(state_dir, "show", "--json")
        path("kdsr show --json, answered by kdsr run: the client", client.seconds, client.peak_mb)
        path("kdsr show --json, answered by kdsr run: kdsr run", client.seconds, daemon.peak_mb())
    finally:
        daemon.stop()
    foreign_transaction()
    run("kdsr destroy after another program's nft transaction", "destroy", "--node", "lb1", "--auto-approve")
    run("kdsr apply into the emptied kernel (full apply)", "apply", intent, "--node", "lb1")


def doc_engine(doc: dict) -> str:
    return next(iter(doc["services"].values()))["dsr"]["engine"]


def inner(args: argparse.Namespace) -> int:
    from kdsr.kernel.state import StateStore

    doc = json.loads(Path(args.intent).read_text())
    work = Path(args.intent).parent
    store = StateStore(args.state_dir)
    rec = Recorder()

    intent, _ = run_pipeline(rec, "full apply", args.intent, None, store, fresh_kernel=True)
    run_pipeline(rec, "no-op re-apply", args.intent, None, store, fresh_kernel=True)
    # The first CLI no-op plans in full and writes the receipt; the second uses it.
    cli_noop = cli_apply(args.intent, args.state_dir)
    receipt_served = noop_by_receipt(rec, args.intent, store, doc_engine(doc))
    cli_receipt = cli_apply(args.intent, args.state_dir)

    # The daemon's path (kdsr run): the intent in memory, one kernel handle
    # kept, and its Reloader, which loaded the file at start and on SIGHUP
    # validates and builds only the entries an edit changed.
    from kdsr.intent.reload import Reloader
    from kdsr.kernel.system import SystemKernel

    daemon_file = work / "daemon-intent.json"
    daemon_file.write_text(Path(args.intent).read_text())
    reloader = Reloader()
    intent = reloader.load(daemon_file)
    from kdsr.compile import CompileCache

    daemon_kernel = SystemKernel(store.directory)
    daemon_cache = CompileCache()  # as kdsr run's Runner keeps one
    from kdsr import cli, collector

    # kdsr run records a receipt after each verified apply (kdsr/cli.py:
    # run_command), its first one after its start, its warnings computed
    # once per intent, through the one Context it keeps.
    daemon_context = cli.Context(str(store.directory), 0.0)
    daemon_context.compile_cache = daemon_cache
    receipt_of = (str(daemon_file), reloader.text, cli._warnings(intent, daemon_cache), daemon_context)
    run_pipeline(
        rec,
        "warm daemon",
        None,
        intent,
        store,
        fresh_kernel=False,
        kernel=daemon_kernel,
        cache=daemon_cache,
        receipt_of=receipt_of,
    )

    collector.settle()  # as kdsr run does after its first apply
    # A health event: the same intent object, one server of one pool down,
    # then up again (what ``kdsr run`` does after a probe changes state).
    down = frozenset({("p0", str(intent.pool("p0").members[1].address))})
    for label, now_down in (("one server down (health)", down), ("the server back up (health)", frozenset())):
        daemon_path = {"fresh_kernel": False, "kernel": daemon_kernel, "receipt_of": receipt_of, "cache": daemon_cache}
        run_pipeline(rec, label, None, intent, store, down=now_down, **daemon_path)
    changes = {
        "one weight change": with_weight(doc, "p0", 0, 3),
        "one server removed": without_member(with_weight(doc, "p0", 0, 3), "p0", 1),
    }
    cli_changes = {}
    for label, changed in changes.items():
        changed_path = work / f"{label.replace(' ', '-')}.json"
        changed_path.write_text(json.dumps(changed))
        # The user edits the daemon's file and sends SIGHUP.
        daemon_file.write_text(changed_path.read_text())
        with collector.paused(), rec.step(f"{label}: load+validate"):
            changed_intent = reloader.load(daemon_file)
        receipt_of = (str(daemon_file), reloader.text, cli._warnings(changed_intent, daemon_cache), daemon_context)
        run_pipeline(
            rec,
            label,
            None,
            changed_intent,
            store,
            fresh_kernel=False,
            kernel=daemon_kernel,
            receipt_of=receipt_of,
            cache=daemon_cache,
        )
    # The same edits through the CLI: back to the start, then each changed file.
    cli_apply(args.intent, args.state_dir)
    for label in changes:
        cli_changes[label] = cli_apply(str(work / f"{label.replace(' ', '-')}.json"), args.state_dir)
    cli_apply(args.intent, args.state_dir)  # back to the start again, for the paths below

    paths = {
        "kdsr apply, no-op (full plan)": {"seconds": cli_noop.seconds, "peak_mb": cli_noop.peak_mb},
        "kdsr apply, no-op (receipt)" if receipt_served else "kdsr apply, no-op (receipt not served: full plan)": {
            "seconds": cli_receipt.seconds,
            "peak_mb": cli_receipt.peak_mb,
        },
        **{f"kdsr apply, {label}": {"seconds": r.seconds, "peak_mb": r.peak_mb} for label, r in cli_changes.items()},
    }
    measure_paths(args.intent, work / "one-weight-change.json", args.state_dir, work, paths, doc_engine(doc))

    steps = [dataclasses.asdict(s) for s in rec.steps if not s.name.startswith("warm daemon")]
    result = {
        "steps": steps,
        "cli": {
            "no-op re-apply": cli_noop.seconds,
            ("no-op, receipt" if receipt_served else "no-op, receipt not served (full plan)"): cli_receipt.seconds,
            **{label: r.seconds for label, r in cli_changes.items()},
        },
        "receipt_served": receipt_served,
        "cli_noop_output": cli_noop.last_line,
        "cli_receipt_output": cli_receipt.last_line,
        "paths": paths,
        # Each step's peak is measured from a reset high-water mark: the
        # process's own is the highest of them.
        "peak_rss_mb": max([_status_kb("VmHWM") / 1024] + [step.peak_mb for step in rec.steps]),
    }
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- driving (outer)
def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def bench_namespace(name: str):
    """A namespace with the LB's interface: a veth whose peer stays in it."""
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", LB_INTERFACE, "type", "veth", "peer", "name", "peer0")
        _ip("-n", name, "link", "set", LB_INTERFACE, "up")
        _ip("-n", name, "link", "set", "peer0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", LB_ADDRESS, "dev", LB_INTERFACE)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def nft_f_reference(ns: str, text: Path, other: str) -> float:
    """The yardstick of the full-apply goal: ``nft -f`` loading the table
    kdsr made (its text as ``nft list`` prints it) into an empty namespace,
    the fastest of NFT_F_ROUNDS loads."""
    with text.open("w") as out:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "netdev", "kdsr"], stdout=out, check=True)
    best = float("inf")
    for _ in range(NFT_F_ROUNDS):
        with bench_namespace(other) as empty:
            start = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", empty, "nft", "-f", str(text)], check=True, timeout=INNER_TIMEOUT_S)
            best = min(best, time.perf_counter() - start)
    return best


def measure(vips: int, servers: int, engine: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdsr-bench-") as tmp:
        path = Path(tmp) / f"intent-{vips}.json"
        path.write_text(json.dumps(bench_intent(vips, servers, engine)))
        state_dir = Path(tmp) / "state"
        with bench_namespace(f"kdsrbench-{os.getpid()}-{vips}") as ns:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", "--intent", str(path)]
                + ["--state-dir", str(state_dir)],
                capture_output=True,
                text=True,
                timeout=INNER_TIMEOUT_S,
            )
            if proc.returncode == 0 and engine == "nft":
                nft_f = nft_f_reference(ns, Path(tmp) / "ruleset.nft", f"kdsrbench-{os.getpid()}-{vips}-nft")
        if proc.returncode != 0:
            raise SystemExit(f"bench at {vips} VIPs failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if engine == "nft":
            result["nft_f_s"] = nft_f
        result["pools"] = len(bench_intent(vips, servers, engine)["pools"])
        return result


def _sum(steps: list[dict], label: str) -> float:
    return sum(s["seconds"] for s in steps if s["name"].startswith(label + ":"))


def goals(vips: int, result: dict) -> dict[str, tuple[str, bool]]:
    steps = result["steps"]
    full = _sum(steps, "full apply")
    noop_writes = sum(s["writes"] for s in steps if s["name"].startswith("no-op"))
    verdicts = {"full apply <= 10 s": (f"{full:.2f} s", full <= GOAL_FULL_APPLY_S)}
    if result.get("nft_f_s"):
        nft_f = result["nft_f_s"]
        verdicts["full apply <= 3x `nft -f` of its table"] = (
            f"{full:.2f} s = {full / nft_f:.1f}x {nft_f:.2f} s",
            full <= GOAL_NFT_F_RATIO * nft_f,
        )
    for label, what in (("no-op re-apply", "full plan"), ("no-op, receipt", "receipt")):
        if not any(s["name"].startswith(label + ":") for s in steps):
            verdicts[f"no-op ({what}) <= 5% of full, 0 writes"] = ("not served", False)
            continue
        noop = _sum(steps, label)
        verdicts[f"no-op ({what}) <= 5% of full, 0 writes"] = (
            f"{noop:.2f} s = {100 * noop / full:.1f}%, {noop_writes} writes",
            noop <= GOAL_NOOP_FRACTION * full and noop_writes == 0,
        )
    verdicts |= {
        "memory <= 500 MB, this process": (f"{result['peak_rss_mb']:.0f} MB", result["peak_rss_mb"] <= GOAL_MEMORY_MB),
    }
    paths = result.get("paths", {})
    if paths:
        worst = max(paths, key=lambda name: paths[name]["peak_mb"])
        over = [name for name, row in paths.items() if row["peak_mb"] > GOAL_MEMORY_MB]
        figure = f"{paths[worst]['peak_mb']:.0f} MB ({worst})" if not over else f"{len(over)} over: {', '.join(over)}"
        verdicts["memory <= 500 MB, every path"] = (figure, not over)
    for label in CHANGES:
        took = _sum(steps, label)
        verdicts[f"{label} <= 150 ms and <= 1/50 of full"] = (
            f"{1000 * took:.0f} ms = 1/{full / took:.0f}",
            took <= GOAL_CHANGE_S and took <= GOAL_CHANGE_FRACTION * full,
        )
        loading = sum(s["seconds"] for s in steps if s["name"] == f"{label}: load+validate")
        if loading:
            applied = took - loading
            verdicts[f"{label}, load+validate left out"] = (
                f"{1000 * applied:.0f} ms = 1/{full / applied:.0f}",
                applied <= GOAL_CHANGE_S and applied <= GOAL_CHANGE_FRACTION * full,
            )
    return verdicts


def print_tables(results: dict[int, dict]) -> None:
    sizes = sorted(results)
    names = [s["name"] for s in results[sizes[0]]["steps"]]
    width = max(len(n) for n in names) + 2
    print(f"\n{'step':<{width}}" + "".join(f"{f'{n} VIPs':>30}" for n in sizes))
    print(f"{'':<{width}}" + "".join(f"{'s    peak MB  writes  elems':>30}" for _ in sizes))
    last_group = ""
    for name in names:
        group = name.split(":")[0]
        if group != last_group and last_group:
            row = f"{'  = ' + last_group:<{width}}"
            row += "".join(f"{_sum(results[n]['steps'], last_group):>9.3f}{'':>21}" for n in sizes)
            print(row)
        last_group = group
        row = f"{name:<{width}}"
        for n in sizes:
            step = next(s for s in results[n]["steps"] if s["name"] == name)
            if not step["seconds"] and not step["peak_mb"]:  # an empty plan: apply returned before its read-back
                row += f"{'(not run)':>30}"
                continue
            row += f"{step['seconds']:>9.3f}{step['peak_mb']:>10.0f}{step['writes']:>7}{step['elements']:>9}"
        peaks = [next(s for s in results[n]["steps"] if s["name"] == name)["peak_mb"] for n in sizes]
        print(row + (f"  OVER {GOAL_MEMORY_MB:.0f} MB" if max(peaks) > GOAL_MEMORY_MB else ""))
    row = f"{'  = ' + last_group:<{width}}"
    print(row + "".join(f"{_sum(results[n]['steps'], last_group):>9.3f}{'':>21}" for n in sizes))
    print(f"\n{'through the CLI (new process)':<{width}}" + "".join(f"{'s':>30}" for _ in sizes))
    for label in results[sizes[0]]["cli"]:
        print(f"{label:<{width}}" + "".join(f"{results[n]['cli'][label]:>30.3f}" for n in sizes))
    print(f"{'process peak RSS (MB)':<{width}}" + "".join(f"{results[n]['peak_rss_mb']:>30.0f}" for n in sizes))
    print(f"{'pools':<{width}}" + "".join(f"{results[n]['pools']:>30}" for n in sizes))
    print_paths(results, sizes)
    print("\ngoals (daemon path for the single changes):")
    for n in sizes:
        for goal, (figure, ok) in goals(n, results[n]).items():
            print(f"  {n:>6} VIPs  {goal:<48} {figure:<28} {'met' if ok else 'MISSED'}")


def print_paths(results: dict[int, dict], sizes: list[int]) -> None:
    """Every path's peak RSS (each its own process), flagged over the goal."""
    names = list(results[sizes[0]].get("paths", {}))
    if not names:
        return
    width = max(len(n) for n in names) + 2
    print(f"\n{'every path, its own process':<{width}}" + "".join(f"{f'{n} VIPs: s, peak MB':>30}" for n in sizes))
    for name in names:
        row, over = f"{name:<{width}}", False
        for n in sizes:
            found = results[n]["paths"].get(name, {"seconds": 0.0, "peak_mb": 0.0})
            row += f"{found['seconds']:>20.2f}{found['peak_mb']:>10.0f}"
            over = over or found["peak_mb"] > GOAL_MEMORY_MB
        print(row + (f"  OVER {GOAL_MEMORY_MB:.0f} MB" if over else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--servers", type=int, default=16)
    parser.add_argument("--engine", choices=("nft", "ipvs", "xdp"), default="nft")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "control_plane.json"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--intent", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args)
    if os.geteuid() != 0:
        print("bench/control_plane.py needs root (it makes a network namespace)", file=sys.stderr)
        return 1
    results = {}
    for vips in (int(s) for s in args.sizes.split(",")):
        print(f"measuring {vips} VIPs x {args.servers} servers ({args.engine}) ...", file=sys.stderr, flush=True)
        results[vips] = measure(vips, args.servers, args.engine)
    print_tables(results)
    out = {
        "engine": args.engine,
        "servers_per_pool": args.servers,
        "kernel": os.uname().release,
        "results": {str(n): r for n, r in results.items()},
        "goals": {
            str(n): {g: {"figure": f, "met": ok} for g, (f, ok) in goals(n, r).items()} for n, r in results.items()
        },
    }
    import benchlib  # here, not at the top: benchlib imports this module

    benchlib.write_json(args.json, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
