"""A validating in-memory kernel for unit tests.

It rejects what the real kernel rejects (a map still named by a rule, a chain
still jumped to, an element added twice with another value, a jump to a
chain that does not exist), applies an nft batch all-or-nothing, records every
write it received, and can fail the k-th write on purpose (fault injection).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from kdsr.kernel import KernelError
from kdsr.kernel.bird import BirdError
from kdsr.kernel.ipvs import ZERO, IpvsCounters, IpvsStats
from kdsr.kernel.keepalived import KeepalivedError
from kdsr.kernel.nft_json import decode_element, decode_map, encode_key, encode_value, map_object
from kdsr.kernel.xdp import FakeIO, XdpBackend
from kdsr.model import (
    Address,
    AnnounceRoute,
    ChainHook,
    IpvsDest,
    IpvsService,
    Link,
    NftChain,
    NftElement,
    NftMap,
    NftRule,
    NftTable,
    Route,
    Rule,
)


@dataclass
class _Table:
    chains: dict[str, tuple[ChainHook | None, list[NftRule]]] = field(default_factory=dict)
    maps: dict[str, tuple[NftMap, dict]] = field(default_factory=dict)  # decl, key -> NftElement


class FakeKernel:
    def __init__(self, interfaces: tuple[str, ...] = ("lo", "eth0"), local: tuple[str, ...] = ()) -> None:
        self.writes = 0
        # kdsr's XDP program and maps, in memory (kdsr/kernel/xdp.py FakeIO)
        self.xdp = XdpBackend(FakeIO({name: f"02:00:00:00:00:{i + 1:02x}" for i, name in enumerate(interfaces)}))
        self.ops: list[str] = []  # one line per write, for assertions
        self.fail_at: int | None = None  # fail the write with this 1-based number
        self.fail_message = "EBUSY (injected)"
        self.tables: dict[tuple[str, str], _Table] = {}
        self.interfaces = set(interfaces)
        self.addresses: dict[str, list[Address]] = {name: [] for name in interfaces}
        self.sysctls: dict[str, str] = {}
        self.local = set(local)
        self.modules: set[str] | None = None  # None: every module is there
        self.links: dict[str, Link] = {}
        self.routes: list[Route] = []
        self.announce: list[AnnounceRoute] = []  # kdsr's announce table
        self.rules: list[Rule] = []
        # IPVS services in creation order, each with its destinations in the
        # kernel's list order (new ones at the head, as the kernel does).
        self.ipvs: dict[str, IpvsService] = {}
        self.ipvs_lists = 0  # ipvs_list calls, to check an apply lists once
        self.ipvs_some_lists = 0  # ipvs_list_some calls (a read-back of the services written)
        self.ipvs_batches = 0
        self.ipvs_batch_runs_on = False  # True: a refused batch line does not stop the rest
        # IPVS statistics ipvs_stats reports; tests set them: service ident ->
        # (connections, packets, bytes), (service ident, destination ident) ->
        # the same.  As the kernel (6.1) does: an edit (weight) keeps them; a
        # deleted destination goes to a trash and comes back from it, counters
        # and all, when added again (kdsr's re-adds that keep mh's list order;
        # the kernel empties its trash after a minute, the fake never does); a
        # deleted service takes its counters and its destinations' along.
        self.ipvs_counts: dict = {}
        self.ipvs_trash: dict = {}
        self.ipvs_stats_reads = 0
        # BIRD: fragment files by path; None: BIRD not installed/running.
        self.bird_files: dict[str, str] | None = {}
        self.bird_stopped = False  # installed, its files there, but not running
        self.bird_rejects: str | None = None  # a text that makes bird_check fail at its first line
        self.bird_loaded: str | None = None  # the fragment text BIRD runs now
        # Packet counters a listing reports (nft_listing); tests set them.
        self.counts: dict = {}
        # keepalived: fragment files by path; None: not installed.
        self.keepalived_files: dict[str, str] | None = {}
        self.keepalived_stopped = False
        self.keepalived_rejects: str | None = None  # a text that makes keepalived_check fail
        self.keepalived_loaded: str | None = None  # the fragment keepalived runs now ("" none)
        self.gate_files: dict[str, str] = {}  # track file path -> value
        self.missing_dirs: set[str] = set()  # track directories that do not exist

    # ------------------------------------------------------------ helpers
    def _write(self, what: str) -> None:
        number = self.writes + 1
        if self.fail_at is not None and number == self.fail_at:
            self.fail_at = None  # one fault; the rollback that follows succeeds
            raise KernelError(f"{what}: {self.fail_message}")
        self.writes = number
        self.ops.append(what)

    # ------------------------------------------------------------ nftables
    def nft_tables(self) -> list[tuple[str, str]]:
        return sorted(self.tables)

    def nft_read_table(self, family: str, name: str, reuse: bool = False) -> NftTable | None:
        table = self.tables.get((family, name))
        if table is None:
            return None
        chains = tuple(
            NftChain(name=n, hook=hook, rules=tuple(rules)) for n, (hook, rules) in sorted(table.chains.items())
        )
        maps = []
        for _n, (decl, elements) in sorted(table.maps.items()):
            items = tuple(sorted(elements.items()))
            maps.append(dataclasses.replace(decl, elements=items, pointer=""))
        return NftTable(family=family, name=name, chains=chains, maps=tuple(maps))

    def nft_listing(self, family: str, name: str) -> list[dict] | None:
        """A listing in libnftables' JSON shape, counters from ``counts``
        (chain name -> (packets, bytes) for its first rule's counter; (map
        name, key) -> (packets, bytes) for an element of a map with counters)."""
        table = self.tables.get((family, name))
        if table is None:
            return None
        listing: list[dict] = [{"table": {"family": family, "name": name}}]
        for chain, (hook, rules) in sorted(table.chains.items()):
            listing.append({"chain": {"family": family, "table": name, "name": chain}})
            for rule in rules:
                expr = json.loads(rule.expr_json)
                packets, nbytes = self.counts.get(chain, (0, 0))
                expr = [{"counter": {"packets": packets, "bytes": nbytes}} if "counter" in s else s for s in expr]
                listing.append({"rule": {"family": family, "table": name, "chain": chain, "expr": expr}})
            del hook
        for map_name, (decl, elements) in sorted(table.maps.items()):
            obj = map_object(NftTable(family, name, (), ()), decl)["map"]
            items = []
            for key, elem in sorted(elements.items()):
                val: object = encode_key(key)
                if decl.counter or elem.comment:
                    inner: dict = {"val": val}
                    if elem.comment:
                        inner["comment"] = elem.comment
                    if decl.counter:
                        packets, nbytes = self.counts.get((map_name, key), (0, 0))
                        inner["counter"] = {"packets": packets, "bytes": nbytes}
                    val = {"elem": inner}
                items.append([val, encode_value(elem.value)])
            listing.append({"map": {**obj, "elem": items}})
        return listing

    def nft_apply(self, commands: list[dict], check_only: bool = False, becomes: NftTable | None = None) -> bool:
        tables = copy.deepcopy(self.tables)
        for cmd in commands:
            self._nft_command(tables, cmd)
        if check_only:
            return False
        self._write(f"nft transaction ({len(commands)} commands)")
        self.tables = tables
        return False  # the fake has no generation: reads always list

    def nft_adopt(self, read: NftTable, same: NftTable) -> None:
        pass  # the fake keeps no read: every read lists

    def nft_token(self, family: str, name: str) -> tuple[str, bool] | None:
        return None  # no generation: an unchanged re-apply always plans in full

    def _table(self, tables: dict, obj: dict) -> _Table:
        key = (obj["family"], obj["table"])
        if key not in tables:
            raise KernelError(f"No such file or directory: table {key[0]} {key[1]}")
        return tables[key]

    def _nft_command(self, tables: dict, cmd: dict) -> None:
        ((verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        handler = getattr(self, f"_{verb}_{kind}", None)
        if handler is None:
            raise KernelError(f"fake kernel does not support {verb} {kind}")
        handler(tables, obj)

    def _add_table(self, tables: dict, obj: dict) -> None:
        tables.setdefault((obj["family"], obj["name"]), _Table())

    def _delete_table(self, tables: dict, obj: dict) -> None:
        if tables.pop((obj["family"], obj["name"]), None) is None:
            raise KernelError(f"No such file or directory: table {obj['family']} {obj['name']}")

    def _add_chain(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        hook = None
        if "hook" in obj:
            if obj["hook"] == "ingress" and obj.get("dev") not in self.interfaces:
                raise KernelError(f"No such file or directory: device {obj.get('dev')}")
            hook = ChainHook(obj["type"], obj["hook"], obj.get("dev"), obj["prio"], obj.get("policy", "accept"))
        if obj["name"] in table.chains:
            if table.chains[obj["name"]][0] != hook:
                raise KernelError(f"Device or resource busy: chain {obj['name']} exists with another hook")
            return
        table.chains[obj["name"]] = (hook, [])

    def _flush_chain(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        if obj["name"] not in table.chains:
            raise KernelError(f"No such file or directory: chain {obj['name']}")
        table.chains[obj["name"]][1].clear()

    def _delete_chain(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        name = obj["name"]
        if name not in table.chains:
            raise KernelError(f"No such file or directory: chain {name}")
        if table.chains[name][1]:
            raise KernelError(f"Device or resource busy: chain {name} is not empty")
        for map_name, (_decl, elements) in table.maps.items():
            if any(e.value == ("jump", name) or e.value == ("goto", name) for e in elements.values()):
                raise KernelError(f"Device or resource busy: chain {name} is used by map {map_name}")
        del table.chains[name]

    def _add_rule(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        if obj["chain"] not in table.chains:
            raise KernelError(f"No such file or directory: chain {obj['chain']}")
        text = json.dumps(obj["expr"])
        for map_name in _referenced_maps(text):
            if map_name not in table.maps:
                raise KernelError(f"No such file or directory: map {map_name}")
        table.chains[obj["chain"]][1].append(NftRule(comment=obj.get("comment", ""), expr_json=text))

    def _add_map(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        decl = decode_map({k: v for k, v in obj.items() if k != "elem"})
        if obj["name"] in table.maps:
            if table.maps[obj["name"]][0].declaration() != decl.declaration():
                raise KernelError(f"File exists: map {obj['name']} with another type")
            return
        table.maps[obj["name"]] = (decl, {})
        if obj.get("elem"):
            self._add_element(tables, {**obj, "table": obj["table"]})

    def _delete_map(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        name = obj["name"]
        if name not in table.maps:
            raise KernelError(f"No such file or directory: map {name}")
        for chain, (_hook, rules) in table.chains.items():
            if any(name in _referenced_maps(r.expr_json) for r in rules):
                raise KernelError(f"Device or resource busy: map {name} is used by chain {chain}")
        del table.maps[name]

    def _add_element(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        if obj["name"] not in table.maps:
            raise KernelError(f"No such file or directory: map {obj['name']}")
        decl, elements = table.maps[obj["name"]]
        for item in obj["elem"]:
            key, elem = decode_element(item)
            if isinstance(elem.value, tuple) and elem.value[1] not in table.chains:
                raise KernelError(f"No such file or directory: chain {elem.value[1]}")
            old = elements.get(key)
            if old is not None and old.value != elem.value:
                raise KernelError(f"File exists: element {key} in map {obj['name']}")
            elements[key] = NftElement(value=elem.value, comment=elem.comment)
        del decl

    def _delete_element(self, tables: dict, obj: dict) -> None:
        table = self._table(tables, obj)
        if obj["name"] not in table.maps:
            raise KernelError(f"No such file or directory: map {obj['name']}")
        elements = table.maps[obj["name"]][1]
        for item in obj["elem"]:
            key, _elem = decode_element(item)
            if key not in elements:
                raise KernelError(f"No such file or directory: element {key} in map {obj['name']}")
            del elements[key]

    # ------------------------------------------------------------ addresses
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

    # ------------------------------------------------------------ sysctls
    def sysctl_read(self, key: str) -> str | None:
        return self.sysctls.get(key)

    def sysctl_write(self, key: str, value: str) -> None:
        if key not in self.sysctls:
            raise KernelError(f"sysctl {key}: No such file or directory")
        self._write(f"sysctl {key}={value}")
        self.sysctls[key] = value

    # ------------------------------------------------------------ L3 and IPVS
    def modules_missing(self, names: tuple[str, ...]) -> list[str]:
        return [] if self.modules is None else [n for n in names if n not in self.modules]

    def link_list(self, prefix: str) -> list[Link]:
        return [link for name, link in sorted(self.links.items()) if name.startswith(prefix)]

    def link_add(self, link: Link) -> None:
        if link.name in self.interfaces:
            raise KernelError(f"add {link.kind} link {link.name}: EEXIST File exists")
        if len(link.name) > 15:
            raise KernelError(f"add {link.kind} link {link.name}: EINVAL name too long")
        self._write(f"link add {link.name} {link.kind} {link.local} -> {link.remote or 'any'}")
        self.links[link.name] = Link(link.name, link.kind, link.local, link.remote, link.ttl)
        self.interfaces.add(link.name)
        self.addresses[link.name] = []
        if link.family == 4:
            self.sysctls[f"net/ipv4/conf/{link.name}/rp_filter"] = self.sysctls.get(
                "net/ipv4/conf/default/rp_filter", "0"
            )

    def link_del(self, name: str) -> None:
        if name not in self.links:
            raise KernelError(f"delete link {name}: ENODEV No such device")
        self._write(f"link del {name}")
        del self.links[name]
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
            raise KernelError(f"add route {route.ident}: ENODEV No such device")
        if any((r.family, r.table) == (route.family, route.table) for r in self.routes):
            raise KernelError(f"add route {route.ident}: EEXIST File exists")
        self._write(f"route add {route.ident}")
        self.routes.append(Route(route.family, route.table, route.dev, gateway=route.gateway))

    def route_del(self, route: Route) -> None:
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

    def ipvs_list(self) -> list[IpvsService]:
        self.ipvs_lists += 1
        return list(self.ipvs.values())

    def ipvs_stats(self) -> list[IpvsStats]:
        self.ipvs_stats_reads += 1
        return [
            IpvsStats(
                svc,
                IpvsCounters(*self.ipvs_counts.get(ident, ZERO)),
                {d.ident: IpvsCounters(*self.ipvs_counts.get((ident, d.ident), ZERO)) for d in svc.dests},
            )
            for ident, svc in self.ipvs.items()
        ]

    def ipvs_list_some(self, services: list[IpvsService]) -> list[IpvsService]:
        self.ipvs_some_lists += 1
        return [self.ipvs[s.ident] for s in services if s.ident in self.ipvs]

    def ipvs_service(self, verb: str, svc: IpvsService) -> None:
        have = self.ipvs.get(svc.ident)
        if verb == "-A":
            if have is not None:
                raise KernelError(f"ipvsadm -A {svc.ident}: Service already exists")
            self._write(f"ipvs add {svc.ident}")
            self.ipvs[svc.ident] = dataclasses.replace(svc, dests=(), pointer="")
        elif verb == "-E":
            if have is None:
                raise KernelError(f"ipvsadm -E {svc.ident}: No such service")
            self._write(f"ipvs edit {svc.ident}")
            self.ipvs[svc.ident] = dataclasses.replace(have, scheduler=svc.scheduler, flags=svc.flags)
        elif verb == "-D":
            if have is None:
                raise KernelError(f"ipvsadm -D {svc.ident}: No such service")
            self._write(f"ipvs del {svc.ident}")
            del self.ipvs[svc.ident]
            self.ipvs_counts = {
                k: v for k, v in self.ipvs_counts.items() if (k[0] if isinstance(k, tuple) else k) != svc.ident
            }
            self.ipvs_trash = {k: v for k, v in self.ipvs_trash.items() if k[0] != svc.ident}
        else:
            raise KernelError(f"fake kernel: unknown ipvs verb {verb}")

    def ipvs_dest(self, verb: str, svc: IpvsService, dest: IpvsDest) -> None:
        have = self.ipvs.get(svc.ident)
        if have is None:
            raise KernelError(f"ipvsadm {verb} {svc.ident}: No such service")
        dests = list(have.dests)
        index = next((i for i, d in enumerate(dests) if d.ident == dest.ident), None)
        if verb == "-a":
            if index is not None:
                raise KernelError(f"ipvsadm -a {svc.ident} {dest.ident}: Destination already exists")
            self._write(f"ipvs dest add {svc.ident} {dest.ident}")
            dests.insert(0, dest)  # the kernel adds at the head of the list
            if (svc.ident, dest.ident) in self.ipvs_trash:
                self.ipvs_counts[(svc.ident, dest.ident)] = self.ipvs_trash.pop((svc.ident, dest.ident))
        elif verb in ("-e", "-d"):
            if index is None:
                raise KernelError(f"ipvsadm {verb} {svc.ident} {dest.ident}: No such destination")
            self._write(f"ipvs dest {'edit' if verb == '-e' else 'del'} {svc.ident} {dest.ident}")
            if verb == "-e":
                dests[index] = dest
            else:
                del dests[index]
                if (svc.ident, dest.ident) in self.ipvs_counts:
                    self.ipvs_trash[(svc.ident, dest.ident)] = self.ipvs_counts.pop((svc.ident, dest.ident))
        else:
            raise KernelError(f"fake kernel: unknown ipvs verb {verb}")
        self.ipvs[svc.ident] = dataclasses.replace(have, dests=tuple(dests))

    def ipvs_batch(self, commands: list) -> None:
        """Line by line, each a write of its own, like ``ipvsadm -R``; stops
        at the first refused line, unless ``ipvs_batch_runs_on`` (what
        ipvsadm 1.31 really does: it runs the rest, and tells only that
        something failed)."""
        self.ipvs_batches += 1
        failed: list[str] = []
        for number, command in enumerate(commands, 1):
            try:
                if command.dest is None:
                    self.ipvs_service(command.verb, command.service)
                else:
                    self.ipvs_dest(command.verb, command.service, command.dest)
            except KernelError as exc:
                failed.append(f"line {number} of {len(commands)}: {command}: {exc}")
                if not self.ipvs_batch_runs_on:
                    break
        if failed:
            raise KernelError("ipvsadm -R failed at " + "; ".join(failed))

    def close(self) -> None:
        pass

    # ------------------------------------------------------------ BIRD
    def bird_read(self, fragment: str) -> str | None:
        return None if self.bird_files is None else self.bird_files.get(fragment)

    def bird_ready(self, config: str, fragment: str, socket: str) -> None:
        if not self.bird_running(socket):
            raise BirdError(f"BIRD is not running with control socket {socket} (fake)")

    def bird_running(self, socket: str) -> bool:
        return self.bird_files is not None and not self.bird_stopped

    def bird_check(self, config: str, fragment: str, text: str) -> None:
        if self.bird_rejects is not None and self.bird_rejects in text:
            line = text[: text.index(self.bird_rejects)].count("\n") + 1
            raise BirdError(f"BIRD rejected the config: syntax error (fake, line {line})", line=line)

    def bird_install(self, config: str, fragment: str, socket: str, text: str, reload: bool = True) -> None:
        if reload:
            self.bird_ready(config, fragment, socket)
        if self.bird_files is None:
            raise BirdError("BIRD is not installed (fake)")
        self.bird_check(config, fragment, text)
        self._write(f"bird {'install' if reload else 'write'} {fragment}")
        self.bird_files[fragment] = text
        if reload:
            self.bird_loaded = text

    # ------------------------------------------------------------ keepalived
    def keepalived_read(self, fragment: str) -> str | None:
        return None if self.keepalived_files is None else self.keepalived_files.get(fragment)

    def keepalived_ready(self, config: str, fragment: str, pid_file: str, track_dirs: tuple[str, ...] = ()) -> None:
        if self.keepalived_files is None:
            raise KeepalivedError("keepalived is not installed here (fake)", missing=True)
        if not self.keepalived_running(pid_file):
            raise KeepalivedError(f"keepalived is not running (pid file {pid_file}) (fake)")
        for track_dir in sorted(set(track_dirs) & self.missing_dirs):
            raise KeepalivedError(f"the VRRP track directory {track_dir} does not exist (fake)")

    def keepalived_running(self, pid_file: str) -> bool:
        return self.keepalived_files is not None and not self.keepalived_stopped

    def keepalived_check(self, config: str, fragment: str, text: str) -> None:
        if self.keepalived_files is None:
            raise KeepalivedError("keepalived is not installed here (fake)", missing=True)
        if self.keepalived_rejects is not None and self.keepalived_rejects in text:
            line = text[: text.index(self.keepalived_rejects)].count("\n") + 1
            raise KeepalivedError(f"keepalived rejected the config: Unknown keyword (fake, line {line})", line=line)

    def keepalived_install(
        self, config: str, fragment: str, pid_file: str, text: str | None, reload: bool = True
    ) -> None:
        if reload:
            self.keepalived_ready(config, fragment, pid_file)
        if self.keepalived_files is None:
            raise KeepalivedError("keepalived is not installed (fake)", missing=True)
        if text is not None:
            self.keepalived_check(config, fragment, text)
        self._write(f"keepalived {'install' if text is not None else 'remove'} {fragment}")
        if text is None:
            self.keepalived_files.pop(fragment, None)
        else:
            self.keepalived_files[fragment] = text
        if reload:
            self.keepalived_loaded = text or ""

    def gate_read(self, path: str) -> str | None:
        return self.gate_files.get(path)

    def gate_write(self, path: str, value: str) -> None:
        self._write(f"gate {path} {value}")
        self.gate_files[path] = value

    def gate_remove(self, path: str) -> None:
        self._write(f"gate remove {path}")
        self.gate_files.pop(path, None)


def _referenced_maps(expr_json: str) -> set[str]:
    """Names of maps a rule refers to ("@name" strings in its expression)."""
    found = set()
    for token in expr_json.split('"'):
        if token.startswith("@"):
            found.add(token[1:])
    return found
