#!/usr/bin/env python3
"""What one Prometheus scrape of `kdsr run --metrics` costs, this checkout
beside an older release, at several sizes.

    sudo .venv/bin/python bench/metrics_scrape.py [--vips 100,1000,10000] [--scrapes 11]
        [--every 10] [--baseline e7e684e] [--json bench/results/metrics_scrape.json]

As root.  Not a timed test: it prints a table and writes the figures as JSON.

Per release (this checkout, and the baseline: a git revision of this
repository whose ``kdsr`` package is unpacked from history, default
e7e684e, the last with the hand-written exposition) and size, a throw-away
namespace (``kdsrbench-scrape-<pid>-<n>``, deleted by name) with the bench
intent of bench/control_plane.py (N VIPs, L2, nft, pools of 16 servers;
no health monitors, so no probe competes with the scrapes), and one process
inside it (``--inner``) that:

- starts the real ``kdsr run --metrics 127.0.0.1:9469 --check-interval 0``
  of that release (``python -m kdsr`` from its directory) and waits until
  it serves metrics;
- scrapes ``/metrics`` ``--scrapes`` times, ``--every`` seconds apart
  (Prometheus scrapes every 15 s to 1 min; this checkout reads the kernel
  after each scrape, and a read that takes longer than the interval runs
  beside the next scrape), each timed from the request to the
  last byte of the answer, and keeps the size of the last answer (bytes of
  exposition), its sample count and, where the release has them, its
  kdsr_kernel_read_duration_seconds (the daemon's last read of the kernel
  counters, formatting included) and kdsr_kernel_counters_age_seconds;
- reads the daemon's CPU time (``/proc/<pid>/stat``) before and after the
  scrapes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "netns-lab"))
import benchlib  # noqa: E402  (bench/benchlib.py)
import control_plane  # noqa: E402  (the bench intent and its namespace)
import releases  # noqa: E402  (an older kdsr from git history)
from benchlib import p90  # noqa: E402

DEFAULT_BASELINE = "e7e684e"
LISTEN = "127.0.0.1:9469"
START_TIMEOUT_S = 900
SCRAPE_TIMEOUT_S = 60


# ---------------------------------------------------------------- inner (in the namespace)
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def inner(args: argparse.Namespace) -> int:
    release, work = Path(args.release), Path(args.work)
    path = work / "intent.json"
    path.write_text(json.dumps(control_plane.bench_intent(args.size, 16, "nft")))
    log = work / "run.log"
    argv = [sys.executable, "-m", "kdsr", "--state-dir", str(work / "state"), "run", str(path), "--node", "lb1"]
    argv += ["--metrics", LISTEN, "--check-interval", "0"]
    with open(log, "wb") as err:
        daemon = subprocess.Popen(argv, cwd=release, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "event=metrics" not in log.read_text(errors="replace"):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"kdsr run did not serve metrics:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        cpu_before = cpu_seconds(daemon.pid)
        took, body = [], b""
        for _ in range(args.scrapes):
            time.sleep(args.every)
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
                body = answer.read()
            took.append(time.perf_counter() - started)
        cpu = cpu_seconds(daemon.pid) - cpu_before
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)  # our own child, by its Popen
            daemon.wait(120)
    text = body.decode()
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    # The daemon's own figures for its kernel reads, where it has them (this checkout).
    read = re.search(r"^kdsr_kernel_read_duration_seconds (\S+)$", text, re.M)
    age = re.search(r"^kdsr_kernel_counters_age_seconds (\S+)$", text, re.M)
    result = {"scrape_s": took, "bytes": len(body), "samples": samples, "daemon_cpu_s": cpu}
    result["kernel_read_s"] = float(read[1]) if read else None
    result["counters_age_s"] = float(age[1]) if age else None
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- outer
def measure(release: Path, vips: int, args: argparse.Namespace, number: int) -> dict:
    extra = ["--size", str(vips), "--scrapes", str(args.scrapes), "--every", str(args.every)]
    return benchlib.run_inner(__file__, "scrape", number, release, extra, f"{vips} VIPs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vips", default="100,1000,10000", help="sizes, comma-separated")
    parser.add_argument("--scrapes", type=int, default=11)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between two scrapes")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="a git revision; 'none' for this checkout only")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "metrics_scrape.json"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--release", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args)
    if os.geteuid() != 0:
        print("bench/metrics_scrape.py needs root (it makes network namespaces)", file=sys.stderr)
        return 1
    sizes = [int(n) for n in args.vips.split(",") if n]
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="kdsr-scrape-releases-") as scratch:
        dirs = {"this checkout": ROOT}
        if args.baseline != "none":
            try:
                dirs[args.baseline] = releases.unpack(args.baseline, Path(scratch) / args.baseline)
            except releases.ReleaseMissing as exc:
                raise SystemExit(f"cannot unpack: {exc}") from None
        number = 0
        for vips in sizes:
            for name, release in dirs.items():
                number += 1
                print(f"measuring {name} at {vips} VIPs ...", file=sys.stderr, flush=True)
                results.setdefault(name, {})[vips] = measure(release, vips, args, number)
    names = list(results)
    print(f"\nscrape of /metrics, {args.scrapes} scrapes {args.every:g} s apart (ms; bytes of exposition;")
    print(f"the daemon's last kernel read and the age of the counters it served, for {names[0]}):")
    header = f"{'VIPs':>7}"
    for name in names:
        header += f"{name + ' median':>24}{'p90':>8}{'bytes':>11}{'samples':>9}{'CPU s':>7}"
    if len(names) == 2:
        header += f"{'median ratio':>14}"
    header += f"{'last read s':>13}{'age s':>7}"
    print(header)
    for vips in sizes:
        row = f"{vips:>7}"
        medians = []
        for name in names:
            r = results[name][vips]
            took = [1000 * s for s in r["scrape_s"]]
            medians.append(statistics.median(took))
            row += f"{medians[-1]:>24.1f}{p90(took):>8.1f}{r['bytes']:>11}{r['samples']:>9}{r['daemon_cpu_s']:>7.2f}"
        if len(names) == 2:
            row += f"{medians[0] / medians[1]:>14.2f}"
        own = results[names[0]][vips]
        if own.get("kernel_read_s") is not None:
            row += f"{own['kernel_read_s']:>13.2f}{own['counters_age_s']:>7.1f}"
        print(row)
    out = {"kernel": os.uname().release, "scrapes": args.scrapes, "every_s": args.every, "results": results}
    benchlib.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
