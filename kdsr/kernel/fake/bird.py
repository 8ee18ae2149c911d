"""BIRD in memory (kdsr/kernel/bird.py's fake): fragment files by path, a
BIRD that may be missing or stopped, and a text it refuses."""

from __future__ import annotations

from kdsr.kernel.bird import BirdError
from kdsr.kernel.fake.log import FakeLog


class FakeBird:
    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.writes = 0
        self.files: dict[str, str] | None = {}  # fragment files by path; None: BIRD not installed
        self.stopped = False  # installed, its files there, but not running
        self.rejects: str | None = None  # a text that makes check fail at its first line
        self.loaded: str | None = None  # the fragment text BIRD runs now

    def _write(self, what: str) -> None:
        self.log.write(what)
        self.writes += 1

    def read(self, fragment: str) -> str | None:
        return None if self.files is None else self.files.get(fragment)

    def ready(self, config: str, fragment: str, socket: str) -> None:
        if not self.running(socket):
            raise BirdError(f"BIRD is not running with control socket {socket} (fake)")

    def running(self, socket: str) -> bool:
        return self.files is not None and not self.stopped

    def check(self, config: str, fragment: str, text: str) -> None:
        if self.rejects is not None and self.rejects in text:
            line = text[: text.index(self.rejects)].count("\n") + 1
            raise BirdError(f"BIRD rejected the config: syntax error (fake, line {line})", line=line)

    def install(self, config: str, fragment: str, socket: str, text: str, reload: bool = True) -> None:
        if reload:
            self.ready(config, fragment, socket)
        if self.files is None:
            raise BirdError("BIRD is not installed (fake)")
        self.check(config, fragment, text)
        self._write(f"bird {'install' if reload else 'write'} {fragment}")
        self.files[fragment] = text
        if reload:
            self.loaded = text
