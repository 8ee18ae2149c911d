"""keepalived in memory (kdsr/kernel/keepalived.py's fake): fragment files by
path, a keepalived that may be missing or stopped, a text it refuses, and
the track files (gates)."""

from __future__ import annotations

from kdsr.kernel.fake.log import FakeLog
from kdsr.kernel.keepalived import KeepalivedError


class FakeKeepalived:
    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.writes = 0
        self.files: dict[str, str] | None = {}  # fragment files by path; None: not installed
        self.stopped = False
        self.rejects: str | None = None  # a text that makes check fail
        self.loaded: str | None = None  # the fragment keepalived runs now ("" none)
        self.gates: dict[str, str] = {}  # track file path -> value
        self.missing_dirs: set[str] = set()  # track directories that do not exist

    def _write(self, what: str) -> None:
        self.log.write(what)
        self.writes += 1

    def read(self, fragment: str) -> str | None:
        return None if self.files is None else self.files.get(fragment)

    def ready(self, config: str, fragment: str, pid_file: str, track_dirs: tuple[str, ...] = ()) -> None:
        if self.files is None:
            raise KeepalivedError("keepalived is not installed here (fake)", missing=True)
        if not self.running(pid_file):
            raise KeepalivedError(f"keepalived is not running (pid file {pid_file}) (fake)")
        for track_dir in sorted(set(track_dirs) & self.missing_dirs):
            raise KeepalivedError(f"the VRRP track directory {track_dir} does not exist (fake)")

    def running(self, pid_file: str) -> bool:
        return self.files is not None and not self.stopped

    def check(self, config: str, fragment: str, text: str) -> None:
        if self.files is None:
            raise KeepalivedError("keepalived is not installed here (fake)", missing=True)
        if self.rejects is not None and self.rejects in text:
            line = text[: text.index(self.rejects)].count("\n") + 1
            raise KeepalivedError(f"keepalived rejected the config: Unknown keyword (fake, line {line})", line=line)

    def install(self, config: str, fragment: str, pid_file: str, text: str | None, reload: bool = True) -> None:
        if reload:
            self.ready(config, fragment, pid_file)
        if self.files is None:
            raise KeepalivedError("keepalived is not installed (fake)", missing=True)
        if text is not None:
            self.check(config, fragment, text)
        self._write(f"keepalived {'install' if text is not None else 'remove'} {fragment}")
        if text is None:
            self.files.pop(fragment, None)
        else:
            self.files[fragment] = text
        if reload:
            self.loaded = text or ""

    def gate_read(self, path: str) -> str | None:
        return self.gates.get(path)

    def gate_write(self, path: str, value: str) -> None:
        self._write(f"gate {path} {value}")
        self.gates[path] = value

    def gate_remove(self, path: str) -> None:
        self._write(f"gate remove {path}")
        self.gates.pop(path, None)
