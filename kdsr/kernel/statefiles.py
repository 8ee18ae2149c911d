"""Files under the state directory, written and read so that nobody else can
steer them: the directory is 0700, files are 0600, every write goes to a new
temp file (O_EXCL) that is fsync'd and renamed over the old one, and no path
is followed through a symlink (someone who can plant one must not get root
to overwrite /etc/shadow, nor to feed kdsr a record of objects to delete).

Why hand-written: the libraries for atomic writes (atomicwrites, archived
by its author; the stdlib's ``tempfile`` + ``os.replace``) do the rename
but follow symlinks in the path and do not check who owns the directory,
which is the half that matters when the writer is root.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from kdsr.errors import KdsrError

DIR_MODE = 0o700
FILE_MODE = 0o600


class StateFileError(KdsrError):
    pass


def ensure_dir(path: Path) -> None:
    """Create the directory 0700, or check an existing one: a real directory,
    ours, not writable by others (tightened to 0700 if it was looser)."""
    try:
        path.mkdir(parents=True, mode=DIR_MODE)
        return
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StateFileError(f"{path} is a symlink; kdsr's state directory must be a real directory")
    if not stat.S_ISDIR(info.st_mode):
        raise StateFileError(f"{path} exists and is not a directory")
    if info.st_uid != os.geteuid():
        raise StateFileError(
            f"{path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()}); "
            "kdsr keeps its records only in a directory it owns"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, DIR_MODE)


def write_atomic(path: Path, text: str, private_dir: bool = True, sync: bool = True) -> None:
    """Write ``text`` to ``path`` (0600) by rename.  ``private_dir`` makes
    the parent the state directory's way (0700, ours); a saved plan in the
    user's working directory leaves its directory as it is."""
    if private_dir:
        ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, FILE_MODE)
    except FileExistsError:  # a leftover of a killed run with our pid
        os.unlink(tmp)
        fd = os.open(tmp, flags, FILE_MODE)
    try:
        os.write(fd, text.encode())
        if sync:  # a cache need not survive a crash: a torn file is a miss
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # rename replaces a symlink itself, never its target


def read_text(path: Path) -> str:
    """The file's text; FileNotFoundError if absent; a symlink is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(f"{path} is a symlink; kdsr does not follow symlinks in its state directory") from None
        raise
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


def open_lock(path: Path) -> int:
    ensure_dir(path.parent)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(f"{path} is a symlink; kdsr does not follow symlinks in its state directory") from None
        raise
