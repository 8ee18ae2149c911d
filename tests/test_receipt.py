"""The receipt (kdsr/receipt.py): an unchanged re-apply skips validate and
compile, and any change to an input or to the kernel goes back to the full
plan.  The CLI runs against a fake kernel given an nftables generation; the
real kernel's token is exercised by
netns-lab/tests/test_generation_reuse_lab.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_in_process import install_kernel
from cli_in_process import run_kdsr as kdsr
from generation_kernel import GenerationKernel

from kdsr import cli, receipt
from kdsr.compile import compile_node
from kdsr.intent import load_intent
from kdsr.kernel.state import StateStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(receipt, "netns_cookie", lambda: 4242)
    return install_kernel(monkeypatch, GenerationKernel())


@pytest.fixture
def loads(monkeypatch):
    """How many times the CLI validated the intent."""
    count = []
    real = cli._load

    def counting(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "_load", counting)
    return count


def apply_twice(tmp_path, intent, node):
    first = kdsr(tmp_path, "apply", str(intent), "--node", node)
    assert first.exit_code == 0 and "read back and verified" in first.output, first.output
    return kdsr(tmp_path, "apply", str(intent), "--node", node)


@pytest.mark.parametrize("node", ["lb1", "s1"])
def test_an_unchanged_reapply_neither_validates_nor_compiles_nor_writes(tmp_path, intent, kernel, loads, node):
    writes = None
    first = kdsr(tmp_path, "apply", str(intent), "--node", node)
    assert first.exit_code == 0, first.output
    writes = kernel.writes
    assert len(loads) == 1
    again = kdsr(tmp_path, "apply", str(intent), "--node", node)
    assert again.exit_code == 0, again.output
    assert "No changes" in again.output
    assert len(loads) == 1, "the second apply validated the intent again"
    assert kernel.writes == writes
    plan = kdsr(tmp_path, "plan", str(intent), "--node", node, "--detailed-exitcode")
    assert plan.exit_code == 0 and len(loads) == 1, plan.output


def test_an_edited_intent_is_planned_in_full(tmp_path, intent, kernel, loads):
    assert "No changes" in apply_twice(tmp_path, intent, "lb1").output
    doc = json.loads(intent.read_text())
    doc["pools"]["web"]["servers"][0]["weight"] = 3
    intent.write_text(json.dumps(doc))
    edited = kdsr(tmp_path, "apply", str(intent), "--node", "lb1")
    assert edited.exit_code == 0 and "to change" in edited.output and len(loads) == 2, edited.output


def test_a_hand_made_nftables_change_is_planned_in_full(tmp_path, intent, kernel, loads):
    apply_twice(tmp_path, intent, "lb1")
    table = kernel.nft.tables[("netdev", "kdsr")]
    slots = next(elements for name, (_decl, elements) in table.maps.items() if name.startswith("pool-web-v4"))
    del slots[min(slots)]
    kernel.hand_edit()
    plan = kdsr(tmp_path, "plan", str(intent), "--node", "lb1", "--detailed-exitcode")
    assert plan.exit_code == 2 and len(loads) == 2, plan.output


def test_a_changed_sysctl_is_seen_without_compiling(tmp_path, intent, kernel, loads):
    """Sysctls, addresses, links and IPVS have no generation: the receipt's
    copy of what the intent wants is diffed against a fresh read; a
    difference sends the plan down the full path, which names it."""
    apply_twice(tmp_path, intent, "s1")
    kernel.sysctl.values["net/ipv4/conf/all/arp_ignore"] = "0"
    plan = kdsr(tmp_path, "plan", str(intent), "--node", "s1", "--detailed-exitcode")
    assert plan.exit_code == 2 and "arp_ignore" in plan.output and len(loads) == 2, plan.output


def test_a_drain_another_kdsr_or_another_node_is_planned_in_full(tmp_path, intent, kernel, loads, monkeypatch):
    apply_twice(tmp_path, intent, "lb1")
    drained = kdsr(tmp_path, "drain", str(intent), "s1", "--node", "lb1")
    assert drained.exit_code == 0, drained.output
    count = len(loads)
    # The drain left the receipt of the drained state: the next apply uses it.
    assert "No changes" in kdsr(tmp_path, "apply", str(intent), "--node", "lb1").output
    assert len(loads) == count, "the drain left no receipt the next apply could use"
    # The drained set is an input: changed behind kdsr's back (as an older
    # kdsr's drain, which left no receipt, did), the receipt must not serve.
    state = StateStore(tmp_path / "state").load("lb1")
    state.drained.add("s2")
    StateStore(tmp_path / "state").save(state)
    assert "to change" in kdsr(tmp_path, "plan", str(intent), "--node", "lb1").output
    assert len(loads) == count + 1
    state.drained.discard("s2")
    StateStore(tmp_path / "state").save(state)
    assert "No changes" in kdsr(tmp_path, "apply", str(intent), "--node", "lb1").output
    assert len(loads) == count + 1
    monkeypatch.setattr(receipt, "code_digest", lambda: "another kdsr")
    assert "No changes" in kdsr(tmp_path, "apply", str(intent), "--node", "lb1").output
    assert len(loads) == count + 2
    other = kdsr(tmp_path, "apply", str(intent), "--node", "s1")
    assert other.exit_code == 0 and "Applied" in other.output and len(loads) == count + 3, other.output


def test_no_receipt_when_another_commit_came_between(tmp_path, intent, kernel, loads, monkeypatch):
    real = kernel.nft.token
    monkeypatch.setattr(kernel.nft, "token", lambda f, n: (real(f, n)[0], False))
    apply_twice(tmp_path, intent, "lb1")
    assert len(loads) == 2
    monkeypatch.setattr(kernel.nft, "token", lambda f, n: None)
    kdsr(tmp_path, "apply", str(intent), "--node", "lb1")
    assert len(loads) == 3


def test_the_receipt_keeps_the_model_exactly(example_path):
    intent = load_intent(example_path)
    for node in intent.node_names():
        desired = compile_node(intent, node)
        assert receipt.decode(json.loads(json.dumps(receipt.encode(desired)))) == desired


def test_kdsr_run_leaves_a_receipt_the_next_apply_uses(tmp_path, intent, kernel, loads, monkeypatch):
    """`kdsr run` records the receipt after each verified apply, with the
    servers health took out: a config-management `kdsr apply` of the same
    file while it runs is answered from it.  Once no daemon reports the
    server down, the same receipt must not serve."""
    from kdsr.commands import health as health_commands
    from kdsr.health import status as health_status
    from kdsr.health.daemon import Runner
    from kdsr.health.probes import Result

    doc = json.loads(intent.read_text())
    doc["pools"]["web"]["health"] = {"type": "tcp", "port": 80, "interval": 1, "timeout": 0.5, "rise": 2, "fall": 3}
    intent.write_text(json.dumps(doc))
    down_server = str(load_intent(intent).pool("web").members[0].address)
    ran = []

    def one_event(load, node, kernel, store, wait, adopt, listen, verified=None, **_options):
        """The daemon's start and one server falling, then return (no signals, no threads)."""
        probe = lambda target: Result(target.server != down_server, 0.001, "refused")  # noqa: E731
        runner = Runner(load, node, kernel, store, adopt=adopt, emit=[].append, probe_fn=probe, verified=verified)
        runner.start()
        runner._stop_probes()
        for _ in range(3):  # fall
            for key, target in runner.targets.items():
                runner.results.put((runner._generation, key, runner._probe(target)))
            runner.step(poll=0)
        runner.publish()
        ran.append(runner.down())
        return 0

    monkeypatch.setattr(health_commands, "run_daemon", one_event)
    run = kdsr(tmp_path, "run", str(intent), "--node", "lb1")
    assert run.exit_code == 0, run.output
    assert ran == [frozenset({("web", down_server)})]
    writes, validated = kernel.writes, len(loads)

    again = kdsr(tmp_path, "apply", str(intent), "--node", "lb1")
    assert again.exit_code == 0 and "No changes" in again.output, again.output
    assert len(loads) == validated, "the apply planned in full: kdsr run left no receipt it could use"
    assert kernel.writes == writes

    # The daemon is gone: nothing reports the server down any more, so the
    # receipt (made with it down) must not serve; the full plan puts it back.
    monkeypatch.setattr(health_status, "live_view", lambda store, node: None)
    back = kdsr(tmp_path, "apply", str(intent), "--node", "lb1")
    assert back.exit_code == 0 and "No changes" not in back.output, back.output
    assert len(loads) == validated + 1


