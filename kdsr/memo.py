"""The one bounded memo kdsr keeps values in between calls (compile's
CompileCache, the nft record's encoded texts).  functools.lru_cache serves
pure functions of hashable arguments; this serves the rest: a value per key
the caller makes up (a name, an object's id), and entries weighed by cost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """Values by key, the least recently used out first once the entries'
    total ``cost`` (1 each by default) passes ``limit``.  The last entry
    always stays, however dear."""

    def __init__(self, limit: int, cost: Callable[[V], int] | None = None) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._limit = limit
        self._cost = cost
        self._held = 0

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        old = self._entries.pop(key, None)
        if old is not None:
            self._held -= self._weigh(old)
        self._entries[key] = value
        self._held += self._weigh(value)
        while self._held > self._limit and len(self._entries) > 1:
            _key, gone = self._entries.popitem(last=False)
            self._held -= self._weigh(gone)
        return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        value = self.get(key)
        return value if value is not None else self.put(key, make())

    def _weigh(self, value: V) -> int:
        return 1 if self._cost is None else self._cost(value)

    def __len__(self) -> int:
        return len(self._entries)
