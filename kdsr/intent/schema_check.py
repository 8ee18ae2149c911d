"""A fast, exact yes/no for "does this document satisfy the schema?".

jsonschema walks a document through its generic machinery (a resolver per
``$ref``, a new validator per subschema, type lookups through persistent
maps): about 1.1 s for an intent of 10,000 VIPs, most of a no-op re-apply.
This module turns the schema into nested closures once, then answers in a
fraction of that.  It never words an error: when it says no, jsonschema
runs and reports every problem in the usual words (kdsr/intent/load.py).

It must agree with jsonschema on every document, so it implements only the
keywords kdsr's schema uses, each the way jsonschema reads it; a schema
with any other keyword, or with what would make jsonschema resolve or read
it differently (a ``$schema``, ``$id`` or anchor below the root, a
reference with percent-escapes, a NaN to compare with, a pattern ``re``
rejects), gets no fast check at all (``compile_check`` returns None).
Where jsonschema's rules for a value are subtle (``enum``, ``const`` or
``uniqueItems`` over lists, objects or mixed numbers and booleans; a
subclass of a JSON type, which jsonschema may read through methods it
overrides; a Python type JSON has no name for) the check raises ``Unsure``
and the caller asks jsonschema.  A differential test holds the
two to the same answer on mutated documents (tests/test_schema_check.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Check = Callable[[object], bool]
Conforms = Callable[[object, str], bool]


class Unsure(Exception):
    """The document holds a value whose verdict this module leaves to jsonschema."""


class Unsupported(ValueError):
    """The schema uses a keyword (or a reference) this module does not implement."""


# Keywords that never change the verdict of a schema compile_check accepts
# (then/else are read with "if"; $schema and $id only at the root).
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples", "then", "else"}
)
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
# Anywhere below the root these change how jsonschema resolves a reference
# (it looks for "$id": "#name" even inside a default).
_LOCATORS = frozenset({"$schema", "$id", "id", "$anchor", "$dynamicAnchor"})
_TYPES = frozenset({"object", "array", "string", "boolean", "integer", "number", "null"})
_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "$ref",
        "if",
        "oneOf",
        "anyOf",
        "not",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "minLength",
        "maxLength",
        "pattern",
        "properties",
        "additionalProperties",
        "required",
        "minProperties",
        "propertyNames",
        "items",
        "minItems",
        "maxItems",
        "uniqueItems",
    }
)

# The JSON type of a value, by its exact Python type.  "integer" is an int
# (not a bool); "number" here is a float.
_KINDS: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _kind_of(value: object) -> str:
    kind = _KINDS.get(type(value))
    if kind is None:
        # A subclass (jsonschema reads a dict by key, a list by index: an
        # override could answer differently) or no JSON type at all.
        raise Unsure(f"a {type(value).__name__} is not one of JSON's plain types")
    return kind


def _has_type(value: object, kind: str, wanted: frozenset[str]) -> bool:
    if kind in wanted:
        return True
    if kind == "integer":
        return "number" in wanted
    # jsonschema counts a whole float (1.0) as an integer.
    return kind == "number" and "integer" in wanted and value.is_integer()  # type: ignore[attr-defined]


def compile_check(root: dict | bool, conforms: Conforms) -> Check | None:
    """The root schema as a check that raises ``Unsure`` or returns the verdict
    jsonschema would give; None when the schema uses something not
    implemented here.  ``conforms(value, format)`` is the format checker's."""
    if isinstance(root, bool):
        return _always if root else _never
    if not isinstance(root, dict) or root.get("$schema", DRAFT_2020_12) != DRAFT_2020_12:
        return None
    try:
        _no_locators_below(root, at_root=True)
        return _Compiler(root, conforms).compile(root)
    except Unsupported:
        return None


def _no_locators_below(value: object, at_root: bool = False) -> None:
    """Unsupported when a dict anywhere below the root (annotations included)
    carries a key that moves jsonschema's reference resolution or draft."""
    if isinstance(value, dict):
        # A string: a property named "$id" (its value a schema) locates nothing.
        found = [key for key in _LOCATORS & value.keys() if isinstance(value[key], str)]
        if found and not at_root:
            raise Unsupported(f"{sorted(found)} below the root")
        for item in value.values():
            _no_locators_below(item)
    elif isinstance(value, list):
        for item in value:
            _no_locators_below(item)


