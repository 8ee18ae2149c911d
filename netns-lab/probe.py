#!/usr/bin/env python3
"""Lab probe: N flows to one address, each from its own source port.

Run inside the client namespace (stdlib only):

    probe.py --vip 10.10.0.100 --proto tcp --port 80 --flows 20 \
             --first-sport 40000 [--payload-bytes 64] [--timeout 2] [--json]
             [--ipv6-ext hop,dst]

Flow i binds source port first_sport + i, sends a random payload to a
responder (responder.py), and checks the reply: the header line names the
server, the address the server saw the request sent to, and the source the
server saw; the rest must echo the payload byte for byte.

A flow is `ok` only if a real client would be satisfied: reply received, echo
exact, and the reply came from the address we sent to (a UDP reply from the
server's own address instead of the VIP is what a broken DSR server does;
connected UDP sockets in real clients drop it). For TCP the reply source is
the connected peer, which the kernel guarantees.

``--ipv6-ext``: every packet of an IPv6 flow carries these extension headers
(sticky socket options: ``hop`` a hop-by-hop, ``dst`` a destination options
header, each one PadN option long), as some clients' stacks send them.

Exit status: 0 every flow ok, 1 some flow failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

TCP_FRAME_MAGIC = b"KDSR1 "  # must match responder.py
MAX_WORKERS = 16
MAX_REPLY_HEADER = 512
# An options header of 8 bytes: next header and length (the kernel fills
# both in), then one PadN option of 4 zero bytes.
OPTIONS_HEADER = bytes([0, 0, 1, 4, 0, 0, 0, 0])
IPV6_EXT_OPTION = {"hop": socket.IPV6_HOPOPTS, "dst": socket.IPV6_DSTOPTS}


@dataclass
class FlowResult:
    sport: int
    ok: bool = False
    server: str | None = None
    server_saw_dst: str | None = None  # the address the request reached the server with
    server_saw_peer: str | None = None  # source address the server saw (no SNAT: ours)
    server_saw_peer_port: int | None = None
    reply_src: str | None = None
    reply_src_port: int | None = None
    rtt_ms: float | None = None
    error: str | None = None


def run_flow(args: argparse.Namespace, index: int, deadline: float) -> FlowResult:
    result = FlowResult(sport=args.first_sport + index)
    timeout = min(args.timeout, deadline - time.monotonic())
    if timeout <= 0:
        result.error = "total deadline passed before the flow started"
        return result
    payload = os.urandom(args.payload_bytes)
    started = time.monotonic()
    try:
        send = tcp_exchange if args.proto == "tcp" else udp_exchange
        reply, reply_src = send(args, result.sport, payload, timeout)
        result.rtt_ms = round((time.monotonic() - started) * 1000, 3)
        result.reply_src, result.reply_src_port = normalise(reply_src[0]), reply_src[1]
        check_reply(result, reply, payload, args)
    except (OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def tcp_exchange(args, sport: int, payload: bytes, timeout: float) -> tuple[bytes, tuple]:
    with socket.socket(family_of(args.vip), socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR lets us bind a source port whose previous connection
        # the server (not we) holds in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        extension_headers(sock, args)
        sock.settimeout(timeout)
        sock.bind((args.source, sport))
        sock.connect((args.vip, args.port))
        peer = sock.getpeername()
        # Framed, so the responder closes first and TIME_WAIT stays on its side.
        sock.sendall(TCP_FRAME_MAGIC + str(len(payload)).encode() + b"\n" + payload)
        return recv_until_eof(sock, time.monotonic() + timeout, len(payload) + MAX_REPLY_HEADER), peer


# A UDP flow sends its datagram up to this many times within its timeout,
# from the same socket (same 5-tuple, so the same flow and the same server),
# as a DNS client would: under emulation on a busy machine one datagram in a
# few thousand is lost, which says nothing about the path.  A path that
# drops the flow drops every copy.
UDP_TRIES = 3


def udp_exchange(args, sport: int, payload: bytes, timeout: float) -> tuple[bytes, tuple]:
    with socket.socket(family_of(args.vip), socket.SOCK_DGRAM) as sock:
        extension_headers(sock, args)
        sock.bind((args.source, sport))
        deadline = time.monotonic() + timeout
        for attempt in range(UDP_TRIES):
            # Not connect()ed on purpose: we want to *see* a reply from a wrong
            # source, not have the kernel drop it silently.
            sock.sendto(payload, (args.vip, args.port))
            wait = (deadline - time.monotonic()) / (UDP_TRIES - attempt)
            if wait <= 0:
                break
            sock.settimeout(wait)
            try:
                return sock.recvfrom(65535)
            except TimeoutError:
                continue
        raise TimeoutError(f"no reply to {UDP_TRIES} datagrams within {timeout:g}s")


def extension_headers(sock: socket.socket, args) -> None:
    for name in args.ipv6_ext:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_EXT_OPTION[name], OPTIONS_HEADER)


def recv_until_eof(sock: socket.socket, deadline: float, limit: int) -> bytes:
    data = b""
    while len(data) <= limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"reply incomplete after the timeout ({len(data)} bytes)")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise ValueError(f"reply longer than expected ({len(data)} bytes)")


def check_reply(result: FlowResult, reply: bytes, payload: bytes, args) -> None:
    header, newline, echo = reply.partition(b"\n")
    fields = header.decode(errors="replace").split(" ")
    if not newline or len(fields) != 3:
        raise ValueError(f"malformed reply header {header[:80]!r}")
    result.server, result.server_saw_dst = fields[0], fields[1]
    peer_addr, _, peer_port = fields[2].rpartition(":")
    result.server_saw_peer, result.server_saw_peer_port = peer_addr, int(peer_port)
    if echo != payload:
        raise ValueError(f"echo mismatch: sent {len(payload)} bytes, got {len(echo)} back")
    if result.reply_src != normalise(args.vip):
        raise ValueError(f"reply came from {result.reply_src}, not from {normalise(args.vip)}")
    result.ok = True


def family_of(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def normalise(address: str) -> str:
    return str(ipaddress.ip_address(address.split("%", 1)[0]))


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    deadline = started + args.deadline
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        flows = list(pool.map(lambda i: run_flow(args, i, deadline), range(args.flows)))
    by_server: dict[str, int] = {}
    for flow in flows:
        if flow.ok:
            by_server[flow.server] = by_server.get(flow.server, 0) + 1
    return {
        "vip": normalise(args.vip),
        "proto": args.proto,
        "port": args.port,
        "elapsed_s": round(time.monotonic() - started, 3),
        "ok": sum(f.ok for f in flows),
        "failed": sum(not f.ok for f in flows),
        "by_server": dict(sorted(by_server.items())),
        "flows": [asdict(f) for f in flows],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vip", required=True, help="address to send to (VIP or a server's own address)")
    parser.add_argument("--proto", choices=("tcp", "udp"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--flows", type=int, default=1)
    parser.add_argument("--first-sport", type=int, required=True)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=2.0, help="per-flow timeout in seconds")
    parser.add_argument("--deadline", type=float, default=60.0, help="total time limit in seconds")
    parser.add_argument("--workers", type=int, default=8, help=f"parallel flows (1..{MAX_WORKERS})")
    parser.add_argument("--source", help="local address to bind (default: any of the VIP's family)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--ipv6-ext", default="", help="IPv6 extension headers on every packet: hop,dst")
    args = parser.parse_args(argv)
    args.ipv6_ext = [name for name in args.ipv6_ext.split(",") if name]
    if any(name not in IPV6_EXT_OPTION for name in args.ipv6_ext):
        parser.error(f"--ipv6-ext takes a list of {', '.join(IPV6_EXT_OPTION)}")
    try:
        family = family_of(args.vip)
    except ValueError:
        parser.error(f"--vip {args.vip!r} is not an IP address")
    if args.ipv6_ext and family != socket.AF_INET6:
        parser.error("--ipv6-ext needs an IPv6 --vip")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be 1-65535")
    if not 1 <= args.flows or not 1 <= args.first_sport or args.first_sport + args.flows - 1 > 65535:
        parser.error("--flows >= 1 and --first-sport .. --first-sport+flows-1 must be within 1-65535")
    if not 0 <= args.payload_bytes <= 60000:
        parser.error("--payload-bytes must be 0-60000 (one UDP datagram carries the echo)")
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be 1-{MAX_WORKERS}")
    args.source = args.source or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for flow in report["flows"]:
            status = "ok " if flow["ok"] else "ERR"
            print(
                f"{status} sport={flow['sport']} server={flow['server']} saw_dst={flow['server_saw_dst']} "
                f"reply_src={flow['reply_src']} {flow['error'] or ''}".rstrip()
            )
        print(f"{report['ok']} ok, {report['failed']} failed, by server {report['by_server']}")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
