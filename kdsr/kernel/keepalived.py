"""Drive a running keepalived: read kdsr's fragment, check a new one with
keepalived's own config test, install it and reload keepalived; read and
write the track files that gate each VIP.

keepalived is the user's daemon with the user's main config; kdsr owns one
file, the fragment the main config includes (``include FILE``), and its
track files.  Why a fragment in the user's keepalived, not a keepalived of
kdsr's own: a site that runs keepalived already (for other VIPs, or for its
own health scripts) keeps one daemon, one unit and one log, and kdsr never
edits the user's file; the include line is the user's, added once, as for
BIRD.

A new fragment is checked in place: a copy of the main config whose include
of the fragment points at the candidate instead is given to ``keepalived -t
-f`` (config test, keepalived >= 2.0.8; bookworm has 2.2.7), next to the
main config so its relative includes still resolve.  Only a fragment
keepalived accepts is written; then SIGHUP to the pid in keepalived's pid
file (``-p``; one per network namespace in the lab) reloads it.  keepalived
reloads asynchronously and answers nothing, so what kdsr can check after the
signal is that the same keepalived still runs; if it does not, the previous
fragment goes back.

keepalived ignores an ``include`` of a file that does not exist (unless run
with ``-e``), so destroy removes the fragment instead of leaving it empty.

argv lists only, never a shell; the candidate files are created O_EXCL in
directories root owns.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

KEEPALIVED_TIMEOUT = 30  # seconds for one keepalived -t
FRAGMENT_MODE = 0o640
GATE_MODE = 0o644
MAX_FRAGMENT_BYTES = 16 * 1024 * 1024
# After SIGHUP: how long the reloading keepalived must stay alive for the
# reload to count as taken (it re-reads the config and restarts its VRRP
# child; a config it cannot load makes it exit).
RELOAD_SETTLE = 0.2

# (/etc/keepalived/.kdsr-candidate-x.conf: Line 12) Unknown keyword 'foo'
_ERROR_AT = re.compile(r"^\((?P<file>[^:()\n]+): Line (?P<line>\d+)\) (?P<message>.*)$", re.M)


class KeepalivedError(Exception):
    """keepalived is missing, not running, or refused a config."""

    def __init__(self, message: str, line: int | None = None, detail: str = "", missing: bool = False) -> None:
        super().__init__(message)
        self.line = line  # line in the fragment keepalived objected to, if it named one
        self.detail = detail
        self.missing = missing  # keepalived is not installed


def require_installed() -> None:
    if shutil.which("keepalived") is None:
        raise KeepalivedError(
            "keepalived is not installed here (keepalived not found). Install it (Debian/Ubuntu: apt-get install "
            "keepalived), include kdsr's fragment in its config and start it (systemctl enable --now keepalived).",
            missing=True,
        )


def running_pid(pid_file: str) -> int | None:
    """The pid of the keepalived that wrote ``pid_file``, if it still runs."""
    try:
        pid = int(Path(pid_file).read_text(encoding="ascii").strip())
        comm = Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "keepalived" else None


def require_running(config: str, pid_file: str) -> int:
    pid = running_pid(pid_file)
    if pid is None:
        raise KeepalivedError(
            f"keepalived is not running (no live keepalived in its pid file {pid_file}). Start it (systemctl start "
            f"keepalived, or keepalived -f {config} -p {pid_file}) and run kdsr again; nothing was changed."
        )
    return pid


def require_track_dir(track_dir: str) -> None:
    """keepalived 2.2 drops a track file whose directory is missing, and
    then runs the instance unguarded: refuse rather than write gates there."""
    if not os.path.isdir(track_dir):
        raise KeepalivedError(
            f"the VRRP track directory {track_dir} does not exist, so keepalived would ignore kdsr's gates. "
            "Create it at boot before keepalived starts (the Debian package's tmpfiles.d makes /run/kdsr; "
            f"else e.g. a tmpfiles.d line: d {track_dir} 0755 root root -), or name an existing tmpfs "
            "directory in vrrp.keepalived.track_dir; nothing was changed."
        )


def _include_line(fragment: str) -> re.Pattern:
    return re.compile(r'^[ \t]*include[ \t]+"?' + re.escape(fragment) + r'"?[ \t]*(?:#.*)?$', re.M)


def main_config(config: str, fragment: str) -> str:
    try:
        text = Path(config).read_text(encoding="utf-8")
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        raise KeepalivedError(
            f"cannot read keepalived's config {config}: {exc.strerror}. Create it with the line include {fragment} "
            "(and your own global_defs, if any), start keepalived, and run kdsr again; nothing was changed.",
            missing=missing,
        ) from exc
    if not _include_line(fragment).search(text):
        raise KeepalivedError(
            f"keepalived's config {config} does not include kdsr's fragment: add the line include {fragment} "
            "at its top level (not inside a block), reload keepalived, then run kdsr again; nothing was changed."
        )
    return text


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=KEEPALIVED_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise KeepalivedError(f"{argv[0]} is not installed ({exc.strerror})", missing=True) from exc
    except subprocess.TimeoutExpired as exc:
        raise KeepalivedError(f"{' '.join(argv[:3])} did not answer within {KEEPALIVED_TIMEOUT} s") from exc


def check(config: str, fragment: str, text: str) -> None:
    """Test the main config with ``text`` as the fragment; KeepalivedError if keepalived refuses it."""
    main = main_config(config, fragment)
    directory = os.path.dirname(config) or "."
    made: list[str] = []
    try:
        candidate = _temp_file(directory, ".kdsr-candidate-", text, made)
        checked = _include_line(fragment).sub(lambda _m: f"include {candidate}", main, count=1)
        wrapper = _temp_file(directory, ".kdsr-check-", checked, made)
        result = _run(["keepalived", "--config-test", "-f", wrapper])
    finally:
        for path in made:
            os.unlink(path)
    if result.returncode != 0:
        output = (result.stderr + result.stdout).strip()
        line = None
        message = output.splitlines()[0] if output else f"exit {result.returncode}"
        for match in _ERROR_AT.finditer(output):
            message = match["message"].strip()
            if os.path.basename(match["file"]).startswith(".kdsr-candidate-"):
                line = int(match["line"])
            else:
                message = f"{message} (in {config} line {match['line']})"
            break
        raise KeepalivedError(f"keepalived rejected the config: {message}", line=line, detail=output)


def _temp_file(directory: str, prefix: str, text: str, made: list[str], mode: int = FRAGMENT_MODE) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".conf", dir=directory)
    made.append(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def read_file(path: str, limit: int = MAX_FRAGMENT_BYTES) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeepalivedError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise KeepalivedError(f"{path} is over {limit} bytes: not a file kdsr wrote")
    return data.decode("utf-8", errors="replace")


def write_file(path: str, text: str, mode: int = FRAGMENT_MODE) -> None:
    """Atomic replace (same directory, rename): keepalived's inotify watch
    on a track file's directory sees the rename as one new value."""
    directory = os.path.dirname(path) or "."
    made: list[str] = []
    temp = _temp_file(directory, ".kdsr-", text, made, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def reload(pid_file: str) -> None:
    """SIGHUP to keepalived; KeepalivedError if it is not running, or not after the reload."""
    pid = running_pid(pid_file)
    if pid is None:
        raise KeepalivedError(f"keepalived is not running (pid file {pid_file}): cannot reload it")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise KeepalivedError(f"keepalived (pid {pid}) ended before its reload") from exc
    time.sleep(RELOAD_SETTLE)
    if running_pid(pid_file) != pid:
        raise KeepalivedError(f"keepalived (pid {pid}) did not survive the reload: see its log")
