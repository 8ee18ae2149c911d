"""Changing one server touches only the slots whose server changed, in one transaction.

Against the validating fake kernel: every batch apply sends is recorded, and
the elements it deletes and adds are counted and compared with the slots
that differ between the old and the new Maglev table, computed independently
from kdsr.maglev.
"""

from __future__ import annotations

import copy
import json

import pytest

from kdsr import maglev, operations
from kdsr.compile.lb_nft_l2 import servers_map_name
from kdsr.compile.selectors import selectors_for
from kdsr.intent import parse_intent
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore
from kdsr.service_view import table_slots

SIZE = 401  # set in the intent: these tests do not depend on the default ladder
BASE = {
    "version": 1,
    "services": {
        "web": {"vip": "10.10.0.100", "ports": [80, 443], "pool": "web", "hashing": {"table_size": SIZE, "seed": 5}},
    },
    "pools": {"web": {"servers": [{"address": f"10.10.0.{11 + i}"} for i in range(4)]}},
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24"]}},
}


def remove_last(doc):
    doc["pools"]["web"]["servers"].pop()


def add_one(doc):
    doc["pools"]["web"]["servers"].append({"address": "10.10.0.15"})


def heavier(doc):
    doc["pools"]["web"]["servers"][1]["weight"] = 3


def drain(doc):
    doc["pools"]["web"]["servers"][2]["weight"] = 0


def replace_one(doc):
    doc["pools"]["web"]["servers"][0] = {"address": "10.10.0.99"}


def pinned(doc):
    doc["services"]["web"]["hashing"]["flow_pinning"] = {"timeout": 30}


def intent(*edits):
    doc = copy.deepcopy(BASE)
    for edit in edits:
        edit(doc)
    return parse_intent(json.dumps(doc), "incremental.json")


class RecordingKernel(FakeKernel):
    """The fake, remembering every batch it committed (check-only runs are not commits)."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: list[list[dict]] = []
        commit = self.nft.apply

        def apply(commands, check_only=False, becomes=None):
            proved = commit(commands, check_only, becomes)
            if not check_only:
                self.committed.append(commands)
            return proved

        self.nft.apply = apply


def element_keys(batch: list[dict], verb: str, map_name: str) -> list:
    keys = []
    for cmd in batch:
        obj = cmd.get(verb, {}).get("element")
        if obj and obj["name"] == map_name:
            for item in obj["elem"]:
                key = item[0] if isinstance(item, list) else item
                keys.append(key["elem"]["val"] if isinstance(key, dict) else key)
    return keys


def apply(it, kernel, store):
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)


@pytest.mark.parametrize("change", [remove_last, add_one, heavier, drain, replace_one])
def test_one_server_change_rewrites_exactly_the_moved_slots(change, tmp_path):
    kernel, store = RecordingKernel(), StateStore(tmp_path)
    before = intent()
    apply(before, kernel, store)
    kernel.committed.clear()

    after = intent(change)
    apply(after, kernel, store)

    (old_sel,), (new_sel,) = selectors_for(before), selectors_for(after)
    assert old_sel.name == new_sel.name  # same table size and seed: same map, element diff only
    old, new = old_sel.table(), new_sel.table()
    moved = {slot for slot in range(SIZE) if old[slot] != new[slot]}
    assert 0 < len(moved) < SIZE // 2

    assert len(kernel.committed) == 1, "more than one transaction"
    (batch,) = kernel.committed
    # Element changes only: slots, and the servers-map elements of servers
    # that joined or left the pool (their counters come and go with them);
    # the others' elements, and so their counters, are not touched.
    members_before = {int(m.address) for m in old_sel.members}
    members_after = {int(m.address) for m in new_sel.members}
    servers = servers_map_name("web", 4)
    assert chain_names(batch) == set()
    assert {verb for cmd in batch for verb in cmd} <= {"add", "delete"}
    assert {kind for cmd in batch for body in cmd.values() for kind in body} == {"element"}
    assert sorted(element_keys(batch, "add", servers)) == sorted(members_after - members_before)
    assert sorted(element_keys(batch, "delete", servers)) == sorted(members_before - members_after)
    deleted = element_keys(batch, "delete", new_sel.name)
    added = element_keys(batch, "add", new_sel.name)
    # nft cannot update an element in place: each moved slot is deleted and re-added.
    assert sorted(deleted) == sorted(added) == sorted(moved)
    slot_elements = [
        len(cmd[verb]["element"]["elem"])
        for cmd in batch
        for verb in cmd
        if "element" in cmd[verb] and cmd[verb]["element"]["name"] == new_sel.name
    ]
    assert sum(slot_elements) == 2 * len(moved)
    # And the kernel now holds the new table.
    table = kernel.nft.read_table("netdev", "kdsr")
    assert table_slots(table)[new_sel.name] == list(new)


def chain_names(batch: list[dict]) -> set[str]:
    """The chains a batch adds, flushes, deletes or adds rules to."""
    names = set()
    for cmd in batch:
        for body in cmd.values():
            if "chain" in body:
                names.add(body["chain"]["name"])
            if "rule" in body:
                names.add(body["rule"]["chain"])
    return names


@pytest.mark.parametrize("size", [4093, 65537])
def test_removal_moves_the_removed_servers_slots_and_at_most_1pp_more(size):
    # At 100 slots per server Maglev moves 1-3% beyond the removed server's
    # own slots (bench/maglev.py measures it); with ~1000 per server, as the
    # lab uses, it stays within the 1 percentage point.
    servers = [maglev.Backend(f"10.10.0.{11 + i}") for i in range(4)]
    old = maglev.build(servers, size, 0x6B647372)
    new = maglev.build(servers[:-1], size, 0x6B647372)
    gone = servers[-1].key
    assert gone not in new
    others_moved = sum(1 for a, b in zip(old, new, strict=True) if a != b and a != gone)
    assert others_moved / size <= 0.01


def test_pinned_pool_change_also_touches_only_moved_slots_plus_the_server_list(tmp_path):
    kernel, store = RecordingKernel(), StateStore(tmp_path)
    apply(intent(pinned), kernel, store)
    kernel.committed.clear()
    apply(intent(pinned, add_one), kernel, store)

    (old_sel,), (new_sel,) = selectors_for(intent(pinned)), selectors_for(intent(pinned, add_one))
    moved = {s for s, (a, b) in enumerate(zip(old_sel.table(), new_sel.table(), strict=True)) if a != b}
    (batch,) = kernel.committed
    # The new server's element (its counter) and slot elements; nothing else.
    assert chain_names(batch) == set()
    assert sorted(element_keys(batch, "delete", new_sel.name)) == sorted(moved)
    assert sorted(element_keys(batch, "add", new_sel.name)) == sorted(moved)
    servers = servers_map_name("web", 4)
    assert element_keys(batch, "add", servers) == [int.from_bytes(bytes([10, 10, 0, 15]), "big")]
    assert element_keys(batch, "delete", servers) == []
