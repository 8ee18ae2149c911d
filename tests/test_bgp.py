"""BGP through BIRD on the fake kernel: intent rules, the fragment kdsr
renders, HA role assignment, and apply/withdraw/destroy ordering.  The lab
(netns-lab/tests/test_bgp_lab.py) runs the same paths against real BIRD."""

import pytest
from intent_docs import IntentDocs

from kdsr import operations
from kdsr.bird_text import parse_model, pointer_at
from kdsr.compile import compile_node
from kdsr.compile.announce import assign
from kdsr.errors import ApplyError, BirdUnavailableError, ForeignObjectError
from kdsr.kernel.fake import FakeKernel

FILES = {"config": "/etc/bird/bird.conf", "fragment": "/etc/bird/kdsr.conf", "socket": "/run/bird/bird.ctl"}


def lb(n: int) -> dict:
    return {
        "interface": "eth0",
        "addresses": [f"10.10.0.{n}/24"],
        "bgp": {
            "asn": 65001,
            "router_id": f"10.10.0.{n}",
            "hold_time": 3,
            "neighbors": [{"address": "10.10.0.1", "asn": 65000}],
            "bird": FILES,
        },
    }


BASE = {
    "version": 1,
    "services": {
        "web": {"vip": "10.0.0.100", "ports": 80, "protocols": "tcp", "pool": "web"},
        "dns": {"vip": "10.0.0.100", "ports": 53, "protocols": "udp", "pool": "web"},
        "media": {"vip": "10.0.0.101", "ports": 5000, "protocols": "udp", "pool": "media"},
    },
    "pools": {
        "web": {"servers": [{"node": "s1"}, {"node": "s2"}]},
        "media": {"servers": [{"node": "s2"}]},
    },
    "load_balancers": {"lb1": lb(2), "lb2": lb(3), "lb3": lb(4)},
    "servers": {
        "s1": {"interface": "eth0", "addresses": ["10.10.0.11/24"]},
        "s2": {"interface": "eth0", "addresses": ["10.10.0.12/24"]},
    },
}


DOCS = IntentDocs(BASE, "bgp.json")
doc_with, intent, problems = DOCS.doc_with, DOCS.intent, DOCS.problems


@pytest.fixture
def kernel():
    k = FakeKernel()
    k.sysctl.values.update({"net/ipv4/conf/all/arp_ignore": "0"})
    return k


# ------------------------------------------------------------------ bad input


def test_every_bgp_problem_is_reported_at_once_with_its_path():
    def bad(doc):
        lbs = doc["load_balancers"]
        lbs["lb1"]["bgp"]["router_id"] = "fd00::1"
        lbs["lb3"]["bgp"]["router_id"] = "10.10.0.3"  # lb2's
        lbs["lb2"]["bgp"]["neighbors"].append({"address": "fd00::1", "asn": 65000})
        doc["services"]["web"]["announce"] = {"mode": "active-active", "prepend": 2}
        doc["services"]["dns"]["announce"] = {"mode": "active-active", "prepend": 2}
        doc["services"]["media"]["announce"] = {
            "mode": "n+m",
            "active": 2,
            "standby": 2,
            "load_balancers": ["lb1", "lbx"],
        }

    found = problems(bad)
    assert "is not an IPv4 address" in found["/load_balancers/lb1/bgp/router_id"]
    assert "also the router ID of load balancer lb2" in found["/load_balancers/lb3/bgp/router_id"]
    assert "has no IPv6 address" in found["/load_balancers/lb2/bgp/neighbors/1/address"]
    assert "standby setting" in found["/services/web/prepend".replace("web/", "web/announce/")]
    assert "not a load balancer" in found["/services/media/announce/load_balancers/1"]
    assert "group has only 2" in found["/services/media/announce/active"]


def test_asn_range_and_password_characters_are_schema_errors():
    def bad(doc):
        doc["load_balancers"]["lb1"]["bgp"]["asn"] = 4294967296
        doc["load_balancers"]["lb2"]["bgp"]["neighbors"][0]["asn"] = 0
        doc["load_balancers"]["lb3"]["bgp"]["neighbors"][0]["password"] = 'x"; protocol kernel { }'

    found = problems(bad)
    assert set(found) >= {
        "/load_balancers/lb1/bgp/asn",
        "/load_balancers/lb2/bgp/neighbors/0/asn",
        "/load_balancers/lb3/bgp/neighbors/0/password",
    }


