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
import time
from pathlib import Path

from kdsr.kernel import fragment_file
from kdsr.kernel.fragment_file import FRAGMENT_MODE, MAX_FRAGMENT_BYTES

KEEPALIVED_TIMEOUT = 30  # seconds for one keepalived -t
GATE_MODE = 0o644
# After SIGHUP: how long the reloading keepalived must stay alive for the
# reload to count as taken (it re-reads the config and restarts its VRRP
# child; a config it cannot load makes it exit).
RELOAD_SETTLE = 0.2

# (/etc/keepalived/.kdsr-candidate-x.conf: Line 12) Unknown keyword 'foo'
_ERROR_AT = re.compile(r"^\((?P<file>[^:()\n]+): Line (?P<line>\d+)\) (?P<message>.*)$", re.M)


class KeepalivedError(fragment_file.FragmentError):
    """keepalived is missing, not running, or refused a config."""


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


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return fragment_file.run(argv, KEEPALIVED_TIMEOUT, KeepalivedError)


_CHECKER = fragment_file.Checker(
    name="keepalived",
    error=KeepalivedError,
    include=_include_line,
    include_as=lambda candidate: f"include {candidate}",
    argv=lambda config: ["keepalived", "--config-test", "-f", config],
    run=_run,
    error_at=_ERROR_AT,
    first_line=True,
)


def main_config(config: str, fragment: str) -> str:
    return fragment_file.main_config(
        _CHECKER,
        config,
        fragment,
        lambda strerror: (
            f"cannot read keepalived's config {config}: {strerror}. Create it with the line include {fragment} "
            "(and your own global_defs, if any), start keepalived, and run kdsr again; nothing was changed."
        ),
        f"keepalived's config {config} does not include kdsr's fragment: add the line include {fragment} "
        "at its top level (not inside a block), reload keepalived, then run kdsr again; nothing was changed.",
    )


def check(config: str, fragment: str, text: str) -> None:
    """Test the main config with ``text`` as the fragment; KeepalivedError if keepalived refuses it."""
    fragment_file.check_in_place(_CHECKER, config, main_config(config, fragment), fragment, text)


def read_file(path: str, limit: int = MAX_FRAGMENT_BYTES) -> str | None:
    return fragment_file.read(path, limit, KeepalivedError)


def write_file(path: str, text: str, mode: int = FRAGMENT_MODE) -> None:
    """Atomic replace (same directory, rename): keepalived's inotify watch
    on a track file's directory sees the rename as one new value."""
    fragment_file.write(path, text, ".kdsr-", mode)


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def reload_config(pid_file: str) -> None:
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


class Keepalived:
    """kdsr's fragment of a running keepalived's config and its track files
    (gates), through keepalived's own config test and SIGHUP."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, fragment: str) -> str | None:
        return read_file(fragment)

    def ready(self, config: str, fragment: str, pid_file: str, track_dirs: tuple[str, ...] = ()) -> None:
        require_installed()
        require_running(config, pid_file)
        main_config(config, fragment)
        for track_dir in track_dirs:
            require_track_dir(track_dir)

    def check(self, config: str, fragment: str, text: str) -> None:
        check(config, fragment, text)

    def running(self, pid_file: str) -> bool:
        return running_pid(pid_file) is not None

    def install(self, config: str, fragment: str, pid_file: str, text: str | None, reload: bool = True) -> None:
        """Check, write (``text`` None: remove the fragment), reload; on a
        reload keepalived does not survive, put the old fragment back.

        Without ``reload`` (keepalived is not running): only a removal, which
        needs no check: a stopped keepalived owns nothing, and ignores the
        missing include when it starts."""
        if text is not None:
            check(config, fragment, text)
        previous = read_file(fragment)
        if text is None:
            remove_file(fragment)
        else:
            write_file(fragment, text)
        self.writes += 1
        if not reload:
            return
        try:
            reload_config(pid_file)
        except KeepalivedError:
            if previous is not None:
                write_file(fragment, previous)
            else:
                remove_file(fragment)
            raise

    def gate_read(self, path: str) -> str | None:
        text = read_file(path, limit=64)
        return None if text is None else text.strip()

    def gate_write(self, path: str, value: str) -> None:
        write_file(path, value + "\n", GATE_MODE)
        self.writes += 1

    def gate_remove(self, path: str) -> None:
        remove_file(path)
        self.writes += 1
