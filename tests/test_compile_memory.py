"""Compile remembers work between calls (selectors and service maps per
intent, chains per selector, Maglev tables, slot elements, formatted
addresses) so that the daemon's recompile after one change is cheap.  What
it remembers must never show: every compile equals a compile from nothing,
whatever was compiled before it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from kdsr import maglev, operations
from kdsr.compile import compile_node, lb_nft_l2, selectors
from kdsr.health.effective import effective_intent
from kdsr.intent import load_intent, model
from kdsr.intent.model import address_text
from kdsr.kernel import nft_cache

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["l2-web.json", "l2-bgp-ha.json", "l3-ipip.json", "l3-gre-ipvs.json", "l3-ip6tnl.json"]


def forget_everything() -> None:
    selectors._LAST_SELECTORS.clear()
    lb_nft_l2._LAST_SERVICE_MAPS.clear()
    lb_nft_l2._LAST_SELECTOR_MAPS.clear()
    operations._LAST_UNSERVED.clear()
    model._LAST_BY_POOL.clear()
    lb_nft_l2._CHAINS.clear()
    lb_nft_l2._SLOT_ELEMENTS.clear()
    maglev._BUILT.clear()
    address_text.cache_clear()
    nft_cache._ENCODED.clear()
    nft_cache._MAP_TEXT.clear()


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
        forget_everything()
        cold = compiled(tmp_path, version, f"v{i}", node)
        assert warm == cold, f"edit {i} of {example}"
        # Element comments are not compared by NftElement equality alone
        # in every model version: compare them explicitly.
        for wt, ct in zip(warm.tables, cold.tables, strict=True):
            for wm, cm in zip(wt.maps, ct.maps, strict=True):
                assert [e.comment for _k, e in wm.elements] == [e.comment for _k, e in cm.elements]
        assert nft_cache.encode_table_text(warm.tables[0]) == nft_cache.encode_table_text(cold.tables[0])


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
        forget_everything()
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


def test_nothing_down_or_drained_is_the_intent_itself(example_path):
    intent = load_intent(example_path)
    effective = effective_intent(intent)
    assert effective.intent is intent
    assert set(effective.pools.values()) == {"ok"}
    assert all(out == () for out in effective.out.values())
