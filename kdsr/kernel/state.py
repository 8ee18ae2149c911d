"""kdsr's own records on disk: what it owns and what it found before it came.

The kernel cannot label everything: IPv6 addresses have no label, and a
sysctl does not remember its previous value.  So per node kdsr keeps
``<state dir>/<node>.json`` with the addresses it added and the sysctl values
it replaced, written atomically (temp file + rename, 0600 in a 0700 directory, no
symlinks followed: kdsr/kernel/statefiles.py) after each kernel step
succeeds, so a crash leaves a record that is at worst one step behind, never
torn.  Default state dir: /var/lib/kdsr (``--state-dir`` / KDSR_STATE_DIR).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdsr.errors import LockedError
from kdsr.kernel.statefiles import open_lock, read_text, write_atomic

DEFAULT_STATE_DIR = "/var/lib/kdsr"
FORMAT_VERSION = 1


@dataclass
class NodeState:
    node: str
    owned_addresses: set[str] = field(default_factory=set)  # Address.ident
    sysctl_previous: dict[str, str] = field(default_factory=dict)
    sysctl_written: dict[str, str] = field(default_factory=dict)
    tables: set[str] = field(default_factory=set)  # "netdev kdsr"
    last_intent: str = ""
    links: set[str] = field(default_factory=set)  # link names kdsr created
    ipvs: set[str] = field(default_factory=set)  # IpvsService.ident kdsr created
    drained: set[str] = field(default_factory=set)  # member addresses or node names (`kdsr drain`)
    bird_files: list[str] = field(default_factory=list)  # [config, fragment, socket] once kdsr wrote a fragment
    xdp: set[str] = field(default_factory=set)  # interfaces kdsr attached its XDP program to (or adopted)
    # [config, fragment, pid_file] once kdsr wrote a keepalived fragment.
    keepalived_files: list[str] = field(default_factory=list)
    gates: set[str] = field(default_factory=set)  # track files kdsr wrote (VrrpGate.path)

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "node": self.node,
            "owned_addresses": sorted(self.owned_addresses),
            "sysctl_previous": dict(sorted(self.sysctl_previous.items())),
            "sysctl_written": dict(sorted(self.sysctl_written.items())),
            "tables": sorted(self.tables),
            "last_intent": self.last_intent,
            "links": sorted(self.links),
            "ipvs": sorted(self.ipvs),
            "drained": sorted(self.drained),
            "bird_files": list(self.bird_files),
            **({"xdp": sorted(self.xdp)} if self.xdp else {}),
            "keepalived_files": list(self.keepalived_files),
            "gates": sorted(self.gates),
        }

    @classmethod
    def from_json(cls, data: dict) -> NodeState:
        return cls(
            node=data["node"],
            owned_addresses=set(data.get("owned_addresses", [])),
            sysctl_previous=dict(data.get("sysctl_previous", {})),
            sysctl_written=dict(data.get("sysctl_written", {})),
            tables=set(data.get("tables", [])),
            last_intent=data.get("last_intent", ""),
            links=set(data.get("links", [])),
            ipvs=set(data.get("ipvs", [])),
            drained=set(data.get("drained", [])),
            bird_files=list(data.get("bird_files", [])),
            xdp=set(data.get("xdp", [])),
            keepalived_files=list(data.get("keepalived_files", [])),
            gates=set(data.get("gates", [])),
        )

    @property
    def empty(self) -> bool:
        return not (
            self.owned_addresses
            or self.sysctl_previous
            or self.tables
            or self.links
            or self.ipvs
            or self.drained
            or self.bird_files
            or self.xdp
            or self.keepalived_files
            or self.gates
        )


class StateStore:
    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory or os.environ.get("KDSR_STATE_DIR") or DEFAULT_STATE_DIR)

    def path(self, node: str) -> Path:
        return self.directory / f"{node}.json"

    def load(self, node: str) -> NodeState:
        try:
            return NodeState.from_json(json.loads(read_text(self.path(node))))
        except FileNotFoundError:
            return NodeState(node=node)

    def save(self, state: NodeState) -> None:
        path = self.path(state.node)
        if state.empty:
            path.unlink(missing_ok=True)
            return
        write_atomic(path, json.dumps(state.to_json(), indent=2) + "\n")

    def nodes(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def health_path(self, node: str) -> Path:
        """Where ``kdsr run`` publishes its health view (read by show, plan and apply)."""
        return self.directory / "health" / f"{node}.json"

    def lock(self, wait_seconds: float = 0.0) -> Lock:
        return Lock(self.directory / "lock", wait_seconds)


class Lock:
    """An flock on <state dir>/lock: one kdsr run at a time changes the kernel.

    The holder writes its PID into the file so a refused run can name it.
    """

    def __init__(self, path: Path, wait_seconds: float) -> None:
        self.path = path
        self.wait_seconds = wait_seconds
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        fd = open_lock(self.path)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise LockedError(
                        f"another kdsr run holds {self.path} (pid {holder}); retry later or pass --wait SECONDS"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
