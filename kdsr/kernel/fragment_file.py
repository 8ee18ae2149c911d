"""The file side of a config fragment kdsr owns in another daemon's config
(BIRD, keepalived; the text side is kdsr/fragment_text.py): run the daemon's
tools, read the fragment back, check a candidate in place with the daemon's
own parser, and replace the file atomically.

Each daemon's module (kdsr/kernel/bird.py, kdsr/kernel/keepalived.py) gives
its error class, its include line, its checker's argv and the shape of its
error lines; what is the same for both lives here.

argv lists only, never a shell; the candidate files are created O_EXCL
(mkstemp) in directories root owns.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FRAGMENT_MODE = 0o640  # the daemon may read its config as its own user (BIRD: -u bird -g bird)
MAX_FRAGMENT_BYTES = 16 * 1024 * 1024
CANDIDATE_PREFIX = ".kdsr-candidate-"


class FragmentError(Exception):
    """The daemon is missing, not running, or refused a config."""

    def __init__(self, message: str, line: int | None = None, detail: str = "", missing: bool = False) -> None:
        super().__init__(message)
        self.line = line  # line in the fragment the daemon objected to, if it named one
        self.detail = detail
        self.missing = missing  # the daemon's programs are not installed


def run(argv: list[str], timeout: float, error: type[FragmentError]) -> subprocess.CompletedProcess:
    """``argv`` with its output captured; ``error`` if it is missing or does not answer in time."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise error(f"{argv[0]} is not installed ({exc.strerror})", missing=True) from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{' '.join(argv[:3])} did not answer within {timeout} s") from exc


def read(path: str, limit: int, error: type[FragmentError], label: str = "", kind: str = "file") -> str | None:
    """The file kdsr wrote at ``path``, None if there is none; a link is
    refused, and so is a file over ``limit`` bytes (``label`` and ``kind`` name
    it in the error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"cannot read {label}{path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path} is over {limit} bytes: not a {kind} kdsr wrote")
    return data.decode("utf-8", errors="replace")


def temp_file(directory: str, prefix: str, text: str, made: list[str], mode: int = FRAGMENT_MODE) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".conf", dir=directory)
    made.append(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def write(path: str, text: str, prefix: str, mode: int = FRAGMENT_MODE, group_of: str | None = None) -> None:
    """Atomic replace (a temporary file in the same directory, renamed over
    ``path``); with ``group_of``, the file takes that file's group."""
    directory = os.path.dirname(path) or "."
    made: list[str] = []
    temp = temp_file(directory, prefix, text, made, mode)
    try:
        if group_of is not None:
            try:
                os.chown(temp, -1, os.stat(group_of).st_gid)
            except OSError:
                pass  # the mode still lets a daemon running as root read it
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


@dataclass(frozen=True)
class Checker:
    """How a daemon checks a config.  ``argv`` of the config's path runs its
    checker through ``run``; ``include`` of the fragment's path matches the
    main config's include of it, ``include_as`` of a path is an include line
    for that file; ``error_at`` matches its error lines (groups file, line and
    message).  A refusal raises ``error`` naming the daemon by ``name``, with
    the first error line's message, else the checker's whole output (or,
    with ``first_line``, only its first line, or its exit code)."""

    name: str
    error: type[FragmentError]
    include: Callable[[str], re.Pattern]
    include_as: Callable[[str], str]
    argv: Callable[[str], list[str]]
    run: Callable[[list[str]], subprocess.CompletedProcess]
    error_at: re.Pattern
    first_line: bool = False


def main_config(
    checker: Checker, config: str, fragment: str, unreadable: Callable[[str], str], not_included: str
) -> str:
    """The daemon's main config, which must include the fragment; else the
    checker's error: ``unreadable`` of the OS error's strerror, or
    ``not_included``."""
    try:
        text = Path(config).read_text(encoding="utf-8")
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        raise checker.error(unreadable(exc.strerror), missing=missing) from exc
    if not checker.include(fragment).search(text):
        raise checker.error(not_included)
    return text


def check_in_place(checker: Checker, config: str, main: str, fragment: str, text: str) -> None:
    """Check a copy of the daemon's main config ``main`` whose include of
    ``fragment`` names a candidate holding ``text`` instead; the checker's
    error if the daemon refuses it.  Both files sit next to
    ``config`` so its relative includes still resolve, and are removed
    afterwards."""
    directory = os.path.dirname(config) or "."
    made: list[str] = []
    try:
        candidate = temp_file(directory, CANDIDATE_PREFIX, text, made)
        checked = checker.include(fragment).sub(lambda _m: checker.include_as(candidate), main, count=1)
        wrapper = temp_file(directory, ".kdsr-check-", checked, made)
        result = checker.run(checker.argv(wrapper))
    finally:
        for path in made:
            os.unlink(path)
    if result.returncode == 0:
        return
    output = (result.stderr + result.stdout).strip()
    line = None
    message = output
    if checker.first_line:
        message = output.splitlines()[0] if output else f"exit {result.returncode}"
    for match in checker.error_at.finditer(output):
        message = match["message"].strip()
        if os.path.basename(match["file"]).startswith(CANDIDATE_PREFIX):
            line = int(match["line"])
        else:  # an error in another file names that line of the main config
            message = f"{message} (in {config} line {match['line']})"
        break
    raise checker.error(f"{checker.name} rejected the config: {message}", line=line, detail=output)
