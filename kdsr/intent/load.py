"""Read an intent file: parse, check the schema, verify, build the model.

Each stage reports every problem it finds.  A later stage runs only when the
earlier ones leave a document it can trust: verify needs the shapes the schema
guarantees, so a document with schema errors gets those errors (all of them)
and no verify pass; otherwise verify's cross-object problems are reported.
Either way ``IntentError`` carries the whole list, sorted in file order.
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml

try:
    import jsonschema_rs
except ImportError:  # optional: see is_valid_for
    jsonschema_rs = None

if TYPE_CHECKING:
    import jsonschema

from kdsr import collector
from kdsr.errors import IntentError, Problem, UsageError, quote
from kdsr.files import read_bounded
from kdsr.intent import values
from kdsr.intent import verify as rules
from kdsr.intent.model import (
    ALL_DOWN_KEEP,
    ANNOUNCE_ACTIVE_ACTIVE,
    DEFAULT_ADVERT_INTERVAL,
    DEFAULT_BIRD_CONFIG,
    DEFAULT_BIRD_FRAGMENT,
    DEFAULT_BIRD_SOCKET,
    DEFAULT_FALL,
    DEFAULT_HASH_FIELDS,
    DEFAULT_HASH_SEED,
    DEFAULT_HOLD_TIME,
    DEFAULT_INTERVAL,
    DEFAULT_JITTER,
    DEFAULT_KEEPALIVED_CONFIG,
    DEFAULT_KEEPALIVED_FRAGMENT,
    DEFAULT_KEEPALIVED_PID_FILE,
    DEFAULT_PATH_MTU,
    DEFAULT_PIN_MAX_FLOWS,
    DEFAULT_PIN_TIMEOUT,
    DEFAULT_PREPEND,
    DEFAULT_RISE,
    DEFAULT_TIMEOUT,
    DEFAULT_UDP_SEND,
    DEFAULT_VRRP_TRACK_DIR,
    DSR_L2,
    ENGINE_NFT,
    MONITOR_DSR,
    Announce,
    Bgp,
    BgpNeighbor,
    BirdFiles,
    FlowPinning,
    Hashing,
    Intent,
    KeepalivedFiles,
    LoadBalancerNode,
    Monitor,
    Pool,
    PoolMember,
    PortRange,
    ServerNode,
    Service,
    Vrrp,
)

SCHEMA_ID = "https://kdsr.dev/schemas/intent-v1.json"

# Bounds on what an intent may cost to parse (the file's size: kdsr/files.py).
# 10,000 VIPs x 16 servers is about 300,000 values; a YAML alias bomb or a
# self-referencing anchor is stopped by the node count and the depth long
# before memory runs out.
MAX_NODES = 1_000_000
MAX_DEPTH = 64

JSON = "json"
YAML = "yaml"
_FORMATS_BY_SUFFIX = {".json": JSON, ".yaml": YAML, ".yml": YAML}


def load_intent(path: str | Path) -> Intent:
    """Read and validate an intent file; IntentError lists every problem."""
    return parse_intent(read_intent_text(path), str(path))


def read_intent_text(path: str | Path) -> str:
    """The intent file's text, read once and within bounds (kdsr/files.py)."""
    source = str(path)
    try:
        # utf-8-sig: tolerate the byte-order mark some Windows editors write.
        text = read_bounded(path, source).decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file. Give the path of an intent file (JSON or YAML).") from None
    except OSError as error:
        raise IntentError([Problem(source, "", f"cannot read the file: {error.strerror or error}.")]) from None
    except UnicodeDecodeError as error:
        raise IntentError(
            [Problem(source, "", f"the file is not UTF-8 text (byte {error.start}).", "Save it as UTF-8.")]
        ) from None
    return text


def parse_intent(text: str, source: str, fmt: str | None = None) -> Intent:
    """Validate intent text; ``fmt`` is "json" or "yaml", else guessed from ``source``."""
    return checked(text, source, fmt)[0]


def checked(
    text: str,
    source: str,
    fmt: str | None = None,
    since: Since | None = None,
    read_json: Callable[[str], dict | None] | None = None,
) -> tuple[Intent, dict]:
    """``parse_intent``, also returning the plain document it built from.

    ``since`` (kdsr/intent/reload.py) stands for the last valid document of
    the same file: it validates and builds only the entries that changed.
    ``read_json`` reads JSON text as ``_parse_json_fast`` does, or says None
    to leave it to it (kdsr/intent/json_entries.py).
    """
    fmt = fmt or _guess_format(text, source)
    if fmt not in (JSON, YAML):
        raise ValueError(f"fmt must be {JSON!r} or {YAML!r}, not {fmt!r}")  # a caller's bug, not the user's
    # The document and the model are large and acyclic (kdsr/collector.py).
    with collector.paused():
        return _checked_text(text, source, fmt, since, read_json)


