#!/usr/bin/env python3
"""Control-plane bench: what a large intent costs kdsr, step by step, with the
kernel doing the real work in a throw-away network namespace.

    .venv/bin/python bench/control_plane.py [--sizes 100,1000,10000] [--servers 16]
        [--engine nft|ipvs] [--json bench/results/control_plane.json]

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

Memory: the peak RSS of each step (``/proc/self/clear_refs`` resets the
high-water mark before it) and of the whole process.  Writes: kernel write
calls (one nft transaction counts one) and the map elements sent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
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

    @contextlib.contextmanager
    def step(self, name: str):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        record = Step(name)
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            record.peak_mb = _status_kb("VmHWM") / 1024
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
    ``receipt_of``: (file, text, warnings) of the daemon's intent: then the
    receipt ``kdsr run`` records after each verified apply is a step too.
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
    step.elements = elements_sent(plan) + ipvs_entries(plan)
    # The apply step's time includes the read-back's: take it out.
    back = next((s for s in rec.steps if s.name == f"{label}: read-back"), Step(f"{label}: read-back"))
    step.seconds -= back.seconds
    # Report the read-back after the apply that ran it.
    rec.steps = [s for s in rec.steps if s is not back] + [back]
    if receipt_of is not None:
        from kdsr import cli

        source, text, warnings = receipt_of
        prepared = operations.Prepared(intent=intent, node="lb1", desired=desired, state=state, plan=plan, down=down)
        with rec.step(f"{label}: receipt"):
            cli._record_receipt(cli.Context(store.directory, 0.0), kernel, source, text, "lb1", prepared, warnings)
    return intent, kernel


def noop_by_receipt(rec: Recorder, path: str, store) -> None:
    """A new ``kdsr apply``'s no-op when the receipt holds (kdsr/receipt.py):
    read the file, check the inputs digest and the nftables tokens, diff what
    has no generation.  No validate, no compile."""
    from kdsr import receipt
    from kdsr.intent.load import read_intent_text
    from kdsr.kernel.system import SystemKernel

    kernel = SystemKernel(store.directory)
    with rec.step("no-op, receipt: read+check+diff") as step:
        found = receipt.unchanged(store, kernel, path, read_intent_text(path).encode(), "lb1")
    if found is None or not found.plan.empty:
        raise SystemExit("the receipt written by the CLI's no-op did not serve the next one")
    step.writes = kernel.writes


def cli_apply(path: str, state_dir: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kdsr", "--state-dir", state_dir, "apply", path, "--node", "lb1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT_S,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"kdsr apply failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def inner(args: argparse.Namespace) -> int:
    from kdsr.kernel.state import StateStore

    doc = json.loads(Path(args.intent).read_text())
    work = Path(args.intent).parent
    store = StateStore(args.state_dir)
    rec = Recorder()

    intent, _ = run_pipeline(rec, "full apply", args.intent, None, store, fresh_kernel=True)
    run_pipeline(rec, "no-op re-apply", args.intent, None, store, fresh_kernel=True)
    # The first CLI no-op plans in full and writes the receipt; the second uses it.
    cli_noop_s, cli_noop_out = cli_apply(args.intent, args.state_dir)
    noop_by_receipt(rec, args.intent, store)
    cli_receipt_s, cli_receipt_out = cli_apply(args.intent, args.state_dir)

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
    run_pipeline(rec, "warm daemon", None, intent, store, fresh_kernel=False, kernel=daemon_kernel, cache=daemon_cache)
    from kdsr import collector

    collector.settle()  # as kdsr run does after its first apply
    # A health event: the same intent object, one server of one pool down,
    # then up again (what ``kdsr run`` does after a probe changes state).
    down = frozenset({("p0", str(intent.pool("p0").members[1].address))})
    # kdsr run records a receipt after each verified apply (kdsr/cli.py:
    # run_command), its warnings computed once per intent.
    from kdsr import cli

    receipt_of = (str(daemon_file), reloader.text, cli._warnings(intent, daemon_cache))
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
        receipt_of = (str(daemon_file), reloader.text, cli._warnings(changed_intent, daemon_cache))
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
        cli_changes[label] = cli_apply(str(work / f"{label.replace(' ', '-')}.json"), args.state_dir)[0]

    result = {
        "steps": [dataclasses.asdict(s) for s in rec.steps if not s.name.startswith("warm daemon")],
        "cli": {"no-op re-apply": cli_noop_s, "no-op, receipt": cli_receipt_s, **cli_changes},
        "cli_noop_output": cli_noop_out,
        "cli_receipt_output": cli_receipt_out,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "max_rss_mb": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024,
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
        if proc.returncode != 0:
            raise SystemExit(f"bench at {vips} VIPs failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["pools"] = len(bench_intent(vips, servers, engine)["pools"])
        return result


def _sum(steps: list[dict], label: str) -> float:
    return sum(s["seconds"] for s in steps if s["name"].startswith(label + ":"))


def goals(vips: int, result: dict) -> dict[str, tuple[str, bool]]:
    steps = result["steps"]
    full = _sum(steps, "full apply")
    noop_writes = sum(s["writes"] for s in steps if s["name"].startswith("no-op"))
    verdicts = {"full apply <= 10 s": (f"{full:.2f} s", full <= GOAL_FULL_APPLY_S)}
    for label, what in (("no-op re-apply", "full plan"), ("no-op, receipt", "receipt")):
        noop = _sum(steps, label)
        verdicts[f"no-op ({what}) <= 5% of full, 0 writes"] = (
            f"{noop:.2f} s = {100 * noop / full:.1f}%, {noop_writes} writes",
            noop <= GOAL_NOOP_FRACTION * full and noop_writes == 0,
        )
    verdicts |= {
        "memory <= 500 MB": (f"{result['peak_rss_mb']:.0f} MB", result["peak_rss_mb"] <= GOAL_MEMORY_MB),
    }
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
        print(row)
    row = f"{'  = ' + last_group:<{width}}"
    print(row + "".join(f"{_sum(results[n]['steps'], last_group):>9.3f}{'':>21}" for n in sizes))
    print(f"\n{'through the CLI (new process)':<{width}}" + "".join(f"{'s':>30}" for _ in sizes))
    for label in results[sizes[0]]["cli"]:
        print(f"{label:<{width}}" + "".join(f"{results[n]['cli'][label]:>30.3f}" for n in sizes))
    print(f"{'process peak RSS (MB)':<{width}}" + "".join(f"{results[n]['peak_rss_mb']:>30.0f}" for n in sizes))
    print(f"{'pools':<{width}}" + "".join(f"{results[n]['pools']:>30}" for n in sizes))
    print("\ngoals (daemon path for the single changes):")
    for n in sizes:
        for goal, (figure, ok) in goals(n, results[n]).items():
            print(f"  {n:>6} VIPs  {goal:<48} {figure:<28} {'met' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--servers", type=int, default=16)
    parser.add_argument("--engine", choices=("nft", "ipvs"), default="nft")
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
