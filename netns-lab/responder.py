#!/usr/bin/env python3
"""Lab responder: answers TCP and UDP requests and says who answered.

Run inside a server namespace (stdlib only):

    responder.py --name s1 --tcp 80,443,53 --udp 53,5000-5010 \
                 --log /tmp/s1.jsonl [--bind ::] [--max-seconds 300]

Every request is answered with one line

    <server-name> <local-addr-the-packet-was-sent-to> <peer-addr>:<peer-port>\n

followed by an echo of the request payload, and logged as one JSON line.

Why the details below matter for DSR:
- UDP replies are sent *from* the address the request was sent to
  (IP_PKTINFO / IPV6_PKTINFO), so a request to the VIP is answered from the
  VIP, as a real DSR server must. A socket bound to '::' would otherwise reply
  from whatever source the routing table picks (the server's own address).
- TCP requests may be framed as `KDSR1 <length>\n<payload>`: the responder then
  replies and closes *first*, so the TIME_WAIT state lands on the server, and
  the probe can reuse the same source ports right away (Linux refuses to
  connect() a 4-tuple the client still holds in TIME_WAIT unless
  tcp_tw_reuse applies, which by default is loopback only). Unframed requests
  (nc, curl) are read until EOF or one idle second.
- `KDSR2 <length>\n<payload>` frames keep the connection open: each one is
  answered the same way, until the client closes (tests that hold connections
  across a change, e.g. flow pinning).
- One selector loop owns every listening socket, so SIGTERM, SIGINT or the
  lifetime limit stop the process within half a second.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python < 3.12 lacks the constant; 8 on Linux
TCP_FRAME_MAGIC = b"KDSR1 "
# Persistent connections (flow-pinning tests): `KDSR2 <len>\n<payload>` frames,
# one at a time, each answered like a KDSR1 request, until the client closes.
PERSISTENT_MAGIC = b"KDSR2 "
PERSISTENT_IDLE_SECONDS = 120.0
MAX_REQUEST_BYTES = 1 << 20
UNFRAMED_IDLE_SECONDS = 1.0
CONNECTION_SECONDS = 10.0
MAX_CONNECTION_THREADS = 128
POLL_SECONDS = 0.5


def parse_ports(spec: str) -> list[int]:
    """'80,443,5000-5010' -> [80, 443, 5000, ..., 5010]."""
    ports: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise argparse.ArgumentTypeError(f"bad port range {part!r}; ports are 1-65535")
        ports.extend(range(first, last + 1))
    return ports


def plain_address(addr: str) -> str:
    """'::ffff:10.0.0.1' -> '10.0.0.1'; a dual-stack socket reports IPv4 peers that way."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


