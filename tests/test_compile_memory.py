"""Compile remembers work between calls (selectors and service maps per
intent, chains per selector, Maglev tables, slot elements, formatted
addresses) so that the daemon's recompile after one change is cheap.  What
it remembers must never show: every compile equals a compile from nothing,
whatever was compiled before it."""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest

from kdsr import operations
from kdsr.compile import compile_node, selectors
from kdsr.errors import IntentError
from kdsr.health.effective import effective_intent
from kdsr.intent import load_intent, parse_intent
from kdsr.intent.reload import Reloader
from kdsr.kernel import nft_cache
from kdsr.memories import forget, forgotten_caches, memories

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["l2-web.json", "l2-bgp-ha.json", "l3-ipip.json", "l3-gre-ipvs.json", "l3-ip6tnl.json"]


def edits(doc: dict) -> list[dict]:
    """The same intent, then small edits of it, each a new document."""
    out = [copy.deepcopy(doc)]
    pool = next(iter(doc["pools"]))
    weighted = copy.deepcopy(doc)
    weighted["pools"][pool]["servers"][0]["weight"] = 7
    out.append(weighted)
    if len(doc["pools"][pool]["servers"]) > 1:
        removed = copy.deepcopy(doc)
        del removed["pools"][pool]["servers"][-1]
        out.append(removed)
    # Same ports, another spelling: only the elements' comments (intent
    # pointers) differ, which a memory keyed on equal services would miss.
    respelled = copy.deepcopy(doc)
    for service in respelled["services"].values():
        ports = service["ports"]
        service["ports"] = (
            ports[0] if isinstance(ports, list) and len(ports) == 1 else [ports] if isinstance(ports, int) else ports
        )
    out.append(respelled)
    reseeded = copy.deepcopy(doc)
    for service in reseeded["services"].values():
        if service.get("dsr", {}).get("engine") != "ipvs":  # IPVS mh takes no seed
            service.setdefault("hashing", {})["seed"] = 12345
    out.append(reseeded)
    out.append(copy.deepcopy(doc))  # and back
    return out


def compiled(tmp_path, doc: dict, name: str, node: str, down=frozenset(), drained=frozenset()):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    intent = load_intent(path)
    return compile_node(effective_intent(intent, down, drained).intent, node)


@pytest.mark.parametrize("example", EXAMPLES)
def test_a_compile_after_others_equals_a_compile_from_nothing(tmp_path, example):
    doc = json.loads((ROOT / "examples" / example).read_text())
    node = next(iter(doc["load_balancers"]))
    for i, version in enumerate(edits(doc)):
        warm = compiled(tmp_path, version, f"v{i}", node)
        forget()
        cold = compiled(tmp_path, version, f"v{i}", node)
        assert warm == cold, f"edit {i} of {example}"
        # Element comments are not compared by NftElement equality alone
        # in every model version: compare them explicitly.
        for wt, ct in zip(warm.tables, cold.tables, strict=True):
            for wm, cm in zip(wt.maps, ct.maps, strict=True):
                assert [e.comment for _k, e in wm.elements] == [e.comment for _k, e in cm.elements]
        assert nft_cache.encode_table_text(warm.tables[0]) == nft_cache.encode_table_text(cold.tables[0])


def _module_memories() -> dict[str, object]:
    """Every dict, text memory and lru_cache held at module level in kdsr."""
    found: dict[str, object] = {}
    for module_name, module in list(sys.modules.items()):
        if module_name != "kdsr" and not module_name.startswith("kdsr."):
            continue
        for name, value in vars(module).items():
            if isinstance(value, nft_cache._TextByIdentity):
                value = value._known
            if isinstance(value, dict) or hasattr(value, "cache_info"):
                found[f"{module_name}.{name}"] = value
    return found


def _size(memory) -> int:
    return memory.cache_info().currsize if hasattr(memory, "cache_info") else len(memory)


