"""Maglev table sizing: defaults, the per-table cap, the load balancer's slot
budget, and the warnings validate/plan/apply print.  Also the weight goal."""

from __future__ import annotations

import json
import operator

import pytest
from cli_in_process import separate_runner

from kdsr import maglev
from kdsr.cli import main
from kdsr.compile import CompileCache, selectors
from kdsr.compile.checks import warnings_for
from kdsr.compile.selectors import (
    MAX_TABLE_SIZE,
    SIZED_BY_BUDGET,
    SIZED_BY_DEFAULT,
    SIZED_BY_INTENT,
    SIZED_BY_MAX,
    SLOT_BUDGET,
    TABLE_SIZE_LADDER,
    default_table_size,
    selectors_for,
)
from kdsr.errors import IntentError
from kdsr.intent import parse_intent
from kdsr.intent.primes import is_prime, next_prime
from kdsr.intent.reload import Reloader
from kdsr.kernel.fake import FakeKernel


def address(i: int) -> str:
    return f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"


def intent_doc(pools: dict[str, int], table_sizes: dict[str, int] | None = None) -> dict:
    """One service per pool (VIPs 192.0.2.x), pool p with the given number of servers."""
    table_sizes = table_sizes or {}
    services, pool_docs = {}, {}
    first = 1
    for k, (name, count) in enumerate(sorted(pools.items())):
        service = {"vip": f"192.0.{2 + k // 250}.{k % 250 + 1}", "ports": 80, "pool": name}
        if name in table_sizes:
            service["hashing"] = {"table_size": table_sizes[name]}
        services[f"svc-{name}"] = service
        pool_docs[name] = {"servers": [{"address": address(first + i)} for i in range(count)]}
        first += count
    return {
        "version": 1,
        "services": services,
        "pools": pool_docs,
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.255.255.254/8", "192.0.0.1/16"]}},
    }


def load(doc: dict, source: str = "sizing.json"):
    return parse_intent(json.dumps(doc), source)


def test_default_size_is_the_smallest_rung_of_the_ladder_with_1000_slots_per_server():
    pools = {"a": 1, "b": 3, "c": 4, "d": 5, "e": 16, "f": 17, "g": 40, "h": 65, "i": 66, "j": 600}
    sels = selectors_for(load(intent_doc(pools)), budget=10**7)
    sizes = {s.pool.name: (s.table_size, s.sized_by) for s in sels}
    assert sizes == {
        "a": (4093, SIZED_BY_DEFAULT),  # the smallest default rung
        "b": (4093, SIZED_BY_DEFAULT),
        "c": (4093, SIZED_BY_DEFAULT),
        "d": (8191, SIZED_BY_DEFAULT),
        "e": (16381, SIZED_BY_DEFAULT),
        "f": (32749, SIZED_BY_DEFAULT),
        "g": (65537, SIZED_BY_DEFAULT),
        "h": (65537, SIZED_BY_DEFAULT),
        "i": (65537, SIZED_BY_MAX),  # fewer than 1000 slots each, still more than 100: no warning
        "j": (65537, SIZED_BY_MAX),
    }
    assert all(is_prime(size) for size, _ in sizes.values())


def test_the_default_size_stays_put_while_a_pool_changes_within_a_rung():
    # A new size re-slots every flow of the pool, so it must not follow N.
    sizes = {n: default_table_size(n)[0] for n in range(1, 700)}
    assert len(set(sizes.values())) == len(TABLE_SIZE_LADDER) - TABLE_SIZE_LADDER.index(4093)
    steps = [n for n in range(2, 700) if sizes[n] != sizes[n - 1]]
    assert steps == [5, 9, 17, 33]  # 65537 from 33 servers on


def test_the_default_sizes_of_small_pools_fit_the_budget_without_warnings():
    it = load(intent_doc({"a": 1, "b": 3, "c": 40}))
    assert [s.sized_by for s in selectors_for(it)] == [SIZED_BY_DEFAULT] * 3
    assert warnings_for(it) == []


def test_a_pool_too_big_for_one_table_is_capped_and_warned_about():
    it = load(intent_doc({"big": 1000}))
    (sel,) = selectors_for(it)
    assert (sel.table_size, sel.sized_by) == (MAX_TABLE_SIZE, SIZED_BY_MAX)
    (warning,) = warnings_for(it)
    assert warning.pointer == "/pools/big"
    assert "65 slots each (fewer than 100)" in warning.message
    assert "1.5% above the mean" in warning.message


def test_a_small_table_size_from_the_intent_is_warned_about_where_it_was_written():
    it = load(intent_doc({"web": 3}, table_sizes={"web": 31}))
    (sel,) = selectors_for(it)
    assert (sel.table_size, sel.sized_by) == (31, SIZED_BY_INTENT)
    (warning,) = warnings_for(it)
    assert warning.pointer == "/services/svc-web/hashing/table_size"
    assert "10 slots each" in warning.message and "(307)" in warning.hint


