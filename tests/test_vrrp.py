"""VRRP through keepalived on the fake kernel: intent rules, the fragment kdsr
renders, and apply/withdraw/destroy ordering of the fragment and its gates.
The lab (netns-lab/tests/test_vrrp_lab.py) runs the same paths against real
keepalived."""

import json
import shutil
from pathlib import Path

import pytest
from intent_docs import IntentDocs

from kdsr import operations
from kdsr.compile import compile_node
from kdsr.errors import ApplyError, ForeignObjectError, IntentError, KeepalivedUnavailableError
from kdsr.keepalived_text import parse_model, pointer_at
from kdsr.kernel.fake import FakeKernel
from kdsr.plan_format import render_json, render_text

FILES = {
    "config": "/etc/keepalived/keepalived.conf",
    "fragment": "/etc/keepalived/kdsr.conf",
    "pid_file": "/run/keepalived.pid",
    "track_dir": "/run/kdsr-test",
}
VRRP = {"mode": "vrrp", "virtual_router_id": 51, "load_balancers": ["lb1", "lb2"], "advert_interval": 0.5}


def lb(n: int) -> dict:
    return {
        "interface": "eth0",
        "addresses": [f"10.10.0.{n}/24", f"fd00:10::{n}/64"],
        "vrrp": {"keepalived": FILES},
    }


BASE = {
    "version": 1,
    "services": {
        "web": {"vip": "10.10.0.100", "ports": 80, "protocols": "tcp", "pool": "web", "announce": VRRP},
        "dns": {"vip": "10.10.0.100", "ports": 53, "protocols": "udp", "pool": "web", "announce": VRRP},
        "media": {
            "vip": "10.10.0.101",
            "ports": 5000,
            "protocols": "udp",
            "pool": "media",
            "announce": {"mode": "vrrp", "virtual_router_id": 52, "load_balancers": ["lb2", "lb1"]},
        },
    },
    "pools": {
        "web": {"servers": [{"node": "s1"}, {"node": "s2"}]},
        "media": {"servers": [{"node": "s2"}]},
    },
    "load_balancers": {"lb1": lb(2), "lb2": lb(3)},
    "servers": {
        "s1": {"interface": "eth0", "addresses": ["10.10.0.11/24"]},
        "s2": {"interface": "eth0", "addresses": ["10.10.0.12/24"]},
    },
}


DOCS = IntentDocs(BASE, "vrrp.json")
doc_with, intent, problems = DOCS.doc_with, DOCS.intent, DOCS.problems


@pytest.fixture
def kernel():
    return FakeKernel()


# ------------------------------------------------------------------ bad input


def test_every_vrrp_problem_is_reported_at_once_with_its_path():
    def break_it(doc):
        web = doc["services"]["web"]["announce"] = dict(VRRP, prepend=2)  # a BGP setting
        doc["services"]["dns"]["announce"] = dict(web)
        del doc["services"]["media"]["announce"]["virtual_router_id"]
        doc["services"]["media"]["announce"]["load_balancers"] = ["lb2", "lb9", "lb3"]
        doc["load_balancers"]["lb3"] = {"interface": "eth0", "addresses": ["10.10.0.4/24"]}  # no vrrp
        doc["services"]["other"] = {
            "vip": "10.10.0.102",
            "ports": 81,
            "pool": "web",
            "announce": {"mode": "vrrp", "virtual_router_id": 51},  # web's ID
        }
        doc["services"]["bgp"] = {
            "vip": "10.10.0.103",
            "ports": 82,
            "pool": "web",
            "announce": {"mode": "active-active", "preempt": False},
        }

    found = problems(break_it)
    assert "'prepend' is a BGP setting" in found["/services/web/announce/prepend"]
    assert "Remove 'prepend'" in found["/services/web/announce/prepend"]
    assert "needs 'virtual_router_id'" in found["/services/media/announce"]
    assert '"virtual_router_id": 51' in found["/services/media/announce"]
    assert '"lb9" is not a load balancer' in found["/services/media/announce/load_balancers/1"]
    assert "has no 'vrrp' section" in found["/services/media/announce/load_balancers/2"]
    assert (
        "virtual router ID 51 is also VIP 10.10.0.100's (service dns)"
        in found["/services/other/announce/virtual_router_id"]
    )
    assert "'preempt' is a VRRP setting" in found["/services/bgp/announce/preempt"]
    # The BGP VIP also has no load balancer with bgp: BGP's own rule says so.
    assert "no load balancer has 'bgp'" in found["/services/bgp/announce"]


