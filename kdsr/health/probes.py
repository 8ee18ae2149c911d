"""One probe of one target: tcp connect, udp send/expect, http(s) GET.

Every probe opens its own socket with the target's fwmark (SO_MARK, which
needs CAP_NET_ADMIN: kdsr runs as root), so a dsr probe to the VIP takes the
route kdsr set up for that one server.  A probe never raises: it returns a
``Result`` whose ``error`` says, in a few words, why it failed.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass

from kdsr.compile.targets import Target

BODY_LIMIT = 65536  # bytes of an http body read for the 'body' check
UDP_REPLY_LIMIT = 4096


@dataclass(frozen=True)
class Result:
    ok: bool
    latency: float  # seconds the probe took
    error: str = ""


def _socket(target: Target, kind: int, timeout: float) -> socket.socket:
    family = socket.AF_INET if target.family == 4 else socket.AF_INET6
    sock = socket.socket(family, kind)
    try:
        if target.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, target.mark)
        sock.settimeout(timeout)
    except OSError:
        sock.close()
        raise
    return sock


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def probe(target: Target) -> Result:
    started = time.monotonic()
    try:
        error = CHECKS[target.monitor.type](target)
    except Exception as exc:  # a probe reports; it never takes the daemon down
        error = _describe(exc)
    return Result(ok=not error, latency=time.monotonic() - started, error=error)


def _tcp(target: Target) -> str:
    with _socket(target, socket.SOCK_STREAM, target.monitor.timeout) as sock:
        sock.connect((target.address, target.port))
    return ""


def _udp(target: Target) -> str:
    monitor = target.monitor
    with _socket(target, socket.SOCK_DGRAM, monitor.timeout) as sock:
        sock.connect((target.address, target.port))
        sock.send(monitor.send.encode())
        reply = sock.recv(UDP_REPLY_LIMIT)
    if monitor.expect is not None and monitor.expect.encode() not in reply:
        return f"reply lacks {monitor.expect!r}"
    return ""


class _MarkedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target) -> None:
        super().__init__(target.address, target.port, timeout=target.monitor.timeout)
        self._target = target

    def connect(self) -> None:
        self.sock = _socket(self._target, socket.SOCK_STREAM, self._target.monitor.timeout)
        self.sock.connect((self._target.address, self._target.port))


class _MarkedHTTPSConnection(_MarkedHTTPConnection):
    def connect(self) -> None:
        super().connect()
        monitor = self._target.monitor
        context = ssl.create_default_context()
        if not monitor.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname=monitor.host or self._target.address)


def status_matches(status: int, accepted: tuple[str, ...]) -> bool:
    """``accepted`` holds codes ("200") and classes ("2xx")."""
    code = str(status)
    return any(code == a or (a.endswith("xx") and code[0] == a[0]) for a in accepted)


def _http(target: Target) -> str:
    monitor = target.monitor
    cls = _MarkedHTTPSConnection if monitor.type == "https" else _MarkedHTTPConnection
    conn = cls(target)
    deadline = time.monotonic() + monitor.timeout
    try:
        host = monitor.host or (f"[{target.address}]" if target.family == 6 else target.address)
        conn.request("GET", monitor.path, headers={"Host": host, "User-Agent": "kdsr-health", "Connection": "close"})
        response = conn.getresponse()
        body = response.read(BODY_LIMIT) if monitor.body is not None else b""
    finally:
        conn.close()
    if time.monotonic() > deadline:
        return "timeout"
    if not status_matches(response.status, monitor.status):
        return f"status {response.status}"
    if monitor.body is not None and monitor.body.encode() not in body:
        return f"body lacks {monitor.body!r}"
    return ""


CHECKS = {"tcp": _tcp, "udp": _udp, "http": _http, "https": _http}
