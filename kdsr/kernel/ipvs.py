"""IPVS through ``ipvsadm``: argument lists to write, listings to read.

Why ipvsadm and not pyroute2's IPVS class: on the machines we test,
pyroute2 0.9 could not create fwmark or IPv6 services (EINVAL: it sends no
netmask for them, and its netmask attribute is typed as an IPv4 address), and
its "update" command deletes.  ipvsadm is the reference client of the same
netlink API, on every director already.  It is run with an argument list,
never a shell; every argument is an address, a number or a fixed word that
kdsr formatted itself from validated values.

Reading needs two sources: ``ipvsadm -Sn`` gives each service's scheduler,
flags and each destination's method, tunnel type and weight, but sorts the
destinations; ``/proc/net/ip_vs`` lists them in the kernel's list order,
which decides the ``mh`` table (see compile/lb_ipvs.py).

Pure except ``run`` and the readers at the bottom, which take callables.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import shlex
from collections.abc import Callable, Iterable

from kdsr.model import IpvsDest, IpvsService

_PROTO_FLAG = {"tcp": "-t", "udp": "-u"}
_FLAG_PROTO = {v: k for k, v in _PROTO_FLAG.items()}
_METHOD_FLAG = {"route": "-g", "tunnel": "-i"}
_FLAG_METHOD = {v: k for k, v in _METHOD_FLAG.items()}


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def service_selector(svc: IpvsService) -> list[str]:
    if svc.protocol == "fwmark":
        args = ["-f", str(svc.fwmark)]
        return args + (["-6"] if svc.family == 6 else [])
    return [_PROTO_FLAG[svc.protocol], _hostport(svc.address, svc.port)]


def service_args(verb: str, svc: IpvsService) -> list[str]:
    """``-A`` add, ``-E`` edit, ``-D`` delete."""
    args = [verb, *service_selector(svc)]
    if verb in ("-A", "-E"):
        args += ["-s", svc.scheduler]
        if svc.flags:
            args += ["-b", ",".join(svc.flags)]
    return args


def dest_args(verb: str, svc: IpvsService, dest: IpvsDest) -> list[str]:
    """``-a`` add, ``-e`` edit, ``-d`` delete: method and weight always explicit."""
    args = [verb, *service_selector(svc), "-r", _hostport(dest.address, dest.port)]
    if verb in ("-a", "-e"):
        args += [_METHOD_FLAG[dest.method], "-w", str(dest.weight)]
        if dest.method == "tunnel":
            args += ["--tun-type", dest.tun_type]
    return args


# ---------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class IpvsCommand:
    """One ipvsadm write: a service verb (-A -E -D) or, with ``dest``, a
    destination verb (-a -e -d)."""

    verb: str
    service: IpvsService
    dest: IpvsDest | None = None

    def args(self) -> list[str]:
        if self.dest is None:
            return service_args(self.verb, self.service)
        return dest_args(self.verb, self.service, self.dest)

    def __str__(self) -> str:
        return "ipvsadm " + " ".join(self.args())


def restore_text(commands: Iterable[IpvsCommand]) -> str:
    """``ipvsadm -R`` input: one command per line, the words of its command line.

    ipvsadm splits a restore line on white space; every word here is an
    address, a number or a fixed word kdsr formatted itself, so none holds
    white space or a quote (checked: a word that did would change meaning).
    """
    lines = []
    for command in commands:
        words = command.args()
        if any(not w or any(c.isspace() or c in "'\"\\#" for c in w) for w in words):
            raise ValueError(f"refusing to pass {words!r} to ipvsadm -R")
        lines.append(" ".join(words) + "\n")
    return "".join(lines)


def landed(command: IpvsCommand, services: dict[str, IpvsService]) -> bool:
    """Whether the kernel listing ``services`` shows the effect of ``command``."""
    have = services.get(command.service.ident)
    if command.dest is None:
        if command.verb == "-D":
            return have is None
        return have is not None and (have.scheduler, have.flags) == (command.service.scheduler, command.service.flags)
    dest = next((d for d in have.dests if d.ident == command.dest.ident), None) if have else None
    if command.verb == "-d":
        return dest is None
    return dest == command.dest


def first_not_landed(commands: list[IpvsCommand], services: dict[str, IpvsService]) -> IpvsCommand | None:
    """After a failed ``ipvsadm -R``: the first command whose effect the
    kernel does not show.  Only the last command on each object is judged,
    since an earlier one (a delete before a re-add) is meant to be undone."""
    last: dict[tuple, int] = {}
    for i, command in enumerate(commands):
        last[(command.service.ident, command.dest.ident if command.dest else None)] = i
    for i in sorted(last.values()):
        if not landed(commands[i], services):
            return commands[i]
    return None


class Listing:
    """The kernel's IPVS services, listed once per apply and kept current by
    the writer: after a batch that went through, a service is what the batch
    made it (``put``); after one that failed nobody knows which lines landed,
    so ``forget`` drops everything and the next ``get`` lists the kernel again.

    ``seen``: what the plan's own read found, for the services it may touch
    (``Plan.ipvs_seen``); a service outside it, or any after a failure, is
    listed from the kernel.
    """

    def __init__(
        self, read: Callable[[], list[IpvsService]], seen: dict[str, IpvsService | None] | None = None
    ) -> None:
        self._read = read
        self._services: dict[str, IpvsService | None] | None = None
        self._seen = dict(seen) if seen is not None else None
        self.reads = 0

    def get(self, ident: str) -> IpvsService | None:
        if self._services is None:
            if self._seen is not None and ident in self._seen:
                return self._seen[ident]
            self.reads += 1
            self._services = {s.ident: s for s in self._read()}
        return self._services.get(ident)

    def put(self, ident: str, service: IpvsService | None) -> None:
        if self._services is not None:
            self._services[ident] = service
        elif self._seen is not None:
            self._seen[ident] = service

    def forget(self) -> None:
        self._services = None
        self._seen = None


# ---------------------------------------------------------------- reading


@functools.lru_cache(maxsize=4096)
def _canonical_address(host: str) -> str:
    # A listing of 10,000 services names the same few servers 160,000 times.
    return str(ipaddress.ip_address(host))


def _split_hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, port = text[1:].rsplit("]:", 1)
    else:
        host, port = text.rsplit(":", 1)
    return _canonical_address(host), int(port)


def parse_save(text: str) -> list[IpvsService]:
    """Services from ``ipvsadm -Sn``; destinations in ipvsadm's (sorted) order."""
    services: dict[str, IpvsService] = {}
    dests: dict[str, list[IpvsDest]] = {}
    for line in text.splitlines():
        # ipvsadm -S quotes nothing kdsr creates; shlex only when it did.
        words = shlex.split(line) if any(q in line for q in "'\"\\") else line.split()
        if not words:
            continue
        verb, rest = words[0], words[1:]
        opts: dict[str, str] = {}
        flags: set[str] = set()
        i = 0
        while i < len(rest):
            word = rest[i]
            if word in ("-t", "-u", "-f", "-s", "-b", "-r", "-w", "--tun-type", "-p", "-M", "--pe", "-x", "-y"):
                opts[word] = rest[i + 1] if i + 1 < len(rest) else ""
                i += 2
            else:
                flags.add(word)
                i += 1
        if "-f" in opts:
            family = 6 if "-6" in flags else 4
            svc = IpvsService(family, "fwmark", "", 0, int(opts["-f"]), "", ())
        else:
            flag = "-t" if "-t" in opts else "-u" if "-u" in opts else None
            if flag is None:
                continue  # sctp or something kdsr never creates
            address, port = _split_hostport(opts[flag])
            family = 6 if ":" in address else 4
            svc = IpvsService(family, _FLAG_PROTO[flag], address, port, 0, "", ())
        ident = svc.ident
        if verb == "-A":
            services[ident] = IpvsService(
                svc.family,
                svc.protocol,
                svc.address,
                svc.port,
                svc.fwmark,
                opts.get("-s", ""),
                tuple(sorted(f for f in opts.get("-b", "").split(",") if f)),
            )
            dests.setdefault(ident, [])
        elif verb == "-a":
            address, port = _split_hostport(opts["-r"])
            method = next((_FLAG_METHOD[f] for f in flags if f in _FLAG_METHOD), "masq")
            tun_type = opts.get("--tun-type", "ipip") if method == "tunnel" else ""
            dests.setdefault(ident, []).append(IpvsDest(address, port, int(opts.get("-w", "1")), method, tun_type))
    return [
        IpvsService(s.family, s.protocol, s.address, s.port, s.fwmark, s.scheduler, s.flags, tuple(dests[i]))
        for i, s in services.items()
    ]


