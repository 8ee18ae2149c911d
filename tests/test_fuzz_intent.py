"""Property: any document either compiles for every node or is refused with
IntentError (problems with file and pointer); never a traceback.

Two generators, bounded (examples and size) so that CI stays quick:
- arbitrary JSON values of any shape;
- the shipped examples with one to four places replaced by arbitrary
  values, which reaches the cross-object rules and the compiler.
Hypothesis keeps no database here (CI's clean clone would lose it anyway).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdsr.compile import compile_node
from kdsr.errors import IntentError, KdsrError
from kdsr.intent import parse_intent

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json"))
DOCS = [json.loads(p.read_text()) for p in EXAMPLES]
FUZZ = settings(
    max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["10.9.0.100", "fd00::1", "s1", "eth0", "l3-gre", "ipvs", "tcp", "both", "80-90", "0", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def check(doc: object) -> None:
    try:
        text = json.dumps(doc, allow_nan=True)
    except (TypeError, ValueError):
        return
    try:
        intent = parse_intent(text, "fuzz.json", "json")
    except IntentError as exc:
        assert exc.problems and all(p.source == "fuzz.json" for p in exc.problems)
        assert all(p.pointer == "" or p.pointer.startswith("/") for p in exc.problems)
        return
    for node in [*(lb.name for lb in intent.load_balancers), *(s.name for s in intent.servers)]:
        try:
            compile_node(intent, node)
        except KdsrError:  # a clear, typed refusal is allowed; a crash is not
            pass


@FUZZ
@given(values)
def test_arbitrary_documents_never_crash(doc):
    check(doc)


def paths_of(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from paths_of(value, (*prefix, index))


def strings_of(doc) -> set[str]:
    if isinstance(doc, dict):
        return set(doc).union(*(strings_of(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(strings_of(v) for v in doc))
    return {doc} if isinstance(doc, str) else set()


# Strings the examples use anywhere (names, addresses, modes): swapped in
# where another string was, they make documents that are nearly valid.
PLAUSIBLE = sorted(set().union(*(strings_of(d) for d in DOCS)))


def plausible(draw, old):
    """A value of the same type as ``old``, often one the intent accepts."""
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return draw(st.one_of(st.integers(min_value=-1, max_value=70000), st.sampled_from([0, 1, 2, 251, 4093])))
    if isinstance(old, str):
        return draw(st.sampled_from(PLAUSIBLE))
    if isinstance(old, list) and old:
        index = draw(st.integers(min_value=0, max_value=len(old) - 1))
        return old[:index] + old[index + 1 :] if draw(st.booleans()) else [*old, old[index]]
    return draw(values)


@st.composite
def mutated_examples(draw):
    doc = copy.deepcopy(draw(st.sampled_from(DOCS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p in paths_of(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        how = draw(st.sampled_from(["delete", "any", "plausible", "plausible"]))
        if how == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "any":
            parent[path[-1]] = draw(values)
        else:
            parent[path[-1]] = plausible(draw, parent[path[-1]])
    return doc


@FUZZ
@given(mutated_examples())
def test_mutated_examples_compile_or_are_refused(doc):
    check(doc)
