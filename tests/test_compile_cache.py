"""Compile with a CompileCache (kdsr/compile/cache.py) equals compile without
one: whatever was compiled before, with whatever edits and health events in
between.  The cache only makes the daemon's recompile after one change cheap;
it must never show in a result."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdsr.compile import CompileCache, compile_node, selectors
from kdsr.compile.effective import effective_intent, unserved_vips
from kdsr.errors import IntentError
from kdsr.intent import load_intent, parse_intent
from kdsr.intent.reload import Reloader
from kdsr.kernel import nft_cache
from kdsr.memo import BoundedMemo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["l2-web.json", "l2-bgp-ha.json", "l3-ipip.json", "l3-gre-ipvs.json", "l3-ip6tnl.json"]


def reloaded_base() -> dict:
    """Pools of several sizes; services on them in L2 and L3, nft and IPVS, pinned and not."""
    pools = {f"p{i}": {"servers": [{"address": f"10.10.{i}.{j}"} for j in range(1, 2 + i % 4)]} for i in range(6)}
    pools["far"] = {"servers": [{"address": "192.0.2.41"}, {"address": "192.0.2.42"}]}
    services = {}
    for i in range(24):
        pool = f"p{i % 6}"
        service = {"vip": f"10.20.0.{i}", "ports": [80, 443] if i % 3 else "7000-7010", "pool": pool}
        if i % 5 == 4:
            service["hashing"] = {"flow_pinning": {"timeout": 30}}
        if i % 7 == 6:
            service["dsr"] = {"engine": "ipvs"}
        services[f"s{i:02d}"] = service
    services["tunnelled"] = {"vip": "10.20.1.1", "ports": 80, "pool": "far", "dsr": {"mode": "l3-ipip"}}
    return {
        "version": 1,
        "services": services,
        "pools": pools,
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.254/16"]}},
    }


BASES = [reloaded_base()] + [json.loads((ROOT / "examples" / name).read_text()) for name in EXAMPLES]


def edit(doc: dict, rng: random.Random) -> None:
    """One edit that changes what compile groups, sizes or builds (most of them valid)."""
    name = rng.choice(sorted(doc["services"]))
    service = doc["services"][name]
    pool = doc["pools"][rng.choice(sorted(doc["pools"]))]
    kind = rng.randrange(11)
    if kind == 0:
        service["pool"] = rng.choice(sorted(doc["pools"]))
    elif kind == 1:
        service["hashing"] = rng.choice(
            [{}, {"seed": 7}, {"fields": "five-tuple"}, {"table_size": 4093}, {"table_size": 251}]
        )
    elif kind == 2:
        service["dsr"] = rng.choice(
            [{}, {"engine": "ipvs"}, {"mode": "l3-gre"}, {"engine": "xdp"}, {"mode": "l3-gre", "engine": "xdp"}]
        )
    elif kind == 3 and len(doc["services"]) > 1:
        del doc["services"][name]
    elif kind == 4:
        doc["services"][f"n{rng.randrange(10**6)}"] = dict(service, vip=f"10.20.2.{rng.randrange(250)}")
    elif kind == 5:
        pool["servers"].append({"address": f"10.30.{rng.randrange(250)}.{rng.randrange(1, 250)}"})
    elif kind == 6 and len(pool["servers"]) > 1:
        pool["servers"].pop(rng.randrange(len(pool["servers"])))
    elif kind == 7:
        rng.choice(pool["servers"])["weight"] = rng.randrange(0, 4)
    elif kind == 8:
        # Same ports, another spelling: only the elements' comments (intent
        # pointers) differ, which a cache keyed on equal services would miss.
        ports = service["ports"]
        service["ports"] = [ports] if not isinstance(ports, list) else ports[0] if len(ports) == 1 else ports
    elif kind == 9:
        if service.get("dsr", {}).get("engine") != "ipvs":  # IPVS mh takes no seed
            service.setdefault("hashing", {})["seed"] = rng.choice([1, 12345])
    else:  # the same service moved to the end: same entries, other order
        doc["services"][name] = doc["services"].pop(name)


def health(intent, rng: random.Random) -> tuple[frozenset, frozenset]:
    """Servers health took down, and servers drained, drawn from the intent's pools."""
    members = [(p.name, str(m.address), m.node) for p in intent.pools for m in p.members]
    down = frozenset((p, a) for p, a, _ in rng.sample(members, rng.randrange(min(3, len(members)) + 1)))
    drained = frozenset(a for _p, a, _n in rng.sample(members, rng.randrange(min(2, len(members)) + 1)))
    return down, drained


