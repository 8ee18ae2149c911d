"""Which form a batch goes to libnftables in (kdsr/kernel/nft.py
``_as_text``): JSON normally; text when JSON cannot say it (flow pinning) or
when the batch is large enough that JSON's parser costs ~100 MB more."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from kdsr.compile import compile_node
from kdsr.diff import diff_table
from kdsr.intent import load_intent, parse_intent
from kdsr.kernel import nft, nft_text
from kdsr.kernel.nft_json import batch_for

ROOT = Path(__file__).resolve().parents[1]


def first_batch(intent, family: str = "netdev") -> list[dict]:
    """The commands that create the load balancer's ``family`` table from nothing."""
    desired = compile_node(intent, intent.load_balancers[0].name)
    table = next(t for t in desired.tables if t.family == family)
    return batch_for(diff_table(table, None, []))


def test_a_small_batch_goes_as_json(monkeypatch):
    commands = first_batch(load_intent(ROOT / "examples" / "l2-web.json"))
    assert 0 < nft_text.element_count(commands) < nft.TEXT_BATCH_ELEMENTS
    assert nft._as_text(commands) is None


def test_a_batch_over_the_threshold_goes_as_text(monkeypatch):
    commands = first_batch(load_intent(ROOT / "examples" / "l2-web.json"))
    count = nft_text.element_count(commands)
    monkeypatch.setattr(nft, "TEXT_BATCH_ELEMENTS", count)
    text = nft._as_text(commands)
    assert text is not None and text == nft_text.render(commands)
    assert text.startswith("add table netdev kdsr\n")


def test_element_count_counts_element_commands_and_map_declarations():
    commands = first_batch(load_intent(ROOT / "examples" / "l2-web.json"))
    counted = sum(len(body["element"]["elem"]) for cmd in commands for body in cmd.values() if "element" in body)
    assert nft_text.element_count(commands) == counted > 0
    inline = {"add": {"map": {"family": "netdev", "table": "t", "name": "m", "elem": [[0, "10.0.0.1"], [1, "x"]]}}}
    assert nft_text.element_count(commands + [inline]) == counted + 2


def test_what_text_cannot_say_stays_json_however_large(monkeypatch):
    # The L3 chains' rules use expressions the renderer does not know (the
    # raw payloads that read an ICMP error's embedded header): a large batch
    # of them falls back to JSON instead of failing.
    commands = first_batch(load_intent(ROOT / "examples" / "l3-ipip.json"))
    monkeypatch.setattr(nft, "TEXT_BATCH_ELEMENTS", 0)
    assert nft._as_text(commands) is None


def test_flow_pinning_still_goes_as_text_and_elements_are_not_walked(monkeypatch):
    doc = json.loads((ROOT / "examples" / "l2-web.json").read_text())
    pinned = copy.deepcopy(doc)
    for service in pinned["services"].values():
        service.setdefault("hashing", {})["flow_pinning"] = True
    commands = first_batch(parse_intent(json.dumps(pinned), "pinned.json"))
    assert nft_text.needs_text(commands)
    assert nft._as_text(commands) is not None
    # An element command is never walked: its values cannot hold a statement.
    walked = []
    monkeypatch.setattr(nft_text, "_needs_text", lambda value: walked.append(value) or False)
    nft_text.needs_text(commands)
    assert walked and not any("element" in next(iter(cmd.values())) for cmd in walked)