class RequestLog:
    """Thread-safe JSON-lines log, flushed per line so tests can read it live."""

    def __init__(self, path: str | None, server: str):
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._server = server
        self._lock = threading.Lock()

    def write(self, **record) -> None:
        if not self._file:
            return
        line = json.dumps({"ts": round(time.time(), 6), "server": self._server, **record}, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            with self._lock:
                self._file.close()


class Responder:
    def __init__(self, name: str, log: RequestLog):
        self.name = name
        self.log = log
        self.stop = threading.Event()
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.threads = threading.BoundedSemaphore(MAX_CONNECTION_THREADS)

    # --- setup -----------------------------------------------------------

    def listen(self, bind: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
        for port in tcp_ports:
            self._add(make_socket(bind, port, socket.SOCK_STREAM), self._accept)
        for port in udp_ports:
            self._add(make_socket(bind, port, socket.SOCK_DGRAM), self._datagram)

    def _add(self, sock: socket.socket, handler) -> None:
        sock.setblocking(False)
        self.sockets.append(sock)
        self.selector.register(sock, selectors.EVENT_READ, handler)

    # --- main loop -------------------------------------------------------

    def serve(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=POLL_SECONDS):
                try:
                    key.data(key.fileobj)
                except OSError as exc:  # one bad packet or peer must not stop the responder
                    print(f"responder {self.name}: {exc}", file=sys.stderr, flush=True)
        for sock in self.sockets:
            sock.close()

    # --- UDP -------------------------------------------------------------

    def _datagram(self, sock: socket.socket) -> None:
        data, ancdata, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(64))
        local = destination_from_cmsgs(ancdata) or sock.getsockname()[0]
        port = sock.getsockname()[1]
        reply = self._reply_header(local, peer) + data
        error = None
        try:
            sock.sendmsg([reply], source_cmsgs(sock.family, local), 0, peer)
        except OSError as exc:
            error = str(exc)
        self._log("udp", local, port, peer, len(data), error)

    def _log(self, proto: str, local, port: int, peer, nbytes: int, error: str | None) -> None:
        self.log.write(
            proto=proto,
            dst=plain_address(local),
            port=port,
            peer=plain_address(peer[0]),
            peer_port=peer[1],
            bytes=nbytes,
            error=error,
        )

    # --- TCP -------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        conn, peer = listener.accept()
        if not self.threads.acquire(timeout=1.0):
            conn.close()  # overloaded: refuse rather than grow without bound
            return
        threading.Thread(target=self._connection, args=(conn, peer), daemon=True).start()

    def _connection(self, conn: socket.socket, peer) -> None:
        try:
            conn.setblocking(True)
            local, port = conn.getsockname()[:2]
            error = None
            data = b""
            try:
                if is_persistent(conn):
                    self._persistent(conn, peer, local, port)
                    return
                data = read_request(conn)
                conn.sendall(self._reply_header(local, peer) + data)
                conn.shutdown(socket.SHUT_WR)
                drain_until_eof(conn)
            except OSError as exc:
                error = str(exc)
            self._log("tcp", local, port, peer, len(data), error)
        finally:
            conn.close()
            self.threads.release()

    def _persistent(self, conn: socket.socket, peer, local: str, port: int) -> None:
        """`KDSR2 <len>\\n<payload>` frames, each answered, until the client closes (or idles)."""
        while not self.stop.is_set():
            error = None
            payload = b""
            try:
                payload = read_persistent_frame(conn)
                if payload is None:
                    return  # the client closed
                conn.sendall(self._reply_header(local, peer) + payload)
            except OSError as exc:
                error = str(exc)
            self._log("tcp", local, port, peer, len(payload or b""), error)
            if error:
                return

    def _reply_header(self, local: str, peer) -> bytes:
        return f"{self.name} {plain_address(local)} {plain_address(peer[0])}:{peer[1]}\n".encode()


def make_socket(bind: str, port: int, kind: int) -> socket.socket:
    """A listening/bound socket; '::' is dual stack so IPv4 VIPs are answered too."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if kind == socket.SOCK_DGRAM:
        if family == socket.AF_INET6:
            # Also covers IPv4 datagrams on a dual-stack socket: the kernel
            # reports them as IPV6_PKTINFO with a v4-mapped address.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind((bind, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def destination_from_cmsgs(ancdata) -> str | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            return str(ipaddress.IPv6Address(data[:16]))
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return str(ipaddress.IPv4Address(data[8:12]))  # ipi_addr: the header's destination
    return None


def source_cmsgs(family: int, local: str) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes the kernel send from `local` (e.g. the VIP)."""
    if family == socket.AF_INET6:
        # For a v4-mapped `local` the kernel's IPv4 path accepts IPV6_PKTINFO too.
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, ipaddress.IPv6Address(local).packed + struct.pack("=i", 0))]
    return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, ipaddress.IPv4Address(local).packed, b"\0" * 4))]


def is_persistent(conn: socket.socket) -> bool:
    """Does the connection start with the persistent magic? (peeked, so nothing is consumed)"""
    conn.settimeout(CONNECTION_SECONDS)
    deadline = time.monotonic() + CONNECTION_SECONDS
    head = conn.recv(len(PERSISTENT_MAGIC), socket.MSG_PEEK)
    while head and len(head) < len(PERSISTENT_MAGIC) and PERSISTENT_MAGIC.startswith(head):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
        head = conn.recv(len(PERSISTENT_MAGIC), socket.MSG_PEEK)
    return head == PERSISTENT_MAGIC