def same(warm, cold) -> None:
    """Equal compiled states, down to what equality leaves out: element
    comments and pointers (the nft table records encode both)."""
    assert warm == cold
    for wt, ct in zip(warm.tables, cold.tables, strict=True):
        for wm, cm in zip(wt.maps, ct.maps, strict=True):
            assert [e.comment for _k, e in wm.elements] == [e.comment for _k, e in cm.elements]
        assert nft_cache.encode_table_text(wt) == nft_cache.encode_table_text(ct)
    assert [s.pointer for s in warm.ipvs] == [s.pointer for s in cold.ipvs]
    if warm.xdp is not None:  # the xdp engine's elements: their pointers too
        for kind in ("services", "selectors", "servers"):
            assert [x.pointer for x in getattr(warm.xdp, kind)] == [x.pointer for x in getattr(cold.xdp, kind)]


CACHE_SETTINGS = settings(
    max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@CACHE_SETTINGS
@given(base=st.sampled_from(BASES), seed=st.integers(0, 2**32 - 1), steps=st.integers(4, 14))
def test_compile_with_a_kept_cache_equals_compile_without(base, seed, steps):
    """A daemon's life: one cache, reloads of edited files (which keep the
    unchanged entries as the same objects, what the cache recognises them
    by) and health events and drains in between.  Every step, compile and
    the unserved VIPs with the kept cache equal those of a fresh parse
    compiled without one, and so do selectors sized under a small budget."""
    rng = random.Random(seed)
    node = next(iter(base["load_balancers"]))
    cache = CompileCache()
    reloader = Reloader()
    current = copy.deepcopy(base)
    intent = reloader.parse(json.dumps(current), "intent.json")
    for step in range(steps):
        if rng.random() < 0.6:
            edited = copy.deepcopy(current)
            for _ in range(rng.choice([1, 1, 2])):
                edit(edited, rng)
            try:
                intent = reloader.parse(json.dumps(edited), "intent.json")
            except IntentError:
                continue
            current = edited
        down, drained = health(intent, rng) if rng.random() < 0.5 else (frozenset(), frozenset())
        cold_intent = parse_intent(json.dumps(current), "intent.json")
        try:
            warm_effective = effective_intent(intent, down, drained)
            warm_withdraw = unserved_vips(warm_effective, cache)
            warm = compile_node(warm_effective.intent, node, warm_withdraw, cache)
        except IntentError as exc:  # e.g. a table size the budget cannot hold: so must the cold compile
            with pytest.raises(IntentError) as cold_exc:
                compile_node(effective_intent(cold_intent, down, drained).intent, node)
            assert str(cold_exc.value) == str(exc)
            continue
        warm_selectors = selectors.selectors_for(warm_effective.intent, budget=20_000, cache=cache)
        cold_effective = effective_intent(cold_intent, down, drained)
        cold_withdraw = unserved_vips(cold_effective)
        assert warm_withdraw == cold_withdraw, f"step {step}"
        same(warm, compile_node(cold_effective.intent, node, cold_withdraw))
        cold_selectors = selectors.selectors_for(cold_effective.intent, budget=20_000)
        assert warm_selectors == cold_selectors
        assert [(s.name, s.sized_by) for s in warm_selectors] == [(s.name, s.sized_by) for s in cold_selectors]


@pytest.mark.parametrize("example", EXAMPLES)
def test_a_cache_kept_across_examples_and_nodes_changes_nothing(example):
    """One cache for every example and node (as if one process compiled them
    all, in turn, twice): each compile equals one without a cache."""
    cache = CompileCache()
    intents = [load_intent(ROOT / "examples" / name) for name in EXAMPLES]
    intents.append(load_intent(ROOT / "examples" / example))  # the one under test again, last
    for _round in range(2):
        for intent in intents:
            for node in intent.node_names():
                same(compile_node(intent, node, cache=cache), compile_node(intent, node))


def _module_state() -> dict[str, int]:
    """Every container held at module level in kdsr, with its size; a
    functools.lru_cache (the value cache of a pure function) by its entries."""
    found: dict[str, int] = {}
    for module_name, module in list(sys.modules.items()):
        if module_name != "kdsr" and not module_name.startswith("kdsr."):
            continue
        for name, value in vars(module).items():
            if hasattr(value, "cache_info"):  # by its own name: modules import it under theirs
                found[f"{value.__module__}.{value.__qualname__}"] = value.cache_info().currsize
            elif isinstance(value, dict | list | set):
                found[f"{module_name}.{name}"] = len(value)
            elif type(value).__module__.startswith("kdsr") and hasattr(value, "__dict__"):
                # An object of kdsr's own: the containers it holds.
                held = [v for v in vars(value).values() if isinstance(v, dict | list | set)]
                found[f"{module_name}.{name}"] = sum(len(v) for v in held)
    return found


# The value caches of pure functions (functools.lru_cache): the same
# arguments give an equal value whatever they hold.
PURE_VALUE_CACHES = {
    "kdsr.model.element",  # one NftElement per value and comment, shared with the table readers
    "kdsr.model.ipvs_dest",  # as element, for IPVS destinations
    "kdsr.intent.model.address_text",  # str() of an address
}


def test_compile_keeps_no_state_of_its_own(tmp_path):
    """Nothing at module level grows while the examples are compiled
    (health events, withdrawals, the table record included): what compile
    reuses lives in the caller's CompileCache, or nowhere."""
    intents = [load_intent(ROOT / "examples" / example) for example in EXAMPLES]
    for intent in intents:  # warm up whatever is made once per process (imports, schema)
        compile_node(intent, intent.node_names()[0])
    before = _module_state()
    cache = CompileCache()
    for intent in intents:
        for node in intent.node_names():
            down = frozenset({(intent.pools[0].name, str(intent.pools[0].members[0].address))})
            for effective in (effective_intent(intent, down, frozenset()), effective_intent(intent)):
                desired = compile_node(effective.intent, node, withdraw=unserved_vips(effective, cache), cache=cache)
                for table in desired.tables:
                    nft_cache.encode_table_text(table)
    grown = [
        name for name, size in _module_state().items() if size != before.get(name, 0) and name not in PURE_VALUE_CACHES
    ]
    assert not grown, f"module-level state that compile changed: {grown}"


def test_a_health_event_rebuilds_only_the_changed_pool(tmp_path):
    """The cache's promise to the diff (compile/cache.py): after one server
    goes down, every other pool's slot map is the one already built, the
    same object, which the diff compares by identity; the changed pool's
    maps are new, and equal to a compile without the cache."""
    doc = json.loads((ROOT / "examples" / "l2-web.json").read_text())
    first = next(iter(doc["pools"]))
    for i in range(3):  # more pools of the same servers
        doc["pools"][f"extra{i}"] = copy.deepcopy(doc["pools"][first])
        service = copy.deepcopy(next(iter(doc["services"].values())))
        service["vip"] = f"192.0.2.{200 + i}"
        service["pool"] = f"extra{i}"
        doc["services"][f"extra{i}"] = service
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc))
    intent = load_intent(path)
    node = next(iter(doc["load_balancers"]))
    member = str(intent.pool(first).members[0].address)
    cache = CompileCache()

    def slot_maps(down, cache):
        table = compile_node(effective_intent(intent, down).intent, node, cache=cache).tables[0]
        return {m.name: m for m in table.maps if m.name.startswith("pool-")}

    before = slot_maps(frozenset(), cache)
    after = slot_maps(frozenset({(first, member)}), cache)
    changed = {name for name in before if before[name] is not after[name]}
    assert changed == {name for name in before if name.startswith(f"pool-{first}-")}
    assert all(before[n] != after[n] for n in changed)
    assert after == slot_maps(frozenset({(first, member)}), None)