def test_the_budget_caps_the_largest_tables_at_a_rung_and_leaves_small_ones_alone():
    # Budget 30,000: three pools want 4093 + 16381 + 65537 slots.
    it = load(intent_doc({"tiny": 2, "mid": 10, "large": 40}))
    sels = {s.pool.name: s for s in selectors_for(it, budget=30_000)}
    assert (sels["tiny"].table_size, sels["tiny"].sized_by) == (4093, SIZED_BY_DEFAULT)
    assert (sels["mid"].table_size, sels["mid"].sized_by) == (8191, SIZED_BY_BUDGET)
    assert (sels["large"].table_size, sels["large"].sized_by) == (8191, SIZED_BY_BUDGET)
    # The cap is the largest rung that fits: the next rung would not.
    assert 4093 + 2 * 16381 > 30_000


def test_below_the_smallest_rung_the_cap_is_the_largest_prime_that_fits():
    it = load(intent_doc({f"p{i}": 2 for i in range(10)}))
    sels = selectors_for(it, budget=2000)
    (cap,) = {s.table_size for s in sels}
    assert cap < TABLE_SIZE_LADDER[0] and is_prime(cap)
    assert 10 * cap <= 2000 < 10 * next_prime(cap + 1)


def test_the_budget_warning_names_the_budget_and_says_how_to_fix_the_size(monkeypatch):
    pools = {f"p{i:02d}": 40 for i in range(70)}  # 70 x 65537 slots > 262144; the cap (2039) is < 100 x 40
    pools["p70"] = 45  # the fewest slots per server
    it = load(intent_doc(pools))
    sels = selectors_for(it)
    assert sum(s.table_size for s in sels) <= SLOT_BUDGET
    assert {s.sized_by for s in sels} == {SIZED_BY_BUDGET}
    # One cause, one warning: the budget, how many pools it squeezes, the worst.
    (warning,) = warnings_for(it)
    assert warning.pointer == "/pools"
    assert str(SLOT_BUDGET) in warning.message and "table_size" in warning.hint
    assert "leaves 71 pools" in warning.message and "(p00, p01, p02 and 68 more)" in warning.message
    cap = sels[0].table_size
    assert f"pool p70's: {cap} slots for 45 servers, {cap // 45} each" in warning.message
    # A few pools get one warning each, at the pool.
    monkeypatch.setattr(selectors, "BUDGET_WARNINGS_EACH", 71)
    warnings = warnings_for(it)
    assert [w.pointer for w in warnings] == [f"/pools/{name}" for name in sorted(pools)]
    assert f"leaves pool p05's 40 servers {cap} slots, {cap // 40} slots each" in warnings[5].message


def test_table_sizes_from_the_intent_over_the_budget_are_an_error():
    pools = {f"p{i}": 3 for i in range(5)}
    it = load(intent_doc(pools, table_sizes={name: MAX_TABLE_SIZE for name in pools}))
    with pytest.raises(IntentError) as caught:
        selectors_for(it)
    assert "budget" in str(caught.value) and str(5 * MAX_TABLE_SIZE) in str(caught.value)


def test_a_default_equal_to_an_explicit_size_is_one_table():
    doc = intent_doc({"web": 3})
    doc["services"]["other"] = {"vip": "192.0.9.9", "ports": 80, "pool": "web", "hashing": {"table_size": 4093}}
    (sel,) = selectors_for(load(doc))
    assert len(sel.services) == 2 and sel.sized_by == SIZED_BY_INTENT


def test_a_merged_table_lists_its_services_in_the_intents_order():
    # Defaults and an explicit size that land on one table: the services
    # keep the intent's order (the first one's hashing and pointers speak
    # for the table), not the order of the groups they came from.
    doc = intent_doc({"web": 3})
    doc["services"]["b-explicit"] = {"vip": "192.0.9.9", "ports": 80, "pool": "web", "hashing": {"table_size": 4093}}
    doc["services"]["a-default"] = {"vip": "192.0.9.10", "ports": 80, "pool": "web"}
    intent = load(doc)
    (sel,) = selectors_for(intent)
    assert [s.name for s in sel.services] == [s.name for s in intent.services]
    assert len(sel.services) == 3


@pytest.mark.parametrize("servers", [4, 16, 100])
def test_weights_one_to_four_get_shares_within_one_percent(servers):
    # The goal: share / weight within 1% for weights 1..4, at the
    # smallest size kdsr accepts without a warning (M >= 100 N).  Heavier servers take proportionally more
    # turns while the table fills, so each count is off by about one slot.
    backends = [maglev.Backend(address(i + 1), 1 + i % 4) for i in range(servers)]
    size = next_prime(max(100 * servers, 251))
    counts = maglev.shares(maglev.build(backends, size, seed=7))
    total = sum(b.weight for b in backends)
    for b in backends:
        assert counts[b.key] / (size * b.weight / total) == pytest.approx(1, abs=0.01), b