def _checked_text(
    text: str, source: str, fmt: str, since: Since | None, read_json: Callable[[str], dict | None] | None
) -> tuple[Intent, dict]:
    if fmt == JSON:
        doc = _parse_json_fast(text, read_json)
        if doc is not _UNREADABLE:
            try:
                return _checked(doc, [], source, fmt, since)
            except (IntentError, RecursionError):
                pass  # the careful path below finds and words every problem
    doc, problems = _parse(text, source, fmt)
    if doc is _UNREADABLE:
        raise IntentError(problems)
    if doc is None:  # YAML: an empty file or only comments
        hint = "An intent holds version, services, pools and load_balancers."
        raise IntentError([Problem(source, "", "the file is empty.", hint)])
    return _checked(doc, problems, source, fmt, since)


def _checked(doc: object, problems: list[Problem], source: str, fmt: str, since: Since | None) -> tuple[Intent, dict]:
    schema_problems = since.schema_problems(doc, source, fmt) if since else list(_schema_problems(doc, source, fmt))
    problems += schema_problems
    if not schema_problems:
        problems += since.verify(doc, source) if since else rules.verify(doc, source)
    else:
        problems += _verify_around(doc, source, schema_problems)
    if problems:
        raise IntentError(_in_file_order(_unique(problems), doc))
    return (since.build(doc, source) if since else _build(doc, source)), doc


class Since(Protocol):
    """What ``checked`` asks of the last valid document (kdsr/intent/reload.py)."""

    def schema_problems(self, doc: object, source: str, fmt: str) -> list[Problem]: ...

    def verify(self, doc: dict, source: str) -> list[Problem]: ...

    def build(self, doc: dict, source: str) -> Intent: ...


def _object_of(pointer: str) -> str:
    """ "/services/web/ports/0" -> "/services/web": the named object a problem is in."""
    return "/".join(pointer.split("/")[:3])


def _verify_around(doc: object, source: str, schema_problems: list[Problem]) -> list[Problem]:
    """Cross-object problems of the objects the schema found no fault in.

    Verify trusts the schema's shapes, so on a document with schema errors it
    may trip over a wrong type: then it reports nothing.  Otherwise its
    problems inside objects that already have a schema error are dropped
    (they are likely echoes of it); the rest are real and the user gets them
    in the same run instead of after fixing the first batch.
    """
    if not isinstance(doc, dict):
        return []
    # Services are leaves: nothing refers to them.  A fault in a pool or a
    # node would echo through every service and member that refers to it, so
    # then verify waits for the schema problems to be fixed.
    if any(not p.pointer.startswith("/services/") for p in schema_problems):
        return []
    try:
        found = rules.verify(doc, source)
    except Exception:  # noqa: BLE001 - a malformed shape; the schema problems say why
        return []
    faulty = {_object_of(p.pointer) for p in schema_problems}
    return [p for p in found if _object_of(p.pointer) not in faulty and p.pointer]


def schema() -> dict:
    """The intent JSON Schema, as shipped in the package (kdsr/data)."""
    return _schema()


# --- parsing ------------------------------------------------------------------


def _guess_format(text: str, source: str) -> str:
    suffix = Path(source).suffix.lower()
    if suffix in _FORMATS_BY_SUFFIX:
        return _FORMATS_BY_SUFFIX[suffix]
    # Standard input or an odd name: JSON documents start with "{".
    return JSON if text.lstrip().startswith("{") else YAML


class _Mapping(dict):
    """A parsed object that remembers the keys it saw twice (last one wins)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.duplicates: list[tuple[object, str]] = []  # (key, where: " (line 12)")


def _tab_at(text: str, line: int, column: int) -> bool:
    """Whether the YAML error's position (0-based) is a tab, or leading whitespace with a tab."""
    lines = text.splitlines()
    if line >= len(lines):
        return False
    here = lines[line]
    return (column < len(here) and here[column] == "\t") or "\t" in here[: len(here) - len(here.lstrip())]


# An empty YAML file parses to None, so failure needs its own marker.
_UNREADABLE = object()