def test_ipvs_services_share_their_pool_s_destinations_and_a_health_event_rebuilds_one_pool(tmp_path):
    """The ipvs engine: services on one pool and port hold one destination
    tuple, kept from compile to compile (with the cache) while the pool is;
    one server down (weight 0) makes a new tuple for its pool only, equal to
    a compile without the cache."""
    doc = json.loads((ROOT / "examples" / "l3-gre-ipvs.json").read_text())
    doc["pools"]["other"] = copy.deepcopy(doc["pools"]["web"])
    doc["services"]["other"] = {**copy.deepcopy(doc["services"]["web"]), "vip": "10.9.0.102", "pool": "other"}
    doc["services"]["other2"] = {**copy.deepcopy(doc["services"]["web"]), "vip": "10.9.0.103", "pool": "other"}
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc))
    intent = load_intent(path)
    member = str(intent.pool("web").members[0].address)
    cache = CompileCache()

    def services(down, cache):
        return {s.ident: s for s in compile_node(effective_intent(intent, down).intent, "lb1", cache=cache).ipvs}

    before = services(frozenset(), cache)
    again = services(frozenset(), cache)
    after = services(frozenset({("web", member)}), cache)
    on_other = [i for i in before if i.startswith("tcp 10.9.0.10") and ("102:" in i or "103:" in i)]
    assert len(on_other) == 4
    assert before["tcp 10.9.0.102:80"].dests is before["tcp 10.9.0.103:80"].dests
    assert all(again[i].dests is before[i].dests for i in before)
    assert all(after[i].dests is before[i].dests for i in on_other)
    changed = [i for i in before if after[i].dests is not before[i].dests]
    assert changed and all(i not in on_other for i in changed)
    assert all({d.address: d.weight for d in after[i].dests}[member] == 0 for i in changed)
    assert after == services(frozenset({("web", member)}), None)


