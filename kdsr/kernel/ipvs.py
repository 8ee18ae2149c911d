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

import ipaddress
import shlex

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


# ---------------------------------------------------------------- reading


def _split_hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, port = text[1:].rsplit("]:", 1)
    else:
        host, port = text.rsplit(":", 1)
    return str(ipaddress.ip_address(host)), int(port)


def parse_save(text: str) -> list[IpvsService]:
    """Services from ``ipvsadm -Sn``; destinations in ipvsadm's (sorted) order."""
    services: dict[str, IpvsService] = {}
    dests: dict[str, list[IpvsDest]] = {}
    for line in text.splitlines():
        words = shlex.split(line)
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