def _parse(text: str, source: str, fmt: str) -> tuple[object, list[Problem]]:
    """(document or _UNREADABLE, problems); duplicate keys are problems, not fatal."""
    try:
        raw = _parse_json(text) if fmt == JSON else _parse_yaml(text)
    except json.JSONDecodeError as error:
        message = f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}."
        hint = "Look for a missing comma, quote or bracket just before it."
        return _UNREADABLE, [Problem(source, "", message, hint)]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = error.problem or error.context or "unreadable"
        hint = "Check the indentation and quoting there."
        if mark is not None and _tab_at(text, mark.line, mark.column):
            # PyYAML says "found character that cannot start any token".
            what, hint = "a tab character", "YAML indents with spaces only; replace the tab with spaces."
        return _UNREADABLE, [Problem(source, "", f"invalid YAML{where}: {what}.", hint)]
    except yaml.YAMLError as error:
        return _UNREADABLE, [Problem(source, "", f"invalid YAML: {error}.")]
    except RecursionError:
        message = f"the document nests deeper than this parser can follow (more than {MAX_DEPTH} levels is no intent)."
        return _UNREADABLE, [Problem(source, "", message, "Check that this is the intent file.")]
    problems: list[Problem] = []
    budget = _Budget()
    try:
        return _plain(raw, "", source, problems, budget), problems
    except _TooBig as error:
        hint = "YAML anchors and aliases repeat a subtree; an intent needs few of them."
        return _UNREADABLE, [Problem(source, error.pointer, f"{error}.", hint)]


class _TooBig(Exception):
    def __init__(self, message: str, pointer: str) -> None:
        super().__init__(message)
        self.pointer = pointer


