"""Links, addresses, routes and rules: kdsr's tunnels, its VIPs on ``lo``
or the front interface, the default route of each server's table, the
fwmark rules that pick a table, and kdsr's announce table.

All through kdsr's own rtnetlink socket (rtnl_socket.py; the messages in
rtnl_addr.py and rtnl_routing.py), reads and writes alike.  pyroute2, the
maintained library for this, was measured beside it for every operation
kdsr does (bench/netlink.py prints both side by side) and lost on every one
but a link's delete, where the kernel's own work dominates: most on the
paths that grow with the intent (a server's address per VIP on ``lo``, an
announce route per VIP) and on every plan's reads, and in its import and
socket, which every CLI run pays.  It builds a message object per answer
and waits for each write's answer before it sends the next; kdsr sends
addresses many to a send, each still answered on its own, and decodes a
dump with ``struct`` from the receive buffer.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Callable, Sequence
from functools import partial

from kdsr import naming
from kdsr.kernel import KernelError, rtnl_addr, rtnl_routing
from kdsr.kernel.rtnl_socket import NetlinkError, RtnlSocket
from kdsr.model import Address, AnnounceRoute, Link, Route, Rule


class Links:
    def __init__(self) -> None:
        self.writes = 0
        self._sock: RtnlSocket | None = None

    @property
    def rtnl(self) -> RtnlSocket:
        if self._sock is None:
            self._sock = RtnlSocket()
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self, dump: Callable[[RtnlSocket], list], what: str) -> list:
        try:
            return dump(self.rtnl)
        except (NetlinkError, OSError) as exc:
            raise KernelError(f"{what}: {exc}") from exc

    def _write(self, what: str, send: Callable[[RtnlSocket], None]) -> None:
        try:
            send(self.rtnl)
        except (NetlinkError, OSError) as exc:
            raise KernelError(f"{what}: {exc}") from exc
        self.writes += 1

    @staticmethod
    def _index_or_none(ifname: str) -> int | None:
        # One ioctl in this process's namespace, not a dump of every link.
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return None

    def _index(self, ifname: str) -> int:
        index = self._index_or_none(ifname)
        if index is None:
            raise KernelError(f"interface {ifname} does not exist")
        return index

    @staticmethod
    def _name_of(index: int) -> str:
        try:
            return socket.if_indextoname(index)
        except OSError:
            return "?"

    # ------------------------------------------------------------ links
    def link_exists(self, ifname: str) -> bool:
        return self._index_or_none(ifname) is not None

    def link_list(self, prefix: str) -> list[Link]:
        found = []
        for _index, name, kind, ends in self._read(rtnl_routing.links, "read links"):
            if not name.startswith(prefix):
                continue
            if ends is not None:
                found.append(Link(name, kind, *ends))
            else:  # not a tunnel kdsr makes: read as such, so a plan refuses it as foreign
                found.append(Link(name, kind or "unknown", "", ""))
        return found

    def link_add(self, link: Link) -> None:
        data = rtnl_routing.tunnel_data(link.kind, link.local, link.remote, link.ttl)
        send = partial(rtnl_routing.add_link, name=link.name, kind=link.kind, data=data)
        self._write(f"add {link.kind} link {link.name}", send)

    def link_del(self, name: str) -> None:
        self._write(f"delete link {name}", partial(rtnl_routing.delete_link, index=self._index(name)))

    # ------------------------------------------------------------ addresses
    def addr_list(self, ifname: str) -> list[Address]:
        index = self._index_or_none(ifname)
        if index is None:
            return []
        result = []
        for _family, prefixlen, ip, label in self._read(partial(rtnl_addr.addresses, index=index), "read addresses"):
            if label == ifname:
                label = ""  # the kernel's default label is the interface name
            result.append(Address(ifname=ifname, cidr=f"{ip}/{prefixlen}", label=label))
        return result

    def addr_write(self, add: bool, addrs: Sequence[Address], done: list[Address]) -> None:
        op = "add" if add else "del"
        first_error = None
        for ifname, group in itertools.groupby(addrs, key=lambda a: a.ifname):
            group = list(group)
            try:
                index = self._index(ifname)
            except KernelError as exc:
                first_error = first_error or exc
                continue
            entries = []
            for addr in group:
                iface = ipaddress.ip_interface(addr.cidr)
                entries.append((str(iface.ip), iface.network.prefixlen, addr.label))
            for addr, error in zip(group, rtnl_addr.write_addresses(self.rtnl, add, index, entries), strict=True):
                if error is None:
                    done.append(addr)
                    self.writes += 1
                elif first_error is None:
                    first_error = KernelError(f"{op} address {addr.cidr} on {addr.ifname}: {error}")
        if first_error is not None:
            raise first_error

    def local_addresses(self) -> set[str]:
        found = self._read(partial(rtnl_addr.addresses, index=0), "read addresses")
        return {str(ipaddress.ip_address(ip)) for _f, _p, ip, _l in found}

    # ------------------------------------------------------------ routes
    def route_list(self) -> list[Route]:
        routes = []
        for family in (4, 6):
            for table, oif, gateway in self._read(partial(rtnl_routing.default_routes, family=family), "read routes"):
                # kdsr's routes are unicast defaults out of a tunnel; anything
                # else in its table range (unreachable, blackhole) is not its own.
                if naming.is_kdsr_mark(table):
                    routes.append(Route(family, table, self._name_of(oif), gateway=gateway))
        return routes

    def _route(self, add: bool, route: Route) -> None:
        send = partial(
            rtnl_routing.write_route,
            add=add,
            family=route.family,
            table=route.table,
            oif=self._index(route.dev),
            gateway=route.gateway,
        )
        self._write(f"{'add' if add else 'del'} route {route.ident}", send)

    def route_add(self, route: Route) -> None:
        self._route(True, route)

    def route_del(self, route: Route) -> None:
        self._route(False, route)

    def announce_list(self) -> list[AnnounceRoute]:
        """Every route in kdsr's announce table (naming.ANNOUNCE_TABLE)."""
        found = []
        for family in (4, 6):
            dump = partial(rtnl_routing.table_routes, family=family, table=naming.ANNOUNCE_TABLE)
            found += [AnnounceRoute(prefix, kind) for prefix, kind in self._read(dump, "read routes")]
        return found

    def _announce(self, add: bool, route: AnnounceRoute) -> None:
        # The type goes with a delete too: the kernel deletes a route only
        # of the type asked for.
        network = ipaddress.ip_network(route.prefix)
        send = partial(
            rtnl_routing.write_route,
            add=add,
            family=network.version,
            table=naming.ANNOUNCE_TABLE,
            dst=str(network.network_address),
            dst_len=network.prefixlen,
            route_type=rtnl_routing.ROUTE_TYPE_NUMBERS[route.kind],
        )
        what = f"{'add' if add else 'del'} announce route {route.prefix} (table {naming.ANNOUNCE_TABLE:#x})"
        self._write(what, send)

    def announce_add(self, route: AnnounceRoute) -> None:
        self._announce(True, route)

    def announce_del(self, route: AnnounceRoute) -> None:
        self._announce(False, route)

    # ------------------------------------------------------------ rules
    def rule_list(self, priority: int) -> list[Rule]:
        rules = []
        for family in (4, 6):
            for prio, mark, table in self._read(partial(rtnl_routing.fwmark_rules, family=family), "read rules"):
                if prio == priority and naming.is_kdsr_mark(mark):
                    rules.append(Rule(family, mark, table, priority))
        return rules

    def _rule(self, add: bool, rule: Rule) -> None:
        send = partial(
            rtnl_routing.write_rule,
            add=add,
            family=rule.family,
            priority=rule.priority,
            fwmark=rule.fwmark,
            table=rule.table,
        )
        self._write(f"{'add' if add else 'del'} rule {rule.ident}", send)

    def rule_add(self, rule: Rule) -> None:
        self._rule(True, rule)

    def rule_del(self, rule: Rule) -> None:
        self._rule(False, rule)
