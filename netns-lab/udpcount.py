#!/usr/bin/env python3
"""Numbered UDP probes, counted where they land (stdlib only).

In the client namespace, send numbered probes to VIP:port, each a new flow
(its own source port, cycling through SPAN ports), paced at RATE per second,
until COUNT are sent, STOP_FILE appears or MAX_SECONDS pass:

    udpcount.py send --vip 10.10.0.100 --port 5999 --first-sport 10000 \
                     --rate 1500 --count 200000 --stop-file stop --out sent.json

In each server namespace, record every probe that arrives until SIGTERM (or
MAX_SECONDS), then write what arrived:

    udpcount.py sink --bind 10.10.0.100 --port 5999 --name s1 --out s1.json

A probe is 4 bytes of sequence number and the sender's CLOCK_MONOTONIC time
(8-byte double) when it was sent; the clock is the same in every network
namespace of the host, so a test can place each probe between the applies
it ran around.  Nothing is answered: the count at the servers is the proof.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import time
from array import array

PROBE = struct.Struct("!Id")
MAX_PROBES = 500_000
RECV_BUFFER = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value; Python does not name it


def send(args: argparse.Namespace) -> int:
    count = min(args.count, MAX_PROBES)
    family = socket.AF_INET6 if ":" in args.vip else socket.AF_INET
    start = time.monotonic()
    deadline = start + args.max_seconds
    sent = 0
    for seq in range(count):
        now = time.monotonic()
        if now >= deadline or (seq % 100 == 0 and os.path.exists(args.stop_file)):
            break
        due = start + seq / args.rate
        if due > now:
            time.sleep(due - now)
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", args.first_sport + seq % args.span))
            sock.sendto(PROBE.pack(seq, time.monotonic()), (args.vip, args.port))
        sent += 1
    report = {"sent": sent, "seconds": round(time.monotonic() - start, 3), "rate": args.rate}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f)
    return 0


def sink(args: argparse.Namespace) -> int:
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    # SO_RCVBUF is capped at net.core.rmem_max (a few hundred KB by default,
    # less than a stalled sink needs on a busy machine); as root, FORCE
    # takes the size asked for.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECV_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
    sock.bind((args.bind, args.port))
    sock.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    seqs, stamps = array("I"), array("d")
    deadline = time.monotonic() + args.max_seconds
    print("ready", flush=True)
    draining = False  # after the stop: what the socket still holds was sent before it
    while len(seqs) < MAX_PROBES:
        if not draining and (stop or time.monotonic() >= deadline):
            sock.setblocking(False)
            draining = True
        try:
            data = sock.recv(64)
        except TimeoutError:
            continue
        except BlockingIOError:
            break
        if len(data) == PROBE.size:
            seq, sent_at = PROBE.unpack(data)
            seqs.append(seq)
            stamps.append(sent_at)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"server": args.name, "seqs": seqs.tolist(), "sent_at": stamps.tolist()}, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send")
    s.add_argument("--vip", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--first-sport", type=int, required=True)
    s.add_argument("--span", type=int, default=50_000, help="distinct source ports, used in turn")
    s.add_argument("--rate", type=float, default=1000.0)
    s.add_argument("--count", type=int, default=50_000)
    s.add_argument("--max-seconds", type=float, default=120.0)
    s.add_argument("--stop-file", required=True)
    s.add_argument("--out", required=True)
    k = sub.add_parser("sink")
    k.add_argument("--bind", required=True)
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--name", required=True)
    k.add_argument("--max-seconds", type=float, default=300.0)
    k.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "send" and not (1024 <= args.first_sport and args.first_sport + args.span <= 65536):
        parser.error("--first-sport + --span must stay within 1024..65535")
    return send(args) if args.command == "send" else sink(args)


if __name__ == "__main__":
    sys.exit(main())
