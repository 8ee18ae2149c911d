"""Without CAP_NET_ADMIN, commands that read or change network state stop
before touching anything, with one clear line and exit code 9."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdsr import cli, privilege
from kdsr.errors import EXIT_PRIVILEGE

ROOT = Path(__file__).resolve().parents[1]
STATUS = "Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t{0}\nCapEff:\t{0}\n"


def test_capability_bit_is_read_from_capeff():
    assert privilege.has_net_admin(STATUS.format("000001ffffffffff"))
    assert privilege.has_net_admin(STATUS.format("0000000000001000"))  # CAP_NET_ADMIN only
    assert not privilege.has_net_admin(STATUS.format("0000000000000000"))
    assert not privilege.has_net_admin(STATUS.format("0000000000002fff"))  # all but bit 12


@pytest.mark.parametrize(
    "args",
    [
        ["apply", "{intent}", "--node", "lb1"],
        ["apply", "{intent}", "--node", "lb1", "--dry-run"],
        ["plan", "{intent}", "--node", "lb1"],
        ["destroy", "--node", "lb1"],
        ["show"],
        ["run", "{intent}", "--node", "lb1"],
        ["drain", "{intent}", "s1", "--node", "lb1"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_unprivileged_commands_stop_before_anything(monkeypatch, tmp_path, example_path, args):
    monkeypatch.setattr(privilege, "has_net_admin", lambda: False)
    touched = []
    monkeypatch.setattr(cli, "_kernel", lambda store=None: touched.append("kernel"))
    argv = ["--state-dir", str(tmp_path / "state"), *(a.format(intent=example_path) for a in args)]
    result = CliRunner().invoke(cli.main, argv)
    assert result.exit_code == EXIT_PRIVILEGE, result.output
    assert "needs CAP_NET_ADMIN" in result.output and "Nothing was read or changed" in result.output
    assert touched == [] and not (tmp_path / "state").exists()


def test_validate_and_maglev_need_no_privilege(monkeypatch, example_path):
    monkeypatch.setattr(privilege, "has_net_admin", lambda: False)
    assert CliRunner().invoke(cli.main, ["validate", str(example_path)]).exit_code == 0
    assert CliRunner().invoke(cli.main, ["maglev", str(example_path), "--service", "web"]).exit_code == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_real_process_without_cap_net_admin(tmp_path, example_path):
    """Root, but with CAP_NET_ADMIN dropped from the bounding set (so from
    the effective set after exec): the check reads what the kernel checks."""
    state = tmp_path / "state"
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
        + [sys.executable, "-m", "kdsr", "--state-dir", str(state), "apply", str(example_path), "--node", "lb1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == EXIT_PRIVILEGE, result.stderr
    assert "run it as root" in result.stderr and not state.exists()
