"""Loading the same intent file again: validate and build only what changed.

``kdsr run`` reloads its whole intent on SIGHUP, though an edit usually
touches one pool or one service.  A whole reload checks and builds every
entry again, and every model object is new, so compile then compares every
service by value where identity would have answered.

Both passes split cleanly by entry.  The schema checks each value of the
services and pools maps by itself (``additionalProperties`` and
``propertyNames``), and building a service reads only its own entry (a
pool: its entry and the server nodes).  So an entry equal to the one in the
last valid document has no schema problem, and its model object is the one
already built.  Everything else (the rest of the document, the maps' own
keywords, each changed entry and new name) is validated as before; the
cross-object rules (kdsr/intent/verify.py) run on the part of the document
an edit can reach (kdsr/intent/reverify.py), and the JSON text is parsed
again only where it changed (kdsr/intent/json_entries.py), which hands
back unchanged entries as the last document's objects.  When anything is
wrong, the whole document is read and validated again, so a reload
reports exactly what ``kdsr plan`` would.

"Equal" is strict about JSON types: Python's ``True == 1``, and a reload
must not let ``true`` through where the last file had ``1``.

Why kept: a whole reload (``load.parse_intent``: jsonschema-rs, then the
whole build and verify) alone exceeds the daemon's budget for an edit on
a large intent (its goal: docs/performance.md); bench/reload_parts.py times it beside this reload and
beside each part of it left out.
"""

from __future__ import annotations

import copy
import functools
import marshal
from collections.abc import Callable
from pathlib import Path

from kdsr.errors import Problem
from kdsr.intent import json_entries, load, reverify
from kdsr.intent import verify as rules
from kdsr.intent.model import Intent, Pool, Service

# The top-level maps whose entries are validated and built one by one.
ENTRY_MAPS = ("services", "pools")
IsValid = Callable[[object], bool]  # does a value satisfy (part of) the schema?
# What the reduced schema knows how to leave to the per-entry checks: a map
# schema with any other keyword is validated whole.
_MAP_KEYWORDS = frozenset(
    {"description", "type", "minProperties", "maxProperties", "propertyNames", "additionalProperties"}
)


class Reloader:
    """Loads one intent file again and again, remembering its last valid
    document (``kdsr run``; one per file)."""

    def __init__(self) -> None:
        self._last: _Since | None = None
        self._reading: json_entries.Reading | None = None  # of the last valid text, when JSON
        self.text: str | None = None  # the last valid text, as read

    def load(self, path: str | Path) -> Intent:
        return self.parse(load.read_intent_text(path), str(path))

    def parse(self, text: str, source: str, fmt: str | None = None) -> Intent:
        """``parse_intent``; an invalid text raises IntentError and leaves the memory as it was."""
        readings: list[json_entries.Reading] = []

        def read_json(text: str) -> dict | None:
            try:
                readings.append(json_entries.read(text, load.JSON_DECODER.scan_once, ENTRY_MAPS, self._reading))
            except json_entries.Unreadable:
                return None
            return readings[-1].doc

        intent, doc = load.checked(text, source, fmt, since=self._last, read_json=read_json)
        if self._last is not None and intent.services is self._last.intent.services:
            intent.share_grouping(self._last.intent)  # an edit of pools or nodes only
        self._reading = next((r for r in readings if r.doc is doc), None)
        first = self._last is None
        self._last = _Since(doc, intent, self._last)
        self.text = text
        if first:
            # What a reload compares with and reverify's index, made now, at
            # start, rather than by the first edit.
            self._last.prepare()
        return intent


