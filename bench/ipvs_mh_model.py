"""A model of the Linux IPVS ``mh`` scheduler (net/netfilter/ipvs/ip_vs_mh.c).

IPVS exists only in the full kernel, which here runs in a slow emulated
guest; this model lets the bench (bench/maglev.py) measure ``mh`` tables on
any machine, and netns-lab/tests/test_ipvs_mh_model_kernel.py checks it
against the real kernel, flow by flow.

What the kernel does, and what the model reproduces:

- Table size: ``primes[CONFIG_IP_VS_MH_TAB_INDEX - 8]``; Debian sets the index
  to 12, so M = 4093.  ``IP_VS_MH_TAB_BITS`` = 12 / 2 = 6 (weight shifting).
- Hash: ``hsiphash`` of one 32-bit word with fixed keys (the same on every
  machine, which is what lets two directors agree at all).  On a 64-bit
  kernel hsiphash is SipHash-1-3 with 64-bit key words (lib/siphash.c, the
  ``BITS_PER_LONG == 64`` branch), truncated to 32 bits.  The word is
  ``offset + port + address`` (unsigned 32-bit arithmetic) where an IPv6
  address is first folded to 32 bits by XOR of its four words; it is hashed
  as the 4 bytes the CPU stores, little-endian on x86.
- Permutation per destination, in the order of the service's destination
  *list*: offset = hash1 % M, skip = hash2 % (M - 1) + 1; "turns" (slots
  taken per round) = last_weight / gcd >> rshift, at least 1 for a nonzero
  last_weight, 0 (no slots) for a destination that never had a weight.
- Scheduling: slot = hash1(client address, source port or 0) % M.  A
  destination whose *current* weight is 0 keeps its slots (its last nonzero
  weight counts for the table), and with ``mh-fallback`` its new flows are
  re-hashed with an offset until an available destination turns up.
- The list order: ``ipvsadm -a`` puts a new destination at the *head* of the
  list (list_add_rcu in __ip_vs_update_dest), so the table depends on the
  history of adds.  kdsr keeps the list in canonical order (sorted by
  address, see kdsr/compile/lb_ipvs.py and kdsr/apply.py converge_commands);
  ``kdsr_order`` and ``list_after_inserts`` express both cases.

Not modelled: the overload flag (upper connection thresholds, which kdsr
never sets) and 32-bit kernels (whose hsiphash is HalfSipHash-1-3).

Standard library only; no kdsr import.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# CONFIG_IP_VS_MH_TAB_INDEX = 12 on Debian's amd64 kernel.
TAB_INDEX = 12
PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
TAB_SIZE = PRIMES[TAB_INDEX - 8]
TAB_BITS = TAB_INDEX // 2

# generate_hash_secret(): fixed, so every director computes the same hashes.
# hsiphash_key_t holds two `unsigned long`, i.e. 64-bit words on x86_64.
HASH1 = (2654435761, 2654435761)
HASH2 = (2654446892, 2654446892)

# SipHash's initial state ("somepseudorandomlygeneratedbytes").
_C0 = 0x736F6D6570736575
_C1 = 0x646F72616E646F6D
_C2 = 0x6C7967656E657261
_C3 = 0x7465646279746573


def _rotl(x: int, bits: int) -> int:
    return ((x << bits) | (x >> (64 - bits))) & MASK64


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    """One SipRound (the same permutation for every SipHash-c-d)."""
    v0 = (v0 + v1) & MASK64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & MASK64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & MASK64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & MASK64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash(data: bytes, key: tuple[int, int], c_rounds: int = 2, d_rounds: int = 4) -> int:
    """SipHash-c-d of ``data`` under the key words (k0, k1); a 64-bit integer.

    The key words are the two little-endian halves of a 16-byte key, as the
    kernel's siphash_key_t holds them.
    """
    k0, k1 = key[0] & MASK64, key[1] & MASK64
    v0, v1, v2, v3 = _C0 ^ k0, _C1 ^ k1, _C2 ^ k0, _C3 ^ k1
    whole = len(data) - len(data) % 8
    for i in range(0, whole, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        for _ in range(c_rounds):
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    # The last word: the leftover bytes, little-endian, with len mod 256 on top.
    b = ((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v3 ^= b
    for _ in range(c_rounds):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(d_rounds):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def hsiphash(data: bytes, key: tuple[int, int]) -> int:
    """The kernel's hsiphash() on a 64-bit build: SipHash-1-3, low 32 bits."""
    return siphash(data, key, 1, 3) & MASK32


