#!/usr/bin/env python3
"""Control-plane bench, ipvs engine against nft engine, on the full kernel.

    .venv/bin/python bench/ipvs_control_plane.py [--sizes 1000,10000] [--servers 16]
        [--budget 2400] [--size-budget 1200] [--json bench/results/ipvs_control_plane.json]

As root.  The steps of bench/control_plane.py (whose functions this imports):
a full apply (load+validate, compile, read, diff, apply, read-back), a no-op
re-apply by a fresh kernel handle, then, the daemon's way (intent in
memory, one kernel handle), one server's weight change and one server
removed from one pool; wall time, peak RSS and kernel writes per step.  The
CLI rows of control_plane.py are left out: under emulation each costs a
whole full apply and says nothing about the engine.

Sizes count IPVS services: N services are N/2 VIPs x ports 80 and 443, over
pools of ``--servers`` servers.  Each size runs the same intent shape on
both engines (``bench_intent(..., engine)``), each in a throw-away namespace
and a fresh process, and the table gives the ipvs/nft ratio per step.

The host kernel has no IPVS, so on such a host the bench re-runs itself in
ONE virtme-ng guest (netns-lab/guest_tier.py, TCG emulation: absolute times
are several times the host's; emulation slows both engines, so compare the
ratios).  The guest run is bounded: ``--size-budget`` seconds per size for
both engines (nft first, then ipvs with what is left), ``--budget`` for all;
a run cut short keeps the steps it finished and says so.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "netns-lab"))

import control_plane as cp  # noqa: E402  (bench/control_plane.py, by the path above)

MARKER = "KDSR-IPVS-BENCH-JSON: "
DEFAULT_JSON = REPO / "bench" / "results" / "ipvs_control_plane.json"
ENGINES = "nft,ipvs"  # nft first: its time is predictable, ipvs gets what is left
GUEST_SLACK_S = 300  # boot, staging the venv, namespaces


# ---------------------------------------------------------------- one engine, one size (fresh process)
def inner(args: argparse.Namespace) -> int:
    """The steps, recorded to ``--out`` after each group, so a run that is cut
    short (timeout) still leaves what it finished."""
    from kdsr.intent import load_intent
    from kdsr.kernel.state import StateStore
    from kdsr.kernel.system import SystemKernel

    doc = json.loads(Path(args.intent).read_text())
    work = Path(args.intent).parent
    store = StateStore(args.state_dir)
    rec = cp.Recorder()
    out = Path(args.out)

    def dump(done: bool = False) -> None:
        steps = [dataclasses.asdict(s) for s in rec.steps if not s.name.startswith("warm daemon")]
        result = {"steps": steps, "peak_rss_mb": cp._status_kb("VmHWM") / 1024, "complete": done}
        out.write_text(json.dumps(result))

    intent, _ = cp.run_pipeline(rec, "full apply", args.intent, None, store, fresh_kernel=True)
    dump()
    cp.run_pipeline(rec, "no-op re-apply", args.intent, None, store, fresh_kernel=True)
    dump()
    daemon_kernel = SystemKernel(store.directory)
    cp.run_pipeline(rec, "warm daemon", None, intent, store, fresh_kernel=False, kernel=daemon_kernel)
    changes = {
        "one weight change": cp.with_weight(doc, "p0", 0, 3),
        "one server removed": cp.without_member(cp.with_weight(doc, "p0", 0, 3), "p0", 1),
    }
    for label, changed in changes.items():
        path = work / f"{label.replace(' ', '-')}.json"
        path.write_text(json.dumps(changed))
        cp.run_pipeline(rec, label, None, load_intent(path), store, fresh_kernel=False, kernel=daemon_kernel)
        dump()
    dump(done=True)
    return 0


def measure(services: int, servers: int, engine: str, timeout: float) -> dict:
    """One engine at one size in its own namespace; partial when it ran out of time."""
    vips = max(1, services // 2)
    with tempfile.TemporaryDirectory(prefix="kdsr-ipvs-bench-") as tmp:
        intent_path = Path(tmp) / f"intent-{vips}.json"
        intent_path.write_text(json.dumps(cp.bench_intent(vips, servers, engine)))
        out = Path(tmp) / "result.json"
        started = time.monotonic()
        with cp.bench_namespace(f"kdsripvs-{os.getpid()}-{engine}-{services}") as ns:
            command = ["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", "--intent", str(intent_path)]
            command += ["--state-dir", str(Path(tmp) / "state"), "--out", str(out)]
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, timeout))
                error = None if proc.returncode == 0 else proc.stderr[-3000:]
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout:.0f} s (the budget); the steps it finished are kept"
        result = json.loads(out.read_text()) if out.exists() else {"steps": [], "peak_rss_mb": 0.0}
        result.update(engine=engine, services=services, vips=vips, wall_s=time.monotonic() - started, error=error)
        result["pools"] = len(cp.bench_intent(vips, servers, engine)["pools"])
        return result


def inside(args: argparse.Namespace) -> dict:
    """Every size and engine, in this kernel (the guest's side), within the budgets."""
    deadline = time.monotonic() + args.budget
    runs: list[dict] = []
    for services in args.sizes:
        size_deadline = min(deadline, time.monotonic() + args.size_budget)
        for engine in args.engines:
            left = size_deadline - time.monotonic()
            if left < 10:
                runs.append({"engine": engine, "services": services, "steps": [], "error": "no time left"})
                continue
            print(f"measuring {services} IPVS services ({engine}), {left:.0f} s left ...", file=sys.stderr, flush=True)
            run = measure(services, args.servers, engine, left)
            runs.append(run)
            print(MARKER + json.dumps({"run": run}), flush=True)
    return {"kernel": os.uname().release, "servers_per_pool": args.servers, "runs": runs}


# ---------------------------------------------------------------- report
def _seconds(run: dict, name: str) -> float | None:
    step = next((s for s in run.get("steps", []) if s["name"] == name), None)
    return step["seconds"] if step else None


def _group_sum(run: dict, group: str) -> float | None:
    steps = [s for s in run.get("steps", []) if s["name"].startswith(group + ":")]
    done = any(s["name"].endswith(": read-back") for s in steps)  # the group's last step
    return sum(s["seconds"] for s in steps) if done else None


def print_table(result: dict) -> None:
    runs = result["runs"]
    sizes = sorted({r["services"] for r in runs})
    for services in sizes:
        by = {r["engine"]: r for r in runs if r["services"] == services}
        ipvs, nft = by.get("ipvs", {}), by.get("nft", {})
        names = [s["name"] for s in (nft.get("steps") or ipvs.get("steps") or [])]
        for s in ipvs.get("steps", []):
            if s["name"] not in names:
                names.append(s["name"])
        pools = (nft or ipvs).get("pools", "?")
        print(f"\n{services} IPVS services ({services // 2} VIPs x 2 ports, {pools} pools), kernel {result['kernel']}")
        print(f"{'step':<34}{'ipvs s':>10}{'MB':>6}{'writes':>8}{'nft s':>10}{'MB':>6}{'writes':>8}{'ipvs/nft':>10}")
        groups = []
        for name in names:
            group = name.split(":")[0]
            if group not in groups:
                groups.append(group)
            row = f"{name:<34}"
            for run in (ipvs, nft):
                step = next((s for s in run.get("steps", []) if s["name"] == name), None)
                row += f"{step['seconds']:>10.3f}{step['peak_mb']:>6.0f}{step['writes']:>8}" if step else f"{'-':>24}"
            a, b = _seconds(ipvs, name), _seconds(nft, name)
            row += f"{a / b:>10.2f}" if a is not None and b else f"{'-':>10}"
            print(row)
        for group in groups:
            a, b = _group_sum(ipvs, group), _group_sum(nft, group)
            cells = "".join(f"{v:>10.3f}{'':>14}" if v is not None else f"{'-':>24}" for v in (a, b))
            ratio = f"{a / b:>10.2f}" if a is not None and b else f"{'-':>10}"
            print(f"{'  = ' + group:<34}{cells}{ratio}")
        for engine, run in (("ipvs", ipvs), ("nft", nft)):
            note = f"  {engine}: process peak RSS {run.get('peak_rss_mb', 0):.0f} MB, wall {run.get('wall_s', 0):.0f} s"
            if run.get("error"):
                note += f"; INCOMPLETE: {run['error'].strip().splitlines()[-1] if run['error'].strip() else '?'}"
            print(note)


def write(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {path}")


# ---------------------------------------------------------------- driving
def has_ipvs() -> bool:
    subprocess.run(["modprobe", "-a", "ip_vs", "ip_vs_mh"], capture_output=True, check=False)
    return Path("/proc/net/ip_vs").exists()


def in_guest(args: argparse.Namespace) -> int:
    import guest_tier

    command = [guest_tier.venv_python(), "bench/ipvs_control_plane.py", "--inside"]
    command += ["--sizes", ",".join(map(str, args.sizes)), "--servers", str(args.servers)]
    command += ["--budget", str(args.budget), "--size-budget", str(args.size_budget)]
    command += ["--engines", ",".join(args.engines)]
    started = time.monotonic()
    rc = guest_tier.run_command_in_guest(command, timeout=args.budget + GUEST_SLACK_S)
    log = guest_tier.DEFAULT_RESULTS / "latest" / "command.log"
    runs, summary = [], None
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(MARKER):
                record = json.loads(line[len(MARKER) :])
                if "run" in record:
                    runs.append(record["run"])
                else:
                    summary = record
    if summary is None and not runs:
        print(f"no result from the guest (exit {rc}); see {log}", file=sys.stderr)
        return rc or 1
    result = summary or {"kernel": "guest (cut short)", "servers_per_pool": args.servers, "runs": runs}
    result["guest"] = {"wall_s": round(time.monotonic() - started, 1), "exit": rc}
    print_table(result)
    write(result, args.json)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="IPVS services per run (2 per VIP)")
    parser.add_argument("--servers", type=int, default=16)
    parser.add_argument("--budget", type=float, default=2400.0, help="seconds for all sizes and engines")
    parser.add_argument("--size-budget", type=float, default=1200.0, help="seconds per size, both engines")
    parser.add_argument("--engines", default=ENGINES, help="in this order (a check on the host: nft)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--inside", action="store_true", help="measure in this kernel (the guest's side)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--intent", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.engines = [e for e in args.engines.split(",") if e.strip()]
    if os.geteuid() != 0:
        print("bench/ipvs_control_plane.py needs root (namespaces, IPVS, the guest)", file=sys.stderr)
        return 1
    if not (args.inside or has_ipvs()):
        return in_guest(args)
    result = inside(args)
    print(MARKER + json.dumps(result), flush=True)
    print_table(result)
    if not os.environ.get("KDSR_IN_GUEST"):  # the guest's file system is thrown away
        write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
