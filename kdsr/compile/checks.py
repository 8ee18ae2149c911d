"""Warnings about a valid intent: things that work, but not as well as they could.

Errors stop kdsr (intent/verify.py); warnings do not.  The CLI prints each one
as ``warning: <file>: <pointer>: <message> <hint>`` on stderr for validate,
plan and apply, and carries on; a plan's JSON on stdout stays as it was.

Each fast path contributes its own checks to ``CHECKS``: today the Maglev
table sizing of the nft engine (L2 and L3 selectors).  An engine adds a
function ``Intent -> list[Problem]`` there.  Pure, like all of compile/.
"""

from __future__ import annotations

from collections.abc import Callable

from kdsr.compile import lb_nft_l3
from kdsr.compile.selectors import sizing_problems
from kdsr.errors import Problem
from kdsr.intent.model import Intent


def _nft_l2_sizing(intent: Intent) -> list[Problem]:
    return sizing_problems(intent)


def _nft_l3_sizing(intent: Intent) -> list[Problem]:
    return sizing_problems(intent, lb_nft_l3.wanted)


CHECKS: list[Callable[[Intent], list[Problem]]] = [_nft_l2_sizing, _nft_l3_sizing]


def warnings_for(intent: Intent) -> list[Problem]:
    """Every warning for the intent, in CHECKS order (IntentError if sizing cannot fit at all)."""
    return [problem for check in CHECKS for problem in check(intent)]