def fold_address(address: str) -> int:
    """ntohl(addr_fold): the IPv4 address as a number, or the XOR of an IPv6 address's four words.

    XOR commutes with the byte swap, so folding the numbers equals folding
    the big-endian words and swapping once, as the kernel does.
    """
    ip = ipaddress.ip_address(address)
    value = int(ip)
    if ip.version == 4:
        return value
    return (value >> 96) ^ ((value >> 64) & MASK32) ^ ((value >> 32) & MASK32) ^ (value & MASK32)


def mh_hashkey(address: str, port: int, key: tuple[int, int], offset: int = 0) -> int:
    """ip_vs_mh_hashkey(): hsiphash of the 32-bit word offset + port + folded address."""
    v = (offset + port + fold_address(address)) & MASK32
    # `v` is an unsigned int in memory: its bytes in x86's (little-endian) order.
    return hsiphash(v.to_bytes(4, "little"), key)


# --------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class MhDest:
    """A destination as the scheduler sees it.

    ``last_weight`` is the last nonzero weight it was given (or its weight
    when added): it decides the slots.  ``weight`` decides availability; 0
    means drained (``ipvsadm -e … -w 0`` keeps last_weight).
    """

    address: str
    port: int
    weight: int
    last_weight: int | None = None

    @property
    def table_weight(self) -> int:
        return self.weight if self.last_weight is None else self.last_weight


def _as_dest(d: MhDest | Sequence) -> MhDest:
    return d if isinstance(d, MhDest) else MhDest(*d)


