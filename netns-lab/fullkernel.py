#!/usr/bin/env python3
"""Which lab tier this kernel supports, and a small namespace toolkit for full-kernel tests.

A host kernel may lack IPVS and ipip/gre/ip6tnl (a distribution's cloud
or minimal kernel often does); Debian's full kernel, booted in a virtme-ng guest by
guest_tier.py, has them as modules. `probe()` tells the two apart by trying
the real thing: modprobe each module, look for /proc/net/ip_vs, then, in a
throw-away namespace it names and deletes, create an `mh` IPVS service and an
ipip, a gre and an ip6tnl link.

Standard library only: scripts/setup.sh runs it with the system interpreter
before the venv exists (`python3 netns-lab/fullkernel.py`; exit 0 when this
kernel has the full-kernel features, 1 when not).
"""

from __future__ import annotations

import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Kernel modules the full-kernel tier needs, in probe order.
MODULES = ("ip_vs", "ip_vs_mh", "ipip", "ip_gre", "ip6_tunnel")
# Set by guest_tier.py inside the virtme-ng guest.
IN_GUEST_ENV = "KDSR_IN_GUEST"
COMMAND_TIMEOUT = 30.0


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr."""


def in_guest() -> bool:
    """True inside the full-kernel guest that guest_tier.py boots."""
    return os.environ.get(IN_GUEST_ENV) == "1"


def _run(argv: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"timed out after {timeout:g}s: {shlex.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise NetnsError(f"not installed: {argv[0]} ({shlex.join(argv)})") from exc
    if check and result.returncode != 0:
        raise NetnsError(f"exit {result.returncode}: {shlex.join(argv)}: {result.stderr.strip()}")
    return result


# --------------------------------------------------------------------------
# Tier detection


@dataclass(frozen=True)
class KernelTier:
    """What the probe found: `missing` maps each absent feature to why."""

    kernel: str
    missing: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    unprobed: str | None = None  # why the probe could not run at all (then everything counts as missing)

    @property
    def capable(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        """One line: what this kernel has or lacks."""
        if self.capable:
            return f"kernel {self.kernel} has the full-kernel features ({', '.join(MODULES)})"
        if self.unprobed:
            return f"kernel {self.kernel} not probed for {', '.join(MODULES)}: {self.unprobed}"
        return f"kernel {self.kernel} lacks {', '.join(self.missing)}"

    def details(self) -> list[str]:
        """One line per missing feature, saying why."""
        if self.unprobed:
            return [f"not probed: {self.unprobed}"]
        return [f"{name}: {why}" for name, why in self.missing.items()]


def probe(prefix: str = "kdsr", load_modules: bool = True) -> KernelTier:
    """Probe this kernel for ip_vs, ip_vs_mh, ipip, ip_gre and ip6_tunnel.

    Needs root (modprobe, namespaces). Touches only a namespace it creates,
    named `<prefix>-<random>-fkprobe`, and deletes it by name; modules that
    load stay loaded (that is what the tests would do anyway).
    """
    kernel = platform.release()
    for unusable, reason in ((os.geteuid() != 0, "probing needs root"), (not shutil.which("ip"), "no iproute2 `ip`")):
        if unusable:
            return KernelTier(kernel, dict.fromkeys(MODULES, reason), unprobed=reason)

    notes: list[str] = []
    modprobe_error: dict[str, str] = {}
    if load_modules and shutil.which("modprobe"):
        for module in MODULES:
            result = _run(["modprobe", module], check=False)
            if result.returncode != 0:
                first_line = (result.stderr.strip() or f"exit {result.returncode}").splitlines()[0]
                modprobe_error[module] = first_line.removeprefix("modprobe: ")
    elif load_modules:
        notes.append("no modprobe: relying on built-in modules")

    def why(module: str, failure: str) -> str:
        return f"{failure}" + (f" (modprobe: {modprobe_error[module]})" if module in modprobe_error else "")

    missing: dict[str, str] = {}
    ip_vs_present = Path("/proc/net/ip_vs").exists()
    if not ip_vs_present:
        missing["ip_vs"] = why("ip_vs", "no /proc/net/ip_vs")

    ns = f"{prefix}-{secrets.token_hex(3)}-fkprobe"
    try:
        _run(["ip", "netns", "add", ns], timeout=10)
    except NetnsError as exc:
        reason = f"cannot create a probe namespace: {exc}"
        return KernelTier(kernel, dict.fromkeys(MODULES, reason), tuple(notes), unprobed=reason)
    try:
        links = {
            "ipip": ["fkipip", "type", "ipip", "local", "192.0.2.1", "remote", "192.0.2.2"],
            "ip_gre": ["fkgre", "type", "gre", "local", "192.0.2.1", "remote", "192.0.2.3"],
            "ip6_tunnel": [
                "fkip6tnl",
                *("type", "ip6tnl", "mode", "ip6ip6"),
                *("local", "2001:db8::1", "remote", "2001:db8::2"),
            ],
        }
        for module, spec in links.items():
            result = _run(["ip", "-n", ns, "link", "add", *spec], check=False, timeout=10)
            if result.returncode != 0:
                missing[module] = why(module, f"`ip link add … type {spec[2]}`: {result.stderr.strip()}")
        if not ip_vs_present:
            missing["ip_vs_mh"] = why("ip_vs_mh", "no IPVS at all")
        elif shutil.which("ipvsadm"):
            # IPVS is per namespace: this service lives and dies with the probe namespace.
            result = _run(
                ["ip", "netns", "exec", ns, "ipvsadm", "-A", "-t", "192.0.2.10:80", "-s", "mh"],
                check=False,
                timeout=10,
            )
            if result.returncode != 0:
                missing["ip_vs_mh"] = why("ip_vs_mh", f"`ipvsadm -A … -s mh`: {result.stderr.strip()}")
        elif not Path("/sys/module/ip_vs_mh").exists():
            missing["ip_vs_mh"] = why("ip_vs_mh", "not loaded (and no ipvsadm to try an mh service)")
    finally:
        _run(["ip", "netns", "del", ns], check=False, timeout=20)
    # Report in MODULES order.
    ordered = {module: missing[module] for module in MODULES if module in missing}
    return KernelTier(kernel, ordered, tuple(notes))


# --------------------------------------------------------------------------
# Namespaces for full-kernel tests


class Namespaces:
    """Namespaces a test creates, named `<prefix>-<random>-<name>`, deleted by name.

        with Namespaces() as nss:
            nss.add("a"); nss.add("b")
            nss.veth("a", "eth0", "b", "eth0")
            nss.run("a", "ip addr add 10.0.0.1/24 dev eth0")

    The conftest fixture `netns` yields one and tears it down after the test.
    """

    def __init__(self, prefix: str = "kdsr", keep: bool = False):
        self.prefix = f"{prefix}-{secrets.token_hex(3)}"
        self.keep = keep
        self._created: list[str] = []

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.keep:
            print(
                "namespaces kept: " + " ".join(self._created) + "\n  delete: " + "; ".join(self._del_commands()),
                file=sys.stderr,
            )
        else:
            self.down()

    def _del_commands(self) -> list[str]:
        return [f"ip netns del {ns}" for ns in reversed(self._created)]

    def ns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        if full not in self._created:
            raise KeyError(f"no namespace {name!r} here; have: {', '.join(self.names())}")
        return full

    def names(self) -> list[str]:
        return [ns.removeprefix(self.prefix + "-") for ns in self._created]

    def add(self, name: str) -> str:
        """Create namespace `name` with lo up; returns its full name."""
        full = f"{self.prefix}-{name}"
        _run(["ip", "netns", "add", full])
        self._created.append(full)
        self.run(name, ["ip", "link", "set", "lo", "up"])
        return full

    def run(
        self, name: str, cmd: Sequence[str] | str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess:
        """`ip netns exec <ns> cmd` (a list, or a string split like a shell would)."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return _run(["ip", "netns", "exec", self.ns(name), *argv], check=check, timeout=timeout)

    def veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        """A veth pair born straight into namespaces a and b, both ends up."""
        _run(
            ["ip", "link", "add", a_if, "netns", self.ns(a), "type", "veth", "peer", "name", b_if, "netns", self.ns(b)]
        )
        self.run(a, ["ip", "link", "set", a_if, "up"])
        self.run(b, ["ip", "link", "set", b_if, "up"])

    def down(self) -> None:
        errors = []
        for ns in reversed(self._created):
            result = _run(["ip", "netns", "del", ns], check=False, timeout=20)
            if result.returncode != 0:
                errors.append(f"ip netns del {ns}: {result.stderr.strip()}")
        self._created.clear()
        if errors:
            raise NetnsError("namespace teardown incomplete: " + "; ".join(errors))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no output; exit code only")
    args = parser.parse_args(argv)
    tier = probe()
    if not args.quiet:
        print(tier.describe())
        for line in tier.details():
            print(f"  {line}")
        for note in tier.notes:
            print(f"note: {note}")
    return 0 if tier.capable else 1


if __name__ == "__main__":
    sys.exit(main())
