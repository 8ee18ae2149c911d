"""An earlier kdsr release, unpacked from this clone's git history.

Upgrade tests and benches run an older kdsr beside this checkout: `git
archive <revision> kdsr` unpacked into a directory, which a process then
puts first on its path (``python -m kdsr`` with that directory as its cwd).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ReleaseMissing(LookupError):
    """The revision is not in this clone's history (a shallow clone, say)."""


def unpack(revision: str, dest: Path) -> Path:
    """kdsr at ``revision`` under ``dest`` (``dest/kdsr``); returns ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "kdsr"], capture_output=True, timeout=120)
    if archive.returncode != 0:
        raise ReleaseMissing(f"kdsr {revision} is not in this checkout's history: {archive.stderr.decode()[-300:]}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=120)
    return dest


def unpack_or_skip(revision: str, dest: Path) -> Path:
    """``unpack`` for a test: a revision this clone lacks skips it, with the reason."""
    import pytest  # only tests call this; the benches have no pytest

    try:
        return unpack(revision, dest)
    except ReleaseMissing as exc:
        pytest.skip(str(exc))