def test_twice_the_weight_gets_twice_the_slots_within_the_bound():
    backends = [maglev.Backend(address(i + 1), 2 if i == 0 else 1) for i in range(10)]
    size = next_prime(100 * 10)
    counts = maglev.shares(maglev.build(backends, size, seed=3))
    light = [counts[b.key] for b in backends[1:]]
    ratio = counts[backends[0].key] / (sum(light) / len(light))
    assert ratio == pytest.approx(2, abs=2 / (size // 11))  # one slot either way, relative


def test_validate_prints_warnings_on_stderr_and_succeeds(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(intent_doc({"web": 3}, table_sizes={"web": 31})))
    result = separate_runner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout and "warning:" not in result.stdout
    assert result.stderr.startswith(f"warning: {path}: /services/svc-web/hashing/table_size: table_size 31")


def test_plan_json_stays_parseable_with_warnings(tmp_path, monkeypatch):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(intent_doc({"web": 3}, table_sizes={"web": 31})))
    monkeypatch.setattr("kdsr.cli._kernel", lambda store=None: FakeKernel())
    result = separate_runner().invoke(
        main, ["--state-dir", str(tmp_path / "st"), "plan", str(path), "--node", "lb1", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["node"] == "lb1"
    assert "warning:" in result.stderr and "table_size 31" in result.stderr


def test_an_intent_over_the_budget_fails_validate_with_exit_3(tmp_path):
    pools = {f"p{i}": 3 for i in range(5)}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(intent_doc(pools, table_sizes={name: MAX_TABLE_SIZE for name in pools})))
    result = separate_runner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 3
    assert "budget" in result.stderr


def ipvs_doc(servers: int) -> dict:
    doc = intent_doc({"web": servers})
    doc["services"]["svc-web"]["dsr"] = {"mode": "l2", "engine": "ipvs"}
    return doc


@pytest.mark.parametrize("servers, warned", [(40, False), (41, True), (120, True)])
def test_ipvs_pools_over_40_servers_are_warned_about_at_the_pool(servers, warned):
    problems = warnings_for(load(ipvs_doc(servers)))
    assert [p.pointer for p in problems] == (["/pools/web"] if warned else [])
    if warned:
        assert f"{servers} servers on the ipvs engine" in problems[0].message
        assert f"{4093 // servers} per server" in problems[0].message
        assert "nft engine" in problems[0].hint


def test_plan_warns_about_a_large_ipvs_pool_and_still_plans(tmp_path, monkeypatch):
    path = tmp_path / "big-ipvs.json"
    path.write_text(json.dumps(ipvs_doc(50)))
    monkeypatch.setattr("kdsr.cli._kernel", lambda store=None: FakeKernel())
    result = separate_runner().invoke(main, ["--state-dir", str(tmp_path / "st"), "plan", str(path), "--node", "lb1"])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: /pools/web: pool web has 50 servers on the ipvs engine" in result.stderr


def test_a_pool_grown_past_its_rung_under_the_cap_says_the_budget_sized_it():
    """The table keeps its size (the cap) and its services, but not its
    reason: selectors a CompileCache kept from the last intent must not keep it."""
    reloader = Reloader()
    cache = CompileCache()
    before = reloader.parse(json.dumps(intent_doc({"tiny": 4, "big": 10})), "sizing.json")
    sels = {s.pool.name: s for s in selectors_for(before, budget=8190, cache=cache)}
    assert (sels["tiny"].table_size, sels["tiny"].sized_by) == (4093, SIZED_BY_DEFAULT)
    grown = intent_doc({"tiny": 5, "big": 10})
    grown["pools"]["big"] = intent_doc({"tiny": 4, "big": 10})["pools"]["big"]  # only tiny changes
    after = reloader.parse(json.dumps(grown), "sizing.json")
    assert all(map(operator.is_, after.services, before.services))  # a reload keeps unchanged services
    sels = {s.pool.name: s for s in selectors_for(after, budget=8190, cache=cache)}
    assert (sels["tiny"].table_size, sels["tiny"].sized_by) == (4093, SIZED_BY_BUDGET)
    assert selectors_for(after, budget=8190, cache=cache) == selectors_for(after, budget=8190)


def test_a_pool_grown_past_its_capped_table_is_refused_though_its_default_size_did_not_move():
    assert selectors_for(load(intent_doc({"a": 3, "b": 3})), budget=7)  # a cap of 3 slots: 3 servers fit
    with pytest.raises(IntentError, match="pool b has 4 servers but the slot budget of 7"):
        selectors_for(load(intent_doc({"a": 3, "b": 4})), budget=7)
