"""What compile may reuse from one call to the next, owned by its caller.

Compile is a function of the intent (and the node) alone.  Compiling a large
intent is dear, and the health daemon compiles the whole intent again after
every probe change and every SIGHUP, where one pool changed.  So a caller
that compiles many times (``kdsr run``) keeps one ``CompileCache`` and passes
it to every compile; a caller that compiles once (the CLI) passes none, and
compile then starts from an empty one of its own.

What a cache holds never shows in a result: a compile with any cache, after
any history, equals a compile with a fresh one (tests/test_compile_cache.py
holds it to that for random intents and edit sequences).  What it changes is
the cost, and which objects come back: an unchanged pool's slot map, chain
and Maglev table are the very objects of the last compile, so the diff that
follows compares them by identity instead of element by element.

Two kinds of entry:

- by value: a key made of everything the entry is built from (a Maglev
  table by its backends, size and seed; a selector chain by all it is made
  of); any cache may answer it;
- by slot, "the last answer": a name (a selector's, the services maps') with
  the inputs the answer came from; the caller compares them, by identity
  where the inputs are the intent's own objects (a health event's effective
  intent shares every object but one pool), and builds afresh when they
  differ.
"""

from __future__ import annotations

from typing import Any

from kdsr import maglev
from kdsr.memo import BoundedMemo


class CompileCache:
    """Everything compile reuses between calls; see the module docstring."""

    def __init__(self) -> None:
        # Maglev tables by (backends, size, seed), and slot-map element tuples
        # by Maglev table (one shared element per server), each bounded by
        # slots held: 2^20, four times the slot budget of one nft table
        # (compile/selectors.py SLOT_BUDGET), so an L2 and an L3 table's
        # working set stays with room for the tables a change replaces.
        self.maglev_tables: BoundedMemo[tuple, tuple[str, ...]] = BoundedMemo(1 << 20, cost=len)
        self.slot_elements: BoundedMemo[tuple, tuple] = BoundedMemo(1 << 20, cost=len)
        # Selector chains by everything they are made of.
        self.chains: BoundedMemo[tuple, Any] = BoundedMemo(4096)
        # The last servers map by name (one per pool, family and mode), with
        # the pool object and members it came from: forwarding data and counters.
        self.servers_maps: BoundedMemo[str, tuple] = BoundedMemo(16384)
        # The last slot map per (selector name, intent source), with the pool and hashing it came from.
        self.selector_maps: BoundedMemo[tuple, tuple] = BoundedMemo(4096)
        # The last services maps per pair of map names (L2, L3), with what they came from.
        self.service_maps: BoundedMemo[tuple, tuple] = BoundedMemo(8)
        # The last selectors per (which services, slot budget), with the steps that made them.
        self.selectors: BoundedMemo[tuple, Any] = BoundedMemo(8)
        # The xdp engine's last model of each selector (its table and its
        # services), with the selector it came from.
        self.xdp_selectors: BoundedMemo[str, tuple] = BoundedMemo(16384)
        # The xdp engine's last sorted services and servers, with the per-selector parts they came from.
        self.xdp_sorted: BoundedMemo[str, tuple] = BoundedMemo(2)
        # IPVS destinations per (pool, method, tunnel type, port, family), with the pool they came from.
        self.ipvs_dests: BoundedMemo[tuple, tuple] = BoundedMemo(1 << 15)
        # The last unserved VIPs, with the services and per-pool reasons they came from.
        self.unserved: BoundedMemo[str, tuple] = BoundedMemo(1)

    def maglev_table(self, backends: tuple[maglev.Backend, ...], size: int, seed: int) -> tuple[str, ...]:
        """``maglev.build``, remembered: the same inputs give the same (immutable) table."""
        return self.maglev_tables.get_or_make((backends, size, seed), lambda: maglev.build(backends, size, seed))