def test_a_missing_announce_route_is_planned_in_full(tmp_path, kernel, loads):
    """Announce routes have no generation either: after a reboot-like loss
    of one, the receipt's diff sees it and the full plan puts it back."""
    from kdsr.compile.bird import announce_routes

    example = load_intent(ROOT / "examples" / "l2-bgp-ha.json")
    assert receipt.decode(json.loads(json.dumps(receipt.encode(compile_node(example, "lb1"))))).announce
    intent = tmp_path / "bgp.json"
    intent.write_text((ROOT / "examples" / "l2-bgp-ha.json").read_text())
    assert "No changes" in apply_twice(tmp_path, intent, "lb1").output
    assert len(loads) == 1
    gone = announce_routes(compile_node(example, "lb1").bird)[0]
    kernel.links.announce.remove(gone)
    plan = kdsr(tmp_path, "plan", str(intent), "--node", "lb1", "--detailed-exitcode")
    assert plan.exit_code == 2 and f"+ announce route {gone.prefix}" in plan.output and len(loads) == 2, plan.output


def _on_xdp(example_path: Path, tmp_path: Path) -> Path:
    doc = json.loads(example_path.read_text())
    for service in doc["services"].values():
        service["dsr"] = {**service.get("dsr", {}), "mode": "l2", "engine": "xdp"}
    path = tmp_path / "xdp.json"
    path.write_text(json.dumps(doc))
    return path


