"""The CLI behaves the same everywhere, and says what it did.

Against the validating fake kernel: global options after the subcommand,
destroy finding its node like apply and asking on a terminal, run refusing a
server node with the usage code, plan refusing a kernel that cannot carry the
intent, drain refusing to leave a service with no server, and the --json and
--dry-run outputs of apply, drain, undrain and destroy.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from cli_in_process import install_kernel, run_kdsr

from kdsr import cli
from kdsr.errors import EXIT_ERROR, EXIT_KERNEL_FEATURE, EXIT_USAGE
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore
from kdsr.service_view import table_slots

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "l2-web.json"
PLAN_SCHEMA = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())


@pytest.fixture
def kernel(monkeypatch):
    return install_kernel(monkeypatch, FakeKernel())


@pytest.fixture
def intent(tmp_path):
    path = tmp_path / "intent.json"
    path.write_text(EXAMPLE.read_text())
    return path


def slots(kernel: FakeKernel, address: str) -> int:
    table = kernel.nft.read_table("netdev", "kdsr")
    return sum(servers.count(address) for name, servers in table_slots(table).items() if name.startswith("pool-web-v4"))


def test_global_options_work_after_the_subcommand(tmp_path, kernel, intent):
    elsewhere = tmp_path / "elsewhere"
    result = cli_result = run_kdsr(
        tmp_path, "apply", str(intent), "--node", "lb1", "--wait", "5", "--state-dir", str(elsewhere)
    )
    assert result.exit_code == 0, result.output
    assert StateStore(elsewhere).nodes() == ["lb1"], "--state-dir after the subcommand was ignored"
    assert not StateStore(tmp_path / "state").nodes()
    assert cli_result.output.rstrip().endswith("read back and verified.")


def test_destroy_with_the_intent_finds_the_node_as_apply_does(tmp_path, kernel, intent):
    for node in ("lb1", "s1"):  # two nodes recorded: without a way to pick, destroy would refuse
        assert run_kdsr(tmp_path, "apply", str(intent), "--node", node).exit_code == 0
    kernel.links.local = {"10.10.0.2"}  # this host is lb1
    refused = run_kdsr(tmp_path, "destroy")
    assert refused.exit_code == EXIT_USAGE and "pass --node" in refused.output
    result = run_kdsr(tmp_path, "destroy", str(intent))
    assert result.exit_code == 0, result.output
    assert "Destroyed what kdsr owned for node lb1." in result.output
    assert StateStore(tmp_path / "state").nodes() == ["s1"]


def test_destroy_on_a_terminal_asks_and_only_yes_goes_ahead(tmp_path, kernel, intent, monkeypatch):
    assert run_kdsr(tmp_path, "apply", str(intent), "--node", "lb1").exit_code == 0
    monkeypatch.setattr(cli, "_on_terminal", lambda: True)
    writes = kernel.writes
    no = cli_invoke(tmp_path, ["destroy", "--node", "lb1"], "y\n")
    assert no.exit_code == EXIT_ERROR and "Destroy cancelled; nothing was changed." in no.output
    assert kernel.writes == writes and kernel.nft.read_table("netdev", "kdsr") is not None
    yes = cli_invoke(tmp_path, ["destroy", "--node", "lb1"], "yes\n")
    assert yes.exit_code == 0, yes.output
    assert "- nft table netdev kdsr" in yes.output and kernel.nft.read_table("netdev", "kdsr") is None
    assert run_kdsr(tmp_path, "apply", str(intent), "--node", "lb1").exit_code == 0
    auto = cli_invoke(tmp_path, ["destroy", "--node", "lb1", "--auto-approve"], "")
    assert auto.exit_code == 0 and "Only 'yes'" not in auto.output


def cli_invoke(tmp_path, args: list[str], answer: str):
    from click.testing import CliRunner

    return CliRunner().invoke(cli.main, ["--state-dir", str(tmp_path / "state"), *args], input=answer)


def test_run_on_a_server_node_is_a_usage_error(tmp_path, kernel, intent):
    result = run_kdsr(tmp_path, "run", str(intent), "--node", "s1")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "s1 is a server node" in result.output


def test_plan_refuses_a_kernel_that_lacks_a_module_the_intent_needs(tmp_path, kernel):
    kernel.modules = {"nf_tables"}
    kernel.sysctl.values.update({"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"})
    result = run_kdsr(tmp_path, "plan", str(ROOT / "examples" / "l3-ipip.json"), "--node", "lb1")
    assert result.exit_code == EXIT_KERNEL_FEATURE, result.output
    assert "lacks ipip" in result.output and "to add" not in result.output


def test_a_yaml_tab_is_called_a_tab(tmp_path):
    path = tmp_path / "intent.yaml"
    path.write_text("version: 1\nservices:\n\tweb: {vip: 10.0.0.1}\n")
    result = run_kdsr(tmp_path, "validate", str(path))
    assert "a tab character" in result.output and "spaces" in result.output, result.output
    assert "1 problem;" in result.output


def test_a_drain_that_leaves_a_service_with_no_server_is_refused_unless_forced(tmp_path, kernel, intent):
    assert run_kdsr(tmp_path, "apply", str(intent), "--node", "lb1").exit_code == 0
    for server in ("s1", "s2"):
        assert run_kdsr(tmp_path, "drain", str(intent), server, "--node", "lb1").exit_code == 0
    writes = kernel.writes
    refused = run_kdsr(tmp_path, "drain", str(intent), "s3", "--node", "lb1")
    assert refused.exit_code == EXIT_USAGE, refused.output
    assert "would leave 4 services with no serving server" in refused.output, refused.output
    assert "--force" in refused.output and "Nothing was changed" in refused.output
    assert kernel.writes == writes and StateStore(tmp_path / "state").load("lb1").drained == {"s1", "s2"}
    # The plan of that state says so before anyone applies it.
    forced = run_kdsr(tmp_path, "drain", str(intent), "s3", "--node", "lb1", "--force")
    assert forced.exit_code == 0, forced.output
    assert "Warning: service web has no serving server" in forced.output
    assert "Drained s3 on lb1" in forced.output and slots(kernel, "10.10.0.13") == 0


def test_drain_dry_run_writes_nothing_and_json_says_what_was_done(tmp_path, kernel, intent):
    assert run_kdsr(tmp_path, "apply", str(intent), "--node", "lb1").exit_code == 0
    writes = kernel.writes
    dry = run_kdsr(tmp_path, "drain", str(intent), "s2", "--node", "lb1", "--dry-run")
    assert dry.exit_code == 0 and "Dry run" in dry.output and "to change" in dry.output
    assert kernel.writes == writes and not StateStore(tmp_path / "state").load("lb1").drained
    done = run_kdsr(tmp_path, "drain", str(intent), "s2", "--node", "lb1", "--json")
    doc = json.loads(done.output)
    jsonschema.validate(doc, PLAN_SCHEMA)
    assert doc["command"] == "drain" and doc["server"] == "s2" and doc["applied"]["writes"] >= 1
    assert slots(kernel, "10.10.0.12") == 0
    back = json.loads(run_kdsr(tmp_path, "undrain", str(intent), "s2", "--node", "lb1", "--json").output)
    assert back["command"] == "undrain" and back["applied"] and slots(kernel, "10.10.0.12") > 0


def test_apply_and_destroy_json_include_what_was_applied(tmp_path, kernel, intent):
    first = json.loads(run_kdsr(tmp_path, "apply", str(intent), "--node", "lb1", "--json").output)
    jsonschema.validate(first, PLAN_SCHEMA)
    assert first["command"] == "apply" and first["applied"]["writes"] >= 1 and first["changes"]
    again = json.loads(run_kdsr(tmp_path, "apply", str(intent), "--node", "lb1", "--json").output)
    assert again["applied"] is None and not again["changes"]
    gone = json.loads(run_kdsr(tmp_path, "destroy", "--node", "lb1", "--json").output)
    jsonschema.validate(gone, PLAN_SCHEMA)
    assert gone["command"] == "destroy" and gone["applied"]["writes"] >= 1
