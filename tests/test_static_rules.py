"""Rules are static: adding or removing a service is map elements only.

The README promises that VIPs, ports and servers are map elements and the
chains never change with them.  A rule that names one of its pool's services
(say, in its comment) breaks that for the service whose name sorts first:
adding or removing it would rewrite the selector chain.  So each case here
adds and removes a service whose name sorts before every other and one that
sorts after, on every nft fast path (L2, L2 with flow pinning, L3), and
expects nothing but element changes.
"""

import copy
import json
from pathlib import Path

import pytest

from kdsr import operations
from kdsr.intent import parse_intent
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _l2(doc):
    return doc


def _pinned(doc):
    for service in doc["services"].values():
        service["hashing"] = {"flow_pinning": {"timeout": 30}}
    return doc


CASES = {
    "l2": ("l2-web", _l2, "10.10.0.100", {}),
    "l2-pinned": ("l2-web", _pinned, "10.10.0.100", {"hashing": {"flow_pinning": {"timeout": 30}}}),
    "l3-ipip": ("l3-ipip", _l2, "10.9.0.100", {"dsr": {"mode": "l3-ipip", "engine": "nft"}}),
}


def _doc(example: str, shape) -> dict:
    return shape(json.loads((EXAMPLES / f"{example}.json").read_text()))


def _intent(doc: dict):
    return parse_intent(json.dumps(doc), "intent.json")


def _plan(doc, kernel, store):
    return operations.prepare(_intent(doc), "lb1", kernel, store).plan


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["aaa-first", "zzz-last"])
def test_a_service_added_or_removed_is_map_elements_only(case, name, tmp_path):
    example, shape, vip, extra = CASES[case]
    kernel, store = FakeKernel(), StateStore(tmp_path / "state")
    kernel.sysctl.values.update({"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"})
    base = _doc(example, shape)
    pool = next(iter(base["pools"]))
    operations.apply(operations.prepare(_intent(base), "lb1", kernel, store), kernel, store)

    grown = copy.deepcopy(base)
    grown["services"][name] = {"vip": vip, "ports": 8443, "protocols": "tcp", "pool": pool, **extra}
    added = _plan(grown, kernel, store)
    assert added.changes, "adding a service changed nothing"
    assert {c.kind for c in added.changes} == {"nft element"}, [
        (c.action, c.kind, c.ident) for c in added.changes if c.kind != "nft element"
    ]
    operations.apply(operations.prepare(_intent(grown), "lb1", kernel, store), kernel, store)

    removed = _plan(base, kernel, store)
    assert removed.changes, "removing a service changed nothing"
    assert {c.kind for c in removed.changes} == {"nft element"}, [
        (c.action, c.kind, c.ident) for c in removed.changes if c.kind != "nft element"
    ]
