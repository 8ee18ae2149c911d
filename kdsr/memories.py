"""What kdsr remembers between compiles and plans in one process, named in
one place.

The health daemon recompiles the whole intent after every probe change, so
compile and planning keep work from the last call: selectors and service
maps per intent, chains per selector, Maglev tables, slot elements, the
unserved VIPs, encoded table records.  None of it may show in a result: a
compile after any history equals one from nothing.  The tests that prove it
and the benches that time a cold compile both need every one of these, and
a memory added without being named here is one they would silently miss.
"""

from __future__ import annotations

from kdsr import maglev, model, operations
from kdsr.compile import lb_ipvs, lb_nft_l2, selectors
from kdsr.intent import model as intent_model
from kdsr.kernel import nft_cache


def memories() -> list[dict]:
    """The memories themselves: dicts a test may copy and put back."""
    return [
        selectors._LAST_SELECTORS,
        lb_nft_l2._LAST_SERVICE_MAPS,
        lb_nft_l2._LAST_SELECTOR_MAPS,
        lb_nft_l2._CHAINS,
        lb_nft_l2._SLOT_ELEMENTS,
        lb_ipvs._LAST_DESTS,
        intent_model._LAST_BY_POOL,
        operations._LAST_UNSERVED,
        maglev._BUILT,
        nft_cache._ENCODED._known,
        nft_cache._MAP_TEXT._known,
    ]


def forgotten_caches() -> list:
    """The value caches compile fills (lru_caches): formatted addresses,
    shared map elements.  Cleared too, though nothing shows through them."""
    return [intent_model.address_text, model.element, model.ipvs_dest]


def forget() -> None:
    """Start cold: every memory and value cache."""
    for memory in memories():
        memory.clear()
    maglev._built_slots = 0
    for cache in forgotten_caches():
        cache.cache_clear()
