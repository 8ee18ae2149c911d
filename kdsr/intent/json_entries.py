"""Reading an intent's JSON again after an edit: only the entries that changed.

``kdsr run`` reloads its intent file on SIGHUP.  The C parser reads the whole
file, though an edit usually touches one service or pool; and every entry it returns is a new object, so
the reload then compares 11,000 entries with the last document's by value.

This reader walks the top-level object and the entries of its entry maps
(services, pools) itself, and hands every value to the C scanner
(``json.JSONDecoder.scan_once``, with the caller's hooks).  Knowing where
each entry starts and ends in the text, it parses again only what an edit
can have reached:

- the text the old and new file share at the start (the common prefix):
  an entry of the last reading that ends inside it is the same entry at the
  same offset, with the same reader state before it (the same text came
  first).  It ends strictly inside, because a number's end depends on the
  character after it;
- the text they share at the end (the common suffix): from an offset where
  the last reading started an entry of the same map, everything after is
  the same text, so it parses the same: the rest of that map is the last
  reading's, shifted.

Reused entries are the last document's very objects: the reload sees them
unchanged by identity.  Anything this reader does not expect (a key twice,
malformed text, a top-level value that is not an object) raises
``Unreadable``; the caller then parses the whole text its usual way, which
words the problem.

Why hand-written: the library it stands in for is the standard ``json``
parser (C), which reads the whole text on every reload; side by side in
bench/reload_parts.py (10,000 VIPs, one weight edited) the whole-text parse
makes a reload several times slower, a large part of the daemon's budget
for an edit (its goal: docs/performance.md).  Its C scanner still parses every value here.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection
from dataclasses import dataclass
from json.decoder import WHITESPACE

# scan(text, offset) -> (value, end): json.JSONDecoder(...).scan_once
Scan = Callable[[str, int], tuple[object, int]]

_CHUNK = 1 << 16  # characters compared at a time when looking for the common ends


class Unreadable(Exception):
    """Text this reader leaves to the caller's whole parse."""


@dataclass(frozen=True)
class _Entries:
    """One entry map as read: its entries in file order and where each lies."""

    names: list[str]
    values: list[object]
    starts: list[int]  # offset of the opening quote of the entry's name
    ends: list[int]  # offset just past the entry's value
    at: dict[int, int]  # start -> index


@dataclass(frozen=True)
class Reading:
    text: str
    doc: dict
    maps: dict[str, _Entries]


def read(text: str, scan: Scan, maps: Collection[str], last: Reading | None = None) -> Reading:
    """The document in ``text`` (a JSON object), reusing ``last``'s entries where the text is the same."""
    reuse = _Reuse(last, text) if last is not None else None
    try:
        return _Reader(text, scan, maps, reuse).document()
    except Unreadable:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the scanner or a hook raised: the whole parse words it
        raise Unreadable from error


class _Reuse:
    """What of ``last`` the new text can take as it is."""

    def __init__(self, last: Reading, text: str) -> None:
        self.last = last
        old = last.text
        self.prefix = _common_prefix(old, text)
        self.suffix = _common_suffix(old, text)
        self.shift = len(text) - len(old)
        self.suffix_from = len(text) - self.suffix  # in the new text

    def at(self, key: str, offset: int) -> tuple[_Entries, int, int, int] | None:
        """(entries, first, past, shift): the last reading's entries first..past-1
        of map ``key`` are the new text's, from ``offset`` on, moved by shift."""
        entries = self.last.maps.get(key)
        if entries is None:
            return None
        first = entries.at.get(offset)
        if first is not None and entries.ends[first] < self.prefix:
            return entries, first, bisect.bisect_left(entries.ends, self.prefix, lo=first), 0
        if offset >= self.suffix_from:
            first = entries.at.get(offset - self.shift)
            if first is not None:
                return entries, first, len(entries.names), self.shift
        return None


