"""What the benches that compare this checkout with an older release share:
one `kdsr` process timed in a namespace, a namespace per release, the
measuring half of a bench re-run as a child in a namespace of its own, the
90th percentile, and the results file.

Imported by the benches with bench/ on sys.path (``import benchlib``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def kdsr(ns: str, release: Path, state: Path, *args: str, timeout: float) -> tuple[float, str]:
    """Seconds and stdout of one `kdsr` process run from ``release`` in
    namespace ``ns`` (python -m imports from its working directory)."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "kdsr", "--state-dir", str(state), *args]
    start = time.perf_counter()
    run = subprocess.run(argv, cwd=release, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"kdsr {' '.join(args)} from {release} exited {run.returncode}: {run.stderr[-2000:]}")
    return seconds, run.stdout


def release_namespaces(stack: contextlib.ExitStack, bench: str, names: Iterable[str]) -> dict[str, str]:
    """A bench namespace per release (a release does not vouch for kernel
    state it did not write), deleted by name when ``stack`` closes."""
    import control_plane  # here: control_plane imports this module

    return {
        name: stack.enter_context(control_plane.bench_namespace(f"kdsrbench-{bench}-{os.getpid()}-{n}"))
        for n, name in enumerate(names)
    }


def release_arguments(doc: str, vips: int, rounds: int, baseline: str, results: str) -> argparse.Namespace:
    """The options of a bench that compares this checkout with ``baseline``:
    --vips, --rounds, --baseline and --json (bench/results/RESULTS.json)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--vips", type=int, default=vips)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--baseline", default=baseline)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / f"{results}.json"))
    return p.parse_args()


def write_release_results(args: argparse.Namespace, results: dict) -> None:
    """The results of a bench with release_arguments' options, unless --json ''."""
    if args.json:
        out = {"vips": args.vips, "rounds": args.rounds, "baseline": args.baseline, "results": results}
        write_json(args.json, out)


def compare_releases(
    bench: str, baseline: str, vips: int, servers: int, rounds: int, measure: Callable[..., dict]
) -> dict:
    """Unpack ``baseline`` (none if empty) beside this checkout, write the
    bench intent of bench/control_plane.py (``vips`` VIPs, ``servers`` per
    pool, nft) and give each release a namespace of its own; then
    ``measure(namespaces, releases, work, intent, rounds)``."""
    import control_plane  # here: control_plane imports this module
    import releases  # an older kdsr from git history (netns-lab/)

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix=f"kdsr-bench-{bench}-") as tmp:
        work = Path(tmp)
        intent = work / "intent.json"
        intent.write_text(json.dumps(control_plane.bench_intent(vips, servers, "nft")))
        found = {"this": root}
        if baseline:
            try:
                found[baseline] = releases.unpack(baseline, work / "baseline")
            except releases.ReleaseMissing as exc:
                raise SystemExit(f"cannot unpack: {exc}") from None
        with contextlib.ExitStack() as stack:
            return measure(release_namespaces(stack, bench, found), found, work, intent, rounds)


def run_inner(script: str, bench: str, number: int, release: Path, args: list[str], what: str) -> dict:
    """Run ``script --inner --release RELEASE --work DIR *args`` in a bench
    namespace of its own, with a temporary work directory; the JSON object
    its last line of output prints.  ``what`` names the run in an error."""
    import control_plane  # here: control_plane imports this module

    with tempfile.TemporaryDirectory(prefix=f"kdsr-{bench}-") as tmp:
        with control_plane.bench_namespace(f"kdsrbench-{bench}-{os.getpid()}-{number}") as ns:
            argv = ["ip", "netns", "exec", ns, sys.executable, script, "--inner", "--release", str(release)]
            argv += ["--work", tmp, *args]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"bench at {what} ({release}) failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def write_json(path: str | Path, out: dict, indent: int = 1) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=indent) + "\n")
    print(f"\nwritten: {path}")
