"""Intent + node name -> Desired state for that node.  Pure: no kernel access.

Nothing in this package may import pyroute2, nftables or subprocess; a unit
test enforces it, so compile stays deterministic and testable without root.
"""

from __future__ import annotations

from kdsr.compile.cache import CompileCache
from kdsr.compile.load_balancer import compile_load_balancer
from kdsr.compile.server import compile_server
from kdsr.errors import UsageError
from kdsr.intent.model import Intent
from kdsr.model import Desired

__all__ = ["CompileCache", "compile_node", "compile_load_balancer", "compile_server"]


def compile_node(
    intent: Intent, node: str, withdraw: dict[str, str] | None = None, cache: CompileCache | None = None
) -> Desired:
    """``withdraw``: VIPs a load balancer must not announce by BGP now (VIP -> why).

    ``cache``: a CompileCache the caller keeps from one compile to the next
    (the health daemon does), or None to start from nothing.  The result is
    the same either way (compile/cache.py)."""
    lb = intent.load_balancer(node)
    if lb is not None:
        return compile_load_balancer(intent, lb, withdraw, cache)
    server = intent.server(node)
    if server is not None:
        return compile_server(intent, server)
    known = ", ".join(intent.node_names()) or "none"
    raise UsageError(f"{intent.source}: node {node!r} is not in the intent. Nodes: {known}.")