class _Compiler:
    def __init__(self, root: dict, conforms: Conforms) -> None:
        self._root = root
        self._conforms = conforms
        # A reference's check by its pointer; the slot is filled once the
        # target is compiled, so a schema may refer to itself.
        self._refs: dict[str, list[Check]] = {}

    def compile(self, schema: object) -> Check:
        if schema is True:
            return _always
        if schema is False:
            return _never
        if not isinstance(schema, dict):
            raise Unsupported(f"a schema must be an object or a boolean, not {schema!r}")
        unknown = set(schema) - _KEYWORDS - _ANNOTATIONS
        if unknown:
            raise Unsupported(f"keywords {sorted(unknown)}")
        wanted = schema.get("type")
        types = frozenset([wanted] if isinstance(wanted, str) else wanted) if wanted is not None else None
        if types is not None and not types <= _TYPES:
            raise Unsupported(f"unknown types {sorted(types - _TYPES)}")  # jsonschema raises UnknownType
        by_kind = {
            "object": self._object_checks(schema),
            "array": self._array_checks(schema),
            "string": self._string_checks(schema),
            "number": _number_checks(schema),
        }
        by_kind["integer"] = by_kind["number"]  # the numeric keywords read ints and floats alike
        any_kind = self._any_kind_checks(schema)
        return _node(types, {kind: tuple(checks) for kind, checks in by_kind.items() if checks}, tuple(any_kind))

    # --- keywords by the kind of value they apply to -------------------------

    def _any_kind_checks(self, schema: dict) -> list[Check]:
        checks: list[Check] = []
        # jsonschema reads enum with ``in`` and const with ``==``: the same on
        # the values _one_of_values accepts (no NaN, which only ``in`` finds).
        if "enum" in schema:
            checks.append(_one_of_values(schema["enum"]))
        if "const" in schema:
            checks.append(_one_of_values([schema["const"]]))
        if "$ref" in schema:
            checks.append(self._ref(schema["$ref"]))
        if "format" in schema:
            checks.append(_format(schema["format"], self._conforms))
        if "if" in schema:
            then, otherwise = self.compile(schema.get("then", True)), self.compile(schema.get("else", True))
            checks.append(_if(self.compile(schema["if"]), then, otherwise))
        if "anyOf" in schema:
            checks.append(_any_of(tuple(self.compile(s) for s in schema["anyOf"])))
        if "oneOf" in schema:
            checks.append(_one_of(tuple(self.compile(s) for s in schema["oneOf"])))
        if "not" in schema:
            checks.append(_not(self.compile(schema["not"])))
        return checks

    def _object_checks(self, schema: dict) -> list[Check]:
        checks: list[Check] = []
        if "required" in schema:
            checks.append(_required(tuple(schema["required"])))
        if "minProperties" in schema:
            checks.append(_min_properties(schema["minProperties"]))
        if "propertyNames" in schema:
            checks.append(_property_names(self.compile(schema["propertyNames"])))
        if "properties" in schema or "additionalProperties" in schema:
            properties = {name: self.compile(sub) for name, sub in schema.get("properties", {}).items()}
            additional = schema.get("additionalProperties", True)
            checks.append(_properties(properties, None if additional is True else self.compile(additional)))
        return checks

    def _array_checks(self, schema: dict) -> list[Check]:
        checks: list[Check] = []
        if "minItems" in schema:
            checks.append(_min_items(schema["minItems"]))
        if "maxItems" in schema:
            checks.append(_max_items(schema["maxItems"]))
        unique = schema.get("uniqueItems", False)
        if not isinstance(unique, bool):
            raise Unsupported(f"uniqueItems {unique!r}")
        if unique:
            checks.append(_unique_items)
        if "items" in schema:
            checks.append(_items(self.compile(schema["items"])))
        return checks

    def _string_checks(self, schema: dict) -> list[Check]:
        checks: list[Check] = []
        if "minLength" in schema:
            checks.append(_min_length(schema["minLength"]))
        if "maxLength" in schema:
            checks.append(_max_length(schema["maxLength"]))
        if "pattern" in schema:
            try:
                compiled = re.compile(schema["pattern"])
            except (re.error, TypeError) as exc:
                raise Unsupported(f"pattern {schema['pattern']!r}: {exc}") from None
            checks.append(_pattern(compiled))
        return checks

    def _ref(self, pointer: str) -> Check:
        if pointer not in self._refs:
            slot: list[Check] = []
            self._refs[pointer] = slot
            slot.append(self.compile(self._resolve(pointer)))
        slot = self._refs[pointer]

        def ref(value: object) -> bool:
            return slot[0](value)

        return ref

    def _resolve(self, pointer: str) -> object:
        if pointer != "#" and not pointer.startswith("#/") or "%" in pointer:
            raise Unsupported(f"reference {pointer!r} leaves the document or has escapes")
        target: object = self._root
        for token in pointer[2:].split("/") if pointer != "#" else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or token not in target:
                raise Unsupported(f"reference {pointer!r} does not resolve")
            target = target[token]
        return target


