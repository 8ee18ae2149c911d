"""What `kdsr show` costs and prints at N VIPs: this checkout beside an older release.

    sudo .venv/bin/python bench/show.py [--vips 10000] [--rounds 5] [--baseline e7e684e]

Each release gets a throw-away network namespace of its own
(``kdsrbench-show-<pid>-<n>``, deleted by name at the end) and a state
directory of its own, and applies the bench intent of bench/control_plane.py
(N VIPs, ports 80 and 443, L2, nft, N/10 pools of 3 servers).  Then, rounds
alternating which release goes first, each runs as a new process (no
daemon: the CLI reads the kernel itself):

- ``kdsr show`` (no filter);
- ``kdsr show --service v7`` (one service with its servers), this checkout only;
- ``kdsr show --json``.

Prints per step the median seconds and the lines (or bytes) printed.  The
baseline is a git revision of this repository, its ``kdsr`` package unpacked
from history (default e7e684e, before `show` per service).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "netns-lab"))
import benchlib  # noqa: E402  (bench/benchlib.py)

TIMEOUT_S = 600
STEPS = {
    "show": ("show",),
    "show --service v7": ("show", "--service", "v7"),
    "show --json": ("show", "--json"),
}


def kdsr(ns: str, release: Path, state: Path, *args: str) -> tuple[float, str]:
    """Seconds and stdout of one `kdsr` process run from ``release``."""
    return benchlib.kdsr(ns, release, state, *args, timeout=TIMEOUT_S)


def measure(namespaces: dict[str, str], found: dict[str, Path], work: Path, intent: Path, rounds: int) -> dict:
    states = {name: work / f"state-{name}" for name in found}
    for name, release in found.items():
        kdsr(namespaces[name], release, states[name], "apply", str(intent), "--node", "lb1")
    times: dict[str, dict[str, list[float]]] = {name: {} for name in found}
    sizes: dict[str, dict[str, dict]] = {name: {} for name in found}
    names = list(found)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for step, args in STEPS.items():
                if name != "this" and step == "show --service v7":
                    continue  # no filters before `show` per service
                seconds, out = kdsr(namespaces[name], found[name], states[name], *args)
                times[name].setdefault(step, []).append(seconds)
                sizes[name][step] = {"lines": out.count("\n"), "bytes": len(out.encode())}
    return {
        name: {step: {"seconds": statistics.median(v), **sizes[name][step]} for step, v in got.items()}
        for name, got in times.items()
    }


def main() -> int:
    args = benchlib.release_arguments(__doc__, 10_000, 5, "e7e684e", "show")
    if os.geteuid() != 0:
        print("bench/show.py needs root (it makes network namespaces)", file=sys.stderr)
        return 1
    results = benchlib.compare_releases("show", args.baseline, args.vips, 3, args.rounds, measure)
    print(f"kdsr show, one process per run, {args.vips} VIPs, median of {args.rounds} rounds:")
    print(f"{'release':<10} {'step':<20} {'seconds':>8} {'lines':>8} {'bytes':>11}")
    for name, steps in results.items():
        for step, got in steps.items():
            print(f"{name:<10} {step:<20} {got['seconds']:>8.2f} {got['lines']:>8} {got['bytes']:>11}")
    benchlib.write_release_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