def read_persistent_frame(conn: socket.socket) -> bytes | None:
    """One `KDSR2 <len>\\n<payload>` frame; None on a clean EOF between frames."""
    conn.settimeout(PERSISTENT_IDLE_SECONDS)
    data = conn.recv(64)
    if not data:
        return None
    deadline = time.monotonic() + CONNECTION_SECONDS
    while b"\n" not in data and len(data) < 64:
        data += recv_before(conn, deadline)
    header, _, payload = data.partition(b"\n")
    if not header.startswith(PERSISTENT_MAGIC):
        raise OSError(f"bad persistent frame header {header[:40]!r}")
    length = int(header[len(PERSISTENT_MAGIC) :])
    if not 0 <= length <= MAX_REQUEST_BYTES:
        raise OSError(f"framed request of {length} bytes exceeds {MAX_REQUEST_BYTES}")
    while len(payload) < length:
        payload += recv_before(conn, deadline)
    if len(payload) > length:
        raise OSError("client sent the next frame before the reply (one request at a time)")
    return payload


def read_request(conn: socket.socket) -> bytes:
    """The payload of one request: framed (`KDSR1 <len>\\n...`) or up to EOF/idle."""
    conn.settimeout(CONNECTION_SECONDS)
    deadline = time.monotonic() + CONNECTION_SECONDS
    data = conn.recv(65536)
    # The magic may arrive split over segments: read until it is decided.
    while data and len(data) < len(TCP_FRAME_MAGIC) and TCP_FRAME_MAGIC.startswith(data):
        data += recv_before(conn, deadline)
    if data.startswith(TCP_FRAME_MAGIC):
        return read_framed(conn, data, deadline)
    conn.settimeout(UNFRAMED_IDLE_SECONDS)
    while data and len(data) < MAX_REQUEST_BYTES and time.monotonic() < deadline:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def read_framed(conn: socket.socket, data: bytes, deadline: float) -> bytes:
    while b"\n" not in data and len(data) < 64:
        data += recv_before(conn, deadline)
    header, _, payload = data.partition(b"\n")
    length = int(header[len(TCP_FRAME_MAGIC) :])
    if not 0 <= length <= MAX_REQUEST_BYTES:
        raise OSError(f"framed request of {length} bytes exceeds {MAX_REQUEST_BYTES}")
    while len(payload) < length:
        payload += recv_before(conn, deadline)
    return payload[:length]


def recv_before(conn: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise OSError("request not complete in time")
    conn.settimeout(remaining)
    chunk = conn.recv(65536)
    if not chunk:
        raise OSError("peer closed before the request was complete")
    return chunk


def drain_until_eof(conn: socket.socket) -> None:
    """Wait (briefly) for the client's FIN so our close does not turn into a RST."""
    conn.settimeout(2.0)
    try:
        for _ in range(64):
            if not conn.recv(65536):
                return
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="server name put into every reply")
    parser.add_argument("--tcp", type=parse_ports, default=[], help="TCP ports, e.g. 80,443,8000-8010")
    parser.add_argument("--udp", type=parse_ports, default=[], help="UDP ports")
    parser.add_argument("--bind", action="append", help="address to bind (repeatable); default '::' dual stack")
    parser.add_argument("--log", help="JSON-lines request log file")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="exit after this long (default 300)")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one of --tcp / --udp")

    log = RequestLog(args.log, args.name)
    responder = Responder(args.name, log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: responder.stop.set())
    for bind in args.bind or ["::"]:
        responder.listen(bind, args.tcp, args.udp)
    # The lab waits for this line before it sends traffic.
    print(f"READY {args.name} pid={os.getpid()}", flush=True)
    try:
        responder.serve(args.max_seconds)
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