def test_a_dsr_monitor_an_ipvs_service_and_a_load_balancer_without_ipv4_are_refused():
    def break_it(doc):
        doc["pools"]["web"]["health"] = {"type": "tcp", "port": 80}  # dsr by default
        doc["services"]["media"]["dsr"] = {"mode": "l2", "engine": "ipvs"}
        doc["load_balancers"]["lb2"]["addresses"] = ["fd00:10::3/64"]

    found = problems(break_it)
    assert "never leaves the host" in found["/pools/web/health/mode"]
    assert '"mode": "plain"' in found["/pools/web/health/mode"]
    assert "l2 on the ipvs engine" in found["/services/media/announce/mode"]
    assert "no IPv4 address to send VRRP advertisements for VIP 10.10.0.100" in found["/load_balancers/lb2/addresses"]


def test_services_on_one_vip_own_it_alike_and_no_vrrp_load_balancer_is_an_error():
    def differ(doc):
        doc["services"]["dns"]["announce"] = dict(VRRP, advert_interval=2)

    assert "owns the same VIP 10.10.0.100 differently" in problems(differ)["/services/web/announce"]

    def one_plain(doc):
        del doc["services"]["dns"]["announce"]

    assert "one VIP has one VRRP owner" in problems(one_plain)["/services/web/announce"]

    def no_keepalived(doc):
        for node in doc["load_balancers"].values():
            del node["vrrp"]
        for service in doc["services"].values():
            service["announce"].pop("load_balancers", None)

    found = problems(no_keepalived)
    assert "no load balancer has 'vrrp'" in found["/services/web/announce/mode"]


def test_the_same_router_id_for_an_ipv4_and_an_ipv6_vip_is_fine():
    def add_v6(doc):
        doc["pools"]["web6"] = {"servers": [{"address": "fd00:10::11"}]}
        doc["services"]["web6"] = {"vip": "fd00:10::100", "ports": 80, "pool": "web6", "announce": VRRP}

    assert {s.name for s in intent(add_v6).services} == {"web", "dns", "media", "web6"}


def test_schema_bounds_are_reported_with_their_path():
    def out_of_range(doc):
        doc["services"]["web"]["announce"] = dict(VRRP, virtual_router_id=256, advert_interval=0.01)
        doc["services"]["dns"]["announce"] = doc["services"]["web"]["announce"]

    found = problems(out_of_range)
    assert "/services/web/announce/virtual_router_id" in found
    assert "/services/web/announce/advert_interval" in found


# ------------------------------------------------------------------ compile


def test_the_fragment_gives_the_first_listed_the_highest_priority_and_gates_every_vip():
    one = compile_node(intent(), "lb1").keepalived
    two = compile_node(intent(), "lb2").keepalived
    assert [(i.name, i.priority) for i in one.instances] == [("kdsr_v4_51", 200), ("kdsr_v4_52", 190)]
    assert [(i.name, i.priority) for i in two.instances] == [("kdsr_v4_51", 190), ("kdsr_v4_52", 200)]
    text = one.text
    assert "track_file kdsr_v4_51_gate {\n  file /run/kdsr-test/kdsr-vrrp-v4_51\n  weight 0\n  init_file 1\n}" in text
    assert "  virtual_ipaddress {\n    10.10.0.100/32 dev eth0\n  }" in text
    assert "  state BACKUP\n  interface eth0\n  version 3\n  virtual_router_id 51\n  priority 200\n" in text
    assert "advert_int 0.5" in text and "advert_int 1\n" in text
    body = text.split("\n", 1)[1]  # after the model line
    assert "unicast" not in body and "nopreempt" not in body
    assert parse_model(text, FILES["config"], FILES["fragment"], FILES["pid_file"]) == one


def test_unicast_peers_are_the_other_listed_load_balancers_and_nopreempt_is_rendered():
    def unicast(doc):
        doc["load_balancers"]["lb3"] = lb(4)
        for name in ("web", "dns"):
            doc["services"][name]["announce"] = dict(
                VRRP, unicast=True, preempt=False, load_balancers=["lb3", "lb1", "lb2"]
            )

    text = compile_node(intent(unicast), "lb1").keepalived.text
    assert "  priority 190\n  advert_int 0.5\n  nopreempt\n" in text
    assert "  unicast_src_ip 10.10.0.2\n  unicast_peer {\n    10.10.0.4\n    10.10.0.3\n  }\n" in text