def test_the_receipt_keeps_an_xdp_model_exactly(example_path, tmp_path):
    intent = load_intent(_on_xdp(example_path, tmp_path))
    desired = compile_node(intent, "lb1")
    assert desired.xdp is not None
    assert receipt.decode(json.loads(json.dumps(receipt.encode(desired)))) == desired


def test_an_unchanged_xdp_reapply_is_answered_by_the_receipt(tmp_path, example_path, kernel, loads):
    for family in ("ipv4", "ipv6"):
        kernel.sysctl.values[f"net/{family}/conf/eth0/forwarding"] = "0"
    path = _on_xdp(example_path, tmp_path)
    again = apply_twice(tmp_path, path, "lb1")
    assert again.exit_code == 0 and "No changes" in again.output, again.output
    assert len(loads) == 1


def test_the_daemons_receipt_parts_write_what_a_full_encoding_writes(example_path, tmp_path):
    """`kdsr run` reuses the encoded text of the xdp objects compile hands
    back again (receipt.Parts): the file must be the one a fresh encoding
    writes, after any sequence of health events, and a note holding a
    part's stand-in must not be taken for one."""
    from kdsr.compile import CompileCache
    from kdsr.compile.effective import effective_intent

    intent = load_intent(_on_xdp(example_path, tmp_path))
    cache, parts = CompileCache(), receipt.Parts()
    pool = next(p for p in intent.pools if len(p.members) > 1)
    down = frozenset({(pool.name, str(pool.members[0].address))})
    notes = ["plain", "\0kdsr-receipt-part-0"]
    for gone in (frozenset(), down, frozenset(), down, down):
        desired = compile_node(effective_intent(intent, gone).intent, "lb1", cache=cache)
        assert desired.xdp is not None
        for doc in ({"desired": desired, "notes": notes[:1]}, {"desired": desired, "notes": notes}):
            text = parts.dumps(doc, "desired")
            assert text == json.dumps({**doc, "desired": receipt.encode(desired)}, separators=(",", ":"))
            assert receipt.decode(json.loads(text)["desired"]) == desired