class MhTable:
    """The lookup table ip_vs_mh builds for a destination list (head first).

    ``dests``: MhDest or tuples (address, port, weight[, last_weight]) in the
    kernel's list order, as /proc/net/ip_vs prints it.
    ``table[slot]``: the index into ``dests`` owning the slot, or None (only
    when no destination has a nonzero last_weight).
    """

    def __init__(self, dests: Iterable[MhDest | Sequence], size: int = TAB_SIZE):
        self.dests: tuple[MhDest, ...] = tuple(_as_dest(d) for d in dests)
        self.size = size
        if len(self.dests) > size:
            raise ValueError(f"{len(self.dests)} destinations > table size {size} (the kernel refuses: EINVAL)")
        self.gcd = self._gcd()
        self.rshift = self._rshift()
        self.turns = [self._turns(d) for d in self.dests]
        self.table: list[int | None] = self._populate()

    def _gcd(self) -> int:
        # ip_vs_mh_gcd_weight(): over nonzero last weights; 0 when there are none.
        g = 0
        for d in self.dests:
            if d.table_weight > 0:
                g = math.gcd(g, d.table_weight)
        return g

    def _rshift(self) -> int:
        # ip_vs_mh_shift_weight(): keep weight/gcd within TAB_BITS bits, so a
        # huge weight cannot hog the table round after round.
        if self.gcd < 1:
            return 0
        heaviest = max([0] + [d.table_weight for d in self.dests])
        return max((heaviest // self.gcd).bit_length() - TAB_BITS, 0)

    def _turns(self, d: MhDest) -> int:
        lw = d.table_weight
        if self.gcd < 1:
            return 0
        # C's `x ?: (lw != 0)`: a nonzero weight shifted down to 0 still gets one turn.
        return ((lw // self.gcd) >> self.rshift) or (1 if lw != 0 else 0)

    def _populate(self) -> list[int | None]:
        size = self.size
        table: list[int | None] = [None] * size
        if self.gcd < 1:
            return table  # ip_vs_mh_reset(): an empty table, every flow unscheduled
        perm, skip = [], []
        for d in self.dests:
            offset = mh_hashkey(d.address, d.port, HASH1) % size
            perm.append(offset)
            skip.append(mh_hashkey(d.address, d.port, HASH2) % (size - 1) + 1)
        taken = bytearray(size)
        count = len(self.dests)
        n = 0
        dt_count = 0  # slots the current destination took this round
        # ip_vs_mh_populate(): rounds over the list from its head; in each, a
        # destination takes `turns` slots in a row, each its next free
        # preferred slot; stop when every slot is taken.
        while n < size:
            i = 0
            while i < count:
                turns = self.turns[i]
                if turns < 1:
                    i += 1
                    continue
                c = perm[i]
                while taken[c]:
                    perm[i] += skip[i]
                    if perm[i] >= size:
                        perm[i] -= size
                    c = perm[i]
                taken[c] = 1
                table[c] = i
                n += 1
                if n == size:
                    return table
                dt_count += 1
                if dt_count >= turns:
                    dt_count = 0
                    i += 1
        return table

    # ---------------------------------------------------------------- lookup

    def _available(self, index: int) -> bool:
        return self.dests[index].weight > 0

    def pick(self, client_addr: str, client_port: int = 0, mh_port: bool = False, fallback: bool = False) -> int | None:
        """ip_vs_mh_schedule(): the index of the destination a new flow gets, or None (dropped)."""
        port = client_port if mh_port else 0
        ihash = mh_hashkey(client_addr, port, HASH1) % self.size
        index = self.table[ihash]
        if index is None:
            return None
        if self._available(index):
            return index
        if not fallback:
            return None
        # ip_vs_mh_get_fallback(): re-hash with offsets ihash, ihash+1, ...
        # (mod M) until a slot's destination is available.
        for offset in range(self.size):
            roffset = (offset + ihash) % self.size
            index = self.table[mh_hashkey(client_addr, port, HASH1, roffset) % self.size]
            if index is None:
                break
            if self._available(index):
                return index
        return None

    def schedule(
        self, client_addr: str, client_port: int = 0, mh_port: bool = False, fallback: bool = False
    ) -> str | None:
        """The address of the destination a new flow from (client_addr, client_port) gets."""
        index = self.pick(client_addr, client_port, mh_port, fallback)
        return None if index is None else self.dests[index].address

    def owners(self) -> list[str | None]:
        """The destination address per slot."""
        return [None if i is None else self.dests[i].address for i in self.table]

    def slot_counts(self) -> dict[str, int]:
        counts = {d.address: 0 for d in self.dests}
        for i in self.table:
            if i is not None:
                counts[self.dests[i].address] += 1
        return counts


# --------------------------------------------------------------------------
# List order

T = TypeVar("T")


def list_after_inserts(history: Iterable[tuple[str, T]]) -> list[T]:
    """The kernel's destination list (head first) after ("add", x) / ("del", x) operations.

    An add goes to the head (also a destination taken back from the trash);
    a delete leaves the others' order alone; editing a weight does not move
    a destination.  Adding one that is there, or deleting one that is not,
    raises ValueError (the kernel answers EEXIST / ENOENT).
    """
    order: list[T] = []
    for op, item in history:
        if op == "add":
            if item in order:
                raise ValueError(f"{item!r} is already in the list")
            order.insert(0, item)
        elif op == "del":
            if item not in order:
                raise ValueError(f"{item!r} is not in the list")
            order.remove(item)
        else:
            raise ValueError(f"unknown operation {op!r} (add or del)")
    return order


def address_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def _address_of(d) -> str:
    if isinstance(d, str):
        return d
    return d.address if isinstance(d, MhDest) else d[0]


def kdsr_order(dests: Iterable[T]) -> list[T]:
    """kdsr's list order (head first): sorted by address, numerically, IPv4 before IPv6.

    kdsr/compile/lb_ipvs.py sorts the pool members by
    kdsr.maglev.canonical_sort_key, and kdsr/apply.py converge_commands
    (re)adds destinations last-first until the kernel's list is that order.
    Items: addresses, MhDest, or tuples whose first element is the address.
    """
    return sorted(dests, key=lambda d: address_key(_address_of(d)))
