"""An intent a test changes: a deep copy of a module's BASE document, edited
by a ``mutate`` function, parsed as if read from the file ``source``; and
the problems such an intent is refused for, by JSON pointer."""

import copy
import json

import pytest

from kdsr.errors import IntentError
from kdsr.intent import parse_intent


class IntentDocs:
    def __init__(self, base: dict, source: str) -> None:
        self.base = base
        self.source = source

    def doc_with(self, mutate=None) -> dict:
        doc = copy.deepcopy(self.base)
        if mutate:
            mutate(doc)
        return doc

    def intent(self, mutate=None):
        return parse_intent(json.dumps(self.doc_with(mutate)), self.source)

    def problems(self, mutate) -> dict[str, str]:
        with pytest.raises(IntentError) as info:
            self.intent(mutate)
        return {p.pointer: f"{p.message} {p.hint}" for p in info.value.problems}
