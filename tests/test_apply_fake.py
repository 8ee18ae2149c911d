"""Apply against the validating fake kernel: idempotence, minimal changes,
transitions, rollback at every step, ownership."""

import pytest
from intent_docs import IntentDocs

from kdsr import operations
from kdsr.compile import CompileCache
from kdsr.errors import ApplyError, LockedError
from kdsr.kernel import KernelError
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore
from kdsr.model import Address
from kdsr.plan_format import render_json

BASE = {
    "version": 1,
    "services": {
        "web": {"vip": "10.10.0.100", "ports": [80, 443], "protocols": "tcp", "pool": "web"},
        "dns": {"vip": "10.10.0.100", "ports": 53, "protocols": "both", "pool": "web"},
        "web6": {"vip": "fd00:10::100", "ports": 80, "pool": "web6"},
    },
    "pools": {
        "web": {"servers": [{"node": "s1"}, {"node": "s2"}, {"node": "s3"}]},
        "web6": {"servers": [{"address": "fd00:10::11"}, {"address": "fd00:10::12"}]},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24", "fd00:10::2/64"]}},
    "servers": {
        "s1": {"interface": "eth0", "addresses": ["10.10.0.11/24"]},
        "s2": {"interface": "eth0", "addresses": ["10.10.0.12/24"]},
        "s3": {"interface": "eth0", "addresses": ["10.10.0.13/24"]},
    },
}

SYSCTL_KEYS = [f"net/ipv4/conf/{s}/{n}" for s in ("all", "eth0") for n in ("arp_ignore", "arp_announce")]


intent = IntentDocs(BASE, "test.json").intent


@pytest.fixture
def kernel():
    k = FakeKernel()
    k.sysctl.values.update({key: "0" for key in SYSCTL_KEYS})
    return k


def run(it, node, kernel, store):
    prepared = operations.prepare(it, node, kernel, store)
    operations.apply(prepared, kernel, store)
    return prepared.plan


def snapshot(kernel):
    return (
        {k: kernel.nft.read_table(*k) for k in kernel.nft.list_tables()},
        {i: sorted(a.cidr for a in addrs) for i, addrs in kernel.links.addresses.items()},
        dict(kernel.sysctl.values),
    )


@pytest.mark.parametrize("node", ["lb1", "s1"])
def test_second_apply_makes_zero_writes(kernel, store, node):
    run(intent(), node, kernel, store)
    writes = kernel.writes
    plan = run(intent(), node, kernel, store)
    assert plan.empty
    assert kernel.writes == writes


def test_first_lb_apply_is_one_transaction(kernel, store):
    run(intent(), "lb1", kernel, store)
    assert kernel.ops == ["nft transaction (21 commands)"] or kernel.writes == 1


def test_weight_change_touches_only_moved_slots(kernel, store):
    run(intent(), "lb1", kernel, store)

    def heavier(doc):
        doc["pools"]["web"]["servers"][0]["weight"] = 2

    prepared = operations.prepare(intent(heavier), "lb1", kernel, store)
    kinds = {c.kind for c in prepared.plan.changes}
    assert kinds == {"nft element"}, prepared.plan.changes[:3]
    changed = len(prepared.plan.changes)
    assert 0 < changed < 4093 // 2  # the default table of a 3-server pool
    assert all(c.action == "update" for c in prepared.plan.changes)
    writes = kernel.writes
    operations.apply(prepared, kernel, store)
    assert kernel.writes == writes + 1  # one transaction


def test_transitions_equal_fresh_apply(store, tmp_path):
    def remove_s3(doc):
        doc["pools"]["web"]["servers"].pop()

    def new_service(doc):
        doc["services"]["media"] = {
            "vip": "10.10.0.101",
            "ports": "5000-5010",
            "protocols": "udp",
            "pool": "web",
            "hashing": {"fields": "source-ip", "seed": 5},
        }

    states = [intent(), intent(remove_s3), intent(new_service), intent()]
    walker = FakeKernel()
    for i, it in enumerate(states):
        run(it, "lb1", walker, store)
        fresh = FakeKernel()
        run(it, "lb1", fresh, StateStore(tmp_path / f"fresh{i}"))
        assert snapshot(walker) == snapshot(fresh), f"step {i}"


def test_destroy_removes_exactly_what_kdsr_owns(kernel, store):
    kernel.links.addresses["lo"].append(Address("lo", "127.0.0.1/8"))
    kernel.links.addresses["lo"].append(Address("lo", "192.0.2.1/32", "lo:mine"))
    kernel.sysctl.values["net/ipv4/conf/eth0/arp_ignore"] = "2"  # foreign value, higher than ours
    before = snapshot(kernel)
    run(intent(), "s1", kernel, store)
    assert "10.10.0.100/32" in [a.cidr for a in kernel.links.addresses["lo"]]
    assert kernel.sysctl.values["net/ipv4/conf/all/arp_ignore"] == "1"
    destroy = operations.prepare_destroy("s1", kernel, store)
    operations.apply(destroy, kernel, store)
    assert snapshot(kernel) == before
    assert store.nodes() == []


def test_foreign_address_equal_to_vip_is_neither_claimed_nor_removed(kernel, store):
    kernel.links.addresses["lo"].append(Address("lo", "10.10.0.100/32"))
    plan = run(intent(), "s1", kernel, store)
    assert not [c for c in plan.changes if c.kind == "address"]
    operations.apply(operations.prepare_destroy("s1", kernel, store), kernel, store)
    assert [a.cidr for a in kernel.links.addresses["lo"]] == ["10.10.0.100/32"]


def test_fault_at_every_step_rolls_back(kernel, store):
    it = intent()
    before = snapshot(kernel)
    steps = len(operations.prepare(it, "s1", kernel, store).plan.changes)
    assert steps >= 5
    for k in range(1, steps + 1):
        kernel.fail_at = kernel.writes + k
        with pytest.raises(ApplyError) as info:
            run(it, "s1", kernel, store)
        assert info.value.rolled_back, k
        kernel.fail_at = None
        assert snapshot(kernel) == before, f"fault at write {k} left changes behind"
    # And the next apply converges.
    run(it, "s1", kernel, store)
    assert operations.prepare(it, "s1", kernel, store).plan.empty


def test_failed_rollback_is_reported_and_next_apply_converges(kernel, store):
    it = intent()
    # Fail the 3rd write, and the undo that follows (the 4th write).
    original = kernel.log.write
    failures = {3, 4}
    count = {"n": 0}

    def flaky(what):
        count["n"] += 1
        if count["n"] in failures:
            raise KernelError(f"{what}: ENOMEM (injected)")
        original(what)

    kernel.log.write = flaky
    with pytest.raises(ApplyError) as info:
        run(it, "s1", kernel, store)
    assert not info.value.rolled_back
    assert "rolling back also failed" in str(info.value)
    kernel.log.write = original
    run(it, "s1", kernel, store)
    assert operations.prepare(it, "s1", kernel, store).plan.empty


def test_rejected_nft_transaction_changes_nothing(kernel, store):
    run(intent(), "lb1", kernel, store)
    before = snapshot(kernel)
    writes = kernel.writes

    real = kernel.nft.apply

    def reject(commands, check_only=False, becomes=None):
        raise KernelError("Error: Could not process rule: Invalid argument")

    kernel.nft.apply = reject
    with pytest.raises(ApplyError) as info:
        run(intent(lambda d: d["pools"]["web"]["servers"].pop()), "lb1", kernel, store)
    assert "nothing was changed" in str(info.value)
    kernel.nft.apply = real
    assert snapshot(kernel) == before and kernel.writes == writes


def test_server_plan_never_touches_lb_table(kernel, store):
    run(intent(), "lb1", kernel, store)
    plan = operations.prepare(intent(), "s1", kernel, StateStore(store.directory / "other")).plan
    assert not [c for c in plan.changes if c.kind.startswith("nft")]


def test_node_selection(kernel, store):
    from kdsr.errors import UsageError

    with pytest.raises(UsageError, match="no node"):
        operations.select_node(intent(), None, kernel)
    kernel.links.local = {"10.10.0.12"}
    assert operations.select_node(intent(), None, kernel) == "s2"
    with pytest.raises(UsageError, match="not in the intent"):
        operations.select_node(intent(), "nope", kernel)


def test_lock_refuses_second_holder(store):
    with store.lock():
        with pytest.raises(LockedError, match="pid"):
            with store.lock(wait_seconds=0.2):
                pass


def test_destroy_of_another_node_leaves_the_lb_table(kernel, store):
    run(intent(), "lb1", kernel, store)
    plan = operations.prepare_destroy("s1", kernel, store).plan
    assert plan.empty
    # With the state directory gone, the orphan table is destroy's to remove.
    orphan_store = StateStore(store.directory / "lost")
    plan = operations.prepare_destroy("lb1", kernel, orphan_store).plan
    assert [c.kind for c in plan.changes] == ["nft table"]


def test_records_of_vanished_objects_are_forgotten_not_reused(kernel, store):
    run(intent(), "s1", kernel, store)
    # Someone removes our v4 VIP and the uplink's sysctls vanish with eth0.
    kernel.links.addresses["lo"] = [a for a in kernel.links.addresses["lo"] if a.cidr != "10.10.0.100/32"]
    for key in [k for k in kernel.sysctl.values if "/eth0/" in k]:
        del kernel.sysctl.values[key]
    destroy = operations.prepare_destroy("s1", kernel, store)
    forgotten = {c.ident for c in destroy.plan.changes if c.reason == "forget"}
    assert "lo 10.10.0.100/32" in forgotten
    assert "net.ipv4.conf.eth0.arp_ignore" in forgotten
    operations.apply(destroy, kernel, store)
    assert store.nodes() == []
    # An address added later with the VIP's value is not ours.
    kernel.links.addresses["lo"].append(Address("lo", "10.10.0.100/32"))
    assert operations.prepare_destroy("s1", kernel, store).plan.empty


def test_sysctl_changed_after_kdsr_is_left_alone(kernel, store):
    run(intent(), "s1", kernel, store)
    kernel.sysctl.values["net/ipv4/conf/all/arp_announce"] = "1"  # an admin's later choice
    operations.apply(operations.prepare_destroy("s1", kernel, store), kernel, store)
    assert kernel.sysctl.values["net/ipv4/conf/all/arp_announce"] == "1"
    assert kernel.sysctl.values["net/ipv4/conf/all/arp_ignore"] == "0"  # ours: restored


def test_stricter_arp_setting_is_not_lowered(kernel, store):
    kernel.sysctl.values["net/ipv4/conf/eth0/arp_ignore"] = "2"
    plan = run(intent(), "s1", kernel, store)
    assert "net.ipv4.conf.eth0.arp_ignore" not in {c.ident for c in plan.changes}
    assert kernel.sysctl.values["net/ipv4/conf/eth0/arp_ignore"] == "2"


def test_rollback_restores_records(kernel, store):
    it = intent()
    kernel.fail_at = kernel.writes + 5  # the address, after the four sysctls
    with pytest.raises(ApplyError):
        run(it, "s1", kernel, store)
    assert store.nodes() == []  # nothing claimed


def six_vips(doc):
    for i in range(5):
        doc["services"][f"extra{i}"] = {"vip": f"10.10.0.{120 + i}", "ports": 80, "pool": "web"}


def test_a_server_s_vips_are_one_step_and_a_fault_part_way_takes_back_what_it_added(kernel, store):
    """Six VIPs on lo are one journaled step (one record, one saved state):
    a fault at any of its writes, or at the write after it, leaves the host
    and the records as they were; destroy the same way."""
    it = intent(six_vips)
    before = snapshot(kernel)
    prepared = operations.prepare(it, "s1", kernel, store)
    writes = len(prepared.plan.changes)
    assert len([c for c in prepared.plan.changes if c.kind == "address"]) == 6
    for k in range(1, writes + 1):
        kernel.fail_at = kernel.writes + k
        with pytest.raises(ApplyError) as info:
            run(it, "s1", kernel, store)
        assert info.value.rolled_back, k
        assert snapshot(kernel) == before, f"fault at write {k} left changes behind"
        assert store.nodes() == [], f"fault at write {k} left records behind"
    result = operations.apply(operations.prepare(it, "s1", kernel, store), kernel, store)
    assert "add 6 addresses (10.10.0.100/32 to lo and 5 more)" in result.steps
    assert not [s for s in result.steps if s.startswith("add address")]
    applied = snapshot(kernel)
    assert len([a for a in kernel.links.addresses["lo"] if a.cidr.startswith("10.10.0.1")]) == 6
    for k in range(1, 7):  # each of the six deletes
        kernel.fail_at = kernel.writes + k
        with pytest.raises(ApplyError) as info:
            operations.apply(operations.prepare_destroy("s1", kernel, store), kernel, store)
        assert info.value.rolled_back, k
        assert snapshot(kernel) == applied, f"fault at delete {k} left changes behind"
        assert operations.prepare(it, "s1", kernel, store).plan.empty
    operations.apply(operations.prepare_destroy("s1", kernel, store), kernel, store)
    assert snapshot(kernel) == before and store.nodes() == []


def many_vips(doc):
    for i in range(600):
        doc["services"][f"many{i}"] = {"vip": f"10.20.{i // 250}.{i % 250 + 1}", "ports": 80, "pool": "web"}


def test_a_server_s_vips_go_to_the_kernel_in_batches_and_a_refusal_in_one_takes_back_all(kernel, store):
    """601 VIPs on lo: the first alone (a crash after it stays a point the
    safety lab reaches), then ADDRESS_BATCH to a kernel call.  A refusal
    inside the third call (the kernel goes on past it, as netlink does)
    takes back every address the step added, those after it included."""
    from kdsr.apply import ADDRESS_BATCH

    it = intent(many_vips)
    before = snapshot(kernel)
    calls = []
    write = kernel.links.addr_write

    def counted(add, addrs, done):
        calls.append((add, len(addrs)))
        write(add, addrs, done)

    kernel.links.addr_write = counted
    kernel.fail_at = kernel.writes + 4 + 1 + ADDRESS_BATCH + 10  # after the sysctls: the 10th of the third call
    with pytest.raises(ApplyError) as info:
        run(it, "s1", kernel, store)
    assert info.value.rolled_back
    assert "EBUSY (injected)" in str(info.value)
    assert snapshot(kernel) == before and store.nodes() == []
    # The rollback deletes what landed in one call, last first.
    assert calls[:3] == [(True, 1), (True, ADDRESS_BATCH), (True, ADDRESS_BATCH)]
    assert calls[3] == (False, 1 + 2 * ADDRESS_BATCH - 1)
    calls.clear()
    run(it, "s1", kernel, store)
    assert calls == [(True, 1), (True, ADDRESS_BATCH), (True, ADDRESS_BATCH), (True, 601 - 1 - 2 * ADDRESS_BATCH)]
    assert len(kernel.links.addresses["lo"]) == 601
    assert operations.prepare(it, "s1", kernel, store).plan.empty


def test_a_kept_compile_cache_plans_what_a_fresh_compile_plans(kernel, store):
    """The daemon's path: one CompileCache through edits, health events and
    drains.  Each step's plan with it is the plan without it (the same
    kernel, the same records), and applying it leaves nothing to do: the
    next plan is empty and makes zero writes."""

    def remove_s3(doc):
        doc["pools"]["web"]["servers"].pop()

    def heavier(doc):
        doc["pools"]["web"]["servers"][0]["weight"] = 3

    cache = CompileCache()
    down = frozenset({("web", "10.10.0.12")})
    steps = [
        (intent(), frozenset(), None),
        (intent(), down, None),
        (intent(heavier), down, None),
        (intent(heavier), frozenset(), frozenset({"s1"})),
        (intent(remove_s3), frozenset(), None),
        (intent(), frozenset(), None),
    ]
    for i, (it, now_down, drained) in enumerate(steps):
        kept = operations.prepare(it, "lb1", kernel, store, down=now_down, drained=drained, cache=cache)
        fresh = operations.prepare(it, "lb1", kernel, store, down=now_down, drained=drained)
        assert render_json(kept.plan, "test.json") == render_json(fresh.plan, "test.json"), f"step {i}"
        assert kept.desired == fresh.desired
        operations.apply(kept, kernel, store)
        writes = kernel.writes
        again = operations.prepare(it, "lb1", kernel, store, down=now_down, drained=drained, cache=cache)
        assert again.plan.empty, f"step {i}: {again.plan.changes[:3]}"
        assert kernel.writes == writes
