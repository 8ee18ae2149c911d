"""One apply step: what it does, how to do it, and how to take it back
(None: nothing to take back).  kdsr/apply.py runs them in order with its
journal; kdsr/vrrp_apply.py makes VRRP's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Step:
    description: str
    run: Callable[[], None]
    undo: Callable[[], None] | None
