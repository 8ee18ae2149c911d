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

import re
import shutil
import subprocess

from kdsr.kernel import fragment_file
from kdsr.kernel.fragment_file import MAX_FRAGMENT_BYTES

BIRD_TIMEOUT = 30  # seconds for one bird -p or birdc command

# bird: /etc/bird/.kdsr-check-x.conf:12:5 syntax error, unexpected ...
_ERROR_AT = re.compile(r"^(?:bird: )?(?P<file>[^:\n]+):(?P<line>\d+):(?P<col>\d+) (?P<message>.*)$", re.M)


class BirdError(fragment_file.FragmentError):
    """BIRD is missing, not running, or refused a config."""


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return fragment_file.run(argv, BIRD_TIMEOUT, BirdError)


def require_installed() -> None:
    missing = [tool for tool in ("bird", "birdc") if shutil.which(tool) is None]
    if missing:
        raise BirdError(
            f"BIRD is not installed here ({', '.join(missing)} not found). Install BIRD 2 "
            "(Debian/Ubuntu: apt-get install bird2), include kdsr's fragment in its config and start it "
            "(systemctl enable --now bird)."
        )


def read_fragment(path: str) -> str | None:
    return fragment_file.read(path, MAX_FRAGMENT_BYTES, BirdError, label="BIRD fragment ", kind="fragment")


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


_CHECKER = fragment_file.Checker(
    name="BIRD",
    error=BirdError,
    include=_include_line,
    include_as=lambda candidate: f'include "{candidate}";',
    argv=lambda config: ["bird", "-p", "-c", config],
    run=_run,
    error_at=_ERROR_AT,
)


def main_config(config: str, fragment: str) -> str:
    return fragment_file.main_config(
        _CHECKER,
        config,
        fragment,
        lambda strerror: f"cannot read BIRD's config {config}: {strerror}",
        f"BIRD's config {config} does not include kdsr's fragment: add the line include \"{fragment}\"; "
        "at its top level (not inside a protocol), then run kdsr again; nothing was changed.",
    )


def check(config: str, fragment: str, text: str) -> None:
    """Parse the main config with ``text`` as the fragment; BirdError if BIRD refuses it."""
    fragment_file.check_in_place(_CHECKER, config, main_config(config, fragment), fragment, text)


def write_fragment(config: str, fragment: str, text: str) -> None:
    """Atomic replace (same directory, rename); group as BIRD's main config."""
    fragment_file.write(fragment, text, ".kdsr-fragment-", group_of=config)


def configure(socket: str) -> None:
    result = _run(["birdc", "-s", socket, "configure"])
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or not re.search(r"Reconfigured|Reconfiguration in progress", output):
        raise BirdError(f"birdc configure failed: {output.splitlines()[-1] if output else result.returncode}")


class Bird:
    """kdsr's fragment of a running BIRD's config, through BIRD's own tools."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, fragment: str) -> str | None:
        return read_fragment(fragment)

    def ready(self, config: str, fragment: str, socket: str) -> None:
        require_installed()
        require_running(config, socket)
        main_config(config, fragment)

    def check(self, config: str, fragment: str, text: str) -> None:
        check(config, fragment, text)

    def running(self, socket: str) -> bool:
        try:
            return running(socket)
        except BirdError:  # birdc missing, or no answer in time
            return False

    def install(self, config: str, fragment: str, socket: str, text: str, reload: bool = True) -> None:
        """Check, write, reload; on a reload BIRD refuses, put the old fragment back.

        Without ``reload`` (BIRD is not running): check and write.  Where
        BIRD is not even installed, nothing can check the file, and nothing
        reads it either."""
        try:
            check(config, fragment, text)
        except BirdError as exc:
            if reload or not exc.missing:
                raise
        previous = read_fragment(fragment)
        write_fragment(config, fragment, text)
        self.writes += 1
        if not reload:
            return
        try:
            configure(socket)
        except BirdError:
            if previous is not None:
                write_fragment(config, fragment, previous)
                configure(socket)
            raise