def test_every_memory_compile_and_planning_fill_is_named(tmp_path):
    """kdsr/memories.py must name every memory, or a cold compile in a test
    or a bench would silently start warm: whatever grows while the examples
    are compiled, planned with a server down and recorded is one."""
    intents = [load_intent(ROOT / "examples" / example) for example in EXAMPLES]
    forget()
    before = {name: _size(memory) for name, memory in _module_memories().items()}
    for intent in intents:
        for node in intent.node_names():
            down = frozenset({(intent.pools[0].name, str(intent.pools[0].members[0].address))})
            effective = effective_intent(intent, down, frozenset())
            desired = compile_node(effective.intent, node, withdraw=operations.unserved_vips(effective))
            for table in desired.tables:
                nft_cache.encode_table_text(table)
    named = {id(memory) for memory in memories()} | {id(memory) for memory in forgotten_caches()}
    grown = [
        name
        for name, memory in _module_memories().items()
        if _size(memory) > before.get(name, 0) and id(memory) not in named
    ]
    assert not grown, f"memories kdsr/memories.py does not name: {grown}"


def test_health_and_drains_after_a_clean_compile(tmp_path):
    doc = json.loads((ROOT / "examples" / "l2-web.json").read_text())
    node = next(iter(doc["load_balancers"]))
    pool = next(iter(doc["pools"]))
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc))
    intent = load_intent(path)
    members = [str(m.address) for m in intent.pool(pool).members]

    def compile_with_withdrawals(down, drained):
        effective = effective_intent(intent, down, drained)
        withdraw = operations.unserved_vips(effective)
        return compile_node(effective.intent, node, withdraw=withdraw), withdraw

    for down, drained in [
        (frozenset(), frozenset()),
        (frozenset({(pool, members[0])}), frozenset()),
        (frozenset(), frozenset({members[0]})),
        (frozenset(), frozenset(members)),  # the whole pool drained: its VIPs unserved
        (frozenset({(pool, members[0])}), frozenset()),
        (frozenset(), frozenset()),
    ]:
        warm = compile_with_withdrawals(down, drained)
        forget()
        cold = compile_with_withdrawals(down, drained)
        assert warm == cold, (down, drained)


def test_a_health_event_rebuilds_only_the_changed_pool(tmp_path):
    """After one server goes down, every other pool's slot map is the one
    already built (the same object): the daemon's cost follows the change."""
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

    def slot_maps(down):
        table = compile_node(effective_intent(intent, down).intent, node).tables[0]
        return {m.name: m for m in table.maps if m.name.startswith("pool-")}

    before = slot_maps(frozenset())
    after = slot_maps(frozenset({(first, member)}))
    changed = {name for name in before if before[name] is not after[name]}
    assert changed == {name for name in before if name.startswith(f"pool-{first}-")}
    assert all(before[n] == after[n] for n in before if n not in changed)
    assert all(before[n] != after[n] for n in changed)


def test_ipvs_services_share_their_pool_s_destinations_and_a_health_event_rebuilds_one_pool(tmp_path):
    """The ipvs engine: services on one pool and port hold one destination
    tuple, kept from compile to compile while the pool is; one server down
    (weight 0) makes a new tuple for its pool only, equal to a cold compile's."""
    doc = json.loads((ROOT / "examples" / "l3-gre-ipvs.json").read_text())
    doc["pools"]["other"] = copy.deepcopy(doc["pools"]["web"])
    doc["services"]["other"] = {**copy.deepcopy(doc["services"]["web"]), "vip": "10.9.0.102", "pool": "other"}
    doc["services"]["other2"] = {**copy.deepcopy(doc["services"]["web"]), "vip": "10.9.0.103", "pool": "other"}
    path = tmp_path / "i.json"
    path.write_text(json.dumps(doc))
    intent = load_intent(path)
    member = str(intent.pool("web").members[0].address)

    def services(down):
        return {s.ident: s for s in compile_node(effective_intent(intent, down).intent, "lb1").ipvs}

    before = services(frozenset())
    again = services(frozenset())
    after = services(frozenset({("web", member)}))
    forget()
    cold = services(frozenset({("web", member)}))
    on_other = [i for i in before if i.startswith("tcp 10.9.0.10") and ("102:" in i or "103:" in i)]
    assert len(on_other) == 4
    assert before["tcp 10.9.0.102:80"].dests is before["tcp 10.9.0.103:80"].dests
    assert all(again[i].dests is before[i].dests for i in before)
    assert all(after[i].dests is before[i].dests for i in on_other)
    changed = [i for i in before if after[i].dests is not before[i].dests]
    assert changed and all(i not in on_other for i in changed)
    assert all({d.address: d.weight for d in after[i].dests}[member] == 0 for i in changed)
    assert after == cold


