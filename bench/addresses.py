"""Address writes and reads: kdsr's rtnetlink code beside pyroute2, one run.

    sudo .venv/bin/python bench/addresses.py [--sizes 1000,5000] [--rounds 3] [--json bench/results/addresses.json]

An ipvs director holds every VIP on its front interface and a server every
VIP on ``lo``, so these paths grow with the intent.  In a throw-away network
namespace (``kdsrbench-addr-<pid>``, deleted by name at the end), on one end
of a veth pair, for each size and round: N /32 addresses added, the
interface listed, all deleted, once through ``SystemKernel`` (kdsr's
``rtnl_addr``: many to a send, a struct-decoded dump) and once through
pyroute2 one request at a time (what kdsr used before).  Prints the medians
and the ratios; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IFNAME = "bench0"


def _addresses(n: int) -> list[tuple[str, int]]:
    return [(f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 32) for i in range(1, n + 1)]


def _kdsr(n: int) -> dict[str, float]:
    from kdsr.kernel.system import SystemKernel
    from kdsr.model import Address

    kernel = SystemKernel()
    addrs = [Address(ifname=IFNAME, cidr=f"{ip}/{plen}") for ip, plen in _addresses(n)]
    done: list[Address] = []
    t0 = time.perf_counter()
    for start in range(0, n, 256):  # as apply sends them (ADDRESS_BATCH)
        kernel.links.addr_write(True, addrs[start : start + 256], done)
    t1 = time.perf_counter()
    listed = kernel.links.addr_list(IFNAME)
    t2 = time.perf_counter()
    gone: list[Address] = []
    kernel.links.addr_write(False, addrs, gone)
    t3 = time.perf_counter()
    kernel.close()
    assert len(done) == len(gone) == n and len([a for a in listed if a.cidr.startswith("10.")]) == n
    return {"add": t1 - t0, "list": t2 - t1, "delete": t3 - t2}


def _pyroute2(n: int) -> dict[str, float]:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    index = ipr.link_lookup(ifname=IFNAME)[0]
    addrs = _addresses(n)
    t0 = time.perf_counter()
    for ip, plen in addrs:
        ipr.addr("add", index=index, address=ip, prefixlen=plen)
    t1 = time.perf_counter()
    listed = [m.get_attr("IFA_LOCAL") for m in ipr.get_addr(index=index)]
    t2 = time.perf_counter()
    for ip, plen in addrs:
        ipr.addr("del", index=index, address=ip, prefixlen=plen)
    t3 = time.perf_counter()
    ipr.close()
    assert len([a for a in listed if a and a.startswith("10.")]) == n
    return {"add": t1 - t0, "list": t2 - t1, "delete": t3 - t2}


def inside(sizes: list[int], rounds: int) -> dict:
    sys.path.insert(0, str(ROOT))
    results: dict = {}
    for n in sizes:
        runs: dict[str, list[dict[str, float]]] = {"kdsr": [], "pyroute2": []}
        for r in range(rounds):
            order = ["kdsr", "pyroute2"] if r % 2 == 0 else ["pyroute2", "kdsr"]
            for name in order:
                runs[name].append((_kdsr if name == "kdsr" else _pyroute2)(n))
        results[str(n)] = {
            name: {step: statistics.median(run[step] for run in got) for step in ("add", "list", "delete")}
            for name, got in runs.items()
        }
    return results


def table(results: dict, rounds: int) -> str:
    lines = [
        f"Addresses on one interface, median of {rounds} rounds (seconds; ratio = pyroute2 / kdsr):",
        f"{'addresses':>9}  {'step':<6} {'kdsr':>8} {'pyroute2':>9} {'ratio':>6}",
    ]
    for n, got in results.items():
        for step in ("add", "list", "delete"):
            ours, theirs = got["kdsr"][step], got["pyroute2"][step]
            lines.append(f"{int(n):>9,}  {step:<6} {ours:>8.3f} {theirs:>9.3f} {theirs / ours:>6.1f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "addresses.json"))
    p.add_argument("--inside", action="store_true", help="run the rounds here (inside the namespace)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.inside:
        print(json.dumps(inside(sizes, args.rounds)))
        return 0
    if os.geteuid() != 0:
        print("bench/addresses.py needs root (it makes a network namespace)", file=sys.stderr)
        return 1
    ns = f"kdsrbench-addr-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        setup = f"ip link add {IFNAME} type veth peer name {IFNAME}p && ip link set {IFNAME} up"
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", setup], check=True, timeout=30)
        argv = [sys.executable, str(Path(__file__).resolve()), "--inside", "--sizes", args.sizes]
        argv += ["--rounds", str(args.rounds)]
        run = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        results = json.loads(run.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
    print(table(results, args.rounds))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
