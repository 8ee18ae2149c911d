import random

import pytest

from kdsr.maglev import Backend, build, moved_fraction, shares

ADDRS = [f"10.0.0.{i}" for i in range(1, 11)]


def test_golden_table_is_stable_across_releases():
    # Changing this table for the same input is a breaking change: every load
    # balancer running an older kdsr would disagree on where flows go.
    table = build([Backend("10.0.0.1"), Backend("10.0.0.2"), Backend("10.0.0.3")], 13, seed=1)
    assert table == (GOLDEN_13), "Maglev table changed for the same input: a breaking change, call it out"


A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"
GOLDEN_13 = (B, B, C, B, A, A, C, C, A, A, C, B, A)


def test_independent_of_input_order():
    backends = [Backend(a) for a in ADDRS]
    shuffled = backends[:]
    random.Random(4).shuffle(shuffled)
    assert build(backends, 1009, 42) == build(shuffled, 1009, 42)


def test_every_slot_filled_and_balanced():
    table = build([Backend(a) for a in ADDRS], 1009, 7)
    assert len(table) == 1009
    counts = shares(table)
    assert set(counts) == set(ADDRS)
    mean = 1009 / len(ADDRS)
    assert max(counts.values()) / mean <= 1 + 1 / (1009 // len(ADDRS)) + 1e-9


def test_seed_changes_table():
    backends = [Backend(a) for a in ADDRS]
    assert build(backends, 1009, 1) != build(backends, 1009, 2)


def test_removal_moves_about_one_nth():
    backends = [Backend(a) for a in ADDRS]
    before = build(backends, 1009, 3)
    after = build(backends[:-1], 1009, 3)
    moved = moved_fraction(before, after)
    # Every slot of the removed backend moves, and little else.
    assert 0.1 - 0.01 <= moved <= 0.1 + 0.05


def test_weights_proportional():
    table = build([Backend("10.0.0.1", 1), Backend("10.0.0.2", 2), Backend("10.0.0.3", 4)], 7001, 9)
    counts = shares(table)
    assert counts["10.0.0.3"] / counts["10.0.0.1"] == pytest.approx(4, rel=0.02)
    assert counts["10.0.0.2"] / counts["10.0.0.1"] == pytest.approx(2, rel=0.02)


def test_zero_weight_gets_nothing_and_all_zero_is_empty():
    table = build([Backend("10.0.0.1", 0), Backend("10.0.0.2", 1)], 13, 1)
    assert set(table) == {"10.0.0.2"}
    assert build([Backend("10.0.0.1", 0)], 13, 1) == ()


def test_duplicate_keys_rejected():
    with pytest.raises(ValueError):
        build([Backend("10.0.0.1"), Backend("10.0.0.1")], 13, 1)


def test_the_endgame_takes_the_slot_the_walk_would(monkeypatch):
    """build finds each backend's last few slots among the free ones instead
    of walking to them (maglev._LastFreeSlots); the tables must be the walk's."""
    from kdsr import maglev

    rng = random.Random(11)
    cases = []
    for _ in range(60):
        size = rng.choice([2, 3, 13, 251, 1009, 4093, 16381])
        weights = [rng.choice([0, 1, 1, 2, 3, 10, rng.randint(0, 500)]) for _ in range(rng.randint(1, 24))]
        backends = [Backend(f"10.{rng.randint(0, 255)}.0.{i}", w) for i, w in enumerate(weights)]
        cases.append((backends, size, rng.randint(0, 2**32 - 1)))
    with_endgame = [maglev.build(*case) for case in cases]
    monkeypatch.setattr(maglev, "_endgame_free_slots", lambda size: 0)
    assert [maglev.build(*case) for case in cases] == with_endgame