class _Budget:
    """Counts the nodes _plain visits: aliases make a small YAML file a huge tree."""

    def __init__(self) -> None:
        self.nodes = 0

    def visit(self, pointer: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooBig(f"the document expands to more than {MAX_NODES:,} values", pointer)
        if depth > MAX_DEPTH:
            raise _TooBig(f"the document nests deeper than {MAX_DEPTH} levels (a self-referencing anchor?)", pointer)


def _parse_json(text: str) -> object:
    def mapping(pairs: list[tuple[str, object]]) -> _Mapping:
        result = _Mapping()
        for key, value in pairs:
            if key in result:
                result.duplicates.append((key, ""))  # json keeps no positions
            result[key] = value
        return result

    return json.loads(text, object_pairs_hook=mapping)


class _Duplicate(Exception):
    """A key written twice in one JSON object (the careful path reports where)."""


def _parse_json_fast(text: str, read_json: Callable[[str], dict | None] | None = None) -> object:
    """The JSON document as plain values straight from the C parser, or
    _UNREADABLE when only the careful path (``_parse``) may answer.

    The careful path walks every value again in Python to find duplicate
    keys, count the values and the depth, and make whole floats integers,
    several times slower than the C parser alone.
    Here the parser's hooks do the first and last, a count of the separators
    bounds the values (every value but the first follows a "[", "," or
    ":"), and the schema bounds the depth: it has no open-ended
    object or array, so a document it accepts nests a few levels at most.
    ``checked`` takes the careful path again for any document with a
    problem, so an error reads exactly as before.
    """
    if 1 + text.count(",") + text.count(":") + text.count("[") > MAX_NODES:
        return _UNREADABLE
    if read_json is not None:
        doc = read_json(text)
        if doc is not None:
            return doc
    try:
        return JSON_DECODER.decode(text)
    except (json.JSONDecodeError, RecursionError, _Duplicate):
        return _UNREADABLE


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Duplicate
    return result


def _whole_as_int(text: str) -> float | int:
    return _integral(float(text))


def _integral(value: float) -> float | int:
    # JSON Schema counts 80.0 as an integer; make it one, so that the
    # model never holds a float port, weight or seed.
    return int(value) if value.is_integer() else value


# The fast path's parser; its scan_once reads one value at an offset
# (kdsr/intent/json_entries.py), with the same hooks.
JSON_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=_whole_as_int)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when PyYAML has it: far faster
    """SafeLoader whose mappings record duplicate keys instead of dropping them."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode):
    # A generator, like SafeLoader's own map constructor, so that nested and
    # recursive (anchor) structures are filled in after the object exists.
    data = _Mapping()
    yield data
    # "<<" merge keys put the merged entries first; keys written in this
    # mapping may override them (YAML merge semantics), so only a key written
    # twice in this mapping itself is a duplicate.
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    first_own = len(node.value) - own
    own_keys: set = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            ) from None
        if index >= first_own:
            if key in own_keys:
                data.duplicates.append((key, f" (line {key_node.start_mark.line + 1})"))
            own_keys.add(key)
        data[key] = loader.construct_object(value_node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> object:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _plain(
    value: object, pointer: str, source: str, problems: list[Problem], budget: _Budget, depth: int = 0
) -> object:
    """Plain dicts and lists again, reporting duplicate and non-text keys."""
    budget.visit(pointer, depth)
    if isinstance(value, dict):
        for key, where in getattr(value, "duplicates", []):
            problems.append(
                Problem(
                    source,
                    f"{pointer}/{_escape(str(key))}",
                    f"{quote(key)} appears twice in the same object{where}; only the last one would count.",
                    "Remove or rename one of them.",
                )
            )
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                # YAML turns unquoted keys like `on`, `no` or `80` into
                # booleans and numbers; names must be text.
                problems.append(
                    Problem(
                        source,
                        f"{pointer}/{_escape(str(key))}",
                        f"the key {_show(key)} is not text.",
                        "YAML reads unquoted on/off/yes/no as booleans and digits as numbers; "
                        'quote the key ("on": ...) so it stays a name.',
                    )
                )
                key = str(key)
            result[key] = _plain(item, f"{pointer}/{_escape(key)}", source, problems, budget, depth + 1)
        return result
    if isinstance(value, list):
        return [_plain(item, f"{pointer}/{i}", source, problems, budget, depth + 1) for i, item in enumerate(value)]
    if isinstance(value, float):
        return _integral(value)
    return value


# --- schema -------------------------------------------------------------------


@functools.cache
def _schema() -> dict:
    # From the package, so an installed kdsr finds it; schemas/ holds an
    # identical copy for people and editors (a test keeps them equal).
    text = importlib.resources.files("kdsr").joinpath("data/intent.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _check_address(value: object) -> bool:
    if isinstance(value, str):
        values.parse_address(value)  # ValueError carries the message
    return True


def _check_interface(value: object) -> bool:
    if isinstance(value, str):
        values.parse_interface(value)
    return True


def _jsonschema():
    # Imported when first asked (a "no" from jsonschema-rs, an error to word,
    # or no jsonschema-rs): a valid intent never needs it, and its import is
    # a large part of the start-up of every command that loads an intent.
    import jsonschema

    return jsonschema


def _format_checker() -> jsonschema.FormatChecker:
    # The schema's address formats are kdsr's own, checked with ipaddress here
    # so that a bad address is reported together with every other schema
    # error.  Only these formats: the standard ones would depend on which
    # optional packages happen to be installed.
    checker = _jsonschema().FormatChecker(formats=())
    checker.checks("ip-address", raises=ValueError)(_check_address)
    checker.checks("ip-interface", raises=ValueError)(_check_interface)
    return checker


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return validator_for(_schema())


def validator_for(schema: dict) -> jsonschema.Draft202012Validator:
    """A validator of (part of) the intent schema, with kdsr's formats."""
    return _jsonschema().Draft202012Validator(schema, format_checker=_format_checker())


def is_valid_for(schema: dict) -> Callable[[object], bool]:
    """``validator_for(schema).is_valid``, answered by jsonschema-rs when it
    says yes.

    jsonschema walks a document through generic Python machinery, a large
    cost on a big intent; jsonschema-rs (Rust) gives the yes or no at a small
    fraction of it.  jsonschema stays the reference: a "no" is asked again
    there (where the two read a value differently, say a name ending in a
    newline, which Python's ``$`` accepts, or NaN against a bound, jsonschema's
    answer is kdsr's), and it alone words the problems.  Without jsonschema-rs
    (Debian has no package of it) every document takes jsonschema's slower path.
    """
    if jsonschema_rs is None:
        return validator_for(schema).is_valid
    slow = functools.cache(lambda: validator_for(schema).is_valid)
    fast = jsonschema_rs.Draft202012Validator(
        schema,
        formats={"ip-address": _conforms(_check_address), "ip-interface": _conforms(_check_interface)},
        validate_formats=True,
    ).is_valid

    def is_valid(doc: object) -> bool:
        try:
            if fast(doc):
                return True
        except ValueError:  # a value JSON has no form for (NaN from YAML's .nan): jsonschema decides
            pass
        return slow()(doc)

    return is_valid


