"""One apply step: what it does, how to do it, and how to take it back
(None: nothing to take back), and the phase it runs in.  kdsr/apply.py
runs them in order with its journal; each backend's steps are built apart
(kdsr/apply.py: links, sysctls, nftables, BIRD, XDP; kdsr/ipvs_apply.py;
kdsr/vrrp_apply.py: keepalived)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum


@dataclass
class Step:
    description: str
    run: Callable[[], None]
    undo: Callable[[], None] | None


class Phase(IntEnum):
    """When a step runs.  Each backend's step builder tags its steps with a
    phase; apply runs them sorted by phase (a stable sort, so a builder's
    own order inside a phase stays).  Deletes mirror creates; kdsr/apply.py
    says why this order."""

    RELEASE = 1  # keepalived gives a VIP up: a gate closes, or a fragment that releases
    WITHDRAW = 2  # BIRD withdraws: announce routes go, or a fragment that withdraws
    MAKE_LINKS = 3
    SET_SYSCTLS = 4
    ADD_ADDRESSES = 5
    ADD_ROUTES = 6  # routes, then rules
    NFT = 7
    IPVS = 8
    DELETE_ROUTES = 9  # rules, then routes
    DELETE_ADDRESSES = 10
    RESTORE_SYSCTLS = 11
    DELETE_LINKS = 12
    XDP = 13
    # The kernel is read back here: what runs from now on announces what
    # the steps above built, once it is verified.
    ANNOUNCE = 14  # announce routes, or a fragment that only announces
    OPEN = 15  # a gate opens (keepalived may own the VIP), or a fragment written last
