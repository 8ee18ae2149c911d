"""Reusing a table read while the ruleset generation is unchanged never hides
a change (kdsr/kernel/nft_generation.py), on the host kernel in a throw-away
namespace.

`kdsr run` keeps one SystemKernel for its life and re-plans after each
health change; it must still see what anybody else did to its table since.
The script below runs inside the namespace: apply, then an outside `nft`
deletes one element of a selector map and another adds a foreign table,
and the same kernel object's next plan must show exactly the drift.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, subprocess, sys
from kdsr import operations
from kdsr.intent import load_intent
from kdsr.kernel.nft_generation import read_generation
from kdsr.kernel.state import StateStore
from kdsr.kernel.system import SystemKernel

intent = load_intent(sys.argv[1])
kernel, store = SystemKernel(), StateStore(sys.argv[2])
operations.apply(operations.prepare(intent, "lb1", kernel, store), kernel, store)
out = {"generation_after_apply": read_generation()}
first = kernel.nft.read_table("netdev", "kdsr", reuse=True)
again = kernel.nft.read_table("netdev", "kdsr", reuse=True)
out["reused_when_unchanged"] = first is again
out["noop_plan"] = len(operations.prepare(intent, "lb1", kernel, store).plan.changes)
# A new handle (kdsr run after a start) lists the table; the no-op plan
# proves it equal to the compiled one, which the handle keeps as its read.
fresh = SystemKernel()
prepared = operations.prepare(intent, "lb1", fresh, store)
compiled = next(t for t in prepared.desired.tables if t.family == "netdev")
out["fresh_noop_plan"] = len(prepared.plan.changes)
out["fresh_keeps_compiled"] = fresh.nft.read_table("netdev", "kdsr", reuse=True) is compiled

maps = [m for m in first.maps if m.name.startswith("pool-web-v4") and m.elements]
name, (key, _value) = maps[0].name, maps[0].elements[0]
subprocess.run(["nft", "delete", "element", "netdev", "kdsr", name, "{", str(key), "}"], check=True)
out["generation_after_drift"] = read_generation()
plan = operations.prepare(intent, "lb1", kernel, store).plan
out["drift"] = [f"{c.action} {c.kind} {c.ident}" for c in plan.changes]
plan = operations.prepare(intent, "lb1", fresh, store).plan
out["drift_fresh"] = [f"{c.action} {c.kind} {c.ident}" for c in plan.changes]
operations.apply(operations.prepare(intent, "lb1", kernel, store), kernel, store)
subprocess.run(["nft", "add", "table", "ip", "someone-else"], check=True)
out["after_foreign_table"] = len(operations.prepare(intent, "lb1", kernel, store).plan.changes)
print(json.dumps(out))
"""


@pytest.fixture
def scratch_ns(lab_available):
    name = f"kdsr-{secrets.token_hex(3)}-gen"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "link", "set", "peer0", "up"],
            ["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_reused_read_never_hides_a_change(scratch_ns, tmp_path):
    result = subprocess.run(
        ["ip", "netns", "exec", scratch_ns, sys.executable, "-c", SCRIPT]
        + [str(ROOT / "examples" / "l2-web.json"), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["generation_after_apply"] is not None, "the generation could not be read: nothing is reused"
    assert out["reused_when_unchanged"] and out["noop_plan"] == 0
    assert out["generation_after_drift"] > out["generation_after_apply"]
    assert len(out["drift"]) == 1 and out["drift"][0].startswith("create nft element"), out["drift"]
    # The compiled table kept as the read hides nothing either.
    assert out["fresh_noop_plan"] == 0 and out["fresh_keeps_compiled"]
    assert out["drift_fresh"] == out["drift"]
    # Another table's transaction bumps the generation too: re-read, still no change.
    assert out["after_foreign_table"] == 0


def _kdsr(ns: str, state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "kdsr", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_the_record_on_disk_serves_new_processes_and_never_hides_a_change(scratch_ns, tmp_path):
    """kernel/nft_cache.py through the real CLI: each command is a new process."""
    state = tmp_path / "state"
    intent = json.loads((ROOT / "examples" / "l2-web.json").read_text())
    original = tmp_path / "web.json"
    original.write_text(json.dumps(intent))
    intent["pools"]["web"]["servers"][2]["weight"] = 2
    heavier = tmp_path / "web-heavier.json"
    heavier.write_text(json.dumps(intent))

    first = _kdsr(scratch_ns, state, "apply", str(original), "--node", "lb1")
    assert first.returncode == 0, first.stderr
    assert "read back and verified" in first.stdout
    assert len(list((state / "cache").glob("nft-*"))) == 1, "the new table was not recorded"
    # kdsr/receipt.py: the verified apply left a receipt; the same intent again
    # is answered from it (nothing validated or compiled, so nothing rewritten).
    (receipt,) = (state / "cache").glob("receipt-*")
    written = receipt.stat().st_mtime_ns
    again = _kdsr(scratch_ns, state, "apply", str(original), "--node", "lb1")
    assert again.returncode == 0 and "No changes" in again.stdout, again.stdout + again.stderr
    assert _kdsr(scratch_ns, state, "plan", str(original), "--node", "lb1", "--detailed-exitcode").returncode == 0
    assert receipt.stat().st_mtime_ns == written, "the receipt did not serve: the intent was planned in full"

    # An element change: the generation proves the commit was the only one.
    change = _kdsr(scratch_ns, state, "apply", str(heavier), "--node", "lb1")
    assert change.returncode == 0, change.stderr
    assert "map elements as sent" in change.stdout, change.stdout
    assert _kdsr(scratch_ns, state, "plan", str(heavier), "--node", "lb1", "--detailed-exitcode").returncode == 0

    # Someone else's element delete bumps the generation: the record is not used.
    listing = subprocess.run(
        ["ip", "netns", "exec", scratch_ns, "nft", "-j", "list", "table", "netdev", "kdsr"],
        capture_output=True,
        text=True,
        check=True,
    )
    pool_map = next(
        i["map"]["name"]
        for i in json.loads(listing.stdout)["nftables"]
        if i.get("map", {}).get("name", "").startswith("pool-web-v4")
    )
    subprocess.run(
        ["ip", "netns", "exec", scratch_ns, "nft", "delete", "element", "netdev", "kdsr", pool_map, "{", "5", "}"],
        check=True,
    )
    drift = _kdsr(scratch_ns, state, "plan", str(heavier), "--node", "lb1", "--detailed-exitcode")
    assert drift.returncode == 2, drift.stdout + drift.stderr
    assert f"{pool_map}[5]" in drift.stdout, "the receipt hid a hand-made change"
    repair = _kdsr(scratch_ns, state, "apply", str(heavier), "--node", "lb1")
    assert repair.returncode == 0, repair.stderr
    assert _kdsr(scratch_ns, state, "plan", str(heavier), "--node", "lb1", "--detailed-exitcode").returncode == 0