def _conforms(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def conforms(value: object) -> bool:
        try:
            return check(value)
        except ValueError:
            return False

    return conforms


@functools.cache
def _is_valid() -> Callable[[object], bool]:
    return is_valid_for(_schema())


def _schema_problems(doc: object, source: str, fmt: str) -> Iterable[Problem]:
    # Most documents are valid: say so fast, and leave the wording of the
    # problems, when there are any, to jsonschema.
    if _is_valid()(doc):
        return
    for error in _validator().iter_errors(doc):
        yield from _explain(error, source, fmt)


# Hints by instance location; "*" matches any key or index.  First match wins.
_PORT_HINT = 'Ports are 1-65535: a port (80), a range "A-B" ("5000-5010"), or a list of them.'
_ADDRESS_HINT = 'Give one address without prefix length, e.g. "10.10.0.100" or "fd00:10::100".'
_HINTS: list[tuple[tuple[str, ...], str]] = [
    (("version",), 'This kdsr reads intent version 1; set "version": 1.'),
    (("services",), "Define at least one service: a VIP, ports and a pool."),
    (("load_balancers",), "Define at least one load balancer: its interface and addresses."),
    (("services", "*", "vip"), 'A VIP is one IPv4 or IPv6 address, e.g. "10.10.0.100" or "fd00:10::100".'),
    (("services", "*", "ports"), _PORT_HINT),
    (("services", "*", "ports", "*"), _PORT_HINT),
    (("services", "*", "protocols"), 'Use "tcp", "udp", "both", or a list such as ["tcp", "udp"].'),
    (("services", "*", "protocols", "*"), 'A list holds "tcp" and "udp"; "both" only replaces the whole list.'),
    (("services", "*", "pool"), "Name a pool defined under /pools."),
    (("services", "*", "dsr", "mode"), 'Modes are "l2", "l3-ipip", "l3-gre" (IPv4) and "l3-ip6tnl" (IPv6).'),
    (("services", "*", "dsr", "engine"), 'Engines are "nft" (default), "ipvs" and "xdp".'),
    (("services", "*", "dsr", "path_mtu"), "path_mtu is 576-65535 bytes; leave it out for 1500."),
    (("services", "*", "dsr", "mss_clamp"), 'Use "auto" (default), "off", or an MSS in bytes such as 1400.'),
    (
        ("services", "*", "hashing", "fields"),
        "source-ip keeps each client on one server; five-tuple spreads its connections.",
    ),
    (("services", "*", "hashing", "seed"), "Seeds are 0-4294967295; leave it out for the default."),
    (("services", "*", "hashing", "table_size"), "table_size is a prime between 7 and 65537; or let kdsr choose."),
    (
        ("services", "*", "hashing", "flow_pinning"),
        "Write true, or an object with timeout (seconds, 1-86400) and max_flows (1024-16777216).",
    ),
    (("services", "*", "hashing", "flow_pinning", "timeout"), "timeout is 1-86400 seconds after a flow's last packet."),
    (("services", "*", "hashing", "flow_pinning", "max_flows"), "max_flows is 1024-16777216 flows per pool."),
    (("pools", "*", "servers"), "List at least one server; to drain a pool, keep its servers with weight 0."),
    (("pools", "*", "servers", "*"), "Give 'node' (a name under /servers), 'address' (an IP), or both."),
    (("pools", "*", "servers", "*", "weight"), "Weights are 0-10000; 0 drains the server."),
    (("pools", "*", "servers", "*", "mac"), "Write a MAC address as six hex pairs: aa:bb:cc:dd:ee:ff."),
    (("pools", "*", "servers", "*", "address"), _ADDRESS_HINT),
    (("pools", "*", "servers", "*", "node"), "Name a server node defined under /servers."),
    (("*", "*", "interface"), "Interface names are 1-15 bytes (IFNAMSIZ) of letters, digits, '_', '.' and '-'."),
    (("*", "*", "addresses"), 'List the node\'s addresses with prefix, e.g. ["10.10.0.2/24", "fd00:10::2/64"].'),
    (("*", "*", "addresses", "*"), 'Write addresses with prefix length, e.g. "10.10.0.2/24" or "fd00:10::2/64".'),
]
_NAME_HINT = (
    "Names start with a lower-case letter followed by up to 22 lower-case letters, digits or '-' "
    "(they become part of nftables chain names)."
)
_JSON_TYPES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
}


def _hint(path: list) -> str:
    for pattern, hint in _HINTS:
        if len(pattern) == len(path) and all(p in ("*", str(k)) for p, k in zip(pattern, path, strict=False)):
            return hint
    return ""


