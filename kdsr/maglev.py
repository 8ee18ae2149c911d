"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), pure and stable.

The table maps slot -> backend.  It depends only on the *set* of
(backend, weight) pairs, the seed and the table size: backends are sorted
canonically before population, so two load balancers that reached the same
pool through different histories build byte-identical tables.  The hash is
BLAKE2b over a fixed byte encoding, so the table is the same on every machine,
Python version and kdsr release.  Changing the table for the same input is a
breaking change (tests pin golden tables).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MAX_TABLE_SIZE = 65537  # largest prime we offer; nft maps carry this easily


@dataclass(frozen=True)
class Backend:
    key: str  # stable identity, e.g. the server address "10.0.0.11"
    weight: int = 1


def canonical_sort_key(key: str) -> tuple:
    # Addresses sort numerically (v4 before v6) so "10.0.0.9" < "10.0.0.10";
    # anything else sorts as text after them.
    try:
        addr = ipaddress.ip_address(key)
        return (0, addr.version, int(addr), key)
    except ValueError:
        return (1, 0, 0, key)


def _hash64(data: bytes, seed: int, salt: bytes) -> int:
    h = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(4, "big") + salt)
    return int.from_bytes(h.digest(), "big")


def _offset_and_skip(key: str, seed: int, size: int) -> tuple[int, int]:
    raw = key.encode()
    offset = _hash64(raw, seed, b"offset") % size
    skip = _hash64(raw, seed, b"skip") % (size - 1) + 1
    return offset, skip


def build(backends: Sequence[Backend], size: int, seed: int) -> tuple[str, ...]:
    """Return the lookup table: ``table[slot]`` is a backend key.

    ``size`` must be prime (every skip is then coprime with it, so each
    backend's permutation visits every slot).  Backends with weight 0 get no
    slots; with no positive weight the table is empty.

    Weights follow the paper's suggestion of giving heavier backends more
    turns: in round r a backend of weight w takes a turn when
    floor((r+1)·w/W) > floor(r·w/W), W being the largest weight.  The
    heaviest backend takes every round; the others in proportion.
    """
    if size < 2:
        raise ValueError(f"table size {size} is too small")
    live = sorted((b for b in backends if b.weight > 0), key=lambda b: canonical_sort_key(b.key))
    if not live:
        return ()
    keys = [b.key for b in live]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate backend keys")
    max_weight = max(b.weight for b in live)
    weights = [b.weight for b in live]
    perms = [_offset_and_skip(b.key, seed, size) for b in live]
    # Each backend's next slot to try: slot_i(j) = (offset_i + j * skip_i) % size,
    # walked by adding skip, without the multiplication and its big products.
    candidate = [offset for offset, _ in perms]
    skips = [skip for _, skip in perms]
    table: list[int] = [-1] * size
    free = size
    endgame = _endgame_free_slots(size)
    last_free: _LastFreeSlots | None = None
    if all(w == max_weight for w in weights):  # every backend, every round
        turns = itertools.repeat(range(len(live)))
    else:
        turns = _weighted_turns(weights, max_weight)
    for turns_now in turns:
        for i in turns_now:
            if free > endgame:
                slot, skip = candidate[i], skips[i]
                while table[slot] >= 0:
                    slot += skip
                    if slot >= size:
                        slot -= size
                candidate[i] = slot + skip if slot + skip < size else slot + skip - size
            else:
                if last_free is None:
                    last_free = _LastFreeSlots(table, perms)
                slot = last_free.take(i)
            table[slot] = i
            free -= 1
            if not free:
                return tuple(map(keys.__getitem__, table))
    raise AssertionError("unreachable: every round fills at least one slot")


def _weighted_turns(weights: list[int], max_weight: int) -> Iterator[list[int]]:
    """The backends taking a turn in each round, round after round.  Which
    ones do depends only on the round modulo the largest weight W
    (floor((r+1)w/W) - floor(rw/W) is the same for r and r + W), so each of
    those lists is computed once, when first needed: at most W of them, and
    never more than the rounds the table takes to fill."""
    schedule: dict[int, list[int]] = {}
    for round_no in itertools.count():
        phase = round_no % max_weight
        turns_now = schedule.get(phase)
        if turns_now is None:
            turns_now = schedule[phase] = [
                i for i, w in enumerate(weights) if (phase + 1) * w // max_weight - phase * w // max_weight
            ]
        yield turns_now


def _endgame_free_slots(size: int) -> int:
    """When this few slots are left free, finding a backend's next one by
    computing where each free slot sits in its permutation (one product per
    free slot) is cheaper than walking to it (size/free probes on average).
    About sqrt(size): the walk's last stretch was half of all probes."""
    return max(1, math.isqrt(size))


class _LastFreeSlots:
    """The last few free slots, and a backend's next one among them.

    Every slot before a backend's candidate in its permutation is taken
    (slots are never freed), so its next free slot, the one walking would
    reach, is the free slot that comes first in its permutation: the one of
    least position (slot - offset) / skip modulo the (prime) size."""

    def __init__(self, table: list[int], perms: list[tuple[int, int]]) -> None:
        self.size = len(table)
        self.slots = _indexes(table, -1)
        self.offsets = [offset for offset, _ in perms]
        self.inverses = [pow(skip, -1, self.size) for _, skip in perms]

    def take(self, i: int) -> int:
        offset, inverse, size = self.offsets[i], self.inverses[i], self.size
        positions = [(slot - offset) * inverse % size for slot in self.slots]
        return self.slots.pop(positions.index(min(positions)))


def _indexes(items: list[int], value: int) -> list[int]:
    found, at = [], -1
    with contextlib.suppress(ValueError):
        while True:
            at = items.index(value, at + 1)
            found.append(at)
    return found


def shares(table: Sequence[str]) -> dict[str, int]:
    """Slots per backend."""
    counts: dict[str, int] = {}
    for key in table:
        counts[key] = counts.get(key, 0) + 1
    return counts


def moved_fraction(before: Sequence[str], after: Sequence[str]) -> float:
    """Fraction of slots whose backend differs between two tables of one size."""
    if len(before) != len(after):
        raise ValueError("tables differ in size")
    if not before:
        return 0.0
    return sum(1 for a, b in zip(before, after, strict=False) if a != b) / len(before)


# nft's jhash expression turns the 32-bit hash h of a flow into a slot with
# reciprocal_scale: slot = (h * M) >> 32 (kernel nft_hash.c).  So slot s
# serves the hashes in [ceil(s * 2^32 / M), ceil((s + 1) * 2^32 / M)).
HASH_SPACE = 1 << 32


def _slot_starts(size: int) -> list[int]:
    return [-(-s * HASH_SPACE // size) for s in range(size)] + [HASH_SPACE]


def moved_flow_fraction(before: Sequence[str], after: Sequence[str]) -> float:
    """Fraction of flows (of the 32-bit hash space) whose backend differs.

    Unlike ``moved_fraction`` the tables may differ in size: a new table size
    re-slots every flow, and this says how many then land on another backend.
    Exact, by walking both tables' slot boundaries together.
    """
    if not before or not after:
        return 0.0 if not before and not after else 1.0
    a_starts, b_starts = _slot_starts(len(before)), _slot_starts(len(after))
    moved = 0
    i = j = 0
    position = 0
    while position < HASH_SPACE:
        end = min(a_starts[i + 1], b_starts[j + 1])
        if before[i] != after[j]:
            moved += end - position
        position = end
        if a_starts[i + 1] == end:
            i += 1
        if b_starts[j + 1] == end:
            j += 1
    return moved / HASH_SPACE