def test_nothing_down_or_drained_is_the_intent_itself(example_path):
    intent = load_intent(example_path)
    effective = effective_intent(intent)
    assert effective.intent is intent
    assert set(effective.pools.values()) == {"ok"}
    assert all(out == () for out in effective.out.values())


def test_the_effective_intent_shares_the_services_and_their_grouping(example_path):
    """A health event's intent is the same services with other pools: the
    grouping by pool is not made again for it (10,000 services sorted)."""
    intent = load_intent(example_path)
    pool = intent.pools[0]
    effective = effective_intent(intent, frozenset({(pool.name, str(pool.members[0].address))})).intent
    assert effective.services is intent.services
    assert effective.services_on(pool.name) is intent.services_on(pool.name)
    assert dataclasses.replace(intent, pools=effective.pools) == effective


def test_the_bounded_memo_lets_the_least_recently_used_go_first_by_cost():
    memo: BoundedMemo[str, tuple] = BoundedMemo(5, cost=len)
    memo.put("a", (1, 2))
    memo.put("b", (3, 4))
    assert memo.get("a") == (1, 2)  # a is now the more recent
    memo.put("c", (5,))  # 5 slots held: all stay
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == ((1, 2), (3, 4), (5,))
    memo.put("d", (6,))  # 6 > 5: the least recently used (a) goes
    assert memo.get("a") is None and len(memo) == 3
    assert memo.get_or_make("a", lambda: (7, 8)) == (7, 8)  # made again; b, the oldest now, goes
    assert memo.get("b") is None
    memo.put("big", tuple(range(10)))  # dearer than the limit: it alone stays
    assert len(memo) == 1 and memo.get("big") == tuple(range(10))
    assert memo.get_or_make("empty", tuple) == () and memo.get("empty") == ()  # a falsy value is a value
