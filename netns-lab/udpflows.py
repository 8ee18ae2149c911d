#!/usr/bin/env python3
"""Lab client: long-lived UDP flows, each datagram answered (or not) and dated.

Run inside the client namespace (stdlib only):

    udpflows.py --vip 10.10.0.102 --port 53 --first-sport 30000 --flows 40 \
                --every 0.05 --seconds 20 --stop-file stop --out flows.json

Flow i is one socket bound to source port first-sport + i for the whole run
(so the load balancer sees the same 5-tuple every time: a continuing flow,
which flow pinning keeps on its server).  Every EVERY seconds each flow
sends one datagram carrying a sequence number and its CLOCK_MONOTONIC send
time; responder.py answers with `<server> <dst> <peer>\\n` and the echo.
A datagram counts as answered when its echo comes back from the VIP within
--timeout; the record says which server answered.  The clock is the same in
every network namespace of the host, so a test can place each datagram
before or after the change it made.

Prints READY once every socket is bound.  Bounded: --seconds (at most 300),
the stop file, and at most 200 flows; it stops by itself.  Writes one JSON
document: {"datagrams": [[sport, seq, sent_at, server or null, rtt_ms or
null], ...]}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import time

PAYLOAD = struct.Struct("!Qd")  # sequence number, CLOCK_MONOTONIC send time
MAX_FLOWS = 200
MAX_SECONDS = 300.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-sport", type=int, required=True)
    parser.add_argument("--flows", type=int, default=20)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between a flow's datagrams")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1.0, help="a reply later than this is no answer")
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not (1 <= args.flows <= MAX_FLOWS and 1024 <= args.first_sport and args.first_sport + args.flows <= 65536):
        parser.error(f"1-{MAX_FLOWS} flows, source ports within 1024-65535")
    seconds = min(args.seconds, MAX_SECONDS)
    vip = ipaddress.ip_address(args.vip)
    family = socket.AF_INET6 if vip.version == 6 else socket.AF_INET

    sel = selectors.DefaultSelector()
    socks = {}
    for i in range(args.flows):
        sport = args.first_sport + i
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        # connect(): the kernel then drops a reply from any address but the
        # VIP, as a real client's connected socket does.
        sock.connect((args.vip, args.port))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, sport)
        socks[sport] = sock
    print("READY", flush=True)

    sent: dict[int, list] = {}  # seq -> [sport, seq, sent_at, server, rtt_ms]
    seq = 0
    start = time.monotonic()
    stop_at = start + seconds
    tick = 0
    while True:
        now = time.monotonic()
        if now >= stop_at or (tick % 10 == 0 and os.path.exists(args.stop_file)):
            break
        for sport, sock in socks.items():
            sent_at = time.monotonic()
            sent[seq] = [sport, seq, sent_at, None, None]
            try:
                sock.send(PAYLOAD.pack(seq, sent_at))
            except OSError:
                pass  # e.g. ECONNREFUSED from an earlier ICMP: the datagram stays unanswered
            seq += 1
        tick += 1
        next_tick = start + tick * args.every
        _receive(sel, sent, next_tick, args.timeout)
    _receive(sel, sent, time.monotonic() + args.timeout, args.timeout)  # the last replies
    for sock in socks.values():
        sock.close()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"every": args.every, "datagrams": list(sent.values())}, f)
    return 0


def _receive(sel: selectors.BaseSelector, sent: dict[int, list], until: float, timeout: float) -> None:
    while (wait := until - time.monotonic()) > 0:
        for key, _ in sel.select(timeout=wait):
            try:
                reply = key.fileobj.recv(65535)
            except OSError:
                continue  # ICMP unreachable reported on the connected socket
            header, newline, echo = reply.partition(b"\n")
            if not newline or len(echo) != PAYLOAD.size:
                continue
            seq, sent_at = PAYLOAD.unpack(echo)
            record = sent.get(seq)
            arrived = time.monotonic()
            if record is None or record[0] != key.data or arrived - sent_at > timeout:
                continue
            record[3] = header.split(b" ", 1)[0].decode(errors="replace")
            record[4] = round((arrived - sent_at) * 1000, 3)


if __name__ == "__main__":
    sys.exit(main())
