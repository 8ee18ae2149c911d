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
import re
import shlex
from collections.abc import Callable, Iterable, Sequence

from kdsr.model import IpvsDest, IpvsService, ipvs_dest

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
        line = " ".join(words)
        if line.count(" ") != len(words) - 1 or _RESTORE_LINE.fullmatch(line) is None:
            raise ValueError(f"refusing to pass {words!r} to ipvsadm -R")
        lines.append(line + "\n")
    return "".join(lines)


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


_OPTIONS_WITH_VALUE = frozenset(
    ("-t", "-u", "-f", "-s", "-b", "-r", "-w", "--tun-type", "-p", "-M", "--pe", "-x", "-y")
)


def _options(words: list[str]) -> tuple[dict[str, str], set[str]]:
    """A restore line's options (``-w 1``) and bare flags (``-g``, ``-6``)."""
    opts: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(words):
        word = words[i]
        if word in _OPTIONS_WITH_VALUE:
            opts[word] = words[i + 1] if i + 1 < len(words) else ""
            i += 2
        else:
            flags.add(word)
            i += 1
    return opts, flags


def _dest(opts: dict[str, str], flags: set[str]) -> IpvsDest:
    address, port = _split_hostport(opts["-r"])
    method = next((_FLAG_METHOD[f] for f in flags if f in _FLAG_METHOD), "masq")
    tun_type = opts.get("--tun-type", "ipip") if method == "tunnel" else ""
    return ipvs_dest(address, port, int(opts.get("-w", "1")), method, tun_type)


def _service_of(opts: dict[str, str], flags: set[str]) -> IpvsService | None:
    """The service a restore line names, without scheduler, flags or destinations."""
    if "-f" in opts:
        return IpvsService(6 if "-6" in flags else 4, "fwmark", "", 0, int(opts["-f"]), "", ())
    flag = "-t" if "-t" in opts else "-u" if "-u" in opts else None
    if flag is None:
        return None  # sctp or something kdsr never creates
    address, port = _split_hostport(opts[flag])
    return IpvsService(6 if ":" in address else 4, _FLAG_PROTO[flag], address, port, 0, "", ())


def _configured(svc: IpvsService, opts: dict[str, str]) -> IpvsService:
    """``svc`` with the scheduler and its flags from an ``-A`` line's options."""
    flags = tuple(sorted(f for f in opts.get("-b", "").split(",") if f))
    return IpvsService(svc.family, svc.protocol, svc.address, svc.port, svc.fwmark, opts.get("-s", ""), flags)


def _read_lines(lines: Iterable[str], quoted: bool, services: dict, dests: dict) -> None:
    """The general reader: each line by its words, into ``services`` and ``dests``."""
    for line in lines:
        words = shlex.split(line) if quoted else line.split()
        if not words:
            continue
        opts, flags = _options(words[1:])
        svc = _service_of(opts, flags)
        if svc is None:
            continue
        ident = svc.ident
        if words[0] == "-A":
            services[ident] = _configured(svc, opts)
            dests.setdefault(ident, [])
        elif words[0] == "-a":
            have = dests.get(ident, ())
            if not isinstance(have, list):
                have = dests[ident] = list(have)
            have.append(_dest(opts, flags))


