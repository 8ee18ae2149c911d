"""IPVS writes in batches (Ipvs.batch, one ``ipvsadm -R``): the
restore text, failures mid-batch (stopping there, or running on past the
refused line as ipvsadm 1.31 does) rolled back to the old state, and an
apply that lists the kernel's IPVS table at most twice (the plan's read and
the read-back) however many services it touches; once, when the read-back
lists only the few services it wrote."""

import copy
import json

import pytest

from kdsr import operations
from kdsr.errors import ApplyError
from kdsr.intent import parse_intent
from kdsr.kernel import KernelError
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.ipvsadm import IpvsCommand, Listing, first_not_landed, restore_text
from kdsr.kernel.state import StateStore
from kdsr.model import IpvsDest, IpvsService

SVC = IpvsService(4, "tcp", "10.9.0.1", 80, 0, "mh", ("mh-port",))
D1 = IpvsDest("10.3.0.1", 80, 1, "route")
D2 = IpvsDest("10.3.0.2", 80, 1, "tunnel", "gre")


def intent(vips: int, servers: int = 4, weight_of_first: int = 1, drop_second: bool = False):
    """``vips`` VIPs x ports 80 and 443 on the ipvs engine, over vips/10 pools."""
    pools = max(1, vips // 10)
    doc = {
        "version": 1,
        "services": {},
        "pools": {},
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.200.0.2/16"]}},
        "servers": {f"s{n}": {"interface": "eth0", "addresses": [f"10.200.1.{1 + n}/16"]} for n in range(16)},
    }
    for p in range(pools):
        members = [{"node": f"s{(p * 3 + k) % 16}"} for k in range(servers)]
        doc["pools"][f"p{p}"] = {"servers": members}
    doc["pools"]["p0"]["servers"][0]["weight"] = weight_of_first
    if drop_second:
        del doc["pools"]["p0"]["servers"][1]
    for v in range(vips):
        doc["services"][f"v{v}"] = {
            "vip": f"10.100.{v // 256}.{v % 256}",
            "ports": [80, 443],
            "protocols": "tcp",
            "pool": f"p{v % pools}",
            "dsr": {"mode": "l2", "engine": "ipvs"},
        }
    return parse_intent(json.dumps(doc), "bench.json")


LB_SYSCTLS = ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] + [
    f"net/ipv4/vs/{k}" for k in ("expire_nodest_conn", "sloppy_tcp", "schedule_icmp")
]


def new_kernel(runs_on: bool = False) -> FakeKernel:
    kernel = FakeKernel()
    kernel.sysctl.values.update({key: "0" for key in LB_SYSCTLS})
    kernel.ipvs.batch_runs_on = runs_on
    return kernel


def apply(it, kernel, store):
    prepared = operations.prepare(it, "lb1", kernel, store)
    operations.apply(prepared, kernel, store)
    return prepared.plan


# ---------------------------------------------------------------- the pieces


def test_restore_text_is_the_command_line_words_one_line_each():
    commands = [IpvsCommand("-A", SVC), IpvsCommand("-a", SVC, D2), IpvsCommand("-d", SVC, D1)]
    assert restore_text(commands).splitlines() == [
        "-A -t 10.9.0.1:80 -s mh -b mh-port",
        "-a -t 10.9.0.1:80 -r 10.3.0.2:80 -i -w 1 --tun-type gre",
        "-d -t 10.9.0.1:80 -r 10.3.0.1:80",
    ]
    assert str(commands[2]) == "ipvsadm -d -t 10.9.0.1:80 -r 10.3.0.1:80"


@pytest.mark.parametrize("scheduler", ["mh x", "mh\tx", "mh\nx", "'mh'", 'm"h', "mh\\", "mh#", "", "mh\u2003x"])
def test_restore_text_refuses_a_word_that_would_split_quote_or_vanish(scheduler):
    bad = IpvsService(4, "tcp", "10.9.0.1", 80, 0, scheduler, ())
    with pytest.raises(ValueError):
        restore_text([IpvsCommand("-A", SVC), IpvsCommand("-A", bad)])


def test_first_not_landed_judges_the_last_command_on_each_object():
    kernel_now = {SVC.ident: IpvsService(4, "tcp", "10.9.0.1", 80, 0, "mh", ("mh-port",), (D1,))}
    # D1 deleted then re-added: the delete is not judged, the re-add landed.
    commands = [IpvsCommand("-d", SVC, D1), IpvsCommand("-a", SVC, D1), IpvsCommand("-a", SVC, D2)]
    assert first_not_landed(commands, kernel_now) == commands[2]
    assert first_not_landed(commands[:2], kernel_now) is None