def _explain(error: jsonschema.ValidationError, source: str, fmt: str) -> list[Problem]:
    """One schema error as Problems a person can act on."""
    path = list(error.absolute_path)
    value = error.instance
    keyword = error.validator
    shown = _show(value)

    # propertyNames errors are about a key, not the value at `path`.
    if "propertyNames" in error.absolute_schema_path:
        return [Problem(source, _pointer(path + [value]), f"{shown} is not a valid name.", _NAME_HINT)]

    if keyword == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        return [
            Problem(
                source,
                _pointer(path + [key]),
                f"unknown field {quote(key)}.",
                f"{values.did_you_mean(key, allowed)}Allowed fields: {', '.join(allowed)}.",
            )
            for key in value
            if key not in allowed
        ]

    if keyword == "required":
        # One error per missing field; the message is the only place that
        # names it, so find the ones that are missing instead.
        problems = []
        for name in error.validator_value:
            if name not in value:
                description = error.schema.get("properties", {}).get(name, {}).get("description", "")
                hint = f'Add "{name}": {description}'.strip()
                problems.append(Problem(source, _pointer(path), f'missing required field "{name}".', hint))
        return problems

    hint = _hint(path)
    if keyword == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        message = f"{shown} is {_type_name(value)}, expected {_join_or([_JSON_TYPES[t] for t in expected])}."
        if fmt == YAML and "string" in expected and not isinstance(value, (dict, list)):
            hint = "In YAML, put the value in quotes so it stays text. " + hint
    elif keyword == "minimum":
        message = f"{shown} is less than {error.validator_value}."
    elif keyword == "maximum":
        message = f"{shown} is greater than {error.validator_value}."
    elif keyword == "enum":
        supported = ", ".join(_show(v) for v in error.validator_value)
        message = f"{shown} is not supported. Supported values: {supported}."
    elif keyword == "const":
        message = f"{shown} is not supported; expected {_show(error.validator_value)}."
    elif keyword == "minItems":
        what = "a pool with no servers" if path[:1] == ["pools"] else "the list is empty"
        message = f"{what}."
    elif keyword == "minProperties":
        message = f"no {str(path[-1]).replace('_', ' ')} defined." if path else "the document is empty."
    elif keyword == "uniqueItems":
        message = f"{shown} lists a value twice."
    elif keyword == "maxLength":
        message = f"{shown} is {len(value.encode())} bytes long."
    elif keyword == "minLength":
        message = "the interface name is empty." if path[-1:] == ["interface"] else "the value is empty."
    elif keyword == "pattern":
        message = _pattern_message(path, value)
    elif keyword == "not":
        message = f"{shown} is not a usable name."
    elif keyword == "format":
        message = f"{error.cause}." if error.cause else f"{shown} is not a valid {error.validator_value}."
    elif keyword == "anyOf" and path[:1] == ["pools"]:
        message = "a pool member needs 'node' or 'address'."
    elif error.context:
        # Any other combinator: the most relevant branch says it best.
        return _explain(_jsonschema().exceptions.best_match(error.context), source, fmt)
    else:
        message = f"{error.message}."
    return [Problem(source, _pointer(path), message, hint)]


def _pattern_message(path: list, value: object) -> str:
    # The field is the last key; for a list item (ports/0) the key before it.
    field = next((str(part) for part in reversed(path) if isinstance(part, str)), "")
    shown = _show(value)
    if field == "ports":
        if isinstance(value, str) and value.isdigit():
            return f"{shown} is text; write a single port as a number ({value})."
        return f"{shown} is not a port range."
    if field == "mac":
        return f"{shown} is not a MAC address."
    if field == "interface":
        return f"{shown} has characters that are not allowed in an interface name."
    return f"{shown} is not valid here."


def _type_name(value: object) -> str:
    for json_type, name in _JSON_TYPES.items():
        if json_type != "number" and _validator().is_type(value, json_type):
            return name
    if isinstance(value, float):
        return "a number"
    return f"a {type(value).__name__}"  # e.g. a YAML date


def _join_or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _show(value: object) -> str:
    """A value as the user wrote it (JSON spelling), cut short when long."""
    return quote(value)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")  # RFC 6901


def _pointer(path: Iterable) -> str:
    return "".join(f"/{_escape(str(part))}" for part in path)


