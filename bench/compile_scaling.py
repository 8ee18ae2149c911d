#!/usr/bin/env python3
"""Compile scaling bench: time and memory of load+validate and of compile
against the number of VIPs, and the fitted exponent (time ~ VIPs^k).

    .venv/bin/python bench/compile_scaling.py [--sizes 100,200,500,1000,2000,5000,10000]
        [--json bench/results/compile_scaling.json]

No root, no kernel: load and compile are pure.  The intents are
bench/control_plane.py's (VIPs over VIPs/10 pools of 16 servers, at most
1,000 pools).  Each figure is the best of ``--repeat`` cold runs (compile
without a CompileCache, and every lru_cache in kdsr cleared before each), and the
memory is tracemalloc's peak of Python allocations during one more run
(measured apart: tracemalloc slows Python several times over).  The
exponent is the least-squares slope of log(time) on log(VIPs); the issue's
goal is linear or better (k <= 1, with a little noise allowed: k <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from control_plane import bench_intent  # noqa: E402

from kdsr.compile import compile_node  # noqa: E402
from kdsr.intent import load_intent  # noqa: E402

GOAL_EXPONENT = 1.1


def _cold() -> None:
    """Clear the value caches of kdsr's pure functions (functools.lru_cache)."""
    for name, module in list(sys.modules.items()):
        if name == "kdsr" or name.startswith("kdsr."):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def _measure(step, repeat: int) -> tuple[float, float, object]:
    """Best time of ``repeat`` cold runs, then the memory peak of one more
    (tracemalloc slows Python several times over, so never both at once)."""
    best, result = math.inf, None
    for _ in range(repeat):
        _cold()
        started = time.perf_counter()
        result = step()
        best = min(best, time.perf_counter() - started)
    _cold()
    tracemalloc.start()
    step()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return best, peak, result


def exponent(sizes: list[int], times: list[float]) -> float:
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,200,500,1000,2000,5000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "compile_scaling.json"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdsr-scaling-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"{n}.json"
            doc = bench_intent(n, 16, "nft")
            path.write_text(json.dumps(doc))
            load_s, load_mb, intent = _measure(lambda p=path: load_intent(p), args.repeat)
            compile_s, compile_mb, desired = _measure(lambda i=intent: compile_node(i, "lb1"), args.repeat)
            slots = sum(len(m.elements) for t in desired.tables for m in t.maps)
            rows.append(
                {
                    "vips": n,
                    "pools": len(doc["pools"]),
                    "elements": slots,
                    "load_s": load_s,
                    "load_mb": load_mb,
                    "compile_s": compile_s,
                    "compile_mb": compile_mb,
                }
            )
            print(f"  {n} VIPs done", file=sys.stderr, flush=True)
    print(f"\n{'VIPs':>7} {'pools':>6} {'elements':>9} {'load+validate s':>16} {'MB':>6} {'compile s':>10} {'MB':>6}")
    for r in rows:
        print(
            f"{r['vips']:>7} {r['pools']:>6} {r['elements']:>9} {r['load_s']:>16.3f} {r['load_mb']:>6.0f}"
            f" {r['compile_s']:>10.3f} {r['compile_mb']:>6.0f}"
        )
    fits = {
        "load+validate": exponent(sizes, [r["load_s"] for r in rows]),
        "compile": exponent(sizes, [r["compile_s"] for r in rows]),
        "load+validate memory": exponent(sizes, [r["load_mb"] for r in rows]),
        "compile memory": exponent(sizes, [r["compile_mb"] for r in rows]),
    }
    print("\nfitted exponent k (time or memory ~ VIPs^k), goal: linear or better (k <= 1.1):")
    for name, k in fits.items():
        print(f"  {name:<22} k = {k:.2f}  {'met' if k <= GOAL_EXPONENT else 'MISSED'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "exponents": fits}, indent=2) + "\n")
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
