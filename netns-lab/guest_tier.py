#!/usr/bin/env python3
"""Run the full-kernel lab tier (`pytest -m full_kernel netns-lab`) where the kernel has the features.

`make test` runs this after the host tier:

- host kernel has ip_vs, ip_vs_mh, ipip, ip_gre, ip6_tunnel (fullkernel.probe):
  nothing to do, the host tier already ran the full_kernel tests;
  with --native-when-capable (`make lab-full`) they run here, natively.
- otherwise: boot ONE virtme-ng guest (qemu, TCG) on the newest
  /boot/vmlinuz-*-amd64 (Debian's linux-image-amd64), run the full_kernel
  tests inside it with KDSR_IN_GUEST=1, stream the guest's output, and exit
  with the guest pytest's exit code.

The guest sees the host's root file system read-only with a writable overlay
(so the project's venv, nft, ipvsadm, tcpdump are there); only the results
directory is shared read-write: --results, by default a fresh
lab-results/guest-tier/run-<time>-<pid>/ (`latest` points at the newest; the
last few runs are kept). It receives junit.xml, pytest.log, console.log
(everything the guest printed), exit-code, timings.json and the guest script.

One guest at a time per checkout: a second run waits for the first (a lock in
lab-results/), because two TCG guests on a small machine slow each other down
enough to make timing-sensitive lab tests flaky.

A guest that fails to boot, times out, or leaves no exit code is a failure
with a message, never a pass. On timeout only the qemu process this run
started (found by walking its own children) is killed, by pid.

Environment: KDSR_GUEST_KERNEL (kernel image), KDSR_GUEST_TIMEOUT (seconds,
default 3600), KDSR_GUEST_BOOT_TIMEOUT (seconds until the guest must be
running the test script, default 300), KDSR_GUEST_KVM=1 (use KVM instead of TCG, on hardware where it
works), KDSR_GUEST_MEMORY / KDSR_GUEST_CPUS. CI, PYTEST_ADDOPTS and other
KDSR_* variables are passed into the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent
if str(LAB_DIR) not in sys.path:
    sys.path.insert(0, str(LAB_DIR))

import fullkernel  # noqa: E402  (needs the path above)

DEFAULT_RESULTS = REPO / "lab-results" / "guest-tier"
LOCK_PATH = REPO / "lab-results" / ".guest-tier.lock"
KEEP_RUNS = 5
DEFAULT_TIMEOUT = 3600.0
# A normal TCG boot takes 20-35 s; a kernel that cannot boot (wrong image, a
# hang before init) would otherwise hold the run until the whole timeout.
DEFAULT_BOOT_TIMEOUT = 300.0
BOOT_MARKER = "kdsr-guest: booted"
# Files this runner owns in the results directory (cleared before a run).
RESULT_FILES = (
    "guest.sh",
    "junit.xml",
    "pytest.log",
    "console.log",
    "exit-code",
    "timings.json",
    "python-tree.tar",
    "command.log",
)
# Variables that configure this runner, not the tests: not passed into the guest.
RUNNER_ENV = (
    "KDSR_GUEST_KERNEL",
    "KDSR_GUEST_TIMEOUT",
    "KDSR_GUEST_BOOT_TIMEOUT",
    "KDSR_GUEST_KVM",
    "KDSR_GUEST_MEMORY",
    "KDSR_GUEST_CPUS",
)


def say(message: str) -> None:
    print(f"guest-tier: {message}", flush=True)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def newest_kernel() -> Path | None:
    """The newest Debian amd64 kernel image in /boot, by version."""

    def version_key(path: Path) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    images = sorted(Path("/boot").glob("vmlinuz-*-amd64"), key=version_key)
    return images[-1] if images else None


def venv_python() -> str:
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def find_vng() -> str | None:
    candidate = REPO / ".venv" / "bin" / "vng"
    return str(candidate) if candidate.exists() else shutil.which("vng")


def guest_env() -> dict[str, str]:
    passed = {}
    for key, value in os.environ.items():
        if key in ("CI", "PYTEST_ADDOPTS") or (
            key.startswith("KDSR_") and key not in RUNNER_ENV and key != fullkernel.IN_GUEST_ENV
        ):
            passed[key] = value
    return passed


# Under TCG every stat and read on the shared root file system (virtiofs)
# costs milliseconds, and one `kdsr` run imports ~400 modules: about 60% of
# a CLI call's time went to finding and reading them.  The guest gets the
# Python trees as one tar, unpacks it into RAM and bind-mounts the copies
# over the originals (same paths, same contents).  Measured in the guest:
# `python -m kdsr --help` 11.4 s from virtiofs, 5.4 s from RAM.
PYTHON_TREE_TAR = "python-tree.tar"
# Parts no lab test imports (tar --exclude globs; anchored to a parent so
# that netns-lab/tests is not caught by "test").
PYTHON_TREE_SKIP = tuple(
    f"*/python3.*/{name}" for name in ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "pydoc_data")
) + tuple(f"*-packages/{name}" for name in ("pip", "virtme", "virtme_ng", "*/tests"))


def python_trees(python: str) -> list[Path]:
    """The directories `python` imports from, plus this project's sources; nested ones dropped."""
    listing = subprocess.run(
        [python, "-c", "import sys; print('\\n'.join(sys.path))"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    candidates = [Path(entry) for entry in listing if entry.startswith("/")]
    candidates += [REPO / "kdsr", LAB_DIR]
    dirs = sorted({path.resolve() for path in candidates if path.is_dir()}, key=lambda path: len(path.parts))
    kept: list[Path] = []
    for path in dirs:
        if not any(path.is_relative_to(parent) for parent in kept):
            kept.append(path)
    return kept


def stage_python_trees(results: Path, python: str) -> list[Path]:
    """Write results/python-tree.tar for the guest; return the trees in it ([] if tar failed)."""
    trees = python_trees(python)
    argv = ["tar", "-C", "/", "-cf", str(results / PYTHON_TREE_TAR)]
    argv += [f"--exclude={name}" for name in PYTHON_TREE_SKIP]
    argv += [str(tree.relative_to("/")) for tree in trees]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        say(f"warning: could not stage the Python trees for the guest ({result.stderr.strip()}); running from virtiofs")
        (results / PYTHON_TREE_TAR).unlink(missing_ok=True)
        return []
    return trees


def staging_lines(trees: list[Path]) -> list[str]:
    """Shell lines that unpack the tar into a tmpfs and bind-mount each tree over its original."""
    if not trees:
        return []
    mounts = " && ".join(f"mount --bind /run/kdsr-python{shlex.quote(str(t))} {shlex.quote(str(t))}" for t in trees)
    return [
        f'if [ -f "$R/{PYTHON_TREE_TAR}" ]; then',
        "  s=$(date +%s%N)",
        "  if mkdir -p /run/kdsr-python && mount -t tmpfs -o size=768M tmpfs /run/kdsr-python \\",
        f'     && tar -C /run/kdsr-python -xf "$R/{PYTHON_TREE_TAR}" && {mounts}; then',
        '    echo "kdsr-guest: Python trees served from RAM (staged in $(( ($(date +%s%N) - s) / 1000000 )) ms)"',
        "  else",
        '    echo "kdsr-guest: WARNING: staging the Python trees failed; imports go to virtiofs (slow)"',
        "  fi",
        f'  rm -f "$R/{PYTHON_TREE_TAR}"',
        "fi",
    ]


def guest_script(
    results: Path, python: str, pytest_args: list[str], trees: list[Path] = (), command: list[str] | None = None
) -> str:
    """The shell script the guest runs (bash: PIPESTATUS): the full_kernel
    tests, or `command` (e.g. the L3 demo) instead."""
    exports = {
        **guest_env(),
        fullkernel.IN_GUEST_ENV: "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(python).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    pytest_argv = [
        python,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-v",
        "-ra",
        "--tb=short",  # failures are also printed in full as they happen (netns-lab/conftest.py)
        "-m",
        "full_kernel",
        f"--junitxml={results / 'junit.xml'}",
        "-o",
        "junit_suite_name=full_kernel",
        "netns-lab",
        *pytest_args,
    ]
    lines = [
        "#!/bin/bash",
        "# Written by netns-lab/guest_tier.py; runs inside the virtme-ng guest.",
        "set -u",
        f"R={shlex.quote(str(results))}",
        f'echo "{BOOT_MARKER} kernel $(uname -r), guest uptime $(cut -d" " -f1 /proc/uptime)s"',
        "# `ip netns add` bind-mounts namespaces under /run/netns: it must be a",
        "# writable, mountable directory (virtme-ng gives /run a tmpfs; make sure).",
        "mkdir -p /run/netns 2>/dev/null",
        "if ! touch /run/netns/.kdsr-check 2>/dev/null; then mount -t tmpfs -o mode=755 tmpfs /run/netns; fi",
        "rm -f /run/netns/.kdsr-check",
        *staging_lines(list(trees)),
        f"cd {shlex.quote(str(REPO))} || exit 90",
        *(f"export {key}={shlex.quote(value)}" for key, value in exports.items()),
        f'{shlex.join(command or pytest_argv)} 2>&1 | tee "$R/{"command" if command else "pytest"}.log"',
        "rc=${PIPESTATUS[0]}",
        'echo "$rc" > "$R/exit-code"',
        f'echo "kdsr-guest: {"command" if command else "pytest"} exit $rc"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _children(pid: int) -> list[int]:
    """All descendants of pid (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses.
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stop_guest(vng: subprocess.Popen) -> None:
    """Kill the qemu this run started (a descendant of our vng), then vng itself; by pid only."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _children(vng.pid):
            if _comm(pid).startswith("qemu"):
                say(f"killing qemu pid {pid} ({signal.Signals(sig).name})")
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            vng.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue
    if vng.poll() is None:
        vng.kill()
        vng.wait(timeout=15)


def junit_counts(path: Path) -> dict[str, float] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    for suite in suites:
        for key in counts:
            counts[key] += float(suite.get(key, 0)) if key == "time" else int(suite.get(key, 0))
    return counts


def new_run_dir() -> Path:
    """A fresh results directory under DEFAULT_RESULTS; older runs beyond KEEP_RUNS are removed."""
    DEFAULT_RESULTS.mkdir(parents=True, exist_ok=True)
    run = DEFAULT_RESULTS / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run.mkdir()
    latest = DEFAULT_RESULTS / f".latest-{os.getpid()}"
    latest.unlink(missing_ok=True)
    latest.symlink_to(run.name)
    os.replace(latest, DEFAULT_RESULTS / "latest")
    for old in sorted(DEFAULT_RESULTS.glob("run-*"))[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    return run


@contextlib.contextmanager
def guest_lock(timeout: float):
    """Hold the checkout's guest lock; wait (bounded) while another run holds it."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as lock:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    lock.seek(0)
                    holder = lock.read().strip() or "?"
                    say(f"another guest-tier run (pid {holder}) holds {LOCK_PATH}; waiting for it")
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK_PATH} still held after {timeout:g}s") from None
                time.sleep(2)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_native(pytest_args: list[str]) -> int:
    argv = [venv_python(), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "full_kernel", "netns-lab"]
    say("running the full_kernel tests natively: " + shlex.join(argv[1:] + pytest_args))
    return subprocess.call(argv + pytest_args, cwd=REPO)


def run_guest(args: argparse.Namespace, pytest_args: list[str], command: list[str] | None = None) -> int:
    kernel = Path(args.kernel) if args.kernel else newest_kernel()
    vng = find_vng()
    problems = []
    if kernel is None or not kernel.exists():
        problems.append(f"no kernel image ({kernel or '/boot/vmlinuz-*-amd64'}): apt-get install linux-image-amd64")
    if vng is None:
        problems.append("no vng: .venv/bin/pip install virtme-ng (scripts/setup.sh does)")
    if shutil.which("qemu-system-x86_64") is None:
        problems.append("no qemu-system-x86_64: apt-get install qemu-system-x86")
    if problems:
        for problem in problems:
            say(f"ERROR: {problem}")
        say("ERROR: the full-kernel tier cannot run; run scripts/setup.sh as root")
        return 1

    try:
        with guest_lock(args.timeout):
            return boot_and_test(args, kernel, vng, pytest_args, command)
    except TimeoutError as exc:
        say(f"ERROR: {exc}")
        return 1


def boot_and_test(
    args: argparse.Namespace, kernel: Path, vng: str, pytest_args: list[str], command: list[str] | None = None
) -> int:
    if args.results:
        results = Path(args.results).resolve()
        results.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            (results / name).unlink(missing_ok=True)
    else:
        results = new_run_dir()
    script = results / "guest.sh"
    trees = stage_python_trees(results, venv_python())
    script.write_text(guest_script(results, venv_python(), pytest_args, trees, command))

    argv = [
        vng,
        "--run",
        str(kernel),
        "--memory",
        args.memory,
        "--cpus",
        str(args.cpus),
        "--rwdir",
        str(results),
        "--exec",
        f"bash {shlex.quote(str(script))}",
    ]
    if not args.kvm:
        argv.insert(3, "--disable-kvm")
    env = dict(os.environ)
    # vng starts virtme-run through a shell: the venv's bin must be on PATH.
    env["PATH"] = f"{Path(vng).parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    say(
        f"booting {kernel.name} ({'KVM' if args.kvm else 'TCG, no KVM'}), timeout {args.timeout:g}s: {shlex.join(argv)}"
    )

    start = time.monotonic()
    boot_s: list[float] = []
    console = open(results / "console.log", "w", errors="replace")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            if BOOT_MARKER in line and not boot_s:
                boot_s.append(time.monotonic() - start)
            sys.stdout.write(line)
            sys.stdout.flush()
            console.write(line)
            console.flush()

    def stop_on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # A cancelled CI job (SIGTERM) or a closed terminal (SIGHUP) must not leave
    # qemu running: treat them like ^C, which stops the guest below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = interrupted = False
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if elapsed > args.timeout:
                say(f"ERROR: the guest did not finish within {args.timeout:g}s; stopping it")
                break
            if not boot_s and elapsed > args.boot_timeout:
                say(f"ERROR: the guest did not reach the test script within {args.boot_timeout:g}s; stopping it")
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        if proc.poll() is None:
            timed_out = True
            stop_guest(proc)
    except KeyboardInterrupt as exc:
        interrupted = True
        say(f"interrupted ({exc or 'SIGINT'}); stopping the guest")
        stop_guest(proc)
    reader.join(timeout=10)
    console.close()
    (results / PYTHON_TREE_TAR).unlink(missing_ok=True)
    wall_s = time.monotonic() - start

    exit_file = results / "exit-code"
    guest_rc = int(exit_file.read_text().strip()) if exit_file.exists() and exit_file.read_text().strip() else None
    counts = junit_counts(results / "junit.xml")
    timings = {
        "kernel": kernel.name,
        "accel": "kvm" if args.kvm else "tcg",
        "boot_s": round(boot_s[0], 1) if boot_s else None,
        "guest_pytest_s": round(counts["time"], 1) if counts else None,
        "tier_wall_s": round(wall_s, 1),
        "vng_exit": proc.returncode,
        "guest_pytest_exit": guest_rc,
        "junit": counts,
    }
    (results / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")

    boot = f"{boot_s[0]:.1f}s" if boot_s else "never"
    say(f"boot {boot}, tier wall time {wall_s:.1f}s; results in {results}")
    if interrupted:
        return 130
    if timed_out:
        return 124
    if not boot_s:
        say(f"ERROR: the guest never booted to the test script (vng exit {proc.returncode}); see {results}/console.log")
        return 1
    if guest_rc is None:
        say(f"ERROR: the guest booted but left no exit code (vng exit {proc.returncode}); see {results}/console.log")
        return 1
    if command:
        say(f"{shlex.join(command)} exited {guest_rc} in the guest")
        return guest_rc
    if counts is None:
        say(f"ERROR: guest pytest exit {guest_rc} but no junit.xml; see {results}/pytest.log")
        return guest_rc or 1
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    say(
        f"full-kernel tier in the guest: {counts['tests']} tests, {passed} passed, {counts['failures']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped; pytest exit {guest_rc}"
    )
    if guest_rc == 0 and counts["tests"] == 0:
        say("ERROR: no full_kernel tests ran")
        return 1
    return guest_rc


def run_command_in_guest(command: list[str], timeout: float = 1800.0) -> int:
    """Run `command` (cwd: the repository) as root in one guest on the full
    kernel, output streamed here; its exit code.  The demo's L3 scenarios use
    this on a host kernel without ipip/gre/ip6tnl/IPVS."""
    args = build_parser().parse_args([])
    args.timeout = timeout
    if os.geteuid() != 0:
        say("ERROR: the guest needs root")
        return 1
    return run_guest(args, [], command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the full_kernel lab tests: natively on a capable kernel, else in a virtme-ng guest.",
        epilog="Arguments after `--` go to the guest's pytest (e.g. -- -k ipip).",
    )
    parser.add_argument(
        "--results", help=f"shared results directory (default: a fresh {DEFAULT_RESULTS.relative_to(REPO)}/run-*/)"
    )
    parser.add_argument("--kernel", default=os.environ.get("KDSR_GUEST_KERNEL"), help="kernel image for the guest")
    parser.add_argument(
        "--timeout", type=float, default=float(os.environ.get("KDSR_GUEST_TIMEOUT", DEFAULT_TIMEOUT)), help="seconds"
    )
    parser.add_argument(
        "--boot-timeout",
        type=float,
        default=float(os.environ.get("KDSR_GUEST_BOOT_TIMEOUT", DEFAULT_BOOT_TIMEOUT)),
        help="seconds until the guest must have started the test script",
    )
    parser.add_argument("--memory", default=os.environ.get("KDSR_GUEST_MEMORY", "2G"))
    parser.add_argument("--cpus", type=int, default=int(os.environ.get("KDSR_GUEST_CPUS", "2")))
    parser.add_argument(
        "--kvm", action="store_true", default=os.environ.get("KDSR_GUEST_KVM") == "1", help="use KVM (default: TCG)"
    )
    parser.add_argument("--force-guest", action="store_true", help="boot the guest even if this kernel is capable")
    parser.add_argument(
        "--native-when-capable",
        action="store_true",
        help="on a capable kernel run the tests here (default: do nothing, the host tier ran them)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    own, _, pytest_args = (argv if argv is not None else sys.argv[1:]), None, []
    if "--" in own:
        split = own.index("--")
        own, pytest_args = own[:split], own[split + 1 :]
    args = parser.parse_args(own)

    if fullkernel.in_guest():
        say("ERROR: already inside the guest (KDSR_IN_GUEST=1); not nesting")
        return 2
    if os.geteuid() != 0:
        message = "the full-kernel tier needs root (qemu guest with namespaces, module probing)"
        if in_ci():
            say(f"ERROR: {message}")
            return 1
        say(f"not run: {message}")
        return 0
    if not args.force_guest:
        tier = fullkernel.probe()
        if tier.capable:
            if args.native_when_capable:
                return run_native(pytest_args)
            say(f"{tier.describe()}: the full_kernel tests ran in the host tier; no guest needed")
            return 0
        say(f"{tier.describe()}: running the full_kernel tests in a virtme-ng guest")
    return run_guest(args, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