def test_listing_lists_once_until_forgotten():
    kernel = FakeKernel()
    listing = Listing(kernel.ipvs.list_all)
    assert listing.get(SVC.ident) is None and listing.get("other") is None
    listing.put(SVC.ident, SVC)
    assert listing.get(SVC.ident) == SVC and kernel.ipvs.lists == 1
    listing.forget()
    assert listing.get(SVC.ident) is None and kernel.ipvs.lists == 2


def test_listing_starts_from_what_the_plan_saw():
    kernel = FakeKernel()
    kernel.ipvs.services[SVC.ident] = SVC
    listing = Listing(kernel.ipvs.list_all, seen={SVC.ident: None, "planned": None})
    # Inside what the plan saw: no listing (even where the kernel now differs).
    assert listing.get(SVC.ident) is None and listing.get("planned") is None
    listing.put("planned", SVC)
    assert listing.get("planned") == SVC and kernel.ipvs.lists == 0
    # Outside it: the kernel is listed.
    assert listing.get("elsewhere") is None and kernel.ipvs.lists == 1
    assert listing.get(SVC.ident) == SVC


def test_a_listing_forgets_what_the_plan_saw_after_a_failure():
    kernel = FakeKernel()
    kernel.ipvs.services[SVC.ident] = SVC
    listing = Listing(kernel.ipvs.list_all, seen={SVC.ident: None})
    listing.forget()
    assert listing.get(SVC.ident) == SVC and kernel.ipvs.lists == 1


@pytest.mark.parametrize("runs_on", [False, True])
def test_fake_batch_names_the_refused_line_and_stops_or_runs_on(runs_on):
    kernel = FakeKernel()
    kernel.ipvs.batch_runs_on = runs_on
    commands = [
        IpvsCommand("-A", SVC),
        IpvsCommand("-a", SVC, D1),
        IpvsCommand("-a", SVC, D1),  # refused: already there
        IpvsCommand("-a", SVC, D2),
    ]
    with pytest.raises(KernelError, match=r"line 3 of 4: ipvsadm -a -t 10.9.0.1:80 -r 10.3.0.1:80 .*already exists"):
        kernel.ipvs.batch(commands)
    expected = (D2, D1) if runs_on else (D1,)
    assert kernel.ipvs.services[SVC.ident].dests == expected


# ---------------------------------------------------------------- in an apply


@pytest.mark.parametrize("runs_on", [False, True])
def test_a_batch_failing_mid_way_rolls_the_apply_back(store, runs_on):
    """Every write of a change that edits, drops and adds destinations (and a
    nftables/sysctl part around it) fails once in turn: the kernel is the
    old one afterwards, destination order included, and the next apply
    converges."""
    base = intent(2)
    changed = intent(2, servers=5, weight_of_first=3, drop_second=True)
    reference = new_kernel()
    apply(base, reference, StateStore(store.directory.parent / "ref"))
    writes_before = reference.writes
    apply(changed, reference, StateStore(store.directory.parent / "ref"))
    total = reference.writes - writes_before
    assert total > 10
    for k in range(1, total + 1):
        kernel = new_kernel(runs_on)
        k_store = StateStore(store.directory.parent / f"s{k}-{runs_on}")
        apply(base, kernel, k_store)
        old = copy.deepcopy(kernel.ipvs.services)
        kernel.fail_at = kernel.writes + k
        with pytest.raises(ApplyError) as caught:
            apply(changed, kernel, k_store)
        assert caught.value.rolled_back, caught.value
        assert kernel.ipvs.services == old, f"write {k}: {caught.value}"
        apply(changed, kernel, k_store)
        assert kernel.ipvs.services == reference.ipvs.services


def test_a_failed_create_batch_leaves_no_service_and_no_record(store):
    it = intent(10)
    reference = new_kernel()
    apply(it, reference, StateStore(store.directory.parent / "ref"))
    first_ipvs = next(i for i, op in enumerate(reference.ops) if op.startswith("ipvs"))
    kernel = new_kernel(runs_on=True)
    kernel.fail_at = first_ipvs + 5  # inside the batch that creates the services
    with pytest.raises(ApplyError, match="ipvsadm -R failed at line"):
        apply(it, kernel, store)
    assert kernel.ipvs.services == {}
    assert store.load("lb1").ipvs == set()
    apply(it, kernel, store)
    assert len(kernel.ipvs.services) == 20


