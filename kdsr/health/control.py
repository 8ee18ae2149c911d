"""The running daemon as the one runtime authority on a node.

`kdsr run` holds ``<state dir>/daemon/<node>.lock`` (an flock, with its pid
and control socket in the file) for as long as it runs, so a second `kdsr
run` for the same node stops at once with the lock code and the first one's
pid.  It listens on a Unix socket (mode 0600, in a 0700 directory: root's
only) for the runtime commands: `kdsr drain`, `undrain`, `show` and
`reload`.  While it runs they go through it, so its health view, its
metrics and the kernel change together, in its own loop; without a daemon
the CLI does the work itself, as before.

The protocol is one JSON object per line each way: ``{"command": "drain",
...}`` then ``{"ok": true, ...}`` or ``{"ok": false, "error": "...",
"exit_code": N}``.  The server thread hands each request to the daemon's
main thread (which owns all its state) and waits for the answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from kdsr.errors import KdsrError, LockedError
from kdsr.kernel.state import StateStore

# A request waits this long for the daemon's answer (an apply at 10,000 VIPs
# takes seconds; a reload longer).
ANSWER_TIMEOUT = 300.0
MAX_LINE = 1 << 20
# An answer can be large: a drain's plan at thousands of changes, `show` at
# 10,000 VIPs (tens of MB).  Only the daemon's side bounds what it reads.
MAX_ANSWER = 1 << 30
# sockaddr_un holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107


class DaemonError(KdsrError):
    """The daemon refused or failed a request; carries its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _directory(store: StateStore) -> Path:
    return Path(store.directory) / "daemon"


def lock_path(store: StateStore, node: str) -> Path:
    return _directory(store) / f"{node}.lock"


def socket_path(store: StateStore, node: str) -> Path:
    """Under the state dir; under /run/kdsr when that path is too long for a Unix socket."""
    path = _directory(store) / f"{node}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return Path("/run/kdsr") / f"{digest}.sock"


class DaemonLock:
    """One `kdsr run` per node: held from before the first apply to exit."""

    def __init__(self, store: StateStore, node: str) -> None:
        self.path = lock_path(store, node)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            pid = f" (pid {holder['pid']})" if holder.get("pid") else ""
            raise LockedError(
                f"kdsr run for node {node} is already running{pid}: one daemon per node. "
                "Stop it first, or send it SIGHUP (or `kdsr reload`) to load a changed intent."
            ) from None
        self.fd = fd

    def record(self, control: Path) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "socket": str(control)}).encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _read_holder(fd: int) -> dict:
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def running(store: StateStore, node: str) -> dict | None:
    """The daemon holding the node's lock ({"pid", "socket"}), or None when none runs."""
    path = lock_path(store, node)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            return holder if holder.get("socket") else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: no daemon
    finally:
        os.close(fd)


def request(store: StateStore, node: str, message: dict, timeout: float = ANSWER_TIMEOUT) -> dict | None:
    """Send one request to the node's daemon; None when no daemon runs.
    Raises DaemonError with the daemon's exit code when it refused."""
    holder = running(store, node)
    if holder is None:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(holder["socket"])
        except OSError:
            return None  # starting or stopping: no control socket yet, or no more
        conn.sendall(json.dumps(message).encode() + b"\n")
        answer = _read_line(conn, MAX_ANSWER)
    if answer is None:
        raise DaemonError(f"kdsr run for node {node} (pid {holder.get('pid')}) closed without an answer", 1)
    if not answer.get("ok"):
        raise DaemonError(str(answer.get("error", "refused")), int(answer.get("exit_code", 1)))
    return answer


def _read_line(conn: socket.socket, limit: int = MAX_LINE) -> dict | None:
    data = bytearray()  # grown in place: `bytes +=` copies all read so far, per piece
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    try:
        found = json.loads(data) if data.strip() else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


class ControlServer:
    """Accepts requests on the node's socket; ``submit`` hands one to the
    daemon's main thread and returns its answer."""

    def __init__(self, path: Path, submit: Callable[[dict], dict]) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead daemon's socket: the lock says no one serves it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # owner-only from the moment it exists
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        self._submit = submit
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), name="control request", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(ANSWER_TIMEOUT)
            try:
                message = _read_line(conn)
                answer = (
                    self._submit(message)
                    if message is not None
                    else {"ok": False, "error": "not a JSON request", "exit_code": 4}
                )
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass  # the client went away

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
