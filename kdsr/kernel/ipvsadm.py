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

`kdsr show` and the metrics read IPVS's own counters with the same listing
and a statistics one, in one process (``read_stats``).

Pure: ``Listing`` and ``read_stats`` take the reader as a callable.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

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


# ---------------------------------------------------------------- statistics


class IpvsCounters(NamedTuple):
    """IPVS's own counters of a service or destination: connections it
    scheduled, packets and bytes it received for them.  Inbound only: a DSR
    server answers the client directly, so the director never sees a reply
    (ipvsadm's OutPkts and OutBytes stay 0 for DR and TUN traffic)."""

    connections: int
    packets: int
    bytes: int


ZERO = IpvsCounters(0, 0, 0)


@dataclasses.dataclass(frozen=True)
class IpvsStats:
    """One IPVS service as the kernel holds it (``service``: scheduler,
    flags, destinations with their weights, in list order) and its counters,
    the service's own and per destination (``dests``: IpvsDest.ident ->
    counters).  IPVS edits a destination in place for a weight change, so its
    counters survive drains and health events; they start again at 0 only when
    the destination or the service is deleted and added again."""

    service: IpvsService
    counters: IpvsCounters
    dests: dict[str, IpvsCounters]


# The one read of `kdsr show` and of each metrics scrape: both listings
# through ONE ``ipvsadm -R`` (restore runs listing commands too, as
# ``list_text`` does).  The configuration listing carries the weights (the
# share of mh's table and whether a destination is in it); the statistics
# listing carries the counters and no weight.  ipvsadm 1.31 prints
# ``--stats`` instead of the configuration columns whatever else is asked
# (with --tun-info too), so it takes two listings.  ``--exact``: whole
# numbers, not "12K"; each number is printed with at least one space before
# it, so the columns split on white space however large they grow.
STATS_INPUT = "-L -n --nosort --tun-info\n-L -n --stats --exact\n"
_TITLE = "IP Virtual Server version"


def parse_stats(text: str) -> list[IpvsStats]:
    """The output of ``ipvsadm -R`` given STATS_INPUT: each service of the
    configuration listing with its counters from the statistics listing.

    A statistics listing, as ipvsadm 1.31 prints it on kernel 6.1::

        IP Virtual Server version 1.2.1 (size=4096)
        Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
          -> RemoteAddress:Port
        TCP  10.9.0.100:80                       3        3        0      180        0
          -> 10.3.0.11:80                        0        0        0        0        0
          -> 10.3.0.12:80                        3        3        0      180        0
        FWM  8 IPv6                              0        0        0        0        0
          -> [fd00:3::11]:0                      0        0        0        0        0

    The two listings are two dumps: a service made or deleted between them
    is in one only, and is left out (the next read has it, or not)."""
    config, stats = _split_listings(text)
    counted = _parse_counters(stats)
    found = []
    for service in parse_list(config):
        entry = counted.get(service.ident)
        if entry is not None:
            found.append(IpvsStats(service, entry[0], entry[1]))
    return found


def _split_listings(text: str) -> tuple[str, str]:
    """(configuration listing, statistics listing) out of both, printed one after the other."""
    parts: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(_TITLE) or not parts:
            parts.append([])
        parts[-1].append(line)
    config = [p for p in parts if len(p) > 1 and "Scheduler" in p[1]]
    stats = [p for p in parts if len(p) > 1 and "InPkts" in p[1]]
    if len(config) != 1 or len(stats) != 1:
        raise ValueError(
            f"ipvsadm printed {len(config)} configuration and {len(stats)} statistics listings, not 1 each"
        )
    return "\n".join(config[0]), "\n".join(stats[0])


def _parse_counters(text: str) -> dict[str, tuple[IpvsCounters, dict[str, IpvsCounters]]]:
    """service ident -> (its counters, destination ident -> counters).

    10,000 services name the same few hundred destinations: each
    destination's text is made an ident once (``idents``)."""
    found: dict[str, tuple[IpvsCounters, dict[str, IpvsCounters]]] = {}
    dests: dict[str, IpvsCounters] | None = None
    idents: dict[str, str] = {}  # a destination as printed -> IpvsDest.ident
    for line in text.splitlines():
        words = line.split()
        if len(words) < 7 or not words[-1].isdigit():
            continue  # the title, the column heads
        counters = IpvsCounters(int(words[-5]), int(words[-4]), int(words[-2]))  # Conns, InPkts, InBytes
        if words[0] == "->":
            if dests is not None:
                ident = idents.get(words[1])
                if ident is None:
                    ident = idents[words[1]] = _hostport(*_split_hostport(words[1]))
                dests[ident] = counters
            continue
        ident = _stats_ident(words[:-5])
        dests = None if ident is None else {}
        if dests is not None:
            found[ident] = (counters, dests)
    return found


def _stats_ident(words: list[str]) -> str | None:
    """The ident of the service a statistics line names (``TCP  10.9.0.100:80``,
    ``FWM  7``, ``FWM  8 IPv6``), None for a kind kdsr never creates."""
    if words[:1] == ["FWM"] and len(words) in (2, 3):
        return IpvsService(6 if words[2:] == ["IPv6"] else 4, "fwmark", "", 0, int(words[1]), "", ()).ident
    if words[:1] in (["TCP"], ["UDP"]) and len(words) == 2:
        address, port = _split_hostport(words[1])
        return IpvsService(6 if ":" in address else 4, _LISTED_PROTOCOL[words[0]], address, port, 0, "", ()).ident
    return None


def read_stats(restore: Callable[[str], subprocess.CompletedProcess]) -> list[IpvsStats]:
    """Every IPVS service with its counters, in one ``ipvsadm -R`` run
    (``restore``: runs ipvsadm -R with its argument on stdin).  ValueError
    names what went wrong."""
    result = restore(STATS_INPUT)
    if result.returncode != 0 or result.stderr.strip():
        raise ValueError(f"ipvsadm -R (listing statistics): {result.stderr.strip() or f'exit {result.returncode}'}")
    try:
        return parse_stats(result.stdout)
    except ValueError as exc:
        raise ValueError(f"ipvsadm -R (listing statistics): {exc}") from None
