"""A reload verifies only the part of the document an edit can reach
(kdsr/intent/reverify.py): chains of random edits, each reloaded by one
Reloader and checked against a cold load (the same intent, or the same
problems in the same words and order)."""

from __future__ import annotations

import copy
import json
import random
import zlib

import pytest

from kdsr import naming
from kdsr.errors import IntentError
from kdsr.intent import parse_intent
from kdsr.intent import verify as rules
from kdsr.intent.reload import Reloader

SOURCE = "intent.json"


def base() -> dict:
    """Services sharing VIPs and pools, L2 and L3, nft and ipvs, a monitored pool."""
    pools = {
        "web": {"servers": [{"node": "s1"}, {"node": "s2"}, {"address": "10.10.0.13"}]},
        "api": {"servers": [{"address": "10.10.0.21"}, {"address": "10.10.0.22", "weight": 3}]},
        "checked": {
            "servers": [{"address": "10.10.0.31"}, {"address": "10.10.0.32"}],
            "health": {"type": "tcp", "mode": "dsr", "port": 82},
        },
        "far": {"servers": [{"address": "192.0.2.41"}, {"address": "192.0.2.42"}]},
        "v6": {"servers": [{"address": "fd00:10::51"}, {"address": "fd00:10::52"}]},
    }
    services = {}
    for i in range(14):
        pool = ["web", "api", "checked", "far", "web", "api", "checked"][i % 7]
        service = {"vip": f"10.10.0.{100 + i // 2}", "ports": [80 + i, 1000 + 10 * i], "pool": pool}
        if pool == "far":
            service["dsr"] = {"mode": ["l3-ipip", "l3-gre"][i % 2]}
        services[f"svc{i:02d}"] = service
    services["six"] = {"vip": "fd00:10::100", "ports": 80, "protocols": "both", "pool": "v6"}
    services["vs"] = {"vip": "10.10.0.120", "ports": "7000-7010", "pool": "api", "dsr": {"engine": "ipvs"}}
    return {
        "version": 1,
        "services": services,
        "pools": pools,
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24", "fd00:10::2/64"]}},
        "servers": {
            "s1": {"interface": "eth0", "addresses": ["10.10.0.11/24"]},
            "s2": {"interface": "eth0", "addresses": ["10.10.0.12/24"]},
        },
    }


ADDRESSES = ["10.10.0.13", "10.10.0.21", "10.10.0.61", "10.10.0.100", "10.10.0.2", "192.0.2.41",
             "192.0.2.77", "fd00:10::51", "fd00:10::77", "10.20.0.5", "10.10.0.11"]  # fmt: skip


def _service(doc: dict, rng: random.Random) -> tuple[str, dict]:
    name = rng.choice(sorted(doc["services"]))
    return name, doc["services"][name]


def _pool(doc: dict, rng: random.Random) -> tuple[str, dict]:
    name = rng.choice(sorted(doc["pools"]))
    return name, doc["pools"][name]


def mutate(doc: dict, rng: random.Random) -> None:
    """One edit of a service or a pool, often a wrong one."""
    kind = rng.randrange(18)
    if kind == 0:  # a VIP: another service's, a member's, a node's, a fresh one
        _, service = _service(doc, rng)
        service["vip"] = rng.choice(ADDRESSES + [s["vip"] for s in doc["services"].values()] + ["10.10.0.140"])
    elif kind == 1:  # ports, maybe clashing with a neighbour's
        _, service = _service(doc, rng)
        service["ports"] = rng.choice([80, 81, [82, 1000], "1000-1020", 4242, [80, 80]])
    elif kind == 2:  # another pool, or one that does not exist
        _, service = _service(doc, rng)
        service["pool"] = rng.choice([*sorted(doc["pools"]), "nowhere"])
    elif kind == 3:  # the mode and engine
        _, service = _service(doc, rng)
        service["dsr"] = rng.choice(
            [{"mode": "l2"}, {"mode": "l3-ipip"}, {"mode": "l3-gre"}, {"mode": "l3-ip6tnl"}, {"engine": "ipvs"}]
        )
    elif kind == 4:  # hashing the ipvs engine may refuse; a table size
        _, service = _service(doc, rng)
        service["hashing"] = rng.choice([{"fields": "five-tuple"}, {"table_size": 4}, {"table_size": 251}, {}])
    elif kind == 5:  # a service removed
        doc["services"].pop(_service(doc, rng)[0])
    elif kind == 6:  # a service added
        vip = rng.choice(["10.10.0.100", "10.10.0.150", "192.0.2.41", "fd00:10::100"])
        pool = rng.choice(sorted(doc["pools"]))
        doc["services"][f"new{rng.randrange(1000)}"] = {"vip": vip, "ports": rng.choice([80, 9000]), "pool": pool}
    elif kind == 7:  # a pool removed
        doc["pools"].pop(_pool(doc, rng)[0])
    elif kind == 8:  # a pool added
        doc["pools"][f"pool{rng.randrange(100)}"] = {"servers": [{"address": rng.choice(ADDRESSES)}]}
    elif kind in (9, 10):  # a member's address
        _, pool = _pool(doc, rng)
        pool["servers"].append({"address": rng.choice(ADDRESSES)})
    elif kind == 11:  # a member removed (a pool may end up empty: the schema says so)
        _, pool = _pool(doc, rng)
        if pool["servers"]:
            pool["servers"].pop(rng.randrange(len(pool["servers"])))
    elif kind == 12:  # a weight
        _, pool = _pool(doc, rng)
        if pool["servers"]:
            rng.choice(pool["servers"])["weight"] = rng.randrange(0, 5)
    elif kind == 13:  # a monitor on a pool
        _, pool = _pool(doc, rng)
        pool["health"] = rng.choice([{"type": "tcp"}, {"type": "udp", "port": 53}, {"type": "tcp", "mode": "plain"}])
    elif kind == 14:  # a pinned MAC
        _, pool = _pool(doc, rng)
        if pool["servers"]:
            rng.choice(pool["servers"])["mac"] = rng.choice(["02:00:00:00:00:01", "01:00:5e:00:00:01"])
    elif kind == 16:  # a member given by its node (s9 is none)
        _, pool = _pool(doc, rng)
        pool["servers"].append({"node": rng.choice(["s1", "s2", "s9"])})
    elif kind == 17:  # a service's own monitor
        _, service = _service(doc, rng)
        service["health"] = rng.choice([{"type": "udp"}, {"type": "tcp", "timeout": 2}, {"type": "tcp"}])
    else:  # protocols
        _, service = _service(doc, rng)
        service["protocols"] = rng.choice(["tcp", "udp", "both"])


