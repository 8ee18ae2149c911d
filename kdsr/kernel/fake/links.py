"""Links, addresses, routes and rules in memory (kdsr/kernel/links.py's fake).

It refuses what the kernel refuses (a link or address added twice, a
route out of a device that does not exist, a delete of what is not there)
and drops what hangs off a link with it, as the kernel does: its
addresses, its routes, its sysctls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from kdsr.kernel import KernelError
from kdsr.kernel.fake.log import FakeLog
from kdsr.model import Address, AnnounceRoute, Link, Route, Rule


class FakeLinks:
    def __init__(
        self, log: FakeLog, interfaces: tuple[str, ...], local: tuple[str, ...], sysctls: dict[str, str]
    ) -> None:
        """``sysctls``: /proc/sys as the sysctl fake holds it (a link brings its
        own keys and takes them along)."""
        self.log = log
        self.writes = 0
        self.interfaces = set(interfaces)
        self.addresses: dict[str, list[Address]] = {name: [] for name in interfaces}
        self.local = set(local)  # addresses local to the host besides those in ``addresses``
        self.tunnels: dict[str, Link] = {}  # the links kdsr made
        self.routes: list[Route] = []
        self.announce: list[AnnounceRoute] = []  # kdsr's announce table
        self.rules: list[Rule] = []
        self.sysctls = sysctls

    def _write(self, what: str) -> None:
        self.log.write(what)
        self.writes += 1

    def link_exists(self, ifname: str) -> bool:
        return ifname in self.interfaces

    def addr_list(self, ifname: str) -> list[Address]:
        return list(self.addresses.get(ifname, []))

    def addr_add(self, addr: Address) -> None:
        if addr.ifname not in self.interfaces:
            raise KernelError(f"interface {addr.ifname} does not exist")
        if any(a.cidr == addr.cidr for a in self.addresses[addr.ifname]):
            raise KernelError(f"add address {addr.cidr} on {addr.ifname}: EEXIST")
        self._write(f"addr add {addr.ifname} {addr.cidr}")
        self.addresses[addr.ifname].append(Address(addr.ifname, addr.cidr, addr.label))

    def addr_del(self, addr: Address) -> None:
        have = [a for a in self.addresses.get(addr.ifname, []) if a.cidr == addr.cidr]
        if not have:
            raise KernelError(f"del address {addr.cidr} on {addr.ifname}: EADDRNOTAVAIL")
        self._write(f"addr del {addr.ifname} {addr.cidr}")
        self.addresses[addr.ifname].remove(have[0])

    def addr_write(self, add: bool, addrs: Sequence[Address], done: list[Address]) -> None:
        first_error = None
        for addr in addrs:
            try:
                (self.addr_add if add else self.addr_del)(addr)
            except KernelError as exc:
                first_error = first_error or exc
            else:
                done.append(addr)
        if first_error is not None:
            raise first_error

    def local_addresses(self) -> set[str]:
        found = set(self.local)
        for addrs in self.addresses.values():
            found.update(str(ipaddress.ip_interface(a.cidr).ip) for a in addrs)
        return found

    def link_list(self, prefix: str) -> list[Link]:
        return [link for name, link in sorted(self.tunnels.items()) if name.startswith(prefix)]

    def link_add(self, link: Link) -> None:
        if link.name in self.interfaces:
            raise KernelError(f"add {link.kind} link {link.name}: EEXIST File exists")
        if len(link.name) > 15:
            raise KernelError(f"add {link.kind} link {link.name}: EINVAL name too long")
        self._write(f"link add {link.name} {link.kind} {link.local} -> {link.remote or 'any'}")
        self.tunnels[link.name] = Link(link.name, link.kind, link.local, link.remote, link.ttl)
        self.interfaces.add(link.name)
        self.addresses[link.name] = []
        if link.family == 4:
            self.sysctls[f"net/ipv4/conf/{link.name}/rp_filter"] = self.sysctls.get(
                "net/ipv4/conf/default/rp_filter", "0"
            )

    def link_del(self, name: str) -> None:
        if name not in self.interfaces:
            raise KernelError(f"interface {name} does not exist")  # links.py looks the index up first
        if name not in self.tunnels:
            raise KernelError(f"delete link {name}: EOPNOTSUPP (the fake deletes only links kdsr made)")
        self._write(f"link del {name}")
        del self.tunnels[name]
        self.interfaces.discard(name)
        self.addresses.pop(name, None)
        # The kernel drops what hangs off a link with it.
        self.routes = [r for r in self.routes if r.dev != name]
        for key in [k for k in self.sysctls if k.split("/")[3:4] == [name]]:
            del self.sysctls[key]

    def route_list(self) -> list[Route]:
        return list(self.routes)

    def route_add(self, route: Route) -> None:
        if route.dev not in self.interfaces:
            raise KernelError(f"interface {route.dev} does not exist")  # links.py looks the index up first
        if any((r.family, r.table) == (route.family, route.table) for r in self.routes):
            raise KernelError(f"add route {route.ident}: EEXIST File exists")
        self._write(f"route add {route.ident}")
        self.routes.append(Route(route.family, route.table, route.dev, gateway=route.gateway))

    def route_del(self, route: Route) -> None:
        if route.dev not in self.interfaces:
            raise KernelError(f"interface {route.dev} does not exist")
        plain = Route(route.family, route.table, route.dev, gateway=route.gateway)
        if plain not in self.routes:
            raise KernelError(f"del route {route.ident}: ESRCH No such process")
        self._write(f"route del {route.ident}")
        self.routes.remove(plain)

    def announce_list(self) -> list[AnnounceRoute]:
        return list(self.announce)

    def announce_add(self, route: AnnounceRoute) -> None:
        if any(r.prefix == route.prefix for r in self.announce):
            raise KernelError(f"add announce route {route.prefix}: EEXIST File exists")
        self._write(f"announce add {route.prefix}")
        self.announce.append(AnnounceRoute(route.prefix, route.kind))

    def announce_del(self, route: AnnounceRoute) -> None:
        plain = AnnounceRoute(route.prefix, route.kind)
        if plain not in self.announce:
            raise KernelError(f"del announce route {route.prefix}: ESRCH No such process")
        self._write(f"announce del {route.prefix}")
        self.announce.remove(plain)

    def rule_list(self, priority: int) -> list[Rule]:
        return [r for r in self.rules if r.priority == priority]

    def rule_add(self, rule: Rule) -> None:
        plain = Rule(rule.family, rule.fwmark, rule.table, rule.priority)
        if plain in self.rules:
            raise KernelError(f"add rule {rule.ident}: EEXIST File exists")
        self._write(f"rule add {rule.ident}")
        self.rules.append(plain)

    def rule_del(self, rule: Rule) -> None:
        plain = Rule(rule.family, rule.fwmark, rule.table, rule.priority)
        if plain not in self.rules:
            raise KernelError(f"del rule {rule.ident}: ENOENT No such file or directory")
        self._write(f"rule del {rule.ident}")
        self.rules.remove(plain)
