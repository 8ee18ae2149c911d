"""Drive a running BIRD 2: read kdsr's fragment, check a new one with BIRD's
own parser, install it and reload BIRD.

BIRD is the user's daemon with the user's main config; kdsr owns one file,
the fragment the main config includes.  A new fragment is checked in place:
a copy of the main config whose include of the fragment points at the
candidate instead is given to ``bird -p`` (parse only), next to the main
config so its relative includes still resolve.  Only a fragment BIRD parses
is ever written, and ``birdc configure`` then loads it; should the running
BIRD still refuse it, the previous fragment goes back and BIRD is
reconfigured with it.

argv lists only, never a shell; the candidate files are created O_EXCL in
directories root owns.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BIRD_TIMEOUT = 30  # seconds for one bird -p or birdc command
FRAGMENT_MODE = 0o640  # BIRD may read its config as user bird (-u bird -g bird)
MAX_FRAGMENT_BYTES = 16 * 1024 * 1024

# bird: /etc/bird/.kdsr-check-x.conf:12:5 syntax error, unexpected ...
_ERROR_AT = re.compile(r"^(?:bird: )?(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+) (?P<message>.*)$", re.M)


class BirdError(Exception):
    """BIRD is missing, not running, or refused a config."""

    def __init__(self, message: str, line: int | None = None, detail: str = "", missing: bool = False) -> None:
        super().__init__(message)
        self.line = line  # line in the fragment BIRD objected to, if it named one
        self.detail = detail
        self.missing = missing  # BIRD's programs are not installed


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=BIRD_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise BirdError(f"{argv[0]} is not installed ({exc.strerror})", missing=True) from exc
    except subprocess.TimeoutExpired as exc:
        raise BirdError(f"{' '.join(argv[:3])} did not answer within {BIRD_TIMEOUT} s") from exc


def require_installed() -> None:
    missing = [tool for tool in ("bird", "birdc") if shutil.which(tool) is None]
    if missing:
        raise BirdError(
            f"BIRD is not installed here ({', '.join(missing)} not found). Install BIRD 2 "
            "(Debian/Ubuntu: apt-get install bird2), include kdsr's fragment in its config and start it "
            "(systemctl enable --now bird)."
        )


def read_fragment(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BirdError(f"cannot read BIRD fragment {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FRAGMENT_BYTES + 1)
    if len(data) > MAX_FRAGMENT_BYTES:
        raise BirdError(f"{path} is over {MAX_FRAGMENT_BYTES} bytes: not a fragment kdsr wrote")
    return data.decode("utf-8", errors="replace")


def running(socket: str) -> bool:
    result = _run(["birdc", "-s", socket, "show", "status"])
    return result.returncode == 0 and "Daemon is up and running" in result.stdout


def require_running(config: str, socket: str) -> None:
    if not running(socket):
        raise BirdError(
            f"BIRD is not running with control socket {socket}. Start it (systemctl start bird, or "
            f"bird -c {config} -s {socket}) and run kdsr again; nothing was changed."
        )


def _include_line(fragment: str) -> re.Pattern:
    return re.compile(r'^\s*include\s+"' + re.escape(fragment) + r'"\s*;', re.M)


def main_config(config: str, fragment: str) -> str:
    try:
        text = Path(config).read_text(encoding="utf-8")
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        raise BirdError(f"cannot read BIRD's config {config}: {exc.strerror}", missing=missing) from exc
    if not _include_line(fragment).search(text):
        raise BirdError(
            f"BIRD's config {config} does not include kdsr's fragment: add the line include \"{fragment}\"; "
            "at its top level (not inside a protocol), then run kdsr again; nothing was changed."
        )
    return text


def check(config: str, fragment: str, text: str) -> None:
    """Parse the main config with ``text`` as the fragment; BirdError if BIRD refuses it."""
    main = main_config(config, fragment)
    directory = os.path.dirname(config) or "."
    made: list[str] = []
    try:
        candidate = _temp_file(directory, ".kdsr-candidate-", text, made)
        checked = _include_line(fragment).sub(lambda _m: f'include "{candidate}";', main, count=1)
        wrapper = _temp_file(directory, ".kdsr-check-", checked, made)
        result = _run(["bird", "-p", "-c", wrapper])
    finally:
        for path in made:
            os.unlink(path)
    if result.returncode != 0:
        output = (result.stderr + result.stdout).strip()
        line = None
        message = output
        for match in _ERROR_AT.finditer(output):
            message = match["message"].strip()
            if os.path.basename(match["file"]).startswith(".kdsr-candidate-"):
                line = int(match["line"])
            else:
                message = f"{message} (in {config} line {match['line']})"
            break
        raise BirdError(f"BIRD rejected the config: {message}", line=line, detail=output)


def _temp_file(directory: str, prefix: str, text: str, made: list[str]) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".conf", dir=directory)
    made.append(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, FRAGMENT_MODE)
    return path


def write_fragment(config: str, fragment: str, text: str) -> None:
    """Atomic replace (same directory, rename); group as BIRD's main config."""
    directory = os.path.dirname(fragment) or "."
    made: list[str] = []
    path = _temp_file(directory, ".kdsr-fragment-", text, made)
    try:
        try:
            os.chown(path, -1, os.stat(config).st_gid)
        except OSError:
            pass  # the mode still lets root's BIRD read it
        os.replace(path, fragment)
    except BaseException:
        os.unlink(path)
        raise


def configure(socket: str) -> None:
    result = _run(["birdc", "-s", socket, "configure"])
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or not re.search(r"Reconfigured|Reconfiguration in progress", output):
        raise BirdError(f"birdc configure failed: {output.splitlines()[-1] if output else result.returncode}")