def test_services_on_one_vip_must_announce_it_alike_and_standby_needs_two():
    def bad(doc):
        doc["services"]["web"]["announce"] = {"mode": "active-standby", "load_balancers": ["lb1", "lb2"]}
        doc["services"]["media"]["announce"] = {"mode": "active-standby", "load_balancers": ["lb3"]}

    found = problems(bad)
    assert "announces the same VIP 10.0.0.100 differently" in found["/services/web/announce"]
    assert "needs at least 2" in found["/services/media/announce/mode"]


def test_announce_without_any_bgp_load_balancer_is_an_error():
    def bad(doc):
        for node in doc["load_balancers"].values():
            del node["bgp"]
        doc["services"]["web"]["announce"] = {"mode": "active-active"}

    assert "nothing would announce" in problems(bad)["/services/web/announce"]


# ------------------------------------------------------------------ roles and text


def test_active_standby_prepends_on_the_standby_only():
    def standby(doc):
        for name in ("web", "dns"):
            doc["services"][name]["announce"] = {
                "mode": "active-standby",
                "load_balancers": ["lb2", "lb1"],
                "standby_med": 50,
                "communities": ["65000:7"],
            }

    it = intent(standby)
    active = compile_node(it, "lb2").bird
    standby_lb = compile_node(it, "lb1").bird
    route_a = next(r for r in active.routes if r.prefix == "10.0.0.100/32")
    route_s = next(r for r in standby_lb.routes if r.prefix == "10.0.0.100/32")
    assert (route_a.role, route_a.prepend, route_a.med) == ("active", 0, None)
    assert (route_s.role, route_s.prepend, route_s.med) == ("standby", 3, 50)
    assert "bgp_path.prepend(65001); bgp_path.prepend(65001); bgp_path.prepend(65001); bgp_med = 50;" in (
        standby_lb.text
    )
    assert "bgp_community.add((65000,7));" in active.text
    # The model line round-trips, and never carries a password.
    assert parse_model(active.text, **{k: FILES[k] for k in FILES}).routes == active.routes


def test_n_plus_m_is_deterministic_and_picks_n_active_m_standby():
    def nm(doc):
        doc["services"]["media"]["announce"] = {"mode": "n+m", "active": 1, "standby": 1}

    it = intent(nm)
    media = next(s for s in it.services if s.name == "media")
    first = assign(it, media)
    again = assign(intent(nm), media)
    assert first == again
    roles = dict(first.roles)
    assert sorted(roles.values()) == ["active", "standby"] and len(roles) == 2
    left_out = ({"lb1", "lb2", "lb3"} - set(roles)).pop()
    assert "10.0.0.101/32" not in [r.prefix for r in compile_node(it, left_out).bird.routes]
    assert first.describe().startswith("n+m: active ")


def test_a_password_is_in_the_file_but_not_in_the_model_line_or_plan_json(kernel, store):
    def secret(doc):
        doc["load_balancers"]["lb1"]["bgp"]["neighbors"][0]["password"] = "s3cr3t!"

    it = intent(secret)
    bird = compile_node(it, "lb1").bird
    assert 'password "s3cr3t!";' in bird.text
    assert "s3cr3t" not in bird.text.splitlines()[0]
    from kdsr.plan_format import render_json

    prepared = operations.prepare(it, "lb1", kernel, store)
    assert "s3cr3t" not in render_json(prepared.plan)


# ------------------------------------------------------------------ apply


