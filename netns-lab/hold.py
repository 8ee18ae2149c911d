#!/usr/bin/env python3
"""Lab helper: hold N TCP connections open across a change, then use them again.

Run inside the client namespace (stdlib only):

    hold.py --vip 10.10.0.101 --port 80 --connections 200 --first-sport 45000 \
            --go-file /tmp/go [--timeout 3] [--deadline 120]

1. opens N connections (source ports first-sport .. first-sport+N-1) and does
   one exchange on each (`KDSR2 <len>\\n<payload>`, answered by responder.py
   with `<server> <dst> <peer>\\n` and an echo), keeping every connection open;
2. prints `READY <json>` (who answered each connection) and waits until
   --go-file exists (the test changes the load balancer meanwhile);
3. sends a second request on every connection at once, reads the replies, and
   prints one JSON document: per connection, who answered before and after,
   and whether the second exchange worked (a connection moved to another
   server is reset by it, or gets no answer).

Bounded: --deadline covers the whole run; it exits by itself.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import sys
import time

MAGIC = b"KDSR2 "


def frame(payload: bytes) -> bytes:
    return MAGIC + str(len(payload)).encode() + b"\n" + payload


def server_of(reply: bytes) -> str:
    return reply.split(b" ", 1)[0].decode(errors="replace")


def open_one(vip: str, port: int, sport: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(vip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(timeout)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
    sock.connect((vip, port))
    return sock


def exchange(sock: socket.socket, payload: bytes, deadline: float) -> bytes:
    """Send one frame, read the header line and the echo; the reply must match."""
    sock.sendall(frame(payload))
    return read_reply(sock, payload, deadline)


def read_reply(sock: socket.socket, payload: bytes, deadline: float) -> bytes:
    data = b""
    while True:
        header, newline, rest = data.partition(b"\n")
        if newline and len(rest) >= len(payload):
            if rest[: len(payload)] != payload:
                raise ValueError("echo mismatch")
            return header
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete reply in time")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--first-sport", type=int, required=True)
    parser.add_argument("--go-file", required=True)
    parser.add_argument("--timeout", type=float, default=3.0, help="per exchange, seconds")
    parser.add_argument("--deadline", type=float, default=120.0, help="whole run, seconds")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 1000 or args.first_sport + args.connections - 1 > 65535:
        parser.error("1-1000 connections, source ports within 1-65535")
    stop_at = time.monotonic() + args.deadline

    conns: dict[int, socket.socket] = {}
    results = {}
    for i in range(args.connections):
        sport = args.first_sport + i
        result = {"sport": sport, "before": None, "after": None, "ok": False, "error": None}
        results[sport] = result
        try:
            sock = open_one(args.vip, args.port, sport, args.timeout)
            result["before"] = server_of(exchange(sock, os.urandom(32), time.monotonic() + args.timeout))
            conns[sport] = sock
        except (OSError, ValueError) as exc:
            result["error"] = f"first exchange: {type(exc).__name__}: {exc}"
    print("READY " + json.dumps({s: r["before"] for s, r in results.items()}), flush=True)

    while not os.path.exists(args.go_file):
        if time.monotonic() > stop_at:
            print(json.dumps({"error": "go file never appeared", "connections": list(results.values())}))
            return 2
        time.sleep(0.05)

    # Second exchange on all connections at once: resets and silences take
    # the same few seconds, not a timeout each.
    payloads = {sport: os.urandom(32) for sport in conns}
    for sport, sock in conns.items():
        try:
            sock.sendall(frame(payloads[sport]))
        except OSError as exc:
            results[sport]["error"] = f"second request: {type(exc).__name__}: {exc}"
    pending = {sport: b"" for sport in conns if results[sport]["error"] is None}
    deadline = min(time.monotonic() + args.timeout, stop_at)
    with selectors.DefaultSelector() as sel:
        for sport in pending:
            conns[sport].setblocking(False)
            sel.register(conns[sport], selectors.EVENT_READ, sport)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(deadline - time.monotonic(), 0)):
                sport = key.data
                try:
                    chunk = conns[sport].recv(65536)
                except OSError as exc:
                    chunk = None
                    results[sport]["error"] = f"second reply: {type(exc).__name__}: {exc}"
                if chunk:
                    pending[sport] += chunk
                    header, newline, rest = pending[sport].partition(b"\n")
                    if not (newline and len(rest) >= len(payloads[sport])):
                        continue
                    if rest[: len(payloads[sport])] == payloads[sport]:
                        results[sport]["after"] = server_of(header)
                        results[sport]["ok"] = True
                    else:
                        results[sport]["error"] = "second reply: echo mismatch"
                elif chunk is not None:
                    results[sport]["error"] = "second reply: closed by the server"
                sel.unregister(conns[sport])
                del pending[sport]
    for sport in pending:
        results[sport]["error"] = "second reply: none in time"
    for sock in conns.values():
        sock.close()
    report = list(results.values())
    print(json.dumps({"ok": sum(r["ok"] for r in report), "connections": report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
