#!/usr/bin/env python3
"""The VRRP lab: an L2 site without a router.  Two or three load balancers
own the VIP on the segment by VRRP (keepalived), and the client reaches it
with no route for it: it asks ARP / neighbour discovery, and the owner
answers.

    client, lb1, lb2, lb3, s1, s2, s3: all eth0 on one bridge (in `sw`)

    segment  10.10.0.0/24 fd00:10::/64   client .50, lb1 .2, lb2 .3, lb3 .4,
                                         s1 .11, s2 .12, s3 .13

Each load balancer runs keepalived on a *main* config that plays the
operator's part (`global_defs`) and includes the fragment kdsr writes.  The
lab starts with no fragment: keepalived ignores an include of a missing
file, so a fresh load balancer owns nothing.  Every load balancer has its
own directory (config, fragment, pid files, track directory), since the
namespaces share the file system.

    with VrrpLab() as lab:
        lab.start_keepalived("lb1")
        lab.owner_of("10.10.0.100")                   # "lb1", or None
        lab.kill_lb("lb1")                            # eth0 gone, keepalived SIGKILLed

keepalived runs in the foreground (-n), started through `setpriv --pdeathsig
TERM` (exec'd in place, so the pid is keepalived's own): if the Python
process that started it dies, keepalived is told to stop, and it stops its
VRRP child.  `python3 vrrplab.py` (as root) builds the lab and leaves it up.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from daemonlab import DaemonLab
from lab import READY_TIMEOUT, Host, LabError, LabProcess, lab_unavailable_reason

KEEPALIVED = shutil.which("keepalived") or "/usr/sbin/keepalived"
POLL = 0.02
LOAD_BALANCERS = ("lb1", "lb2", "lb3")
SERVERS = ("s1", "s2", "s3")
VIP = "10.10.0.100"
VIP6 = "fd00:10::100"


def keepalived_unavailable_reason() -> str | None:
    """Why keepalived cannot run here (None: it can)."""
    if not os.access(KEEPALIVED, os.X_OK):
        return f"the VRRP lab needs keepalived ({KEEPALIVED} missing: apt-get install keepalived)"
    return None


class VrrpLab(DaemonLab):
    HOSTS = {
        "client": Host("client", "10.10.0.50/24", "fd00:10::50/64"),
        "lb1": Host("lb1", "10.10.0.2/24", "fd00:10::2/64"),
        "lb2": Host("lb2", "10.10.0.3/24", "fd00:10::3/64"),
        "lb3": Host("lb3", "10.10.0.4/24", "fd00:10::4/64"),
        "s1": Host("s1", "10.10.0.11/24", "fd00:10::11/64"),
        "s2": Host("s2", "10.10.0.12/24", "fd00:10::12/64"),
        "s3": Host("s3", "10.10.0.13/24", "fd00:10::13/64"),
    }
    SERVERS = SERVERS
    LOAD_BALANCERS = LOAD_BALANCERS

    def __init__(self, **kwargs):
        kwargs.setdefault("vips", (VIP, VIP6))
        super().__init__(**kwargs)
        self._keepaliveds: dict[str, LabProcess] = {}

    def up(self) -> None:
        super().up()
        for lb in self.LOAD_BALANCERS:
            paths = self.keepalived_paths(lb)
            paths["track_dir"].mkdir(parents=True, exist_ok=True)
            paths["config"].write_text(self.main_config(lb))

    def _client_routes(self) -> None:
        """None: the client finds the VIP on its segment by ARP / ND, from
        whichever load balancer owns it (the point of this lab)."""

    # --- keepalived --------------------------------------------------------------

    def keepalived_paths(self, lb: str) -> dict[str, Path]:
        if lb not in self.LOAD_BALANCERS:
            raise KeyError(f"no keepalived on {lb!r}; it runs on {', '.join(self.LOAD_BALANCERS)}")
        base = self.workdir / lb
        return {
            "config": base / "keepalived.conf",
            "fragment": base / "kdsr.conf",
            "pid_file": base / "keepalived.pid",
            "vrrp_pid_file": base / "vrrp.pid",
            "track_dir": base / "run",
        }

    def main_config(self, lb: str) -> str:
        paths = self.keepalived_paths(lb)
        return f"""# The operator's part of {lb}'s keepalived config; VRRP for kdsr's VIPs comes from the fragment.
