"""Every ingress chain first lets frames not addressed to this host go on
(the lab proof with flooded frames is netns-lab/tests/test_flooded_frames.py);
the change from a table without that rule is one in-place chain update."""

import dataclasses
import json
from pathlib import Path

from kdsr.compile import compile_node
from kdsr.diff import diff
from kdsr.intent import load_intent, parse_intent
from kdsr.kernel import nft_text
from kdsr.kernel.nft_json import batch_for
from kdsr.model import Observed
from kdsr.plan_format import render_text

ROOT = Path(__file__).resolve().parent.parent
NOT_FOR_THIS_HOST = [{"match": {"op": "!=", "left": {"meta": {"key": "pkttype"}}, "right": "host"}}, {"accept": None}]


def _ingress_chains(desired):
    return [c for t in desired.tables for c in t.chains if c.hook is not None and c.hook.hook == "ingress"]


def _l3_intent(mode: str) -> object:
    family = 6 if mode == "l3-ip6tnl" else 4
    doc = json.loads((ROOT / "examples" / ("l3-ip6tnl.json" if family == 6 else "l3-ipip.json")).read_text())
    for service in doc["services"].values():
        service["dsr"] = {"mode": mode, "engine": "nft"}
    return parse_intent(json.dumps(doc), f"{mode}.json")


def test_every_ingress_chain_starts_with_the_host_check():
    cases = [
        (load_intent(ROOT / "tests" / "golden" / c / "intent.json"), n)
        for c, n in (("l2-web", "lb1"), ("l2-pinned-mac", "edge"))
    ]
    cases += [(_l3_intent(mode), "lb1") for mode in ("l3-ipip", "l3-gre", "l3-ip6tnl")]
    seen = set()
    for intent, node in cases:
        chains = _ingress_chains(compile_node(intent, node))
        assert chains, node
        for chain in chains:
            seen.add(chain.name)
            assert chain.rules[0].expr == NOT_FOR_THIS_HOST, (chain.name, chain.rules[0].expr)
            assert "frames not addressed to this host" in chain.rules[0].comment
            assert all(NOT_FOR_THIS_HOST != r.expr for r in chain.rules[1:])
    assert seen == {"ingress", "l3-ingress"}


def test_the_check_comes_before_the_l3_icmp_error_rules():
    chain = next(c for c in _ingress_chains(compile_node(_l3_intent("l3-ipip"), "lb1")) if c.name == "l3-ingress")
    # Routers send them to the load balancer's MAC, like the flow's packets.
    check = [i for i, r in enumerate(chain.rules) if r.expr == NOT_FOR_THIS_HOST]
    icmp = [i for i, r in enumerate(chain.rules) if "ICMP errors" in r.comment]
    assert check == [0] and len(icmp) == 2 and min(icmp) > 0, (check, icmp)


def test_the_rule_renders_as_nft_text():
    """Batches that hold flow pinning go to the kernel as nft text."""
    intent = load_intent(ROOT / "tests" / "golden" / "l2-web" / "intent.json")
    batch = [cmd for td in diff(compile_node(intent, "lb1"), Observed()).tables for cmd in batch_for(td)]
    text = nft_text.render(batch)
    assert "add rule netdev kdsr ingress meta pkttype != host accept comment" in text
    # A rule as the kernel lists it back (a rollback re-adds exactly that) renders the same.
    listed = {"match": {"op": "!=", "left": {"meta": {"key": "pkttype"}}, "right": "host"}}
    assert nft_text._statement(listed) == "meta pkttype != host"


def test_upgrade_from_a_table_without_the_check_is_one_in_place_chain_update():
    intent = load_intent(ROOT / "tests" / "golden" / "l2-web" / "intent.json")
    desired = compile_node(intent, "lb1")
    table = desired.tables[0]
    ingress = table.chain("ingress")
    before = dataclasses.replace(ingress, rules=ingress.rules[1:])
    old = dataclasses.replace(table, chains=tuple(before if c.name == "ingress" else c for c in table.chains))
    plan = diff(desired, Observed(tables=(old,)))
    assert [(c.action, c.kind, c.ident) for c in plan.changes] == [("update", "nft chain", "netdev kdsr/ingress")]
    assert "Plan: 0 to add, 1 to change, 0 to replace, 0 to destroy." in render_text(plan)
    (td,) = plan.tables
    batch = batch_for(td)
    # One transaction that flushes the chain and adds its rules back: no table,
    # map or element is touched, so the maps and their counters stay.
    verbs = [(verb, kind) for cmd in batch for verb, body in cmd.items() for kind in body]
    assert verbs == [("flush", "chain")] + [("add", "rule")] * len(ingress.rules), verbs
    assert batch[1]["add"]["rule"]["expr"] == NOT_FOR_THIS_HOST