def _node(types: frozenset[str] | None, by_kind: dict[str, tuple[Check, ...]], any_kind: tuple[Check, ...]) -> Check:
    def check(value: object) -> bool:
        kind = _KINDS.get(type(value)) or _kind_of(value)
        if types is not None and not _has_type(value, kind, types):
            return False
        for each in by_kind.get(kind, ()):
            if not each(value):
                return False
        for each in any_kind:
            if not each(value):
                return False
        return True

    return check


def _always(value: object) -> bool:
    return True


def _never(value: object) -> bool:
    return False


# --- keywords for any value ---------------------------------------------------


def _one_of_values(allowed: list) -> Check:
    # Strings compare as strings; booleans, null and numbers each only with
    # their own kind (jsonschema tells True from 1, but not 1 from 1.0).
    # Lists and objects follow rules not restated here.
    by_kind: dict[str, list] = {}
    for each in allowed:
        kind = _KINDS.get(type(each))
        if kind in ("object", "array") or kind is None:
            raise Unsupported("enum or const with a list, an object or a non-JSON value")
        if each != each:  # NaN: ``in`` finds the very object, ``==`` never
            raise Unsupported("enum or const with NaN")
        by_kind.setdefault("number" if kind == "integer" else kind, []).append(each)

    def one_of_values(value: object) -> bool:
        kind = _KINDS.get(type(value)) or _kind_of(value)
        if kind in ("object", "array"):
            raise Unsure("enum or const against a list or an object")
        if kind == "integer":
            kind = "number"
        return value in by_kind.get(kind, ())

    return one_of_values


def _format(name: str, conforms: Conforms) -> Check:
    def format_(value: object) -> bool:
        return conforms(value, name)

    return format_


def _if(condition: Check, then: Check, otherwise: Check) -> Check:
    def if_(value: object) -> bool:
        return then(value) if condition(value) else otherwise(value)

    return if_


def _any_of(options: tuple[Check, ...]) -> Check:
    def any_of(value: object) -> bool:
        return any(option(value) for option in options)

    return any_of


def _one_of(options: tuple[Check, ...]) -> Check:
    def one_of(value: object) -> bool:
        return sum(1 for option in options if option(value)) == 1

    return one_of


def _not(negated: Check) -> Check:
    def not_(value: object) -> bool:
        return not negated(value)

    return not_


# --- numbers ------------------------------------------------------------------


def _number_checks(schema: dict) -> list[Check]:
    # Written as jsonschema compares, so NaN passes both bounds as it does there.
    checks: list[Check] = []
    if "minimum" in schema:
        low = schema["minimum"]
        checks.append(lambda value: not value < low)  # type: ignore[operator]
    if "maximum" in schema:
        high = schema["maximum"]
        checks.append(lambda value: not value > high)  # type: ignore[operator]
    if "exclusiveMinimum" in schema:
        above = schema["exclusiveMinimum"]
        checks.append(lambda value: not value <= above)  # type: ignore[operator]
    return checks


# --- strings ------------------------------------------------------------------


def _min_length(least: int) -> Check:
    return lambda value: len(value) >= least  # type: ignore[arg-type]


def _max_length(most: int) -> Check:
    return lambda value: len(value) <= most  # type: ignore[arg-type]


def _pattern(compiled: re.Pattern[str]) -> Check:
    search = compiled.search  # as jsonschema: anywhere in the string unless anchored
    return lambda value: search(value) is not None  # type: ignore[arg-type]


# --- objects ------------------------------------------------------------------


def _required(names: tuple[str, ...]) -> Check:
    return lambda value: all(name in value for name in names)  # type: ignore[operator]


def _min_properties(least: int) -> Check:
    return lambda value: len(value) >= least  # type: ignore[arg-type]


def _property_names(name_check: Check) -> Check:
    return lambda value: all(name_check(name) for name in value)  # type: ignore[attr-defined]


def _properties(properties: dict[str, Check], additional: Check | None) -> Check:
    get = properties.get

    def properties_(value: object) -> bool:
        for name, item in value.items():  # type: ignore[attr-defined]
            check = get(name, additional)
            if check is not None and not check(item):
                return False
        return True

    return properties_


# --- arrays -------------------------------------------------------------------


def _min_items(least: int) -> Check:
    return lambda value: len(value) >= least  # type: ignore[arg-type]


def _max_items(most: int) -> Check:
    return lambda value: len(value) <= most  # type: ignore[arg-type]


def _unique_items(value: object) -> bool:
    # Only strings are compared here; any other item (where True, 1 and 1.0
    # follow jsonschema's own rules) is left to it.
    if not all(type(item) is str for item in value):  # type: ignore[attr-defined]
        raise Unsure("uniqueItems over values that are not all strings")
    return len(set(value)) == len(value)  # type: ignore[arg-type]


def _items(item_check: Check) -> Check:
    return lambda value: all(item_check(item) for item in value)  # type: ignore[attr-defined]
