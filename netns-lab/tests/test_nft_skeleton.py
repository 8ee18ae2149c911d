"""nft/*.nft (the readable skeletons) and the compiler build the same table.

Both are loaded into the kernel of a throw-away namespace and listed back as
JSON, so the kernel's own normal form is compared: chains, hooks, map
declarations and rule expressions (comments, handles and elements aside).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from kdsr.compile import compile_node
from kdsr.compile.lb_nft_l2 import pins_map_name, servers_map_name
from kdsr.compile.selectors import selectors_for
from kdsr.diff import diff
from kdsr.intent import load_intent
from kdsr.kernel import nft_text
from kdsr.kernel.nft_json import batch_for
from kdsr.model import Observed

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    # skeleton, golden intent, node, the selector the skeleton shows
    ("l2-lb.nft", "l2-web", "lb1", 4),
    ("l2-lb-pinned-mac.nft", "l2-pinned-mac", "edge", 4),
    ("l2-lb-flow-pinning.nft", "l2-flow-pinning", "edge", 4),
]


@pytest.fixture
def scratch_ns(lab_available):
    name = f"kdsr-{secrets.token_hex(3)}-skel"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _nft(ns: str, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _shape(ns: str, keep: set[str]) -> dict:
    """The table as the kernel lists it, minus handles, comments and elements.

    Maps and chains by name (listing order follows creation order, which
    differs); rules in chain order, which is what matters.
    """
    listing = json.loads(_nft(ns, "-j", "list", "table", "netdev", "kdsr"))["nftables"]
    shape: dict = {"map": {}, "chain": {}, "rule": {}}
    for item in listing:
        ((kind, obj),) = item.items()
        if kind not in shape:
            continue
        obj = {k: v for k, v in obj.items() if k not in ("handle", "comment", "elem")}
        name = obj["chain"] if kind == "rule" else obj["name"]
        if name not in keep:
            continue
        if kind == "rule":
            shape["rule"].setdefault(name, []).append(obj["expr"])
        else:
            shape[kind][name] = obj
    return shape


@pytest.mark.parametrize(("skeleton", "case", "node", "family"), CASES)
def test_skeleton_matches_compiler(scratch_ns, skeleton, case, node, family):
    intent = load_intent(ROOT / "tests" / "golden" / case / "intent.json")
    desired = compile_node(intent, node)
    device = desired.tables[0].chain("ingress").hook.device
    selector = next(s for s in selectors_for(intent) if s.family == family)
    subprocess.run(["ip", "-n", scratch_ns, "link", "add", device, "type", "veth", "peer", "name", "peer0"], check=True)
    pins, servers = pins_map_name(selector.pool.name, family), servers_map_name(selector.pool.name, family)
    keep = {"ingress", "services-v4", "services-v6", "service-ranges-v4", "service-ranges-v6", selector.name, servers}
    if selector.hashing.pinning is not None:
        keep |= {pins}

    text = (ROOT / "nft" / skeleton).read_text()
    for placeholder, value in {
        "@DEVICE@": device,
        "@SELECTOR@": selector.name,
        "@MOD@": str(selector.table_size),
        "@SEED@": hex(selector.hashing.seed),
        "@PINS@": pins,
        "@SERVERS@": servers,
        "@TIMEOUT@": str(selector.hashing.pinning.timeout if selector.hashing.pinning else 0),
        "@MAX_FLOWS@": str(selector.hashing.pinning.max_flows if selector.hashing.pinning else 0),
    }.items():
        text = text.replace(placeholder, value)
    _nft(scratch_ns, "-f", "-", stdin=text)
    from_skeleton = _shape(scratch_ns, keep)
    _nft(scratch_ns, "delete", "table", "netdev", "kdsr")

    batch = [cmd for td in diff(desired, Observed()).tables for cmd in batch_for(td)]
    if nft_text.needs_text(batch):  # flow pinning's map statements (libnftables 1.0.6)
        _nft(scratch_ns, "-f", "-", stdin=nft_text.render(batch))
    else:
        _nft(scratch_ns, "-j", "-f", "-", stdin=json.dumps({"nftables": batch}))
    from_compiler = _shape(scratch_ns, keep)

    assert from_skeleton == from_compiler, f"nft/{skeleton} and the compiler disagree; update one of them"
