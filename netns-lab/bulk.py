#!/usr/bin/env python3
"""Bulk TCP upload through the DSR path, checked end to end (stdlib only).

    bulk.py sink --port 9000 --max-seconds 300          # on a server
    bulk.py send --vip 10.9.0.100 --port 9000 --megabytes 10 --timeout 20

The sender streams deterministic bytes to the VIP, half-closes, and expects
the SHA-256 of everything the sink received, plus the sink's name.  It prints
one JSON line: ok, sent/expected digest, received digest, server, elapsed.
Client segments are what the load balancer encapsulates, so an upload is the
direction that needs the tunnel's MTU to fit (the MSS clamp's job).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import selectors
import socket
import struct
import sys
import threading
import time

CHUNK = 64 * 1024


def pattern(total: int):
    """Deterministic, incompressible-enough bytes: SHA-256 in counter mode."""
    sent, counter = 0, 0
    while sent < total:
        block = b"".join(hashlib.sha256(f"{counter}:{i}".encode()).digest() for i in range(CHUNK // 32))
        counter += 1
        block = block[: total - sent]
        sent += len(block)
        yield block


def sink(args) -> int:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", args.port))
    sock.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    print("READY", flush=True)
    deadline = time.monotonic() + args.max_seconds

    def serve(conn: socket.socket) -> None:
        conn.settimeout(30)
        digest = hashlib.sha256()
        try:
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                digest.update(data)
            conn.sendall(f"{args.name} {digest.hexdigest()}\n".encode())
        except OSError:
            pass
        finally:
            conn.close()

    while time.monotonic() < deadline:
        for _key, _mask in sel.select(timeout=0.5):
            conn, _peer = sock.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    return 0


def send(args) -> int:
    total = args.megabytes * 1024 * 1024
    expected = hashlib.sha256()
    started = time.monotonic()
    result = {"ok": False, "server": None, "sent": 0, "error": ""}
    conn = None
    try:
        family = socket.AF_INET6 if ":" in args.vip else socket.AF_INET
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.settimeout(args.timeout)
        conn.connect((args.vip, args.port))
        result["mss"] = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        for block in pattern(total):
            if time.monotonic() - started > args.timeout:
                raise TimeoutError(f"upload not done after {args.timeout}s")
            conn.sendall(block)
            expected.update(block)
            result["sent"] += len(block)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            data = conn.recv(256)
            if not data:
                break
            reply += data
        conn.close()
        name, _, digest = reply.decode().strip().partition(" ")
        result.update(server=name, received=digest, expected=expected.hexdigest(), ok=digest == expected.hexdigest())
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        if conn is not None:
            # Abort (RST) instead of leaving an orphan that keeps retransmitting
            # its oversized segments: once the lab lets ICMP through again, the
            # errors they draw would teach this host a path MTU that later
            # tests must not inherit.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", default=socket.gethostname())
    s.add_argument("--max-seconds", type=float, default=300)
    c = sub.add_parser("send")
    c.add_argument("--vip", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--megabytes", type=int, default=10)
    c.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    return sink(args) if args.role == "sink" else send(args)


if __name__ == "__main__":
    sys.exit(main())
