"""`kdsr plan --out FILE` then `kdsr apply --plan-file FILE`: exactly the
reviewed plan goes in, or nothing does (a stale plan exits 10 and lists what
changed).  The CLI runs against a fake kernel; the lab test with a real
kernel is netns-lab/tests/test_l2_dsr.py::test_a_saved_plan_is_refused_once_the_kernel_drifts.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from cli_in_process import install_kernel
from cli_in_process import run_kdsr as kdsr

from kdsr import saved_plan
from kdsr.errors import EXIT_STALE_PLAN, EXIT_USAGE
from kdsr.kernel.fake import FakeKernel
from kdsr.model import Address


@pytest.fixture
def kernel(monkeypatch):
    return install_kernel(monkeypatch, FakeKernel())


def save_plan(tmp_path, intent, node="s1"):
    out = tmp_path / f"{node}.plan"
    result = kdsr(tmp_path, "plan", str(intent), "--node", node, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_the_saved_plan_is_applied_and_the_next_plan_is_empty(tmp_path, intent, kernel):
    out = save_plan(tmp_path, intent)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert kernel.writes == 0
    result = kdsr(tmp_path, "apply", "--plan-file", str(out))
    assert result.exit_code == 0, result.output
    assert kernel.writes > 0 and "read back and verified" in result.output
    again = kdsr(tmp_path, "plan", str(intent), "--node", "s1", "--detailed-exitcode")
    assert again.exit_code == 0, again.output


def test_drift_since_the_plan_makes_it_stale_and_nothing_is_written(tmp_path, intent, kernel):
    kdsr(tmp_path, "apply", str(intent), "--node", "s1")
    kernel.sysctl.values["net/ipv4/conf/all/arp_ignore"] = "0"  # someone resets a sysctl kdsr set
    out = save_plan(tmp_path, intent)
    kernel.links.addresses["lo"].clear()  # ...and, after the review, deletes the VIPs
    writes = kernel.writes
    result = kdsr(tmp_path, "apply", "--plan-file", str(out))
    assert result.exit_code == EXIT_STALE_PLAN, result.output
    assert "is stale" in result.output and "nothing was changed" in result.output
    assert "planned now, not in the saved plan: create address" in result.output
    assert f"kdsr plan {intent} --node s1 --out {out}" in result.output
    assert kernel.writes == writes


def test_another_apply_since_the_plan_makes_it_stale(tmp_path, intent, kernel):
    out = save_plan(tmp_path, intent)
    assert kdsr(tmp_path, "apply", str(intent), "--node", "s1").exit_code == 0
    writes = kernel.writes
    result = kdsr(tmp_path, "apply", "--plan-file", str(out))
    assert result.exit_code == EXIT_STALE_PLAN, result.output
    assert "kdsr's record of node s1 changed" in result.output
    assert "no longer planned: create address" in result.output
    assert kernel.writes == writes


def test_state_kdsr_does_not_manage_does_not_make_a_plan_stale(tmp_path, intent, kernel):
    out = save_plan(tmp_path, intent)
    kernel.links.addr_add(Address(ifname="eth0", cidr="192.0.2.9/24"))  # foreign, unrelated
    kernel.sysctl.values["net/ipv4/ip_forward"] = "1"
    result = kdsr(tmp_path, "apply", "--plan-file", str(out))
    assert result.exit_code == 0, result.output


def test_the_plan_carries_its_intent_so_a_later_edit_changes_nothing(tmp_path, intent, kernel):
    out = save_plan(tmp_path, intent)
    doc = json.loads(intent.read_text())
    doc["services"]["web"]["vip"] = "10.10.0.200"
    intent.write_text(json.dumps(doc))
    assert kdsr(tmp_path, "apply", "--plan-file", str(out)).exit_code == 0
    assert "10.10.0.200/32" not in {a.cidr for a in kernel.links.addresses["lo"]}
    assert "10.10.0.100/32" in {a.cidr for a in kernel.links.addresses["lo"]}


def test_bad_plan_files_and_arguments_are_usage_errors(tmp_path, intent, kernel):
    out = save_plan(tmp_path, intent)
    other = tmp_path / "other.json"
    other.write_text('{"changes": []}')
    doc = json.loads(out.read_text())
    doc["kdsr_version"] = "0.0.0-elsewhere"
    old = tmp_path / "old.plan"
    old.write_text(json.dumps(doc))
    cases = [
        (["apply"], "give either INTENT_FILE or --plan-file"),
        (["apply", str(intent), "--plan-file", str(out)], "give either INTENT_FILE or --plan-file"),
        (["apply", "--plan-file", str(out), "--node", "lb1"], "was planned for node s1, not lb1"),
        (["apply", "--plan-file", str(tmp_path / "missing.plan")], "cannot read the saved plan"),
        (["apply", "--plan-file", str(other)], "not a plan saved by `kdsr plan --out`"),
        (["apply", "--plan-file", str(old)], "was made by kdsr 0.0.0-elsewhere"),
    ]
    for args, message in cases:
        result = kdsr(tmp_path, *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert message in result.output, (args, result.output)
    assert kernel.writes == 0


def test_dry_run_of_a_saved_plan_checks_it_and_writes_nothing(tmp_path, intent, kernel):
    out = save_plan(tmp_path, intent)
    result = kdsr(tmp_path, "apply", "--plan-file", str(out), "--dry-run")
    assert result.exit_code == 0 and "+ address" in result.output, result.output
    kernel.sysctl.values["net/ipv4/conf/all/arp_ignore"] = "2"
    assert kdsr(tmp_path, "apply", "--plan-file", str(out), "--dry-run").exit_code == EXIT_STALE_PLAN
    assert kernel.writes == 0


def test_differences_are_listed_up_to_a_limit():
    from types import SimpleNamespace

    from kdsr.diff import CREATE, Change, Plan
    from kdsr.kernel.state import NodeState

    state = NodeState(node="lb1")
    saved = saved_plan.SavedPlan("lb1.plan", "i.json", "", "lb1", "v", state.to_json(), [])
    plan = Plan(node="lb1", role="lb", changes=[Change(CREATE, "nft element", f"m[{i}]") for i in range(15)], tables=[])
    with pytest.raises(saved_plan.StalePlanError) as info:
        saved_plan.check_fresh(saved, SimpleNamespace(plan=plan, state=state))
    text = str(info.value)
    assert text.count("planned now, not in the saved plan") == saved_plan.DIFFERENCES_SHOWN
    assert "... and 5 more" in text