def test_apply_announces_last_after_the_read_back_and_a_second_apply_changes_nothing(kernel, store):
    it = intent()
    prepared = operations.prepare(it, "lb1", kernel, store)
    kinds = [c.kind for c in prepared.plan.changes]
    assert kinds.count("bgp route") == 2 and kinds.count("bgp session") == 1 and "bird config" in kinds
    assert [c.ident for c in prepared.plan.of_kind("announce route")] == ["10.0.0.100/32", "10.0.0.101/32"]
    result = operations.apply(prepared, kernel, store)
    # The fast path first; then the announce routes; then the fragment, which
    # BIRD announces from only while those routes are there.
    assert result.steps[-3:] == [
        "add announce route 10.0.0.100/32 (BIRD announces it)",
        "add announce route 10.0.0.101/32 (BIRD announces it)",
        "write BIRD fragment /etc/bird/kdsr.conf (2 routes, 1 sessions) and reload BIRD",
    ]
    assert kernel.ops.index("announce add 10.0.0.100/32") > max(
        i for i, op in enumerate(kernel.ops) if op.startswith("nft")
    )
    assert [r.prefix for r in kernel.links.announce] == ["10.0.0.100/32", "10.0.0.101/32"]
    assert kernel.bird.loaded == kernel.bird.files[FILES["fragment"]]
    assert store.load("lb1").bird_files == [FILES["config"], FILES["fragment"], FILES["socket"]]
    assert operations.prepare(it, "lb1", kernel, store).plan.empty


def test_the_fragment_announces_only_what_it_learns_from_kdsrs_announce_table():
    text = compile_node(intent(), "lb1").bird.text
    assert "protocol static" not in text and "blackhole" not in text
    assert "protocol kernel kdsr_kernel4 {" in text
    assert "  ipv4 { table kdsr_t4; import all; export none; };" in text
    assert f"  kernel table {0x6B800000};" in text and "  learn;" in text
    assert "  if net = 10.0.0.100/32 then { accept; }  # active" in text


def test_a_fast_path_that_does_not_read_back_is_never_announced(kernel, store):
    """The read-back before the announce routes finds the table gone (as if
    the kernel had dropped it): the apply fails and announces nothing."""
    real_apply = kernel.nft.apply

    def apply_then_lose(commands, check_only=False, becomes=None):
        proved = real_apply(commands, check_only=check_only, becomes=becomes)
        if not check_only:
            kernel.nft.tables.clear()
        return proved

    kernel.nft.apply = apply_then_lose
    with pytest.raises(ApplyError) as info:
        operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)
    assert "read-back after apply does not match" in str(info.value)
    assert kernel.links.announce == [] and not any(op.startswith("announce") for op in kernel.ops)


def test_after_a_reboot_the_files_alone_announce_nothing_until_kdsr_applies(kernel, store):
    """A reboot keeps the fragment and the state directory, not the kernel:
    the announce routes are gone, and apply puts them back after the fast path."""
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    rebooted = FakeKernel()
    rebooted.sysctl.values.update({"net/ipv4/conf/all/arp_ignore": "0"})
    rebooted.bird.files = dict(kernel.bird.files)
    rebooted.bird.loaded = kernel.bird.files[FILES["fragment"]]  # BIRD started from the file
    assert rebooted.links.announce == []
    prepared = operations.prepare(it, "lb1", rebooted, store)
    assert not prepared.plan.of_kind("bird config")  # the fragment on disk is right as it is
    assert [c.action for c in prepared.plan.of_kind("announce route")] == ["create", "create"]
    result = operations.apply(prepared, rebooted, store)
    assert [s for s in result.steps if "announce" in s] == result.steps[-2:]
    assert not any(op.startswith("bird") for op in rebooted.ops)
    assert operations.prepare(it, "lb1", rebooted, store).plan.empty


def test_announce_table_drift_is_planned(kernel, store):
    from kdsr.model import AnnounceRoute
    from kdsr.plan_format import render_text

    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    kernel.links.announce.remove(AnnounceRoute("10.0.0.101/32"))
    kernel.links.announce.append(AnnounceRoute("192.0.2.7/32", "unreachable"))
    kernel.links.announce[0] = AnnounceRoute("10.0.0.100/32", "prohibit")
    text = render_text(operations.prepare(it, "lb1", kernel, store).plan)
    assert (
        "  + announce route 10.0.0.101/32: blackhole in table 0x6b800000, BIRD announces the VIP while it is there"
        in text
    )
    assert "  -/+ announce route 10.0.0.100/32: blackhole in table 0x6b800000" in text
    assert "[type prohibit -> blackhole forces replacement]" in text
    assert "  - announce route 192.0.2.7/32 (withdraw)" in text
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    assert sorted(kernel.links.announce, key=lambda r: r.prefix) == [
        AnnounceRoute("10.0.0.100/32"),
        AnnounceRoute("10.0.0.101/32"),
    ]