# --- reporting order ----------------------------------------------------------


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _in_file_order(problems: list[Problem], doc: object) -> list[Problem]:
    """Sort problems the way the file reads (stable for ties)."""
    order: dict[str, int] = {}

    def walk(value: object, pointer: str) -> None:
        order[pointer] = len(order)
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{pointer}/{_escape(str(key))}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{pointer}/{i}")

    walk(doc, "")

    def position(problem: Problem) -> int:
        pointer = problem.pointer
        while pointer not in order:  # a missing field: sort by its parent
            pointer = pointer.rpartition("/")[0]
        return order[pointer]

    return sorted(problems, key=position)


# --- model --------------------------------------------------------------------


def _build(doc: dict, source: str, kept: Kept | None = None) -> Intent:
    """The model of a valid document; ``kept`` hands back the objects of the
    entries that did not change since the last build (kdsr/intent/reload.py)."""
    servers = doc.get("servers", {})
    services = tuple(
        (kept and kept.service(name)) or _service(name, doc["services"][name]) for name in sorted(doc["services"])
    )
    pools = tuple(
        (kept and kept.pool(name)) or _pool(name, doc["pools"][name], servers) for name in sorted(doc["pools"])
    )
    return Intent(
        source=source,
        services=kept.same_tuple(services) if kept else services,
        pools=kept.same_tuple(pools) if kept else pools,
        load_balancers=tuple(
            LoadBalancerNode(
                **_node(name, doc["load_balancers"][name], "load_balancers"),
                bgp=_bgp(doc["load_balancers"][name].get("bgp"), f"/load_balancers/{name}/bgp"),
                vrrp=_vrrp(doc["load_balancers"][name].get("vrrp"), f"/load_balancers/{name}/vrrp"),
            )
            for name in sorted(doc["load_balancers"])
        ),
        servers=tuple(ServerNode(**_node(name, servers[name], "servers")) for name in sorted(servers)),
    )


class Kept(Protocol):
    """The model objects a rebuild keeps (kdsr/intent/reload.py)."""

    def service(self, name: str) -> Service | None: ...

    def pool(self, name: str) -> Pool | None: ...

    def same_tuple(self, built: tuple) -> tuple: ...


def _service(name: str, service: dict) -> Service:
    pointer = f"/services/{name}"
    ports = []
    for port_pointer, item in values.port_entries(service["ports"], f"{pointer}/ports"):
        first, last = values.parse_port(item)
        ports.append(PortRange(first, last, port_pointer))
    dsr = service.get("dsr", {})
    hashing = service.get("hashing", {})
    return Service(
        name=name,
        vip=values.parse_address(service["vip"]),
        ports=tuple(sorted(ports, key=lambda r: (r.first, r.last))),
        protocols=values.service_protocols(service),
        pool=service["pool"],
        mode=dsr.get("mode", DSR_L2),
        engine=dsr.get("engine", ENGINE_NFT),
        path_mtu=int(dsr.get("path_mtu", DEFAULT_PATH_MTU)),
        mss_clamp=values.mss_clamp(service),
        hashing=Hashing(
            fields=hashing.get("fields", DEFAULT_HASH_FIELDS),
            seed=int(hashing.get("seed", DEFAULT_HASH_SEED)),
            table_size=int(hashing["table_size"]) if "table_size" in hashing else None,
            pointer=f"{pointer}/hashing",
            pinning=_flow_pinning(hashing.get("flow_pinning", False)),
        ),
        pointer=pointer,
        health=_monitors(service.get("health"), f"{pointer}/health"),
        announce=_announce(service.get("announce", {}), f"{pointer}/announce"),
    )


def _announce(doc: dict, pointer: str) -> Announce:
    lbs = doc.get("load_balancers")
    return Announce(
        mode=doc.get("mode", ANNOUNCE_ACTIVE_ACTIVE),
        load_balancers=tuple(lbs) if lbs is not None else None,
        active=doc.get("active"),
        standby=doc.get("standby"),
        prepend=int(doc.get("prepend", DEFAULT_PREPEND)),
        med=doc.get("med"),
        standby_med=doc.get("standby_med"),
        communities=tuple(tuple(int(part) for part in c.split(":")) for c in doc.get("communities", ())),
        pointer=pointer,
        virtual_router_id=doc.get("virtual_router_id"),
        advert_interval=float(doc.get("advert_interval", DEFAULT_ADVERT_INTERVAL)),
        preempt=bool(doc.get("preempt", True)),
        unicast=bool(doc.get("unicast", False)),
    )