def parse_save(text: str) -> list[IpvsService]:
    """Services from ``ipvsadm -Sn``; destinations in ipvsadm's (sorted) order.

    A listing of 10,000 services is 170,000 lines, but ipvsadm prints each
    service's ``-A`` line followed by its ``-a`` lines, each of which
    repeats the service's selector; with that prefix cut off, the services
    of one pool on one port hold the same text.  So a TCP or UDP service's
    destinations are parsed once per distinct text, and every service with
    that text gets the same tuple of frozen destinations.  A block that is
    not of that shape (fwmark services, anything kdsr did not write), and
    a listing that quotes any word, are read line by line.
    """
    services: dict[str, IpvsService] = {}
    dests: dict[str, Sequence[IpvsDest]] = {}
    if any(q in text for q in "'\"\\"):  # ipvsadm -S quotes nothing kdsr creates
        _read_lines(text.splitlines(), True, services, dests)
    else:
        known: dict[str, tuple[IpvsDest, ...]] = {}  # a block's destination text -> its destinations
        blocks = ("\n" + text.rstrip("\n") + "\n").split("\n-A ")
        _read_lines(blocks[0].splitlines(), False, services, dests)  # anything before the first service
        for block in blocks[1:]:
            head, _, rest = block.partition("\n")
            words = head.split()
            opts, flags = _options(words)
            svc = _service_of(opts, flags) if words[:1] in (["-t"], ["-u"]) else None
            tails = ("\n" + rest).replace(f"\n-a {' '.join(words[:2])} -r ", "\n")
            if svc is None or "\n-" in tails or svc.ident in dests:
                _read_lines(["-A " + head, *rest.splitlines()], False, services, dests)
                continue
            services[svc.ident] = _configured(svc, opts)
            found = known.get(tails)
            if found is None:
                found = known[tails] = tuple(
                    _dest(*_options(["-r", *tail.split()])) for tail in tails.split("\n") if tail
                )
            dests[svc.ident] = found
    return [
        IpvsService(s.family, s.protocol, s.address, s.port, s.fwmark, s.scheduler, s.flags, tuple(dests[ident]))
        for ident, s in services.items()
    ]


def _proc_hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, port = text[1:].rsplit("]:", 1)
        return str(ipaddress.IPv6Address(host)), int(port, 16)
    host, port = text.split(":")
    return str(ipaddress.IPv4Address(int(host, 16))), int(port, 16)


_PROC_DEST = re.compile(r"^ *-> ([0-9A-F]{8}:[0-9A-F]{4}|\[[0-9a-fA-F:.]+\]:[0-9A-F]{4}) ", re.M)


def parse_proc_order(text: str) -> dict[tuple, list[str]]:
    """Destination idents per service, in kernel list order, from /proc/net/ip_vs.

    Keys: ("tcp"|"udp", address, port) or ("fwmark", mark).  An IPv6 fwmark
    service is not told apart from an IPv4 one there; the destinations'
    addresses are.  A service's line starts at the margin and its
    destinations' lines follow, indented: the reader takes each block's
    addresses with one regular expression and names each server once.
    """
    order: dict[tuple, list[str]] = {}
    idents: dict[str, str] = {}  # "C0A80001:0050" -> "192.168.0.1:80", once per server and port
    for block in re.split(r"\n(?=\S)", text):
        head, _, rest = block.partition("\n")
        words = head.split()
        if words[:1] in (["TCP"], ["UDP"]):
            address, port = _proc_hostport(words[1])
            found = order[(words[0].lower(), address, port)] = []
        elif words[:1] == ["FWM"]:
            found = order.setdefault(("fwmark", int(words[1], 16)), [])
        else:
            continue  # the title, the column heads, SCTP
        for hostport in _PROC_DEST.findall(rest):
            ident = idents.get(hostport)
            if ident is None:
                ident = idents[hostport] = IpvsDest(*_proc_hostport(hostport), 0, "").ident
            found.append(ident)
    return order


def in_kernel_order(services: list[IpvsService], order: dict[tuple, list[str]]) -> list[IpvsService]:
    """``services`` with each one's destinations in the kernel's order.

    Services that share a destination tuple (``parse_save`` hands one tuple
    to every service with the same text) and a kernel order are sorted once.
    """
    result = []
    sorted_before: dict[tuple, tuple[IpvsDest, ...]] = {}
    for svc in services:
        key = ("fwmark", svc.fwmark) if svc.protocol == "fwmark" else (svc.protocol, svc.address, svc.port)
        ranked = tuple(order.get(key, ()))
        memo = (id(svc.dests), svc.family, ranked)
        dests = sorted_before.get(memo)
        if dests is None:
            position = {ident: i for i, ident in enumerate(ranked)}
            mine = [d for d in svc.dests if (":" in d.address) == (svc.family == 6)]
            dests = tuple(sorted(mine, key=lambda d: position.get(d.ident, len(ranked))))
            sorted_before[memo] = dests
        result.append(
            IpvsService(svc.family, svc.protocol, svc.address, svc.port, svc.fwmark, svc.scheduler, svc.flags, dests)
        )
    return result
