"""The nft text form kdsr uses for flow pinning, against the host kernel's nft 1.0.6.

- every golden batch, written as text, gives the kernel exactly the table the
  JSON batch gives (so the text path is not a second dialect);
- a pinned intent applies, lists back in text and JSON, plans empty, and a
  rolled-back transition restores the pinned chain (whose map statement the
  JSON listing can only print as text).
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kdsr.kernel import nft_text  # noqa: E402

PINNED = {
    "version": 1,
    "services": {
        "web": {
            "vip": "10.10.0.100",
            "ports": [80, 443],
            "pool": "web",
            "hashing": {"flow_pinning": {"timeout": 60, "max_flows": 2048}},
        },
        "dns": {"vip": "10.10.0.100", "ports": 53, "protocols": "udp", "pool": "web"},
        "web6": {"vip": "fd00:10::100", "ports": 80, "pool": "web6", "hashing": {"flow_pinning": True}},
    },
    "pools": {
        "web": {"servers": [{"address": "10.10.0.11"}, {"address": "10.10.0.12", "weight": 0}]},
        "web6": {"servers": [{"address": "fd00:10::11"}, {"address": "fd00:10::12"}]},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24", "fd00:10::2/64"]}},
}


class Scratch:
    """A throw-away namespace with eth0/eth1 (veth), deleted by name afterwards."""

    def __init__(self, tmp: Path):
        self.ns = f"kdsr-{secrets.token_hex(3)}-nt"
        self.tmp = tmp
        self.state = tmp / f"{self.ns}-state"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        for ifname in ("eth0", "eth1"):
            subprocess.run(
                ["ip", "-n", self.ns, "link", "add", ifname, "type", "veth", "peer", "name", f"p{ifname}"], check=True
            )

    def run(self, *argv: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True, input=input, timeout=60
        )

    def kdsr(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "kdsr", "--state-dir", str(self.state), *args)

    def listing(self) -> list[dict]:
        out = self.run("nft", "-j", "list", "table", "netdev", "kdsr")
        assert out.returncode == 0, out.stderr
        items = []
        for item in json.loads(out.stdout)["nftables"]:
            ((kind, obj),) = item.items()
            if kind == "metainfo":
                continue
            obj = {k: v for k, v in obj.items() if k != "handle"}
            if "elem" in obj:
                obj["elem"] = sorted(json.dumps(e, sort_keys=True) for e in obj["elem"])
            items.append({kind: obj})
        return sorted(items, key=lambda i: json.dumps(i, sort_keys=True))

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@pytest.fixture
def scratch(lab_available, tmp_path):
    made = []

    def make():
        made.append(Scratch(tmp_path))
        return made[-1]

    yield make
    for ns in made:
        ns.delete()


GOLDEN = sorted((ROOT / "tests" / "golden").glob("*/*.nft.json"))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.parent.name)
def test_text_form_of_golden_batches_builds_the_same_table(scratch, path):
    commands = json.loads(path.read_text())["nftables"]
    if not any(c.get("add", {}).get("table", {}).get("family") == "netdev" for c in commands):
        pytest.skip("not a netdev table batch")
    ifname = next(c["add"]["chain"]["dev"] for c in commands if "dev" in c.get("add", {}).get("chain", {}))
    by_json, by_text = scratch(), scratch()
    for ns in (by_json, by_text):
        ns.run("ip", "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname[:12]}p")
    result = by_json.run("nft", "-j", "-f", "-", input=path.read_text())
    if result.returncode != 0 and nft_text.needs_text(commands):
        # Flow pinning's map statements: libnftables before 1.0.9 has no JSON
        # for them, so there is nothing to compare the text form with here
        # (test_nft_skeleton holds that batch to nft/l2-lb-flow-pinning.nft).
        pytest.skip(f"this nft cannot read the batch as JSON: {result.stderr.strip().splitlines()[0]}")
    assert result.returncode == 0, result.stderr
    text = nft_text.render(commands)
    result = by_text.run("nft", "-f", "-", input=text)
    assert result.returncode == 0, f"{result.stderr}\n{text[:2000]}"
    assert by_text.listing() == by_json.listing()


def test_pinned_intent_applies_lists_back_and_replans_empty(scratch, tmp_path):
    node = scratch()
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps(PINNED))
    check = node.kdsr("apply", str(path), "--node", "lb1", "--dry-run")
    assert check.returncode == 0, check.stderr
    applied = node.kdsr("apply", str(path), "--node", "lb1")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "warning" not in applied.stderr, applied.stderr  # libnftables' JSON-listing noise is filtered
    text = node.run("nft", "list", "table", "netdev", "kdsr")
    assert text.returncode == 0, text.stderr
    assert "update @pins-web-v4 { jhash ip saddr . ip daddr . meta l4proto . th sport . th dport" in text.stdout
    assert "typeof symhash mod 2 : meta mark" in text.stdout
    # What nft lists, nft reads back (a user's `nft list ruleset > file` keeps working).
    relist = node.run("nft", "-c", "-f", "-", input=text.stdout.replace("table netdev kdsr", "table netdev kdsrcopy"))
    assert relist.returncode == 0, relist.stderr
    listing = node.listing()
    pinned_rules = [i["rule"] for i in listing if "rule" in i and any(isinstance(e, str) for e in i["rule"]["expr"])]
    # Per pinned selector: pin, unpin a stale pin, pin afresh; nft 1.0.6's
    # JSON listing prints each map statement as text.
    assert len(pinned_rules) == 6, pinned_rules
    assert "delete @pins-web-v4 { jhash ip saddr . ip daddr . meta l4proto . th sport . th dport" in text.stdout
    applied_again = node.kdsr("apply", str(path), "--node", "lb1")
    assert applied_again.returncode == 0 and "No changes" in applied_again.stdout, applied_again.stdout
    replan = node.kdsr("plan", str(path), "--node", "lb1", "--detailed-exitcode")
    assert replan.returncode == 0, replan.stdout + replan.stderr


def test_rolled_back_transition_restores_the_pinned_chain(scratch, tmp_path):
    node = scratch()
    before_path, after_path = tmp_path / "before.json", tmp_path / "after.json"
    before_path.write_text(json.dumps(PINNED))
    after = copy.deepcopy(PINNED)
    after["services"]["web"]["hashing"]["flow_pinning"]["timeout"] = 90  # a new selector chain
    after_path.write_text(json.dumps(after))
    assert node.kdsr("apply", str(before_path), "--node", "lb1").returncode == 0
    before = node.listing()
    # A record the kernel refuses to restore: the step after the nft
    # transaction fails, so the transaction is undone with what was read back.
    state_file = node.state / "lb1.json"
    state = json.loads(state_file.read_text())
    state["sysctl_previous"] = {"net/ipv4/conf/eth0/arp_ignore": "not-a-number"}
    state_file.write_text(json.dumps(state))
    result = node.kdsr("apply", str(after_path), "--node", "lb1")
    assert result.returncode == 6, result.stdout + result.stderr
    assert node.listing() == before, "the rolled-back table differs from the one before"


def test_a_large_batch_goes_as_text_and_builds_what_json_builds(scratch, tmp_path):
    """Over TEXT_BATCH_ELEMENTS (kdsr/kernel/nft.py) kdsr sends the batch
    as text: through the CLI it applies, replans empty, and the kernel holds
    exactly what the same batch as JSON builds."""
    from kdsr.compile import compile_node
    from kdsr.diff import diff_table
    from kdsr.intent import load_intent
    from kdsr.kernel import nft
    from kdsr.kernel.nft_json import batch_for

    doc = copy.deepcopy(PINNED)
    doc["services"], doc["pools"] = {}, {}
    for i in range(6):  # 6 default tables of 4,093 slots: over the threshold
        doc["services"][f"s{i}"] = {"vip": f"10.10.0.{100 + i}", "ports": [80, 443], "pool": f"p{i}"}
        doc["services"][f"s{i}-6"] = {"vip": f"fd00:10::{100 + i}", "ports": "8000-8099", "pool": f"p{i}-6"}
        doc["pools"][f"p{i}"] = {"servers": [{"address": f"10.10.0.{11 + i}"}, {"address": f"10.10.0.{31 + i}"}]}
        doc["pools"][f"p{i}-6"] = {"servers": [{"address": f"fd00:10::{11 + i}"}]}
    path = tmp_path / "large.json"
    path.write_text(json.dumps(doc))
    table = compile_node(load_intent(path), "lb1").tables[0]
    commands = batch_for(diff_table(table, None, []))
    assert nft_text.element_count(commands) >= nft.TEXT_BATCH_ELEMENTS
    assert nft._as_text(commands) is not None

    by_kdsr, by_json = scratch(), scratch()
    applied = by_kdsr.kdsr("apply", str(path), "--node", "lb1")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    replan = by_kdsr.kdsr("plan", str(path), "--node", "lb1", "--detailed-exitcode")
    assert replan.returncode == 0, replan.stdout + replan.stderr
    loaded = by_json.run("nft", "-j", "-f", "-", input=json.dumps({"nftables": commands}))
    assert loaded.returncode == 0, loaded.stderr
    assert by_kdsr.listing() == by_json.listing()
