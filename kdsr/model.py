"""Desired and observed kernel state, as keyed, comparable objects.

Both compile (what we want) and the kernel readers (what is there) produce
these types, so diff can compare them.  Equality compares configuration only:
handles, counters and statistics never enter these objects (readers drop
them), so a re-read of an applied state equals the desired state.

nftables rules are compared by their comment, which carries a digest of the
rule's canonical JSON (see ``NftRule``): the kernel lists rules back in its
own normal form (it drops implied dependencies such as ``meta protocol ip``),
so comparing expressions literally would report false drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# A map element key or value: an int (slot), a string (address, MAC) or a
# tuple for concatenations, with a port range as a (first, last) tuple.
ElementKey = int | str | tuple
ElementValue = str | tuple

RULE_COMMENT_PREFIX = "kdsr:"


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def rule_digest(expr: list) -> str:
    return hashlib.sha256(canonical_json(expr).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class NftRule:
    """One rule: libnftables JSON statements plus an identifying comment.

    ``comment`` is ``kdsr:<digest> <intent pointer>``; the digest covers the
    expression kdsr generated, so a changed rule gets a new comment and a rule
    added by hand (no kdsr comment) never compares equal.  A rule replaced by
    hand *keeping* kdsr's comment is not detected: the kernel lists rules in
    its own normal form, so the expressions cannot be compared literally.
    ``expr_json`` is what kdsr generated, or for a rule read back, what the
    kernel listed (a rollback re-adds exactly that).
    """

    comment: str
    expr_json: str = field(default="", compare=False)

    @classmethod
    def build(cls, expr: list, pointer: str) -> NftRule:
        comment = f"{RULE_COMMENT_PREFIX}{rule_digest(expr)} {pointer}".strip()
        # The kernel caps comments (NFT_USERDATA_MAXLEN) at 256 bytes;
        # nft's own parser at 128.  Pointers are short; truncate to be sure.
        return cls(comment=comment[:128], expr_json=canonical_json(expr))

    @property
    def expr(self) -> list:
        return json.loads(self.expr_json) if self.expr_json else []

    @property
    def digest(self) -> str:
        if not self.comment.startswith(RULE_COMMENT_PREFIX):
            return ""
        return self.comment[len(RULE_COMMENT_PREFIX) :].split(" ", 1)[0]


@dataclass(frozen=True)
class ChainHook:
    """What makes a chain a base chain."""

    type: str
    hook: str
    device: str | None
    priority: int
    policy: str


@dataclass(frozen=True)
class NftChain:
    name: str
    hook: ChainHook | None
    rules: tuple[NftRule, ...]
    pointer: str = field(default="", compare=False)


@dataclass(frozen=True)
class NftElement:
    value: ElementValue
    comment: str = ""


@dataclass(frozen=True)
class NftMap:
    """A named map: its declaration plus its elements (key -> value)."""

    name: str
    key_type: tuple[str, ...]
    data_type: str
    flags: tuple[str, ...] = ()
    counter: bool = False
    elements: tuple[tuple[ElementKey, NftElement], ...] = ()
    pointer: str = field(default="", compare=False)

    def declaration(self) -> tuple:
        return (self.key_type, self.data_type, self.flags, self.counter)

    def element_dict(self) -> dict[ElementKey, NftElement]:
        return dict(self.elements)


@dataclass(frozen=True)
class NftTable:
    family: str
    name: str
    chains: tuple[NftChain, ...]
    maps: tuple[NftMap, ...]
    pointer: str = field(default="", compare=False)

    def chain(self, name: str) -> NftChain | None:
        return next((c for c in self.chains if c.name == name), None)

    def map(self, name: str) -> NftMap | None:
        return next((m for m in self.maps if m.name == name), None)

    @property
    def ident(self) -> str:
        return f"{self.family} {self.name}"


@dataclass(frozen=True)
class Address:
    """An address on an interface that kdsr wants or owns."""

    ifname: str
    cidr: str  # "10.10.0.100/32"
    label: str = ""  # IPv4 only ("lo:kdsr"); IPv6 addresses have no label
    pointer: str = field(default="", compare=False)

    @property
    def ident(self) -> str:
        return f"{self.ifname} {self.cidr}"


@dataclass(frozen=True)
class Sysctl:
    key: str  # "net/ipv4/conf/all/arp_ignore"
    value: str
    # True: any value >= ``value`` will do.  The kernel takes max(all, iface)
    # for the ARP knobs, and an admin's stricter setting must not be lowered.
    at_least: bool = False
    pointer: str = field(default="", compare=False)

    def satisfied_by(self, current: str | None) -> bool:
        if current is None:
            return False
        if self.at_least:
            try:
                return int(current) >= int(self.value)
            except ValueError:
                return False
        return current == self.value

    @property
    def dotted(self) -> str:
        return self.key.replace("/", ".")


@dataclass(frozen=True)
class Desired:
    """Everything kdsr wants on one node."""

    node: str
    role: str  # "load-balancer" | "server"
    tables: tuple[NftTable, ...] = ()
    addresses: tuple[Address, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()


@dataclass(frozen=True)
class Observed:
    """What the kernel has of kdsr's objects (and what could collide with them).

    ``addresses`` lists the owned addresses and any foreign address that
    equals a desired one; ``owned_addresses`` says which are kdsr's.
    ``sysctl_previous`` holds the values kdsr found before it first changed
    a key, so destroy can put them back; ``sysctl_written`` what kdsr wrote,
    so a value someone changed after kdsr is left alone.
    """

    tables: tuple[NftTable, ...] = ()
    addresses: tuple[Address, ...] = ()
    owned_addresses: frozenset[str] = frozenset()  # Address.ident, present now
    address_records: frozenset[str] = frozenset()  # Address.ident, as the state file says
    sysctls: tuple[Sysctl, ...] = ()
    sysctl_previous: tuple[tuple[str, str], ...] = ()
    sysctl_written: tuple[tuple[str, str], ...] = ()  # what kdsr wrote, per key
