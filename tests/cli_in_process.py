"""The real kdsr CLI, run in process (click's runner), for tests.

A module of its own, not conftest: ``pytest tests netns-lab`` imports both
directories' conftest files as one module name, so names imported from
``conftest`` resolve to whichever came first.
"""

from __future__ import annotations

from click.testing import CliRunner

from kdsr import cli, privilege


def separate_runner() -> CliRunner:
    """A runner whose result keeps stdout and stderr apart on every click the
    project meets: 8.1 (Debian bookworm's python3-click) mixes them unless
    told not to; 8.2 keeps them apart and has no such switch."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def run_kdsr(tmp_path, *args: str):
    """``kdsr --state-dir <tmp_path>/state <args>``; returns click's Result."""
    return CliRunner().invoke(cli.main, ["--state-dir", str(tmp_path / "state"), *args])


def install_kernel(monkeypatch, kernel):
    """Make ``kernel`` (a fake) the one the CLI drives, with the server-side
    sysctls at the distribution defaults and NET_ADMIN granted; returns it."""
    kernel.sysctl.values.update(
        {f"net/ipv4/conf/{i}/arp_{k}": "0" for i in ("all", "eth0") for k in ("ignore", "announce")}
    )
    kernel.sysctl.values["net/ipv4/ip_forward"] = "0"
    monkeypatch.setattr(cli, "_kernel", lambda store=None: kernel)
    monkeypatch.setattr(privilege, "has_net_admin", lambda: True)
    return kernel
