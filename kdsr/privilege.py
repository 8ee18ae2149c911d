"""Whether this process may read and change network state (CAP_NET_ADMIN).

Checked before a command touches anything, so that a non-root `kdsr apply`
says so in one line instead of failing part-way with EPERM.  The effective
capability set is what the kernel checks; root normally has it, and a
service may be given it without being root (AmbientCapabilities=).
"""

from __future__ import annotations

from pathlib import Path

from kdsr.errors import PrivilegeError

CAP_NET_ADMIN = 12


def has_net_admin(status: str | None = None) -> bool:
    """From /proc/self/status (``status``: its text, for tests)."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return True  # no procfs: let the kernel be the judge
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return True


def require_net_admin(command: str, why: str) -> None:
    if not has_net_admin():
        raise PrivilegeError(
            f"kdsr {command} {why}, which needs CAP_NET_ADMIN: run it as root (sudo kdsr {command} ...). "
            "Nothing was read or changed. `kdsr validate` and `kdsr maglev` need no privileges."
        )
