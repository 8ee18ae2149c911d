"""The IPVS mh model (bench/ipvs_mh_model.py) on its own: hash, table, scheduling, list order.

The model against the real kernel, flow by flow, is
netns-lab/tests/test_ipvs_mh_model_kernel.py (full-kernel tier).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import ipvs_mh_model as mh  # noqa: E402

from kdsr.maglev import canonical_sort_key  # noqa: E402

M = mh.TAB_SIZE
# The 16-byte key 00 01 .. 0f, as the two little-endian words siphash_key_t holds.
KEY_00_0F = (0x0706050403020100, 0x0F0E0D0C0B0A0908)


def dests(n: int, weight: int = 1, port: int = 80) -> list[tuple[str, int, int]]:
    return [(f"10.1.{i // 256}.{i % 256}", port, weight) for i in range(1, n + 1)]


# ---------------------------------------------------------------- hashing


def test_table_constants_are_debians():
    # CONFIG_IP_VS_MH_TAB_INDEX=12: primes[4], and 6 bits for weight shifting.
    assert (mh.TAB_SIZE, mh.TAB_BITS) == (4093, 6)


def test_siphash_2_4_reference_vectors():
    # The SipHash paper's worked example (key 00..0f, message 00..0e) and the
    # reference implementation's first vector (empty message): they pin the
    # round function, the key layout and the length/padding word.
    assert mh.siphash(bytes(range(15)), KEY_00_0F) == 0xA129CA6149BE45E5
    assert mh.siphash(b"", KEY_00_0F) == 0x726FDB47DD0E0E31


# lib/siphash_kunit.c (formerly lib/test_siphash.c), the 64-bit table: hsiphash
# of the bytes 00 01 .. (len - 1) under the key 00..0f.  Length 4 is the case
# ip_vs_mh hashes.
KERNEL_HSIPHASH_64 = {
    0: 0x050FC4DC,
    1: 0x7D57CA93,
    2: 0x4DC7D44D,
    3: 0xE7DDF7FB,
    4: 0x88D38328,
    5: 0x49533B67,
    7: 0x9BB11140,
    8: 0x8D299A8E,
    15: 0x2A519956,
    16: 0x7D908B66,
}


@pytest.mark.parametrize("length", sorted(KERNEL_HSIPHASH_64))
def test_hsiphash_matches_the_kernels_self_test(length):
    assert mh.hsiphash(bytes(range(length)), KEY_00_0F) == KERNEL_HSIPHASH_64[length]


def test_hashkey_hashes_one_little_endian_word():
    # v = offset + port + address (host order), stored as x86 stores an unsigned int.
    v = 7 + 53 + 0x0A000001
    assert mh.mh_hashkey("10.0.0.1", 53, mh.HASH1, offset=7) == mh.hsiphash(v.to_bytes(4, "little"), mh.HASH1)
    # Unsigned 32-bit arithmetic: it wraps.
    assert mh.mh_hashkey("255.255.255.255", 1, mh.HASH1) == mh.hsiphash(bytes(4), mh.HASH1)
    assert mh.mh_hashkey("255.255.255.255", 1, mh.HASH1) != mh.mh_hashkey("255.255.255.255", 1, mh.HASH2)


def test_ipv6_folds_by_xor_of_words():
    assert mh.fold_address("2001:db8:1:2:3:4:5:6") == 0x20010DB8 ^ 0x00010002 ^ 0x00030004 ^ 0x00050006
    # An IPv6 address whose fold equals an IPv4 address hashes the same.
    assert mh.mh_hashkey("::10.0.0.1", 80, mh.HASH1) == mh.mh_hashkey("10.0.0.1", 80, mh.HASH1)
    assert mh.fold_address("10.0.0.1") == 0x0A000001


# ---------------------------------------------------------------- table


@pytest.mark.parametrize("n", [1, 3, 5, 16, 100, 1000])
def test_equal_weights_balance_within_one_slot(n):
    counts = mh.MhTable(dests(n)).slot_counts()
    assert set(counts.values()) <= {M // n, -(-M // n)}
    assert sum(counts.values()) == M


def test_weights_give_proportional_turns():
    weights = (1, 2, 3, 4)
    table = mh.MhTable([(f"10.2.0.{i}", 80, w) for i, w in enumerate(weights, 1)])
    assert table.turns == list(weights)
    counts = table.slot_counts()
    total = sum(weights)
    for dest in table.dests:
        assert abs(counts[dest.address] - M * dest.weight / total) <= dest.weight, (dest, counts)
    # Only the ratios count: weights over their gcd.
    doubled = mh.MhTable([(f"10.2.0.{i}", 80, 2 * w) for i, w in enumerate(weights, 1)])
    assert doubled.gcd == 2 and doubled.table == table.table


def test_large_weights_are_shifted_to_six_bits():
    table = mh.MhTable([("10.3.0.1", 80, 1), ("10.3.0.2", 80, 1000)])
    # fls(1000) = 10 bits, 6 kept: 1000 >> 4 = 62 turns; 1 >> 4 = 0 becomes 1.
    assert (table.gcd, table.rshift, table.turns) == (1, 4, [1, 62])


def test_a_destination_added_with_weight_zero_gets_no_slots():
    table = mh.MhTable([("10.4.0.1", 80, 0), ("10.4.0.2", 80, 1), ("10.4.0.3", 80, 1)])
    assert table.turns == [0, 1, 1]
    assert table.slot_counts()["10.4.0.1"] == 0
    assert mh.MhTable([("10.4.0.1", 80, 0)]).table == [None] * M
    assert mh.MhTable([]).table == [None] * M
    assert mh.MhTable([]).schedule("192.0.2.1", fallback=True) is None


def test_the_kernel_refuses_more_destinations_than_slots():
    with pytest.raises(ValueError):
        mh.MhTable(dests(5), size=3)


def test_the_destination_port_is_hashed():
    assert mh.MhTable(dests(5, port=80)).table != mh.MhTable(dests(5, port=443)).table


# ---------------------------------------------------------------- order


def test_list_order_changes_the_table():
    members = dests(16)
    same = mh.MhTable(members)
    assert mh.MhTable(list(members)).table == same.table
    # The same set listed in another order: the same balance, other owners.
    reordered = mh.MhTable(list(reversed(members)))
    assert reordered.owners() != same.owners()
    differ = sum(a != b for a, b in zip(reordered.owners(), same.owners(), strict=True))
    assert 0 < differ < M // 2


def test_kdsr_order_makes_any_history_agree():
    members = dests(5)
    tables = {tuple(mh.MhTable(mh.kdsr_order(p)).owners()) for p in itertools.permutations(members)}
    assert len(tables) == 1


def test_kdsr_order_is_kdsrs_canonical_order():
    addresses = ["10.0.0.10", "2001:db8::2", "10.0.0.9", "192.168.0.1", "2001:db8::10", "9.255.255.255"]
    assert mh.kdsr_order(addresses) == sorted(addresses, key=canonical_sort_key)
    assert [d[0] for d in mh.kdsr_order([(a, 80, 1) for a in addresses])] == sorted(addresses, key=canonical_sort_key)


def test_list_after_inserts_adds_at_the_head():
    history = [("add", "a"), ("add", "b"), ("add", "c")]
    assert mh.list_after_inserts(history) == ["c", "b", "a"]
    assert mh.list_after_inserts(history + [("del", "b")]) == ["c", "a"]
    # Taken back (from the kernel's trash or anew): at the head again.
    assert mh.list_after_inserts(history + [("del", "b"), ("add", "b")]) == ["b", "c", "a"]
    # kdsr adds last-first, so the list reads in its order.
    wanted = mh.kdsr_order(["10.0.0.3", "10.0.0.1", "10.0.0.2"])
    assert mh.list_after_inserts(("add", a) for a in reversed(wanted)) == wanted
    for bad in ([("add", "a"), ("add", "a")], [("del", "a")], [("move", "a")]):
        with pytest.raises(ValueError):
            mh.list_after_inserts(bad)


# ---------------------------------------------------------------- scheduling


def clients(count: int) -> list[tuple[str, int]]:
    return [(f"198.51.100.{i % 250 + 1}", 20000 + i) for i in range(count)]


def test_schedule_is_the_slot_owner():
    table = mh.MhTable(dests(5))
    for addr, port in clients(200):
        slot = mh.mh_hashkey(addr, port, mh.HASH1) % M
        assert table.schedule(addr, port, mh_port=True) == table.dests[table.table[slot]].address
        slot0 = mh.mh_hashkey(addr, 0, mh.HASH1) % M
        assert table.schedule(addr, port) == table.dests[table.table[slot0]].address


def test_without_mh_port_the_source_port_does_not_count():
    table = mh.MhTable(dests(5))
    assert len({table.schedule("198.51.100.7", p) for p in range(1000, 1200)}) == 1
    assert len({table.schedule("198.51.100.7", p, mh_port=True) for p in range(1000, 1200)}) == 5


def test_fallback_moves_only_a_drained_destinations_flows():
    members = dests(5)
    live = mh.MhTable(members)
    # `ipvsadm -e … -w 0`: weight 0, last weight kept, so the table is unchanged.
    drained_address = members[2][0]
    drained = [mh.MhDest(a, p, 0, w) if a == drained_address else mh.MhDest(a, p, w) for a, p, w in members]
    table = mh.MhTable(drained)
    assert table.table == live.table
    moved = 0
    for addr, port in clients(400):
        before = live.schedule(addr, port, mh_port=True, fallback=True)
        after = table.schedule(addr, port, mh_port=True, fallback=True)
        assert after is not None and after != drained_address
        if before == drained_address:
            moved += 1
            assert table.schedule(addr, port, mh_port=True, fallback=False) is None
        else:
            assert after == before
    assert moved > 0
    # Every destination drained: nothing is scheduled.
    none = mh.MhTable([mh.MhDest(a, p, 0, w) for a, p, w in members])
    assert none.schedule("198.51.100.1", 1, mh_port=True, fallback=True) is None