def test_nothing_down_or_drained_is_the_intent_itself(example_path):
    intent = load_intent(example_path)
    effective = effective_intent(intent)
    assert effective.intent is intent
    assert set(effective.pools.values()) == {"ok"}
    assert all(out == () for out in effective.out.values())


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


def edit_for_compile(doc: dict, rng: random.Random) -> None:
    """One edit that changes what compile groups or sizes (most of them valid)."""
    name = rng.choice(sorted(doc["services"]))
    service = doc["services"][name]
    pool = doc["pools"][rng.choice(sorted(doc["pools"]))]
    kind = rng.randrange(9)
    if kind == 0:
        service["pool"] = rng.choice(sorted(doc["pools"]))
    elif kind == 1:
        service["hashing"] = rng.choice(
            [{}, {"seed": 7}, {"fields": "five-tuple"}, {"table_size": 4093}, {"table_size": 251}]
        )
    elif kind == 2:
        service["dsr"] = rng.choice([{}, {"engine": "ipvs"}, {"mode": "l3-gre"}])
    elif kind == 3:
        del doc["services"][name]
    elif kind == 4:
        doc["services"][f"n{rng.randrange(10**6)}"] = dict(service, vip=f"10.20.2.{rng.randrange(250)}")
    elif kind == 5:
        pool["servers"].append({"address": f"10.30.{rng.randrange(250)}.{rng.randrange(1, 250)}"})
    elif kind == 6 and len(pool["servers"]) > 1:
        pool["servers"].pop(rng.randrange(len(pool["servers"])))
    elif kind == 7:
        rng.choice(pool["servers"])["weight"] = rng.randrange(0, 4)
    else:  # the same service moved to the end: same entries, other order
        doc["services"][name] = doc["services"].pop(name)


@pytest.mark.parametrize("seed", range(6))
def test_reloaded_edits_compile_as_from_nothing(seed):
    """A reload keeps the unchanged services as the same objects, which is
    what the selector and service-map memories key on: every compile after
    a chain of reloads equals a compile from nothing, and so do selectors
    sized under a budget small enough to shrink tables."""
    rng = random.Random(seed)
    current = reloaded_base()
    reloader = Reloader()
    reloader.parse(json.dumps(current), "intent.json")
    accepted = 0
    for step in range(20):
        edited = copy.deepcopy(current)
        for _ in range(rng.choice([1, 1, 2])):
            edit_for_compile(edited, rng)
        text = json.dumps(edited)
        try:
            intent = reloader.parse(text, "intent.json")
        except IntentError:
            continue
        current, accepted = edited, accepted + 1
        warm = compile_node(intent, "lb1"), selectors.selectors_for(intent, budget=20_000)
        saved = [dict(memory) for memory in memories()]
        forget()
        cold_intent = parse_intent(text, "intent.json")
        cold = compile_node(cold_intent, "lb1"), selectors.selectors_for(cold_intent, budget=20_000)
        assert warm == cold, f"seed {seed}, step {step}"
        assert [s.name for s in warm[1]] == [s.name for s in cold[1]]
        assert [s.sized_by for s in warm[1]] == [s.sized_by for s in cold[1]]
        for wt, ct in zip(warm[0].tables, cold[0].tables, strict=True):
            assert nft_cache.encode_table_text(wt) == nft_cache.encode_table_text(ct)
        for memory, kept in zip(memories(), saved, strict=True):  # as if the cold compile never ran
            memory.clear()
            memory.update(kept)
    assert accepted >= 12, accepted