global_defs {{
  router_id lab_{lb}
}}
include {paths["fragment"]}
"""

    def start_keepalived(self, lb: str, timeout: float = READY_TIMEOUT) -> LabProcess:
        """Start keepalived (VRRP only) on ``lb``; returns once its pid file names it.  Without a
        fragment it starts no VRRP child; the reload that brings kdsr's fragment starts it."""
        paths = self.keepalived_paths(lb)
        argv = [KEEPALIVED, "--vrrp", "--dont-fork", "--log-console", "--log-detail", "--no-syslog"]
        argv += ["-f", str(paths["config"]), "-p", str(paths["pid_file"]), "-r", str(paths["vrrp_pid_file"])]

        def ready(proc: LabProcess) -> bool:
            try:
                return int(paths["pid_file"].read_text().strip()) == proc.pid
            except (OSError, ValueError):
                return False

        return self._start_daemon(self._keepaliveds, lb, "keepalived", argv, ready, timeout, POLL)

    def keepalived(self, lb: str) -> LabProcess:
        return self._keepaliveds[lb]

    def keepalived_log(self, lb: str) -> str:
        proc = self._keepaliveds.get(lb)
        return (proc.stdout() + proc.stderr()) if proc else ""

    def kill_lb(self, lb: str, also: tuple[LabProcess, ...] = ()) -> None:
        """A load balancer dies: its eth0 deleted (gone from the segment), then
        keepalived and its VRRP child SIGKILLed (no priority-0 advert, no
        address cleanup), and ``also`` (e.g. its `kdsr run`) SIGKILLed."""
        if lb not in self.LOAD_BALANCERS:
            raise KeyError(f"{lb!r} is not a load balancer")
        self.run(lb, ["ip", "link", "del", "eth0"])
        child = None
        try:
            child = int(self.keepalived_paths(lb)["vrrp_pid_file"].read_text().strip())
        except (OSError, ValueError):
            pass
        proc = self._keepaliveds.get(lb)
        if proc is not None:
            proc.stop(signal.SIGKILL)
        # The VRRP child is keepalived's (started by the process we started):
        # ended by its own pid, once, if it is still keepalived.
        if child is not None and _comm(child) == "keepalived":
            os.kill(child, signal.SIGKILL)
        for other in also:
            other.stop(signal.SIGKILL)

    def reboot_lb(self, lb: str) -> None:
        """A load balancer loses power and comes back: every process of ours
        in it SIGKILLed (its link first, as kill_lb), its network namespace
        deleted and made again with a fresh eth0 on the segment (the kernel
        state of the last boot is gone), and its track directory emptied, as
        a boot empties the tmpfs it lives on.  Every other file stays: the
        state directory, keepalived's config and kdsr's fragment.  Nothing is
        started: the caller starts keepalived and kdsr, in the order a boot would.
        """
        if lb not in self.LOAD_BALANCERS:
            raise KeyError(f"{lb!r} is not a load balancer")
        ours = [p for p in self._processes if p.host == lb]
        self.kill_lb(lb, also=tuple(p for p in ours if p is not self._keepaliveds.get(lb)))
        for proc in ours:
            self._processes.remove(proc)
        self._keepaliveds.pop(lb, None)
        self._renew_namespace(lb)
        for gate in self.keepalived_paths(lb)["track_dir"].iterdir():
            gate.unlink()

    def owner_of(self, vip: str) -> str | None:
        """The load balancer that has ``vip`` on its eth0 now (None: nobody)."""
        owners = [lb for lb in self.LOAD_BALANCERS if self.has_address(lb, vip)]
        if len(owners) > 1:
            raise LabError(f"{vip} is on several load balancers at once: {owners}")
        return owners[0] if owners else None

    def has_address(self, name: str, address: str) -> bool:
        result = self.run(name, ["ip", "-o", "addr", "show", "dev", "eth0"], check=False)
        return any(part.split("/")[0] == address for line in result.stdout.splitlines() for part in line.split()[3:4])

    def wait_owner(self, vip: str, lb: str | None, timeout: float) -> float:
        """Seconds until ``lb`` (None: nobody) owns ``vip``; LabError after ``timeout``."""
        start = time.monotonic()
        want = [lb] if lb else []
        while True:
            # A handover may show the VIP on two load balancers for a moment.
            owners = [name for name in self.LOAD_BALANCERS if self.has_address(name, vip)]
            if owners == want:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise LabError(f"{vip}: on {owners or 'no load balancer'}, not {want or 'none'}, after {timeout:g}s")
            time.sleep(POLL)

    def client_neighbour(self, address: str) -> str | None:
        """The MAC the client's neighbour table holds for ``address`` (None: none)."""
        result = self.run("client", ["ip", "neigh", "show", address], check=False)
        for line in result.stdout.splitlines():
            parts = line.split()
            if "lladdr" in parts:
                return parts[parts.index("lladdr") + 1]
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def main() -> int:
    reason = lab_unavailable_reason() or keepalived_unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 4
    with VrrpLab(keep=True) as lab:
        for lb in lab.LOAD_BALANCERS:
            lab.start_keepalived(lb)
        print(f"VRRP lab up; keepalived files under {lab.workdir}/<lb>/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