def test_unicast_in_a_group_of_one_renders_no_empty_peer_list():
    def alone(doc):
        doc["services"]["media"]["announce"] = {"mode": "vrrp", "virtual_router_id": 52, "unicast": True}
        doc["services"]["media"]["announce"]["load_balancers"] = ["lb2"]

    text = compile_node(intent(alone), "lb2").keepalived.text
    assert "unicast_peer" not in text.split("\n", 1)[1]


def test_pointer_at_maps_fragment_lines_back_to_the_intent():
    config = compile_node(intent(), "lb1").keepalived
    line = config.text.splitlines().index("  virtual_router_id 52") + 1
    assert pointer_at(config, line) == "/services/media/announce"


def test_bgp_never_announces_a_vrrp_vip():
    def with_bgp(doc):
        doc["load_balancers"]["lb1"]["bgp"] = {
            "asn": 65001,
            "router_id": "10.10.0.2",
            "neighbors": [{"address": "10.10.0.1", "asn": 65000}],
        }

    desired = compile_node(intent(with_bgp), "lb1")
    assert desired.bird.routes == () and desired.announce == ()
    assert len(desired.keepalived.instances) == 2


# ------------------------------------------------------------------ apply


def test_apply_opens_the_gates_last_after_the_read_back_and_a_second_apply_changes_nothing(kernel, store):
    it = intent()
    prepared = operations.prepare(it, "lb1", kernel, store)
    kinds = [c.kind for c in prepared.plan.changes]
    assert kinds.count("vrrp instance") == 2 and kinds.count("vrrp gate") == 2 and "keepalived config" in kinds
    result = operations.apply(prepared, kernel, store)
    gate = FILES["track_dir"] + "/kdsr-vrrp-v4_51"
    assert result.steps[-3:] == [
        f"open VRRP gate {gate} (keepalived may own 10.10.0.100/32)",
        f"open VRRP gate {FILES['track_dir']}/kdsr-vrrp-v4_52 (keepalived may own 10.10.0.101/32)",
        f"write keepalived fragment {FILES['fragment']} (2 VRRP instances) and reload keepalived",
    ]
    assert kernel.ops.index(f"gate {gate} 0") > max(i for i, op in enumerate(kernel.ops) if op.startswith("nft"))
    assert kernel.keepalived.loaded == kernel.keepalived.files[FILES["fragment"]]
    state = store.load("lb1")
    assert state.keepalived_files == [FILES["config"], FILES["fragment"], FILES["pid_file"]]
    assert len(state.gates) == 2
    assert operations.prepare(it, "lb1", kernel, store).plan.empty


def test_a_fast_path_that_does_not_read_back_never_opens_a_gate(kernel, store):
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
    assert kernel.keepalived.gates == {} and kernel.keepalived.files == {}


def test_health_gives_a_vip_up_by_its_gate_first_and_keeps_a_shared_one(kernel, store):
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    loaded = kernel.keepalived.loaded
    prepared = operations.prepare(it, "lb1", kernel, store, down=frozenset({("media", "10.10.0.12")}))
    assert [(c.action, c.ident) for c in prepared.plan.changes if c.kind.startswith(("vrrp", "keepalived"))] == [
        ("update", FILES["track_dir"] + "/kdsr-vrrp-v4_52")
    ]
    text = render_text(prepared.plan)
    assert "(give up: no healthy server in pool media)" in text
    assert "given up here (no healthy server in pool media)" in text
    result = operations.apply(prepared, kernel, store)
    assert result.steps[0].startswith(f"close VRRP gate {FILES['track_dir']}/kdsr-vrrp-v4_52")
    assert kernel.keepalived.gates[FILES["track_dir"] + "/kdsr-vrrp-v4_52"] == "1"
    assert kernel.keepalived.gates[FILES["track_dir"] + "/kdsr-vrrp-v4_51"] == "0"
    assert kernel.keepalived.loaded is loaded  # keepalived was not reloaded
    result = operations.apply(operations.prepare(it, "lb1", kernel, store, down=frozenset()), kernel, store)
    assert result.steps[-1].startswith(f"open VRRP gate {FILES['track_dir']}/kdsr-vrrp-v4_52")


