"""What the labs whose load balancers run a routing daemon share (the VRRP
lab's keepalived, the BGP lab's BIRD): starting the daemon and waiting until
it is ready, and a load balancer's reboot (its namespace made again).

The daemon runs in the foreground, started through `setpriv --pdeathsig
TERM` (exec'd in place, so the pid is the daemon's own): if the Python
process that started it dies, even by SIGKILL, the daemon is told to stop.
Start daemons from the main thread: the signal follows the thread that
forked.  A kept lab (keep=True) starts them without it, so the daemons stay
up with the namespaces.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

from lab import L2Lab, LabError, LabProcess, _exec

SETPRIV = shutil.which("setpriv")


class DaemonLab(L2Lab):
    def _start_daemon(
        self,
        daemons: dict[str, LabProcess],
        name: str,
        what: str,
        argv: list[str],
        ready: Callable[[LabProcess], bool],
        timeout: float,
        poll: float,
    ) -> LabProcess:
        """Start ``argv`` (the daemon ``what``) in host ``name`` and keep it
        in ``daemons``; returns once ``ready`` of it, LabError if it exits
        first or is not ready within ``timeout`` (polled every ``poll`` s)."""
        old = daemons.get(name)
        if old and old.running():
            raise LabError(f"{what} already runs in {name} (pid {old.pid})")
        if old:
            self._processes.remove(old)
        if SETPRIV and not self.keep:  # a kept lab's daemons outlive us on purpose
            argv = [SETPRIV, "--pdeathsig", "TERM", *argv]
        proc = daemons[name] = self.spawn(name, argv, tag=what.lower())
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / poll) + 1):
            if not proc.running():
                raise LabError(f"{what} in {name} exited {proc.popen.returncode}:\n{proc.stderr().strip()}")
            if ready(proc):
                return proc
            if time.monotonic() > deadline:
                break
            time.sleep(poll)
        proc.stop()
        raise LabError(f"{what} in {name} not ready after {timeout:g}s:\n{proc.stderr().strip()}")

    def _renew_namespace(self, lb: str) -> None:
        """Delete ``lb``'s network namespace and make it again with a fresh
        eth0 on the segment: the kernel state of the last boot is gone."""
        ns = self.ns(lb)
        _exec(["ip", "netns", "del", ns], timeout=20)
        self._created.remove(ns)
        self._add_namespace(lb)
        self._attach(self.HOSTS[lb])
