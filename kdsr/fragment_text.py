"""The text of a config fragment kdsr writes for another daemon (BIRD,
keepalived): a first line that carries kdsr's model as JSON (so the file
read back is enough to diff against), a note that kdsr owns the file, and
blocks remembered with the intent path each came from, so that a daemon's
error at a line points back into the intent."""

from __future__ import annotations

import json

OWNED = "# kdsr owns this file and rewrites it on every apply; edits here are undone."


class FragmentText:
    def __init__(self, model_line: str, node: str, source: str) -> None:
        self.out: list[str] = [
            model_line,
            "# kdsr owns this file and rewrites it on every apply; edits here are undone.",
        ]
        if node:
            self.out.append(f"# Node {node}; intent {json.dumps(source)}.")
        self.where: list[tuple[int, int, str]] = []  # (first line, last line, intent path)

    def block(self, pointer: str, *lines: str) -> None:
        first = len(self.out) + 1
        self.out.extend(lines)
        if pointer:
            self.where.append((first, len(self.out), pointer))

    def done(self) -> tuple[str, list[tuple[int, int, str]]]:
        return "\n".join(self.out) + "\n", self.where


def pointer_at(lines: tuple[tuple[int, int, str], ...], line: int) -> str:
    """The intent path behind ``line`` of a fragment, from its blocks' ``lines``."""
    return next((p for first, last, p in lines if first <= line <= last), "")