def same_json(a: object, b: object) -> bool:
    """Equal as JSON values: Python's ``==`` with the types checked too
    (``True == 1`` and ``1 == 1.0`` in Python, not in JSON)."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return a.keys() == b.keys() and all(same_json(value, b[key]) for key, value in a.items())
    if kind is list:
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _frozen(entry: object) -> bytes:
    """An entry as bytes that differ wherever ``same_json`` would say
    different: marshal writes True and 1, 1 and 1.0 as different types.
    Equal bytes mean strictly equal values; a different key order gives
    different bytes, which costs a needless check, never a missed one.
    Version 2: no back-references, whose use depends on reference counts."""
    return marshal.dumps(entry, 2)


_ABSENT = object()


class _Since:
    """The last valid document and its model, as ``load.checked`` uses them."""

    def __init__(self, doc: dict, intent: Intent, last: _Since | None = None) -> None:
        self.doc = doc
        self.intent = intent
        self._services = {s.name: s for s in intent.services}
        self._pools = {p.name: p for p in intent.pools}
        self._same: dict[str, frozenset[str]] = {}  # of the document being checked
        self._checking: object = None
        # The marshal form of this document's entries, made when first compared
        # (_unchanged); the index reverify keeps, built when first needed.
        self._forms: dict[str, dict[str, bytes]] = {key: {} for key in ENTRY_MAPS}
        self._index: reverify.Indexes | None = None
        self._next_forms: dict[str, dict[str, bytes]] = {}  # of the document being checked
        self._verified: tuple[object, reverify.Edit, list | None] | None = None  # the document verify accepted
        if last is not None:
            self._carry(last)

    def prepare(self) -> None:
        for key in ENTRY_MAPS:
            self._forms[key].update((name, _frozen(entry)) for name, entry in self.doc.get(key, {}).items())
        if self._index is None:
            self._index = reverify.Indexes.of(self.doc)

    def _carry(self, last: _Since) -> None:
        """What ``last`` learned of this document while checking it."""
        if last._checking is self.doc:
            self._forms.update(last._next_forms)
        if last._verified is not None and last._verified[0] is self.doc and last._index is not None:
            _, edit, marks = last._verified
            if marks is not None:  # else the whole document was verified: a new index when needed
                self._index = reverify.apply(edit, last._index, marks)

    # --- which entries did not change ----------------------------------------

    def _unchanged(self, doc: object) -> dict[str, frozenset[str]]:
        """Per map: the names whose entry equals the last document's."""
        if self._checking is not doc:
            self._checking, self._same, self._next_forms = doc, {}, {}
            for key in ENTRY_MAPS:
                new = doc.get(key) if isinstance(doc, dict) else None
                old = self.doc.get(key, {})
                if isinstance(new, dict):
                    # ``==`` runs in C but says True == 1; their marshal forms
                    # (_frozen) tell them apart, and cost less than repr or
                    # a compare in Python.
                    forms, next_forms = self._forms[key], self._next_forms.setdefault(key, {})
                    same = []
                    for name, entry in new.items():
                        if entry is old.get(name, _ABSENT):  # json_entries reused it: the same text
                            same.append(name)
                            if name in forms:
                                next_forms[name] = forms[name]
                        elif name in old and entry == old[name]:
                            next_forms[name] = frozen = _frozen(entry)
                            if frozen == (forms.get(name) or forms.setdefault(name, _frozen(old[name]))):
                                same.append(name)
                    self._same[key] = frozenset(same)
                else:
                    self._same[key] = frozenset()
        return self._same

    # --- Since: the two passes ------------------------------------------------

    def schema_problems(self, doc: object, source: str, fmt: str) -> list[Problem]:
        checks = _entry_validators()
        if checks is not None and isinstance(doc, dict):
            whole, by_map = checks
            same = self._unchanged(doc)
            if whole(doc) and all(
                self._entries_valid(doc[key], self.doc.get(key, {}), same[key], *by_map[key])
                for key in ENTRY_MAPS
                if key in doc
            ):
                return []
        # Something is wrong (or the schema is not shaped as expected): the
        # whole document again, for the full list in the usual words.
        return list(load._schema_problems(doc, source, fmt))

    @staticmethod
    def _entries_valid(
        entries: dict,
        old: dict,
        same: frozenset[str],
        names: IsValid,
        values: IsValid,
    ) -> bool:
        return all(
            (name in old or names(name)) and values(entry) for name, entry in entries.items() if name not in same
        )

    def verify(self, doc: dict, source: str) -> list[Problem]:
        """verify's problems, found on the part of ``doc`` an edit can reach
        (kdsr/intent/reverify.py) when only services and pools changed."""
        self._verified = None
        if doc.keys() != self.doc.keys() or not all(
            same_json(value, self.doc[key]) for key, value in doc.items() if key not in ENTRY_MAPS
        ):
            return rules.verify(doc, source)
        same = self._unchanged(doc)
        changed = {key: frozenset((doc[key].keys() | self.doc[key].keys()) - same[key]) for key in ENTRY_MAPS}
        edit = reverify.Edit(self.doc, doc, changed["services"], changed["pools"])
        if self._index is None:
            self._index = reverify.Indexes.of(self.doc)
        problems, marks = reverify.verify_edit(edit, self._index, source)
        if not problems:
            self._verified = (doc, edit, marks)
        return problems

    def build(self, doc: dict, source: str) -> Intent:
        # The servers are part of every pool's build (a member may name a node).
        servers_same = same_json(doc.get("servers", {}), self.doc.get("servers", {}))
        return load._build(doc, source, _Kept(self, self._unchanged(doc), servers_same))


class _Kept:
    """The model objects of unchanged entries, for ``load._build``."""

    def __init__(self, since: _Since, same: dict[str, frozenset[str]], servers_same: bool) -> None:
        self._since = since
        self._services = same.get("services", frozenset())
        self._pools = same.get("pools", frozenset()) if servers_same else frozenset()

    def service(self, name: str) -> Service | None:
        return self._since._services.get(name) if name in self._services else None

    def pool(self, name: str) -> Pool | None:
        return self._since._pools.get(name) if name in self._pools else None

    def same_tuple(self, built: tuple) -> tuple:
        """The last model's tuple when ``built`` holds the same objects: compile
        reuses its answers for a services tuple it has seen (by identity)."""
        for last in (self._since.intent.services, self._since.intent.pools):
            if len(last) == len(built) and all(a is b for a, b in zip(last, built, strict=True)):
                return last
        return built


@functools.cache
def _entry_validators() -> tuple[IsValid, dict[str, tuple[IsValid, IsValid]]] | None:
    """(a test of the schema with the maps' entries and names left out, and
    per map a test of a name and one of an entry); None when a map's schema
    has a keyword this split does not know."""
    root = load.schema()
    reduced = copy.deepcopy(root)
    by_map = {}
    for key in ENTRY_MAPS:
        part = reduced["properties"][key]
        if not set(part) <= _MAP_KEYWORDS or "additionalProperties" not in part or "propertyNames" not in part:
            return None
        by_map[key] = (
            _is_valid_for(root, part["propertyNames"]),
            _is_valid_for(root, part["additionalProperties"]),
        )
        # Left out rather than set to true: the check would still visit
        # each of 10,000 entries to accept it.
        del part["propertyNames"], part["additionalProperties"]
    return load.is_valid_for(reduced), by_map


def _is_valid_for(root: dict, subschema: dict) -> IsValid:
    # The entry's schema with the root's definitions, so that its
    # "#/$defs/..." references resolve as they do in the whole schema.
    return load.is_valid_for({"$schema": root["$schema"], "$defs": root["$defs"], **subschema})