def _proc_hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, port = text[1:].rsplit("]:", 1)
        return str(ipaddress.IPv6Address(host)), int(port, 16)
    host, port = text.split(":")
    return str(ipaddress.IPv4Address(int(host, 16))), int(port, 16)


def parse_proc_order(text: str) -> dict[tuple, list[str]]:
    """Destination idents per service, in kernel list order, from /proc/net/ip_vs.

    Keys: ("tcp"|"udp", address, port) or ("fwmark", mark).  An IPv6 fwmark
    service is not told apart from an IPv4 one there; the destinations'
    addresses are.
    """
    order: dict[tuple, list[str]] = {}
    current: tuple | None = None
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] in ("TCP", "UDP"):
            address, port = _proc_hostport(words[1])
            current = (words[0].lower(), address, port)
            order[current] = []
        elif words[0] == "FWM":
            current = ("fwmark", int(words[1], 16))
            order.setdefault(current, [])
        elif words[0] == "->" and current is not None and words[1][0] in "[0123456789ABCDEF":
            address, port = _proc_hostport(words[1])
            order[current].append(IpvsDest(address, port, 0, "").ident)
        elif words[0] in ("SCTP",):
            current = None
    return order


def in_kernel_order(services: list[IpvsService], order: dict[tuple, list[str]]) -> list[IpvsService]:
    result = []
    for svc in services:
        key = ("fwmark", svc.fwmark) if svc.protocol == "fwmark" else (svc.protocol, svc.address, svc.port)
        ranked = order.get(key, [])
        position = {ident: i for i, ident in enumerate(ranked)}
        mine = [d for d in svc.dests if (":" in d.address) == (svc.family == 6)]
        dests = sorted(mine, key=lambda d: position.get(d.ident, len(ranked)))
        result.append(
            IpvsService(
                svc.family, svc.protocol, svc.address, svc.port, svc.fwmark, svc.scheduler, svc.flags, tuple(dests)
            )
        )
    return result
