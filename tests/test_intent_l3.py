"""Bad input for the L3 modes and the ipvs engine: one clear problem each,
naming the intent path and how to fix it."""

import json
from pathlib import Path

import pytest

from kdsr import naming
from kdsr.errors import IntentError
from kdsr.intent import parse_intent
from kdsr.intent.model import L3_TUNNELS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def problems(mutate, name="l3-ipip"):
    doc = json.loads((EXAMPLES / f"{name}.json").read_text())
    mutate(doc)
    with pytest.raises(IntentError) as caught:
        parse_intent(json.dumps(doc), "x.json")
    return caught.value.problems


def dsr(doc, service="web", **fields):
    doc["services"][service]["dsr"].update(fields)


def test_the_l3_examples_are_valid():
    for name in ("l3-ipip", "l3-gre-ipvs", "l3-ip6tnl"):
        parse_intent((EXAMPLES / f"{name}.json").read_text(), name)


@pytest.mark.parametrize(
    "mutate, pointer, words",
    [
        (lambda d: dsr(d, mode="l3-ip6tnl"), "/services/web/dsr/mode", 'use "l3-ipip" or "l3-gre"'),
        (lambda d: dsr(d, mss_clamp=400), "/services/web/dsr/mss_clamp", "too small to carry a TCP segment"),
        (lambda d: dsr(d, mss_clamp=1460), "/services/web/dsr/mss_clamp", "do not fit path_mtu 1500"),
        (lambda d: dsr(d, path_mtu=576), "/services/web/dsr/path_mtu", "Raise path_mtu to at least"),
        (
            lambda d: d["pools"]["web"]["servers"].append({"address": "127.0.0.9"}),
            "/pools/web/servers/3/address",
            "not routable",
        ),
        (
            lambda d: d["pools"]["web"]["servers"][0].update(mac="02:00:00:00:00:01"),
            "/pools/web/servers/0/mac",
            "a tunnel has no MACs to pin",
        ),
        (
            lambda d: d["load_balancers"]["lb1"].update(addresses=["fd00:2::2/64"]),
            "/load_balancers/lb1/addresses",
            "no IPv4 address to source",
        ),
    ],
)
def test_l3_bad_input(mutate, pointer, words):
    found = problems(mutate)
    assert any(p.pointer == pointer and words in str(p) for p in found), "\n".join(map(str, found))


@pytest.mark.parametrize(
    "hashing, pointer, words",
    [
        ({"fields": "five-tuple"}, "/services/web/hashing/fields", "cannot hash the five-tuple"),
        ({"seed": 7}, "/services/web/hashing/seed", "cannot take a seed"),
        ({"table_size": 251}, "/services/web/hashing/table_size", "not 251"),
    ],
)
def test_what_ipvs_cannot_honour_is_refused_and_named(hashing, pointer, words):
    def mutate(doc):
        doc["services"]["web"]["hashing"] = hashing

    found = problems(mutate, "l3-gre-ipvs")
    assert any(p.pointer == pointer and words in str(p) and p.hint for p in found), "\n".join(map(str, found))


def test_mss_clamp_on_l2_is_refused():
    def mutate(doc):
        for service in doc["services"].values():
            service["dsr"] = {"mode": "l2", "mss_clamp": 1400}
        for name in ("s1", "s2", "s3"):
            doc["servers"][name]["addresses"][0] = doc["servers"][name]["addresses"][0].replace("10.3.0", "10.2.0")

    found = problems(mutate)
    assert any(p.pointer.endswith("/dsr/mss_clamp") and "L2 DSR does not encapsulate" in str(p) for p in found)


def test_every_l3_mode_names_its_tunnels_after_its_link_kind():
    """naming.py keeps its own letter per mode (the kernel layer reads names
    without the intent): every mode of the intent has one, and it is its
    link kind's, in a name kdsr recognises as its own."""
    letters = {"ipip": "i", "gre": "g", "ip6tnl": "6"}
    for mode, (kind, _family, _overhead) in L3_TUNNELS.items():
        name = naming.tunnel_name(mode, "192.0.2.7")
        assert name.startswith(f"kdsr{letters[kind]}-") and naming.is_kdsr_link_name(name), (mode, name)
