#!/usr/bin/env python3
"""Lab flow stream: a new TCP flow to VIP:port every EVERY seconds, for SECONDS.

Run inside the client namespace (stdlib only; reuses probe.py's exchange):

    flowstream.py --vip 10.10.0.100 --port 80 --first-sport 30000 \
                  --every 0.02 --seconds 10 --out flows.jsonl

Each flow is a fresh connection from its own source port (so the load
balancer hashes it afresh) and is written as one JSON line: the wall-clock
time it started, ok, the server that answered, and the error.  A flow that
reaches a server whose listener is gone fails with "Connection refused":
that is how a test dates the last new flow a dead server received.  Bounded:
at most SECONDS / EVERY flows (and 5,000), each with its own timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe  # noqa: E402

MAX_FLOWS = 5000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-sport", type=int, required=True)
    parser.add_argument("--every", type=float, default=0.02)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    flows = min(int(args.seconds / args.every), MAX_FLOWS)
    exchange = argparse.Namespace(
        vip=args.vip,
        proto="tcp",
        port=args.port,
        first_sport=args.first_sport,
        payload_bytes=32,
        timeout=args.timeout,
        source="0.0.0.0" if ":" not in args.vip else "::",
        ipv6_ext=[],
    )
    lock = threading.Lock()
    start = time.monotonic()
    print("READY", flush=True)
    with open(args.out, "w") as out, ThreadPoolExecutor(max_workers=16) as pool:

        def one(index: int) -> None:
            began = time.time()
            result = probe.run_flow(exchange, index, time.monotonic() + args.timeout + 1)
            line = {
                "t": round(began, 6),
                "sport": result.sport,
                "ok": result.ok,
                "server": result.server,
                "error": result.error,
            }
            with lock:
                out.write(json.dumps(line) + "\n")

        for index in range(flows):
            delay = start + index * args.every - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