def test_many_services_apply_with_a_constant_number_of_listings(store):
    kernel = new_kernel()
    it = intent(300)  # 600 services x 4 destinations
    lists, batches = kernel.ipvs.lists, kernel.ipvs.batches
    apply(it, kernel, store)
    assert len(kernel.ipvs.services) == 600
    # prepare's read and the read-back; the steps start from the plan's read and send one batch.
    assert kernel.ipvs.lists - lists == 2
    assert kernel.ipvs.batches - batches == 1
    # A weight change of one pool's first server: its 20 services edited, no
    # listing by the steps, and the read-back lists those 20 again, not 600.
    lists, some, batches, writes = kernel.ipvs.lists, kernel.ipvs.some_lists, kernel.ipvs.batches, kernel.writes
    prepared = operations.prepare(intent(300, weight_of_first=2), "lb1", kernel, store)
    result = operations.apply(prepared, kernel, store)
    assert kernel.ipvs.lists - lists == 1 and kernel.ipvs.some_lists - some == 1
    assert result.ipvs_listed_again == 20
    assert kernel.ipvs.batches - batches == 1
    assert kernel.writes - writes == 20
    heavier = [d for s in kernel.ipvs.services.values() for d in s.dests if d.weight == 2]
    assert len(heavier) == 20 and {d.address for d in heavier} == {"10.200.1.1"}
    assert apply(intent(300, weight_of_first=2), kernel, store).empty


def _losing_last_write(kernel):
    """ipvsadm -R that says every line ran but drops the last one."""
    real = kernel.ipvs.batch

    def batch(commands):
        real(commands[:-1])
        kernel.ipvs.writes += 1

    kernel.ipvs.batch = batch


@pytest.mark.parametrize("vips", [300, 5], ids=["read back by service", "read back in full"])
def test_the_read_back_catches_a_write_that_did_not_land(store, vips):
    kernel = new_kernel()
    apply(intent(vips), kernel, store)
    _losing_last_write(kernel)
    some = kernel.ipvs.some_lists
    with pytest.raises(ApplyError, match="read-back after apply does not match the intent: update ipvs dest"):
        apply(intent(vips, weight_of_first=2), kernel, store)
    assert kernel.ipvs.some_lists - some == (1 if vips == 300 else 0)


def test_services_expected_gone_cost_a_listing_each_so_many_are_read_back_in_full(store):
    kernel = new_kernel()
    apply(intent(300), kernel, store)
    lists, some = kernel.ipvs.lists, kernel.ipvs.some_lists
    prepared = operations.prepare(intent(290), "lb1", kernel, store)  # 20 services go
    result = operations.apply(prepared, kernel, store)
    assert (kernel.ipvs.lists - lists, kernel.ipvs.some_lists - some, result.ipvs_listed_again) == (2, 0, 0)
    assert len(kernel.ipvs.services) == 580


def test_drain_health_and_weight_edit_destinations_in_place_so_their_stats_survive(store):
    """IPVS zeroes a destination's stats when it is deleted and added again:
    a drain, a health event and a weight change must edit the destination
    (weight 0, or the new weight), never delete it."""
    kernel = new_kernel()
    apply(intent(20), kernel, store)
    first = str(intent(20).pool("p0").members[1].address)
    steps = {
        "drain": {"drained": frozenset({first})},
        "undrain": {"drained": frozenset()},
        "health down": {"down": frozenset({("p0", first)})},
        "health up": {"down": frozenset()},
    }
    for what, how in steps.items():
        start = len(kernel.ops)
        operations.apply(operations.prepare(intent(20), "lb1", kernel, store, **how), kernel, store)
        ops = [op for op in kernel.ops[start:] if op.startswith("ipvs")]
        assert ops and all(op.startswith("ipvs dest edit") for op in ops), (what, ops)
    start = len(kernel.ops)
    apply(intent(20, weight_of_first=3), kernel, store)
    ops = [op for op in kernel.ops[start:] if op.startswith("ipvs")]
    assert ops and all(op.startswith("ipvs dest edit") for op in ops), ops