def _vrrp(doc: dict | None, pointer: str) -> Vrrp | None:
    if doc is None:
        return None
    files = doc.get("keepalived", {})
    return Vrrp(
        keepalived=KeepalivedFiles(
            config=files.get("config", DEFAULT_KEEPALIVED_CONFIG),
            fragment=files.get("fragment", DEFAULT_KEEPALIVED_FRAGMENT),
            pid_file=files.get("pid_file", DEFAULT_KEEPALIVED_PID_FILE),
            track_dir=files.get("track_dir", DEFAULT_VRRP_TRACK_DIR),
        ),
        pointer=pointer,
    )


def _bgp(doc: dict | None, pointer: str) -> Bgp | None:
    if doc is None:
        return None
    bird = doc.get("bird", {})
    return Bgp(
        asn=int(doc["asn"]),
        router_id=ipaddress.IPv4Address(doc["router_id"]),
        neighbors=tuple(
            BgpNeighbor(
                address=values.parse_address(n["address"]),
                asn=int(n["asn"]),
                password=n.get("password"),
                bfd=bool(n.get("bfd", False)),
                multihop=n.get("multihop"),
                pointer=f"{pointer}/neighbors/{i}",
            )
            for i, n in enumerate(doc["neighbors"])
        ),
        hold_time=int(doc.get("hold_time", DEFAULT_HOLD_TIME)),
        bird=BirdFiles(
            config=bird.get("config", DEFAULT_BIRD_CONFIG),
            fragment=bird.get("fragment", DEFAULT_BIRD_FRAGMENT),
            socket=bird.get("socket", DEFAULT_BIRD_SOCKET),
        ),
        pointer=pointer,
    )


def _monitors(value: dict | list | None, pointer: str) -> tuple[Monitor, ...]:
    """The monitors written at ``pointer`` (one object or a list), defaults filled in."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return (_monitor(value, pointer),)
    return tuple(_monitor(item, f"{pointer}/{i}") for i, item in enumerate(value))


def _monitor(doc: dict, pointer: str) -> Monitor:
    status = doc.get("status", ["2xx", "3xx"])
    status = status if isinstance(status, list) else [status]
    return Monitor(
        type=doc["type"],
        mode=doc.get("mode", MONITOR_DSR),
        port=doc.get("port"),
        interval=float(doc.get("interval", DEFAULT_INTERVAL)),
        timeout=float(doc.get("timeout", DEFAULT_TIMEOUT)),
        rise=int(doc.get("rise", DEFAULT_RISE)),
        fall=int(doc.get("fall", DEFAULT_FALL)),
        jitter=float(doc.get("jitter", DEFAULT_JITTER)),
        send=doc.get("send", DEFAULT_UDP_SEND),
        expect=doc.get("expect"),
        path=doc.get("path", "/"),
        host=doc.get("host"),
        status=tuple(str(code) for code in status),
        body=doc.get("body"),
        verify_tls=bool(doc.get("verify_tls", False)),
        pointer=pointer,
    )


def _flow_pinning(value: bool | dict) -> FlowPinning | None:
    """``true`` or an object (defaults filled in) turns pinning on; ``false`` or absent: off."""
    if value is False:
        return None
    value = {} if value is True else value
    return FlowPinning(
        timeout=int(value.get("timeout", DEFAULT_PIN_TIMEOUT)),
        max_flows=int(value.get("max_flows", DEFAULT_PIN_MAX_FLOWS)),
    )


def _pool(name: str, pool: dict, servers: dict) -> Pool:
    members = []
    for i, member in enumerate(pool["servers"]):
        text, _ = values.member_address(member, servers)  # verify proved it resolves
        mac = member.get("mac")
        members.append(
            PoolMember(
                address=values.parse_address(text),
                weight=int(member.get("weight", 1)),
                node=member.get("node"),
                mac=mac.lower() if mac else None,
                pointer=f"/pools/{name}/servers/{i}",
            )
        )
    pointer = f"/pools/{name}"
    return Pool(
        name=name,
        members=tuple(members),
        pointer=pointer,
        health=_monitors(pool.get("health"), f"{pointer}/health"),
        all_down=pool.get("all_down", ALL_DOWN_KEEP),
    )


def _node(name: str, node: dict, kind: str) -> dict:
    return {
        "name": name,
        "interface": node["interface"],
        "addresses": tuple(values.parse_interface(a) for a in node["addresses"]),
        "pointer": f"/{kind}/{name}",
    }
