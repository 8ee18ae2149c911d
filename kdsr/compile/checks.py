"""Warnings about a valid intent: things that work, but not as well as they could.

Errors stop kdsr (intent/verify.py); warnings do not.  The CLI prints each one
as ``warning: <file>: <pointer>: <message> <hint>`` on stderr for validate,
plan and apply, and carries on; a plan's JSON on stdout stays as it was.

Each fast path contributes its own checks to ``CHECKS``: the Maglev table
sizing of the nft engine (L2 and L3 selectors), and the fixed-size ``mh``
table of the ipvs engine.  An engine adds a
function ``Intent -> list[Problem]`` there.  Pure, like all of compile/.
"""

from __future__ import annotations

from collections.abc import Callable

from kdsr.compile import lb_nft_l3
from kdsr.compile.cache import CompileCache
from kdsr.compile.selectors import SLOTS_PER_SERVER, sizing_problems
from kdsr.errors import Problem
from kdsr.intent.model import ENGINE_IPVS, IPVS_MH_TABLE_SIZE, Intent


def _nft_l2_sizing(intent: Intent, cache: CompileCache | None) -> list[Problem]:
    return sizing_problems(intent, cache=cache)


def _nft_l3_sizing(intent: Intent, cache: CompileCache | None) -> list[Problem]:
    return sizing_problems(intent, lb_nft_l3.wanted, cache)


def _ipvs_mh_sizing(intent: Intent, _cache: CompileCache | None) -> list[Problem]:
    """IPVS mh's table is the kernel's (IP_VS_MH_TAB_SIZE, 4093 on Debian) and
    cannot be raised from user space: above 40 servers a pool gets fewer than
    100 slots per server.  One warning per pool, at the pool."""
    problems, seen = [], set()
    limit = IPVS_MH_TABLE_SIZE // SLOTS_PER_SERVER
    for service in intent.services:
        if service.engine != ENGINE_IPVS or service.pool in seen:
            continue
        seen.add(service.pool)
        pool = intent.pool(service.pool)
        servers = sum(1 for member in pool.members if member.weight > 0)
        if servers <= limit:
            continue
        per_server = IPVS_MH_TABLE_SIZE // servers
        message = (
            f"pool {pool.name} has {servers} servers on the ipvs engine (service {service.name}): the kernel's "
            f"mh table has {IPVS_MH_TABLE_SIZE} slots, {per_server} per server (fewer than 100), so a server's "
            f"share of flows can be up to {100 / max(per_server, 1):.1f}% above the mean."
        )
        hint = f"Keep ipvs pools at {limit} servers or fewer, or use the nft engine (its table grows with the pool)."
        problems.append(Problem(intent.source, pool.pointer, message, hint))
    return problems


CHECKS: list[Callable[[Intent, CompileCache | None], list[Problem]]] = [
    _nft_l2_sizing,
    _nft_l3_sizing,
    _ipvs_mh_sizing,
]


def warnings_for(intent: Intent, cache: CompileCache | None = None) -> list[Problem]:
    """Every warning for the intent, in CHECKS order (IntentError if sizing cannot fit at all).
    ``cache``: the CompileCache of the compile that follows, which sizes the same selectors."""
    return [problem for check in CHECKS for problem in check(intent, cache)]
