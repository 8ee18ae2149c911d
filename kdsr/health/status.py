"""The health view ``kdsr run`` publishes: ``<state dir>/health/<node>.json``.

Written atomically after every change and every few seconds, with the
daemon's PID.  ``kdsr show`` prints it; ``plan``, ``apply`` and ``drain``
fold its down servers into what they apply while that daemon is alive, so a
manual run never puts a dead server back behind the daemon's back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdsr.health.state import DOWN
from kdsr.kernel.state import StateStore
from kdsr.kernel.statefiles import StateFileError, read_text, write_atomic


def write(store: StateStore, node: str, view: dict) -> None:
    write_atomic(store.health_path(node), json.dumps(view, indent=1, sort_keys=True) + "\n")


def read(store: StateStore, node: str) -> dict | None:
    try:
        return json.loads(read_text(store.health_path(node)))
    except (FileNotFoundError, ValueError, StateFileError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_view(store: StateStore, node: str) -> dict | None:
    """The view of a daemon that is still running (None when none is)."""
    view = read(store, node)
    if not view or not isinstance(view.get("pid"), int) or not _alive(view["pid"]):
        return None
    return view


def down_servers(view: dict | None) -> frozenset[tuple[str, str]]:
    """(pool, server) pairs that a view reports down."""
    if not view:
        return frozenset()
    return frozenset((s["pool"], s["server"]) for s in view.get("servers", []) if s.get("state") == DOWN)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
