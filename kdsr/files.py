"""Reading a file named on the command line, within bounds.

The intent loader's only I/O: kdsr/intent/ stays pure otherwise.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kdsr.errors import IntentError, Problem

# The bound leaves room an order of magnitude above the largest intent the
# benches use (bench/control_plane.py: 10,000 VIPs x 16 servers).
MAX_INTENT_BYTES = 64 * 1024 * 1024


def read_bounded(path: str | Path, source: str, limit: int = MAX_INTENT_BYTES) -> bytes:
    """A regular file's bytes, at most ``limit``.  A directory, a device (a
    symlink to /dev/zero), a FIFO or an over-long file is an IntentError,
    found before reading more than limit + 1 bytes; a FIFO never blocks."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IntentError([Problem(source, "", "this is a directory, not an intent file.", "Name the file.")])
        if not stat.S_ISREG(mode):
            raise IntentError(
                [Problem(source, "", "this is not a regular file (a device, FIFO or socket).", "Name a file.")]
            )
        chunks, size = [], 0
        if os.fstat(fd).st_size > limit:
            size = limit + 1  # no need to read it to know
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise IntentError(
                [
                    Problem(
                        source,
                        "",
                        f"the file is larger than {limit // (1024 * 1024)} MiB; no intent is that large.",
                        "Check that this is the intent file.",
                    )
                ]
            )
        return b"".join(chunks)
    finally:
        os.close(fd)
