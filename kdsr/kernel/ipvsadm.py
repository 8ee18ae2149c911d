"""ipvsadm's words: argument lists and restore lines to write, listings to
read (kdsr/kernel/ipvs.py runs ipvsadm with them).

Why ipvsadm and not pyroute2's IPVS class: on the machines we test,
pyroute2 0.9 could not create fwmark or IPv6 services (EINVAL: it sends no
netmask for them, and its netmask attribute is typed as an IPv4 address), and
its "update" command deletes.  ipvsadm is the reference client of the same
netlink API, on every director already.  It is run with an argument list,
never a shell; every argument is an address, a number or a fixed word that
kdsr formatted itself from validated values.

Reading takes one listing, ``ipvsadm -L -n --nosort --tun-info``: each
service's scheduler and flags, each destination's method, tunnel type and
weight, and the destinations in the kernel's list order, which decides the
``mh`` table (see compile/lb_ipvs.py).  (``ipvsadm -Sn`` sorts them and
refuses ``--nosort``; ``/proc/net/ip_vs`` has the order but not the flags
or the tunnel type.  kdsr read both until the one listing was found to
carry everything, at 10,000 services in less time.)

Pure: ``Listing`` takes the reader as a callable.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence

from kdsr.model import IpvsDest, IpvsService, ipvs_dest

_PROTO_FLAG = {"tcp": "-t", "udp": "-u"}
_METHOD_FLAG = {"route": "-g", "tunnel": "-i"}


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
    return "".join(_restore_line(command.args()) for command in commands)


def _restore_line(words: Sequence[str]) -> str:
    line = " ".join(words)
    if line.count(" ") != len(words) - 1 or _RESTORE_LINE.fullmatch(line) is None:
        raise ValueError(f"refusing to pass {list(words)!r} to ipvsadm -R")
    return line + "\n"


# Words of no white space, quote, backslash or '#', one space between them
# (and no space inside one: ``restore_text`` counts them).
_RESTORE_LINE = re.compile(r"[^\s'\"\\#]+(?: [^\s'\"\\#]+)*")


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

    def get(self, ident: str) -> IpvsService | None:
        if self._services is None:
            if self._seen is not None and ident in self._seen:
                return self._seen[ident]
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


# ``ipvsadm -L -n --nosort --tun-info``, as ipvsadm 1.31 prints it:
#
#   TCP  10.100.0.1:80 mh (mh-fallback,mh-port)
#     -> 10.200.1.3:8080              Masq    n/a           0      0          0
#     -> 10.200.1.5:53                Tunnel  gre:-c        2      0          0
#   FWM  5 IPv6 sh (sh-port)
#
# A service's line starts at the margin (after a title and the column heads,
# which the reader skips); its destinations follow, indented, in the
# kernel's list order (``--nosort``).  The last two columns count
# connections: they change with traffic, not with configuration.
_LISTED_PROTOCOL = {"TCP": "tcp", "UDP": "udp"}
_LISTED_METHOD = {"Route": "route", "Tunnel": "tunnel"}  # Masq, Local: kdsr never writes them


LIST_ARGS = ("-L", "-n", "--nosort", "--tun-info")  # what parse_list reads


def list_text(services: Iterable[IpvsService]) -> str:
    """``ipvsadm -R`` input that lists each of ``services`` by its selector."""
    return "".join(_restore_line((*LIST_ARGS, *service_selector(s))) for s in services)


def _listed_service(words: list[str]) -> IpvsService | None:
    """The service a listing's line names (scheduler and its flags included,
    no destinations), or None for a title, the column heads, or a kind kdsr
    never creates."""
    if words[:1] == ["FWM"] and len(words) >= 3:
        family = 6 if words[2] == "IPv6" else 4
        address, port, mark = "", 0, int(words[1])
        protocol, rest = "fwmark", words[3:] if family == 6 else words[2:]
    elif words[:1] in (["TCP"], ["UDP"]) and len(words) >= 3:
        address, port = _split_hostport(words[1])
        family, mark = 6 if ":" in address else 4, 0
        protocol, rest = _LISTED_PROTOCOL[words[0]], words[2:]
    else:
        return None
    scheduler = rest[0] if rest else ""
    flags = rest[1][1:-1].split(",") if len(rest) > 1 and rest[1].startswith("(") else ()
    return IpvsService(family, protocol, address, port, mark, scheduler, tuple(sorted(flags)))


def _listed_dest(words: list[str]) -> IpvsDest:
    """``-> ADDRESS:PORT FORWARD TUNNELINFO WEIGHT`` (counters cut off)."""
    address, port = _split_hostport(words[1])
    method = _LISTED_METHOD.get(words[2], "masq")
    tun_type = (words[3].split(":", 1)[0] if words[3] != "n/a" else "ipip") if method == "tunnel" else ""
    return ipvs_dest(address, port, int(words[4]), method, tun_type)


def parse_list(text: str) -> list[IpvsService]:
    """Services from ``ipvsadm -L -n --nosort --tun-info``, each with its
    destinations in the kernel's list order (which decides the ``mh`` table).

    A listing of 10,000 services is 170,000 lines, but they name a few
    hundred distinct destinations: each distinct line (its connection
    counters cut off) is read once, and every service that lists it holds
    the same frozen destination.  (Not a regular expression over the whole
    listing to cut the counters: it backtracks over the column padding.)
    """
    services: list[IpvsService] = []
    read: dict[str, IpvsDest] = {}  # a destination line without its counters -> that destination
    service: IpvsService | None = None
    dests: list[IpvsDest] = []
    for line in text.splitlines():
        if line.startswith("  -> "):
            if service is not None:
                config = line.rsplit(None, 2)[0]
                dest = read.get(config)
                if dest is None:
                    dest = read[config] = _listed_dest(config.split())
                dests.append(dest)
            continue
        if service is not None:
            services.append(_with(service, dests))
        service, dests = _listed_service(line.split()), []
    if service is not None:
        services.append(_with(service, dests))
    return services


def _with(s: IpvsService, dests: list[IpvsDest]) -> IpvsService:
    return IpvsService(s.family, s.protocol, s.address, s.port, s.fwmark, s.scheduler, s.flags, tuple(dests))
