"""IPVS in memory (kdsr/kernel/ipvs.py's fake): services in creation order,
each with its destinations in the kernel's list order (a new one at the
head, as the kernel adds it); a service or destination added twice, or
edited or deleted when missing, is refused as ipvsadm refuses it; the
counters ``stats`` reports are what a test puts in ``counts``."""

from __future__ import annotations

import dataclasses

from kdsr.kernel import KernelError
from kdsr.kernel.fake.log import FakeLog
from kdsr.kernel.ipvsadm import ZERO, IpvsCommand, IpvsCounters, IpvsStats
from kdsr.model import IpvsDest, IpvsService


class FakeIpvs:
    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.writes = 0
        self.services: dict[str, IpvsService] = {}
        self.lists = 0  # list_all calls, to check an apply lists once
        self.some_lists = 0  # list_some calls (a read-back of the services written)
        self.batches = 0
        self.batch_runs_on = False  # True: a refused batch line does not stop the rest
        # IPVS statistics ``stats`` reports; tests set them: service ident ->
        # (connections, packets, bytes), (service ident, destination ident) ->
        # the same.  As the kernel (6.1) does: an edit (weight) keeps them; a
        # deleted destination goes to a trash and comes back from it, counters
        # and all, when added again (kdsr's re-adds that keep mh's list order;
        # the kernel empties its trash after a minute, the fake never does); a
        # deleted service takes its counters and its destinations' along.
        self.counts: dict = {}
        self.trash: dict = {}
        self.stats_reads = 0

    def _write(self, what: str) -> None:
        self.log.write(what)
        self.writes += 1

    def list_all(self) -> list[IpvsService]:
        self.lists += 1
        return list(self.services.values())

    def stats(self) -> list[IpvsStats]:
        self.stats_reads += 1
        return [
            IpvsStats(
                svc,
                IpvsCounters(*self.counts.get(ident, ZERO)),
                {d.ident: IpvsCounters(*self.counts.get((ident, d.ident), ZERO)) for d in svc.dests},
            )
            for ident, svc in self.services.items()
        ]

    def list_some(self, services: list[IpvsService]) -> list[IpvsService]:
        self.some_lists += 1
        return [self.services[s.ident] for s in services if s.ident in self.services]

    def service(self, verb: str, svc: IpvsService) -> None:
        have = self.services.get(svc.ident)
        if verb == "-A":
            if have is not None:
                raise KernelError(f"ipvsadm -A {svc.ident}: Service already exists")
            self._write(f"ipvs add {svc.ident}")
            self.services[svc.ident] = dataclasses.replace(svc, dests=(), pointer="")
        elif verb == "-E":
            if have is None:
                raise KernelError(f"ipvsadm -E {svc.ident}: No such service")
            self._write(f"ipvs edit {svc.ident}")
            self.services[svc.ident] = dataclasses.replace(have, scheduler=svc.scheduler, flags=svc.flags)
        elif verb == "-D":
            if have is None:
                raise KernelError(f"ipvsadm -D {svc.ident}: No such service")
            self._write(f"ipvs del {svc.ident}")
            del self.services[svc.ident]
            self.counts = {k: v for k, v in self.counts.items() if (k[0] if isinstance(k, tuple) else k) != svc.ident}
            self.trash = {k: v for k, v in self.trash.items() if k[0] != svc.ident}
        else:
            raise KernelError(f"fake kernel: unknown ipvs verb {verb}")

    def dest(self, verb: str, svc: IpvsService, dest: IpvsDest) -> None:
        have = self.services.get(svc.ident)
        if have is None:
            raise KernelError(f"ipvsadm {verb} {svc.ident}: No such service")
        dests = list(have.dests)
        index = next((i for i, d in enumerate(dests) if d.ident == dest.ident), None)
        if verb == "-a":
            if index is not None:
                raise KernelError(f"ipvsadm -a {svc.ident} {dest.ident}: Destination already exists")
            self._write(f"ipvs dest add {svc.ident} {dest.ident}")
            dests.insert(0, dest)  # the kernel adds at the head of the list
            if (svc.ident, dest.ident) in self.trash:
                self.counts[(svc.ident, dest.ident)] = self.trash.pop((svc.ident, dest.ident))
        elif verb in ("-e", "-d"):
            if index is None:
                raise KernelError(f"ipvsadm {verb} {svc.ident} {dest.ident}: No such destination")
            self._write(f"ipvs dest {'edit' if verb == '-e' else 'del'} {svc.ident} {dest.ident}")
            if verb == "-e":
                dests[index] = dest
            else:
                del dests[index]
                if (svc.ident, dest.ident) in self.counts:
                    self.trash[(svc.ident, dest.ident)] = self.counts.pop((svc.ident, dest.ident))
        else:
            raise KernelError(f"fake kernel: unknown ipvs verb {verb}")
        self.services[svc.ident] = dataclasses.replace(have, dests=tuple(dests))

    def batch(self, commands: list[IpvsCommand]) -> None:
        """Line by line, each a write of its own, like ``ipvsadm -R``; stops
        at the first refused line, unless ``batch_runs_on`` (what
        ipvsadm 1.31 really does: it runs the rest, and tells only that
        something failed)."""
        self.batches += 1
        failed: list[str] = []
        for number, command in enumerate(commands, 1):
            try:
                if command.dest is None:
                    self.service(command.verb, command.service)
                else:
                    self.dest(command.verb, command.service, command.dest)
            except KernelError as exc:
                failed.append(f"line {number} of {len(commands)}: {command}: {exc}")
                if not self.batch_runs_on:
                    break
        if failed:
            raise KernelError("ipvsadm -R failed at " + "; ".join(failed))