class _Reader:
    def __init__(self, text: str, scan: Scan, maps: Collection[str], reuse: _Reuse | None) -> None:
        self.text = text
        self.scan = scan
        self.maps = maps
        self.reuse = reuse

    def _skip(self, offset: int) -> int:
        return WHITESPACE.match(self.text, offset).end()

    def _expect(self, offset: int, char: str) -> int:
        if self.text[offset : offset + 1] != char:
            raise Unreadable
        return self._skip(offset + 1)

    def _name(self, offset: int) -> tuple[str, int]:
        """A key and the offset of its value."""
        if self.text[offset : offset + 1] != '"':
            raise Unreadable
        name, offset = self.scan(self.text, offset)
        return name, self._expect(self._skip(offset), ":")

    def _next(self, offset: int) -> tuple[bool, int]:
        """After a member: (another follows, its offset) or (False, past the closing brace)."""
        offset = self._skip(offset)
        char = self.text[offset : offset + 1]
        if char == ",":
            return True, self._skip(offset + 1)
        if char == "}":
            return False, offset + 1
        raise Unreadable

    def document(self) -> Reading:
        offset = self._expect(self._skip(0), "{")
        doc: dict = {}
        entries: dict[str, _Entries] = {}
        more = self.text[offset : offset + 1] != "}"
        if not more:
            offset += 1
        while more:
            key, offset = self._name(offset)
            if key in doc:
                raise Unreadable  # a key twice: the whole parse says where
            if key in self.maps and self.text[offset : offset + 1] == "{":
                doc[key], entries[key], offset = self._entries(key, offset)
            else:
                doc[key], offset = self.scan(self.text, offset)
            more, offset = self._next(offset)
        if self._skip(offset) != len(self.text):
            raise Unreadable
        return Reading(self.text, doc, entries)

    def _entries(self, key: str, offset: int) -> tuple[dict, _Entries, int]:
        names: list[str] = []
        values: list[object] = []
        starts: list[int] = []
        ends: list[int] = []
        offset = self._skip(offset + 1)
        more = self.text[offset : offset + 1] != "}"
        if not more:
            offset += 1
        while more:
            same = self.reuse.at(key, offset) if self.reuse is not None else None
            if same is not None:
                last, first, past, shift = same
                names += last.names[first:past]
                values += last.values[first:past]
                starts += last.starts[first:past] if not shift else [s + shift for s in last.starts[first:past]]
                ends += last.ends[first:past] if not shift else [e + shift for e in last.ends[first:past]]
                if ends[-1] <= offset:  # cannot happen (an entry ends past its start); never loop on it
                    raise Unreadable
                offset = ends[-1]
            else:
                starts.append(offset)
                name, offset = self._name(offset)
                value, offset = self.scan(self.text, offset)
                names.append(name)
                values.append(value)
                ends.append(offset)
            more, offset = self._next(offset)
        doc = dict(zip(names, values, strict=True))
        if len(doc) != len(names):
            raise Unreadable  # a name twice
        return doc, _Entries(names, values, starts, ends, {s: i for i, s in enumerate(starts)}), offset


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix (slice compares run in C)."""
    limit = min(len(a), len(b))
    low = 0
    while low + _CHUNK <= limit and a[low : low + _CHUNK] == b[low : low + _CHUNK]:
        low += _CHUNK
    high = min(low + _CHUNK, limit)
    while low < high:  # a[:low] == b[:low]; the answer is in [low, high]
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _common_suffix(a: str, b: str) -> int:
    """The length of the longest common suffix (it may overlap the common
    prefix: each is used on its own)."""
    end_a, end_b = len(a), len(b)
    limit = min(end_a, end_b)
    low = 0
    while low + _CHUNK <= limit and a[end_a - low - _CHUNK : end_a - low] == b[end_b - low - _CHUNK : end_b - low]:
        low += _CHUNK
    high = min(low + _CHUNK, limit)
    while low < high:  # the last low characters agree; the answer is in [low, high]
        mid = (low + high + 1) // 2
        if a[end_a - mid : end_a - low] == b[end_b - mid : end_b - low]:
            low = mid
        else:
            high = mid - 1
    return low