def test_health_withdraws_a_vip_by_its_announce_route_first_and_keeps_a_shared_one(kernel, store):
    from kdsr.plan_format import render_text

    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    loaded = kernel.bird.loaded
    # media's only server is down: its VIP goes; web and dns keep theirs.
    prepared = operations.prepare(it, "lb1", kernel, store, down=frozenset({("media", "10.10.0.12")}))
    assert [(c.action, c.ident) for c in prepared.plan.of_kind("announce route")] == [("delete", "10.0.0.101/32")]
    assert not prepared.plan.of_kind("bird config") and not prepared.plan.of_kind("bgp route")
    assert prepared.desired.bird.withdrawn == (("10.0.0.101/32", "no healthy server in pool media"),)
    assert "  - announce route 10.0.0.101/32 (withdraw: no healthy server in pool media)" in render_text(prepared.plan)
    result = operations.apply(prepared, kernel, store)
    assert result.steps[0] == (
        "delete announce route 10.0.0.101/32 (BIRD withdraws it: no healthy server in pool media)"
    )  # before the fast path changes
    assert [r.prefix for r in kernel.links.announce] == ["10.0.0.100/32"]
    assert kernel.bird.loaded is loaded  # BIRD was not reloaded
    # Back up: announced again, last.
    result = operations.apply(operations.prepare(it, "lb1", kernel, store, down=frozenset()), kernel, store)
    assert result.steps[-1] == "add announce route 10.0.0.101/32 (BIRD announces it)"
    assert [r.prefix for r in kernel.links.announce] == ["10.0.0.100/32", "10.0.0.101/32"]


def test_destroy_withdraws_everything_before_removing_the_fast_path(kernel, store):
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    prepared = operations.prepare_destroy("lb1", kernel, store)
    result = operations.apply(prepared, kernel, store)
    assert result.steps[:3] == [
        "delete announce route 10.0.0.100/32 (BIRD withdraws it)",
        "delete announce route 10.0.0.101/32 (BIRD withdraws it)",
        f"write BIRD fragment {FILES['fragment']} (empty) and reload BIRD",
    ]
    assert result.notes == []
    text = kernel.bird.files[FILES["fragment"]]
    assert "protocol" not in text and "router id" not in text
    assert kernel.links.announce == [] and kernel.nft.tables == {}
    assert store.load("lb1").bird_files == []
    assert operations.prepare_destroy("lb1", kernel, store).plan.empty


def test_destroy_with_bird_stopped_empties_the_fragment_without_a_reload_and_says_so(kernel, store):
    from kdsr.plan_format import render_text

    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    loaded = kernel.bird.loaded
    kernel.bird.stopped = True
    prepared = operations.prepare_destroy("lb1", kernel, store)
    text = render_text(prepared.plan)
    assert "BIRD is not running (no answer on /run/bird/bird.ctl)" in text
    assert f"  ~ bird config {FILES['fragment']}: empty (declares nothing), no reload (BIRD is not running)" in text
    result = operations.apply(prepared, kernel, store)
    assert f"write BIRD fragment {FILES['fragment']} (empty) (BIRD is not running: no reload)" in result.steps
    assert result.notes == [
        f"BIRD was not running (no answer on {FILES['socket']}): {FILES['fragment']} was emptied without a "
        "reload, so BIRD announces nothing of kdsr's when it starts."
    ]
    text = kernel.bird.files[FILES["fragment"]]
    assert "protocol" not in text and "router id" not in text
    assert kernel.bird.loaded is loaded
    assert kernel.links.announce == [] and kernel.nft.tables == {} and store.load("lb1").bird_files == []
    assert operations.prepare_destroy("lb1", kernel, store).plan.empty


def test_an_intent_without_bgp_empties_the_fragment_while_bird_is_stopped(kernel, store):
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    kernel.bird.stopped = True

    def no_bgp(doc):
        for node in doc["load_balancers"].values():
            del node["bgp"]

    prepared = operations.prepare(intent(no_bgp), "lb1", kernel, store)  # no exit 7: nothing to announce
    result = operations.apply(prepared, kernel, store)
    assert result.notes and "was emptied without a reload" in result.notes[0]
    assert kernel.links.announce == [] and store.load("lb1").bird_files == []


