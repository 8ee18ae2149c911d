"""What a config-management run pays per node: `kdsr apply` when nothing
changed, process start included, this checkout beside an older release.

    sudo .venv/bin/python bench/cli_noop.py [--vips 100] [--rounds 11] [--baseline 35746cb]

Each release gets a throw-away network namespace of its own
(``kdsrbench-cli-<pid>-<n>``, deleted by name at the end) and a state
directory of its own (a release does not vouch for kernel state it did not
write), and applies the bench intent of bench/control_plane.py (N VIPs, L2,
nft) there.  Then, rounds
alternating which release goes first, each runs as a new process:

- ``kdsr apply`` with nothing to change (answered by its receipt);
- ``kdsr plan --out FILE`` (a full plan: the intent loaded and compiled, the
  kernel read, no receipt).

The baseline is a git revision of this repository, its ``kdsr`` package
unpacked from history into a temporary directory (default 35746cb, the last
that read links, routes and rules through pyroute2).  Prints the medians
and the ratios (baseline / this); ``--json`` writes them.
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

STEPS = ("apply, no-op by receipt", "plan in full")
TIMEOUT_S = 300


def kdsr(ns: str, release: Path, state: Path, *args: str) -> float:
    """Seconds for one `kdsr` process run from ``release`` (python -m imports from its working directory)."""
    return benchlib.kdsr(ns, release, state, *args, timeout=TIMEOUT_S)[0]


def measure(namespaces: dict[str, str], releases: dict[str, Path], work: Path, intent: Path, rounds: int) -> dict:
    states = {name: work / f"state-{name}" for name in releases}
    for name, release in releases.items():
        # The first apply writes the kernel state, the second the receipt.
        kdsr(namespaces[name], release, states[name], "apply", str(intent), "--node", "lb1")
        kdsr(namespaces[name], release, states[name], "apply", str(intent), "--node", "lb1")
    times: dict[str, dict[str, list[float]]] = {name: {step: [] for step in STEPS} for name in releases}
    names = list(releases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ns, release, state = namespaces[name], releases[name], states[name]
            got = times[name]
            got[STEPS[0]].append(kdsr(ns, release, state, "apply", str(intent), "--node", "lb1"))
            saved = work / f"{name}.plan"
            got[STEPS[1]].append(kdsr(ns, release, state, "plan", str(intent), "--node", "lb1", "--out", str(saved)))
    return {name: {step: statistics.median(v) for step, v in got.items()} for name, got in times.items()}


def main() -> int:
    args = benchlib.release_arguments(__doc__, 100, 11, "35746cb", "cli_noop")
    if os.geteuid() != 0:
        print("bench/cli_noop.py needs root (it makes a network namespace)", file=sys.stderr)
        return 1
    results = benchlib.compare_releases("cli", args.baseline, args.vips, 16, args.rounds, measure)
    this, base = results["this"], results[args.baseline]
    print(f"kdsr CLI, one process per run, {args.vips} VIPs, median of {args.rounds} rounds (seconds):")
    print(f"{'step':<26} {'this':>7} {args.baseline:>9} {'ratio':>6}")
    for step in STEPS:
        print(f"{step:<26} {this[step]:>7.3f} {base[step]:>9.3f} {base[step] / this[step]:>6.2f}")
    benchlib.write_release_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
