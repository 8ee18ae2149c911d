"""When Python's cyclic garbage collector may run.

kdsr's state is large and acyclic: at 10,000 VIPs a plan holds ~3 million
tuples, frozen dataclasses and strings, and none of them is freed by the
cyclic collector (reference counting frees them).  The collector still walks
them: every 700 allocations it scans the young objects, and whenever the
survivors grow by a quarter it scans everything.  Building a full apply's
batch then spends most of its time in the collector, for no memory saved,
and a single change in the daemon pays a full scan whenever one falls due
(bench/control_plane.py shows both).

So the collector is paused while a command plans and applies (``paused``),
and the daemon, after it has built and applied an intent, collects once and
freezes what is alive (``settle``): later full scans walk only what came
after, not the intent and its table.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside; the collector's own state again after.

    Cycles made inside (exceptions with their tracebacks, mostly) are
    collected after, by the next collection that falls due."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle() -> None:
    """After a long-running process built its state: collect what is garbage
    now, then keep everything alive out of later collections (``gc.freeze``).
    The previous freeze is undone first, so the state a reload replaced is
    collected, not kept."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