@pytest.fixture
def few_marks(monkeypatch):
    """Tunnel and probe marks from 8 values only, so edits collide often;
    the base document's addresses get distinct ones."""

    known = [f"{mode}|192.0.2.{i}" for mode in ("l3-ipip", "l3-gre") for i in (41, 42)]
    known += [f"probe|10.10.0.{i}" for i in (31, 32)]

    def mark(text: str) -> int:
        index = known.index(text) if text in known else zlib.crc32(text.encode()) % 8
        return naming.MARK_BASE | index

    monkeypatch.setattr(naming, "tunnel_mark", lambda mode, address: mark(f"{mode}|{address}"))
    monkeypatch.setattr(naming, "probe_mark", lambda address: mark(f"probe|{address}"))


def outcome(load) -> tuple:
    try:
        return "ok", load()
    except IntentError as error:
        return "refused", [str(p) for p in error.problems]


@pytest.mark.parametrize("seed", range(13))
def test_random_edits_reload_as_a_cold_load_does(seed, few_marks):
    rng = random.Random(seed)
    current = base()
    reloader = Reloader()
    reloader.parse(json.dumps(current), SOURCE)
    refused = accepted = 0
    for _ in range(40):
        edited = copy.deepcopy(current)
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutate(edited, rng)
        text = json.dumps(edited)
        cold = outcome(lambda text=text: parse_intent(text, SOURCE))
        warm = outcome(lambda text=text: reloader.parse(text, SOURCE))
        assert warm == cold, json.dumps(edited, indent=1)
        if cold[0] == "ok":
            current, accepted = edited, accepted + 1
        else:
            refused += 1
    # The edits must exercise both answers, or the comparison proves little.
    assert accepted >= 3 and refused >= 10, (accepted, refused)


def test_the_base_document_is_valid_with_few_marks(few_marks):
    parse_intent(json.dumps(base()), SOURCE)


def test_a_weight_edit_verifies_only_its_pool_and_the_services_on_it(monkeypatch):
    reloader = Reloader()
    reloader.parse(json.dumps(base()), SOURCE)
    seen = []
    real = rules.verify
    monkeypatch.setattr(rules, "verify", lambda doc, source: seen.append(doc) or real(doc, source))
    edited = base()
    edited["pools"]["far"]["servers"][0]["weight"] = 7
    reloader.parse(json.dumps(edited), SOURCE)
    [part] = seen
    assert sorted(part["pools"]) == ["far"]
    assert sorted(part["services"]) == ["svc03", "svc10"]


def test_a_changed_vip_that_is_a_member_address_verifies_the_whole_document(monkeypatch):
    reloader = Reloader()
    reloader.parse(json.dumps(base()), SOURCE)
    edited = base()
    edited["services"]["six"]["vip"] = "10.10.0.22"  # a member of pool api
    with pytest.raises(IntentError) as refused:
        reloader.parse(json.dumps(edited), SOURCE)
    assert [p.pointer for p in refused.value.problems] == [p.pointer for p in cold(edited)]
    assert any("VIP 10.10.0.22 is the address of pool api member 1" in str(p) for p in refused.value.problems)


def cold(doc: dict) -> list:
    with pytest.raises(IntentError) as error:
        parse_intent(json.dumps(doc), SOURCE)
    return error.value.problems


def test_marks_of_an_edit_verified_in_full_are_not_forgotten(few_marks):
    """A stale mark sends an edit to a full verify; the marks that edit adds
    must still be known to the next reload (a bug the random chains found)."""
    reloader = Reloader()
    doc = base()
    reloader.parse(json.dumps(doc), SOURCE)
    doc["pools"]["far"]["servers"].pop(0)  # 192.0.2.41 leaves: its marks go stale
    reloader.parse(json.dumps(doc), SOURCE)
    # 192.0.2.14's l3-gre mark is 192.0.2.41's (stale): a full verify, which passes.
    doc["pools"]["far"]["servers"].append({"address": "192.0.2.14"})
    reloader.parse(json.dumps(doc), SOURCE)
    # 198.51.100.2's l3-ipip mark is 192.0.2.14's, from a pool and service of its own.
    doc["pools"]["q"] = {"servers": [{"address": "198.51.100.2"}]}
    doc["services"]["tunnelled"] = {"vip": "10.10.0.130", "ports": 80, "pool": "q", "dsr": {"mode": "l3-ipip"}}
    problems = cold(doc)
    assert any("gets the same mark" in str(p) for p in problems)
    with pytest.raises(IntentError) as refused:
        reloader.parse(json.dumps(doc), SOURCE)
    assert [str(p) for p in refused.value.problems] == [str(p) for p in problems]