def test_a_fragment_bird_rejects_changes_nothing_and_names_the_intent_path(kernel, store):
    def extra(doc):
        doc["load_balancers"]["lb1"]["bgp"]["neighbors"].append({"address": "10.10.0.9", "asn": 65009})

    it = intent(extra)
    kernel.bird.rejects = "neighbor 10.10.0.9 as 65009;"
    writes = kernel.writes
    with pytest.raises(ApplyError) as info:
        operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    assert "nothing was changed" in str(info.value)
    assert "/load_balancers/lb1/bgp/neighbors/1" in str(info.value)
    assert kernel.writes == writes and FILES["fragment"] not in kernel.bird.files


def test_bird_not_running_is_exit_7_before_any_write(kernel, store):
    kernel.bird.files = None
    with pytest.raises(BirdUnavailableError) as info:
        operations.prepare(intent(), "lb1", kernel, store)
    assert info.value.exit_code == 7 and "not running" in str(info.value)
    assert kernel.writes == 0


def test_a_fragment_kdsr_did_not_write_is_refused(kernel, store):
    kernel.bird.files[FILES["fragment"]] = "protocol static mine { ipv4; route 192.0.2.0/24 blackhole; }\n"
    with pytest.raises(ForeignObjectError):
        operations.prepare(intent(), "lb1", kernel, store)
    kernel.bird.files[FILES["fragment"]] = "# placeholder for kdsr\n"
    assert not operations.prepare(intent(), "lb1", kernel, store).plan.empty


def test_pointer_at_maps_fragment_lines_back_to_the_intent():
    bird = compile_node(intent(), "lb1").bird
    lines = bird.text.splitlines()
    neighbor_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("neighbor 10.10.0.1"))
    router_line = next(i for i, line in enumerate(lines, 1) if line.startswith("router id"))
    assert pointer_at(bird, neighbor_line) == "/load_balancers/lb1/bgp/neighbors/0"
    assert pointer_at(bird, router_line) == "/load_balancers/lb1/bgp/router_id"


def test_plan_prints_every_vips_assignment_and_this_nodes_part(kernel, store):
    from kdsr.plan_format import render_text

    def nm(doc):
        doc["services"]["media"]["announce"] = {"mode": "n+m", "active": 1, "standby": 1}

    it = intent(nm)
    media = next(s for s in it.services if s.name == "media")
    left_out = ({"lb1", "lb2", "lb3"} - {lb for lb, _ in assign(it, media).roles}).pop()
    text = render_text(operations.prepare(it, left_out, kernel, store).plan, "bgp.json")
    assert "10.0.0.100/32  active-active: active lb1 lb2 lb3; standby -  -> announced here as active" in text
    assert f"10.0.0.101/32  {assign(it, media).describe()}  -> not announced here" in text


def test_the_bgp_example_loads_and_every_load_balancer_gets_a_fragment():
    from pathlib import Path

    from kdsr.intent import load_intent

    it = load_intent(Path(__file__).resolve().parents[1] / "examples" / "l2-bgp-ha.json")
    announced = {lb.name: {r.prefix for r in compile_node(it, lb.name).bird.routes} for lb in it.load_balancers}
    assert all("10.0.0.100/32" in prefixes for prefixes in announced.values())
    assert sum("10.0.0.102/32" in prefixes for prefixes in announced.values()) == 2  # n+m 1+1 of 3


def test_show_lists_the_announce_routes(kernel, store):
    operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)
    report = operations.show(kernel, store, "lb1")
    assert report["announce"] == ["10.0.0.100/32", "10.0.0.101/32"]
    text = operations.format_show(report)
    assert "announce routes (table 0x6b800000; BIRD announces these VIPs):\n  10.0.0.100/32\n  10.0.0.101/32" in text
    operations.apply(operations.prepare_destroy("lb1", kernel, store), kernel, store)
    assert operations.show(kernel, store, "lb1")["announce"] == []
