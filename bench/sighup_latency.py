#!/usr/bin/env python3
"""How long a running `kdsr run` takes from SIGHUP to the kernel's commit,
and what its drift check costs, this checkout beside an older release.

    sudo .venv/bin/python bench/sighup_latency.py [--vips 100] [--edits 21]
        [--baseline b0868eb] [--drift-vips 100,10000] [--json bench/results/sighup_latency.json]

As root.  Not a timed test: it prints a table and writes the figures as JSON.

Per release (this checkout, and the baseline: a git revision of this
repository whose ``kdsr`` package is unpacked from history, default b0868eb,
the last whose loop polled every 0.2 s) and size, a throw-away namespace
(``kdsrbench-hup-<pid>-<n>``, deleted by name) with the bench intent of
bench/control_plane.py (N VIPs, L2, nft, pools of 16 servers), and one
process inside it (``--inner``) that:

- starts the real ``kdsr run`` of that release (``python -m kdsr`` from its
  directory) and waits for its first apply;
- subscribes to the namespace's nftables notifications (netlink group
  NFNLGRP_NFTABLES) and timestamps each NEWGEN message, the one the kernel
  sends at the end of every committed transaction, with the committing pid;
- ``--edits`` times: sleeps 0.3-0.7 s (so a signal lands anywhere in a
  polling loop's period), writes the intent with pool p0's first server at
  another weight (temporary file, then rename, as editors do), sends SIGHUP,
  and takes the time to the daemon's next NEWGEN; then waits for the
  daemon's ``applied reason=reload`` line (its own figure for the apply:
  plan, transaction, read-back) before the next edit;
- for releases with a drift check, and the sizes in ``--drift-vips``: starts
  ``kdsr run``'s Runner of that release in the process itself (its first
  apply, no signals), times 20 drift checks with nothing drifted (nftables
  tokens and a read of what has no generation), then five checks each right
  after a commit to another table (``nft add table inet kdsrbench_other;
  delete table ...``, one transaction): those plan in full, listing kdsr's
  table again; and the process's RSS before and after them.  (In process,
  not through ``--metrics``: a scrape lists the table for its packet
  counters, which would compete with what it measures.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "netns-lab"))
import benchlib  # noqa: E402  (bench/benchlib.py)
import control_plane  # noqa: E402  (the bench intent and its namespace)
import releases  # noqa: E402  (an older kdsr from git history)
from benchlib import p90  # noqa: E402

DEFAULT_BASELINE = "b0868eb"
START_TIMEOUT_S = 600
EVENT_TIMEOUT_S = 60
DRIFT_CHECKS = 20
FOREIGN_COMMITS = 5

# linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NFNLGRP_NFTABLES = 7
NFT_NEWGEN = (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
NFTA_GEN_ID, NFTA_GEN_PROC_PID = 1, 2


# ---------------------------------------------------------------- inner (in the namespace)
class Commits:
    """NEWGEN notifications of this namespace, each (monotonic time of receipt, generation, pid)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # A change notifies every element it adds or deletes before its NEWGEN.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self.seen: list[tuple[float, int, int]] = []
        self.overruns = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name="nft notifications").start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:  # ENOBUFS: notifications were dropped; a NEWGEN may be among them
                self.overruns += 1
                continue
            now = time.monotonic()
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NFT_NEWGEN:
                    attrs = _attributes(data[offset + 20 : offset + length])
                    with self.cond:
                        gen = struct.unpack(">I", attrs.get(NFTA_GEN_ID, b"\0\0\0\0")[:4])[0]
                        pid = struct.unpack(">I", attrs.get(NFTA_GEN_PROC_PID, b"\0\0\0\0")[:4])[0]
                        self.seen.append((now, gen, pid))
                        self.cond.notify_all()
                offset += (length + 3) & ~3 if length else len(data)

    def next_by(self, pid: int, after: float, timeout: float) -> float:
        """When the first commit by ``pid`` after ``after`` was notified."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for when, _gen, by in self.seen:
                    if by == pid and when > after:
                        return when
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"no commit by pid {pid} within {timeout} s (overruns: {self.overruns})")
                self.cond.wait(left)


def _attributes(payload: bytes) -> dict[int, bytes]:
    attrs, offset = {}, 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


class Daemon:
    def __init__(self, release: Path, intent: Path, state: Path, log: Path, options: list[str]) -> None:
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(state), "run", str(intent), "--node", "lb1", *options]
        self.log_path = log
        with open(log, "wb") as err:
            self.popen = subprocess.Popen(argv, cwd=release, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.wait_for(lambda: self.count("event=applied", "reason=start") >= 1, START_TIMEOUT_S, "the first apply")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, *words: str) -> int:
        return sum(1 for line in self.log().splitlines() if all(w in line for w in words))

    def wait_for(self, condition, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            if self.popen.poll() is not None:
                raise SystemExit(f"kdsr run exited {self.popen.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        raise SystemExit(f"kdsr run: {what} did not happen within {seconds} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # our own child, by its Popen
            self.popen.wait(60)


def write_intent(path: Path, doc: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(doc))
    temporary.rename(path)


def edits(daemon: Daemon, commits: Commits, doc: dict, path: Path, count: int) -> list[float]:
    rng = random.Random(4242)
    took = []
    for number in range(count):
        time.sleep(rng.uniform(0.3, 0.7))
        write_intent(path, control_plane.with_weight(doc, "p0", 0, 2 + number % 2))
        applied = daemon.count("event=applied", "reason=reload")
        sent = time.monotonic()
        daemon.popen.send_signal(signal.SIGHUP)
        took.append(commits.next_by(daemon.popen.pid, sent, EVENT_TIMEOUT_S) - sent)
        daemon.wait_for(lambda n=applied: daemon.count("event=applied", "reason=reload") > n, EVENT_TIMEOUT_S, "reload")
    return took


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def drift_costs(release: Path, path: Path, state: Path) -> dict:
    """The daemon's drift check, in this process: ``kdsr run``'s Runner of
    ``release`` started on the intent (its first apply), then timed checks."""
    sys.path.insert(0, str(release))
    from kdsr.health.daemon import Runner
    from kdsr.intent.reload import Reloader
    from kdsr.kernel.state import StateStore
    from kdsr.kernel.system import SystemKernel

    store = StateStore(state)
    reloader = Reloader()
    lines: list[str] = []
    runner = Runner(lambda: reloader.load(path), "lb1", SystemKernel(store.directory), store, emit=lines.append)
    runner.start()
    quiet = []
    for _ in range(DRIFT_CHECKS):
        started = time.perf_counter()
        runner.check_drift()
        quiet.append(time.perf_counter() - started)
    rss_before = status_mb("VmRSS")
    foreign = []
    for _ in range(FOREIGN_COMMITS):
        # One transaction (one generation) that leaves the ruleset as it was.
        batch = "add table inet kdsrbench_other; delete table inet kdsrbench_other"
        subprocess.run(["nft", batch], check=True, timeout=30)
        started = time.perf_counter()
        runner.check_drift()
        foreign.append(time.perf_counter() - started)
    if runner.counters.drift_repairs or runner.counters.drift_checks != DRIFT_CHECKS + FOREIGN_COMMITS:
        raise SystemExit(f"unexpected drift counters: {runner.counters}\n" + "\n".join(lines))
    return {
        "checks_s": quiet,
        "after_foreign_commit_s": foreign,
        "rss_mb_before_foreign": rss_before,
        "rss_mb_after_foreign": status_mb("VmRSS"),
    }


def inner(args: argparse.Namespace) -> int:
    release = Path(args.release)
    work = Path(args.work)
    doc = control_plane.bench_intent(args.vips, 16, "nft")
    path = work / "intent.json"
    write_intent(path, doc)
    result: dict = {}
    if args.edits:
        daemon = Daemon(release, path, work / "state", work / "run.log", [])
        try:
            commits = Commits()
            result["sighup_to_commit_s"] = edits(daemon, commits, doc, path, args.edits)
            result["overruns"] = commits.overruns
            result["apply_logged_s"] = [
                float(s) for s in re.findall(r"event=applied .*reason=reload .*seconds=([\d.]+)", daemon.log())
            ]
        finally:
            daemon.stop()
        write_intent(path, doc)
    if args.drift:
        result["drift"] = drift_costs(release, path, work / "state")
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- outer
def release_dir(revision: str | None, scratch: Path) -> Path:
    if revision is None:
        return ROOT
    try:
        return releases.unpack(revision, scratch / f"release-{revision}")
    except releases.ReleaseMissing as exc:
        raise SystemExit(f"cannot unpack: {exc}") from None


def has_check_interval(release: Path) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "kdsr", "run", "--help"], cwd=release, capture_output=True, text=True, timeout=60
    )
    return "--check-interval" in out.stdout


def measure(release: Path, vips: int, edits: int, drift: bool, number: int) -> dict:
    extra = ["--vips", str(vips), "--edits", str(edits)] + (["--drift"] if drift else [])
    return benchlib.run_inner(__file__, "hup", number, release, extra, f"{vips} VIPs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vips", type=int, default=100)
    parser.add_argument("--edits", type=int, default=21)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="a git revision; 'none' for this checkout only")
    parser.add_argument("--drift-vips", default="100,10000", help="sizes to measure the drift check at ('' for none)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "sighup_latency.json"))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--release", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--drift", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args)
    if os.geteuid() != 0:
        print("bench/sighup_latency.py needs root (it makes network namespaces)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kdsr-hup-releases-") as scratch:
        releases = {"this checkout": release_dir(None, Path(scratch))}
        if args.baseline != "none":
            releases[args.baseline] = release_dir(args.baseline, Path(scratch))
        drift_sizes = [int(n) for n in args.drift_vips.split(",") if n]
        results: dict[str, dict] = {}
        number = 0
        for name, release in releases.items():
            results[name] = {}
            drifts = drift_sizes if has_check_interval(release) else []
            for vips in sorted({args.vips, *drifts}):
                number += 1
                print(f"measuring {name} at {vips} VIPs ...", file=sys.stderr, flush=True)
                results[name][vips] = measure(
                    release, vips, args.edits if vips == args.vips else 0, vips in drifts, number
                )
    print(f"\nSIGHUP to the kernel's commit, {args.edits} weight edits at {args.vips} VIPs (ms):")
    print(f"{'release':<16}{'median':>8}{'p90':>8}{'min':>8}{'max':>8}   apply as logged: median, max")
    for name, by_size in results.items():
        row = by_size[args.vips]
        took = [1000 * s for s in row["sighup_to_commit_s"]]
        logged = [1000 * s for s in row["apply_logged_s"]]
        print(
            f"{name:<16}{statistics.median(took):>8.0f}{p90(took):>8.0f}{min(took):>8.0f}{max(took):>8.0f}"
            f"   {statistics.median(logged):.0f}, {max(logged):.0f}"
            + (f"  ({row['overruns']} notification overruns)" if row["overruns"] else "")
        )
    print("\ndrift check (kdsr run --check-interval), ms:")
    print(
        f"{'release':<16}{'VIPs':>7}{'nothing drifted (median)':>26}{'after a foreign commit (median, max)':>40}"
        f"{'RSS before, after (MB)':>26}"
    )
    for name, by_size in results.items():
        for vips, row in sorted(by_size.items()):
            if "drift" in row:
                drift = row["drift"]
                foreign = [1000 * s for s in drift["after_foreign_commit_s"]]
                quiet = statistics.median(drift["checks_s"]) * 1000
                rss = f"{drift['rss_mb_before_foreign']:.0f}, {drift['rss_mb_after_foreign']:.0f}"
                print(
                    f"{name:<16}{vips:>7}{quiet:>26.1f}"
                    f"{f'{statistics.median(foreign):.0f}, {max(foreign):.0f}':>40}"
                    f"{rss:>26}"
                )
    out = {"kernel": os.uname().release, "vips": args.vips, "edits": args.edits, "results": results}
    benchlib.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