def test_gate_and_fragment_drift_is_planned_back(kernel, store):
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    kernel.keepalived.gates[FILES["track_dir"] + "/kdsr-vrrp-v4_51"] = "1"
    del kernel.keepalived.gates[FILES["track_dir"] + "/kdsr-vrrp-v4_52"]
    kernel.keepalived.files[FILES["fragment"]] += "# an edit\n"
    plan = operations.prepare(it, "lb1", kernel, store).plan
    assert sorted((c.action, c.kind) for c in plan.changes) == [
        ("create", "vrrp gate"),
        ("update", "keepalived config"),
        ("update", "vrrp gate"),
    ]
    assert plan.of_kind("keepalived config")[0].reason == "not what kdsr writes"
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    assert operations.prepare(it, "lb1", kernel, store).plan.empty


def test_after_a_reboot_the_fragment_alone_owns_nothing_until_kdsr_applies(kernel, store):
    """A reboot keeps the fragment and the state directory; the track
    directory is emptied, so keepalived creates each gate closed."""
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    rebooted = FakeKernel()
    rebooted.keepalived.files = dict(kernel.keepalived.files)
    prepared = operations.prepare(it, "lb1", rebooted, store)
    assert not prepared.plan.of_kind("keepalived config")
    result = operations.apply(prepared, rebooted, store)
    assert [s for s in result.steps if "gate" in s] == result.steps[-2:]
    assert not any(op.startswith("keepalived") for op in rebooted.ops)


def test_destroy_removes_the_fragment_first_then_the_gates_and_leaves_nothing(kernel, store):
    it = intent()
    operations.apply(operations.prepare(it, "lb1", kernel, store), kernel, store)
    result = operations.apply(operations.prepare_destroy("lb1", kernel, store), kernel, store)
    assert result.steps[0] == f"remove keepalived fragment {FILES['fragment']} and reload keepalived"
    assert [s for s in result.steps[1:3]] == [
        f"remove VRRP gate {FILES['track_dir']}/kdsr-vrrp-v4_51",
        f"remove VRRP gate {FILES['track_dir']}/kdsr-vrrp-v4_52",
    ]
    assert kernel.keepalived.files == {} and kernel.keepalived.gates == {} and kernel.nft.tables == {}
    assert kernel.keepalived.loaded == ""
    assert store.load("lb1").empty
    assert operations.prepare_destroy("lb1", kernel, store).plan.empty


def test_destroy_with_keepalived_stopped_removes_the_fragment_without_a_reload_and_says_so(kernel, store):
    operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)
    kernel.keepalived.stopped = True
    prepared = operations.prepare_destroy("lb1", kernel, store)
    assert any("keepalived is not running" in note for note in prepared.plan.notes)
    result = operations.apply(prepared, kernel, store)
    assert result.steps[0].endswith("(keepalived is not running: no reload)")
    assert any("was removed without a reload" in note for note in result.notes)
    assert kernel.keepalived.files == {}


def test_keepalived_missing_or_stopped_is_exit_7_before_any_write(kernel, store):
    kernel.keepalived.stopped = True
    with pytest.raises(KeepalivedUnavailableError) as info:
        operations.prepare(intent(), "lb1", kernel, store)
    assert info.value.exit_code == 7 and "not running" in str(info.value)
    kernel.keepalived.files = None
    with pytest.raises(KeepalivedUnavailableError) as info:
        operations.prepare(intent(), "lb1", kernel, store)
    assert "apt-get install keepalived" in str(info.value) or "not installed" in str(info.value)
    assert kernel.ops == []


def test_a_missing_track_directory_is_exit_7_before_any_write(kernel, store):
    """keepalived would drop a track file whose directory is missing and own
    the VIP unguarded: kdsr refuses instead."""
    kernel.keepalived.missing_dirs.add(FILES["track_dir"])
    with pytest.raises(KeepalivedUnavailableError) as info:
        operations.prepare(intent(), "lb1", kernel, store)
    assert info.value.exit_code == 7 and FILES["track_dir"] in str(info.value)
    assert kernel.ops == []


def test_a_fragment_keepalived_rejects_changes_nothing_and_names_the_intent_path(kernel, store):
    kernel.keepalived.rejects = "virtual_router_id 52"
    with pytest.raises(ApplyError) as info:
        operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)
    assert info.value.exit_code == 6
    assert "from the intent's /services/media/announce" in str(info.value)
    assert kernel.ops == []


