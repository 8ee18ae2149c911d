"""A validating in-memory nftables (kdsr/kernel/nft.py's fake).

It rejects what the kernel rejects (a map still named by a rule, a chain
still jumped to, an element added twice with another value, a jump to a
chain that does not exist, an ingress chain on a device that does not
exist) and applies a batch all-or-nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from kdsr.kernel import KernelError
from kdsr.kernel.fake.log import FakeLog
from kdsr.kernel.nft_json import decode_element, decode_map, encode_key, encode_value, map_object
from kdsr.model import ChainHook, NftChain, NftElement, NftMap, NftRule, NftTable


@dataclass
class _Table:
    chains: dict[str, tuple[ChainHook | None, list[NftRule]]] = field(default_factory=dict)
    maps: dict[str, tuple[NftMap, dict]] = field(default_factory=dict)  # decl, key -> NftElement


class FakeNftables:
    def __init__(self, log: FakeLog, has_device: Callable[[str | None], bool]) -> None:
        """``has_device``: whether a network device of that name exists (the links fake knows)."""
        self.log = log
        self.writes = 0
        self._has_device = has_device
        self.tables: dict[tuple[str, str], _Table] = {}
        # Packet counters a listing reports (listing); tests set them.
        self.counts: dict = {}

    def _write(self, what: str) -> None:
        self.log.write(what)
        self.writes += 1

    def available(self) -> bool:
        return True

    def list_tables(self) -> list[tuple[str, str]]:
        return sorted(self.tables)

    def read_table(self, family: str, name: str, reuse: bool = False) -> NftTable | None:
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

    def listing(self, family: str, name: str) -> list[dict] | None:
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

    def apply(self, commands: list[dict], check_only: bool = False, becomes: NftTable | None = None) -> bool:
        tables = copy.deepcopy(self.tables)
        for cmd in commands:
            self._nft_command(tables, cmd)
        if check_only:
            return False
        self._write(f"nft transaction ({len(commands)} commands)")
        self.tables = tables
        return False  # the fake has no generation: reads always list

    def adopt(self, read: NftTable, same: NftTable) -> None:
        pass  # the fake keeps no read: every read lists

    def token(self, family: str, name: str) -> tuple[str, bool] | None:
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
            if obj["hook"] == "ingress" and not self._has_device(obj.get("dev")):
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


def _referenced_maps(expr_json: str) -> set[str]:
    """Names of maps a rule refers to ("@name" strings in its expression)."""
    found = set()
    for token in expr_json.split('"'):
        if token.startswith("@"):
            found.add(token[1:])
    return found
