"""IPVS services and destinations, through ``ipvsadm`` (its words: ipvsadm.py).

Writes go many to one ``ipvsadm -R`` (``batch``), so 10,000 services cost a
handful of processes; IPVS has no transactions, so a failed batch is judged
by listing the kernel again.  Why ipvsadm and not a netlink library: see
ipvsadm.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kdsr.kernel import KernelError, ipvsadm
from kdsr.kernel.ipvsadm import IpvsCommand, IpvsStats
from kdsr.model import IpvsDest, IpvsService


class Ipvs:
    def __init__(self) -> None:
        self.writes = 0

    def _ipvsadm(self, args: list[str], write: bool = True) -> str:
        if shutil.which("ipvsadm") is None:
            raise KernelError("ipvsadm is not installed (Debian package ipvsadm); the ipvs engine needs it")
        result = subprocess.run(["ipvsadm", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelError(f"ipvsadm {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        if write:
            self.writes += 1
        return result.stdout

    def _ipvsadm_restore(self, text: str):
        """``ipvsadm -R`` with ``text`` on stdin; the caller judges the result."""
        if shutil.which("ipvsadm") is None:
            raise KernelError("ipvsadm is not installed (Debian package ipvsadm); the ipvs engine needs it")
        return subprocess.run(["ipvsadm", "-R"], input=text, capture_output=True, text=True, check=False)

    def list_all(self) -> list[IpvsService]:
        if not Path("/proc/net/ip_vs").exists():
            return []
        return ipvsadm.parse_list(self._ipvsadm(list(ipvsadm.LIST_ARGS), write=False))

    def stats(self) -> list[IpvsStats]:
        """Every IPVS service with its counters and its destinations' (one
        ``ipvsadm -R``, ipvsadm.read_stats)."""
        if not Path("/proc/net/ip_vs").exists():
            return []
        try:
            return ipvsadm.read_stats(self._ipvsadm_restore)
        except ValueError as exc:
            raise KernelError(f"{exc}") from None

    def list_some(self, services: list[IpvsService]) -> list[IpvsService]:
        """Those of ``services`` the kernel holds: ``-L`` lines through ONE
        ``ipvsadm -R``, which runs listing commands too (one process, not one
        per service).  A service
        that is not there ends the run ("No such service", exit 1) after
        those before it were listed; the run starts again after it."""
        if not Path("/proc/net/ip_vs").exists():
            return []
        found, left = [], list(services)
        while left:
            result = self._ipvsadm_restore(ipvsadm.list_text(left))
            listed = ipvsadm.parse_list(result.stdout)
            if [s.ident for s in listed] != [s.ident for s in left[: len(listed)]]:
                raise KernelError(f"ipvsadm -R listed other services than it was asked for: {listed[:3]}")
            found += listed
            if result.returncode == 0 and not result.stderr.strip():
                break
            if len(listed) == len(left) or result.stderr.strip() != "No such service":
                raise KernelError(f"ipvsadm -R (listing {len(left)} services): {result.stderr.strip() or 'no message'}")
            left = left[len(listed) + 1 :]  # the one after the service that is not there
        return found

    def service(self, verb: str, svc: IpvsService) -> None:
        self._ipvsadm(ipvsadm.service_args(verb, svc))

    def dest(self, verb: str, svc: IpvsService, dest: IpvsDest) -> None:
        self._ipvsadm(ipvsadm.dest_args(verb, svc, dest))

    def batch(self, commands: list[IpvsCommand]) -> None:
        """Many writes through ONE ``ipvsadm -R`` (restore lines on stdin).

        ipvsadm 1.31 runs every line it reads: a line the kernel refuses
        prints its error on stderr and the next line runs anyway; the exit
        status is that of the LAST line only; a line it cannot parse ends
        the process there (status 2).  So: any stderr or a non-zero status
        is a failure, and since ipvsadm says neither which line failed nor
        which ran, the kernel is listed again and the first command whose
        effect is missing is named.  Callers must re-read, not assume.
        """
        if not commands:
            return
        result = self._ipvsadm_restore(ipvsadm.restore_text(commands))
        self.writes += len(commands)
        said = " / ".join(line for line in (result.stderr + result.stdout).splitlines() if line.strip())
        if result.returncode == 0 and not result.stderr.strip():
            return
        now = {s.ident: s for s in self.list_all()}
        culprit = ipvsadm.first_not_landed(commands, now)
        where = f"{culprit}" if culprit else "(every command's effect shows on re-reading the kernel)"
        raise KernelError(
            f"ipvsadm -R ({len(commands)} commands, exit {result.returncode}) failed at {where}: {said or 'no message'}"
        )