def test_a_fragment_kdsr_did_not_write_is_refused(kernel, store):
    kernel.keepalived.files[FILES["fragment"]] = "vrrp_instance mine {\n}\n"
    with pytest.raises(ForeignObjectError):
        operations.prepare(intent(), "lb1", kernel, store)


def test_plan_json_carries_the_fragment_digest_and_the_gates():
    import jsonschema

    from kdsr.diff import diff
    from kdsr.model import Observed

    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "plan.schema.json").read_text())
    plan = diff(compile_node(intent(), "lb1"), Observed())
    doc = json.loads(render_json(plan))
    jsonschema.Draft202012Validator(schema).validate(doc)
    kinds = {c["kind"] for c in doc["changes"]}
    assert {"vrrp instance", "keepalived config", "vrrp gate"} <= kinds
    config = next(c for c in doc["changes"] if c["kind"] == "keepalived config")
    assert len(config["after"]["sha256"]) == 64
    gate = next(c for c in doc["changes"] if c["kind"] == "vrrp gate")
    assert gate["after"]["value"] == "0"


def test_the_vrrp_example_loads_and_every_load_balancer_gets_a_fragment():
    from kdsr.intent import load_intent

    it = load_intent("examples/l2-vrrp.json")
    for name in ("lb1", "lb2"):
        desired = compile_node(it, name)
        assert [i.name for i in desired.keepalived.instances] == ["kdsr_v4_51", "kdsr_v4_52", "kdsr_v6_51"]


# ------------------------------------------------------------------ keepalived's own config test


@pytest.mark.skipif(shutil.which("keepalived") is None, reason="keepalived is not installed")
def test_keepalived_t_checks_the_candidate_in_place_of_the_fragment_and_names_its_line(tmp_path):
    from kdsr.kernel import keepalived

    fragment = tmp_path / "kdsr.conf"
    config = tmp_path / "keepalived.conf"
    config.write_text(f"global_defs {{\n  router_id test\n}}\ninclude {fragment}\n")
    text = compile_node(intent(), "lb1").keepalived.text
    keepalived.check(str(config), str(fragment), text)  # accepted; nothing written
    assert not fragment.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["keepalived.conf"]
    bad = text.replace("  virtual_router_id 52", "  virtual_router_id 52\n  bogus_keyword 1")
    with pytest.raises(keepalived.KeepalivedError) as info:
        keepalived.check(str(config), str(fragment), bad)
    assert "Unknown keyword 'bogus_keyword'" in str(info.value)
    assert info.value.line == bad.splitlines().index("  bogus_keyword 1") + 1
    config.write_text("global_defs {\n}\n")
    with pytest.raises(keepalived.KeepalivedError) as info:
        keepalived.check(str(config), str(fragment), text)
    assert f"add the line include {fragment}" in str(info.value)


def test_show_lists_each_vip_its_gate_and_whether_this_host_owns_it(kernel, store):
    from kdsr.model import Address

    operations.apply(operations.prepare(intent(), "lb1", kernel, store), kernel, store)
    kernel.links.addresses["eth0"].append(Address("eth0", "10.10.0.100/32"))  # keepalived made lb1 the owner
    report = operations.show(kernel, store, "lb1")
    assert [(v["vip"], v["gate"], v["owned_here"]) for v in report["vrrp"]] == [
        ("10.10.0.100/32", "0", True),
        ("10.10.0.101/32", "0", False),
    ]
    text = operations.format_show(report)
    assert "[lb1] 10.10.0.100/32 kdsr_v4_51 priority 200, gate 0, owned here" in text
    assert "[lb1] 10.10.0.101/32 kdsr_v4_52 priority 190, gate 0, not here" in text


def test_a_reload_that_gives_a_vip_another_vips_router_id_is_refused():
    """A reload verifies only what an edit can reach (kdsr/intent/reverify.py);
    a virtual router ID pairs a VRRP VIP with every other one, so an edit of
    one verifies the whole document."""
    from kdsr.intent.reload import Reloader

    reloader = Reloader()
    reloader.parse(json.dumps(doc_with()), "vrrp.json")
    edited = doc_with()
    edited["services"]["media"]["announce"]["virtual_router_id"] = 51
    with pytest.raises(IntentError) as info:
        reloader.parse(json.dumps(edited), "vrrp.json")
    assert [p.pointer for p in info.value.problems] == ["/services/media/announce/virtual_router_id"]
