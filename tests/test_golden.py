"""Golden files pin the compiler's output byte for byte.

Each case in tests/golden/<case>/ holds intent.json and, per node, the
artefacts compile produces: the nft batch of a first apply (JSON), the
server-side addresses and sysctls, and the rendered plan.  Run
`make golden` (pytest --update-golden) to rewrite them; the diff is the
change to review.
"""

import json
from pathlib import Path

import pytest

from kdsr.compile import compile_node
from kdsr.diff import diff
from kdsr.intent import load_intent
from kdsr.kernel.nft_json import batch_for
from kdsr.model import Observed
from kdsr.plan_format import render_text

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "intent.json").exists())


def batch_text(batch: list[dict]) -> str:
    """The batch as JSON with one command per line and one map element per line.

    Maglev maps hold thousands of elements: a line each keeps the golden
    reviewable (a changed table shows as the slots that moved) and compact.
    """
    lines = ['{"nftables": [']
    for index, command in enumerate(batch):
        comma = "," if index + 1 < len(batch) else ""
        ((verb, body),) = command.items()
        if "element" not in body:
            lines.append(json.dumps(command, sort_keys=True) + comma)
            continue
        element = dict(body["element"])
        elems = element.pop("elem")
        head = json.dumps({verb: {"element": element}}, sort_keys=True)
        lines.append(head[: -len("}}}")] + ', "elem": [')
        lines += [json.dumps(e, sort_keys=True) + ("," if i + 1 < len(elems) else "") for i, e in enumerate(elems)]
        lines.append("]}}}" + comma)
    return "\n".join(lines) + "\n]}\n"


def test_batch_text_is_the_batch():
    intent = load_intent(GOLDEN / "l2-web" / "intent.json")
    plan = diff(compile_node(intent, "lb1"), Observed())
    batch = [cmd for td in plan.tables for cmd in batch_for(td)]
    assert json.loads(batch_text(batch)) == {"nftables": batch}


def artefacts(case_dir: Path) -> dict[str, str]:
    intent = load_intent(case_dir / "intent.json")
    out = {}
    for node in intent.node_names():
        desired = compile_node(intent, node)
        plan = diff(desired, Observed())
        out[f"{node}.plan.txt"] = render_text(plan, "intent.json")
        if desired.tables:
            batch = [cmd for td in plan.tables for cmd in batch_for(td)]
            out[f"{node}.nft.json"] = batch_text(batch)
        if desired.keepalived is not None:
            # The fragment names the intent file it came from: here, as the case's own.
            out[f"{node}.keepalived.conf"] = desired.keepalived.text.replace(json.dumps(intent.source), '"intent.json"')
        if desired.addresses or desired.sysctls:
            server = {
                "addresses": [{"interface": a.ifname, "address": a.cidr, "label": a.label} for a in desired.addresses],
                "sysctls": {s.dotted: s.value for s in desired.sysctls},
            }
            out[f"{node}.server.json"] = json.dumps(server, indent=1, sort_keys=True) + "\n"
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden(case, update_golden):
    case_dir = GOLDEN / case
    produced = artefacts(case_dir)
    if update_golden:
        for old in case_dir.iterdir():
            if old.name != "intent.json":
                old.unlink()
        for name, text in produced.items():
            (case_dir / name).write_text(text)
        return
    stored = {p.name: p.read_text() for p in case_dir.iterdir() if p.name != "intent.json"}
    assert sorted(stored) == sorted(produced), "artefact set changed; run `make golden` and review"
    for name, text in produced.items():
        assert text == stored[name], f"{case}/{name} differs from the compiler's output; run `make golden` and review"


def test_cases_exist():
    assert len(CASES) >= 3
