#!/usr/bin/env python3
"""Consistent-hashing bench: kdsr's Maglev tables against the issue's goals,
with ring hashing, IPVS sh-style modulo and IPVS mh on the same inputs.

    .venv/bin/python bench/maglev.py [--json bench/results/maglev.json] [--quick]

Prints a table and writes the same numbers as JSON.  Not a timed test: the
build times are for orientation on the machine it runs on.

Every strategy is measured the same way, over the whole 32-bit hash space a
flow's hash falls into (no sampling): a strategy builds a *partition* of that
space (where each server's flows go) from a list of (server, weight) in a
given order.  For a table of M slots the nft data path puts hash h in slot
(h * M) >> 32 (the kernel's reciprocal_scale), so each slot is an interval.

- balance: the largest and smallest share over the mean (equal weights);
  goal 1 + 1/floor(M/N) (Maglev's bound, NSDI 2016);
- disruption: the fraction of flows whose server changes when one server is
  removed, or one added; goal 1/N (resp. 1/(N+1)) + 1 percentage point.
  kdsr's default table size steps on a ladder of primes (>= 1000 slots per
  server), so a second Maglev row recomputes the default after the change:
  where N crosses a rung every flow is re-slotted, within a rung nothing
  extra moves;
- weights 1..4: the worst |share / fair share - 1|; goal 1%;
- agreement: two load balancers that list the same servers in different
  orders; kdsr's goal is 100%;
- build time of one table (N = 100, M = 65537) and compile time of an intent
  of 1,000 pools.

The IPVS ``mh`` rows (kdsr's ipvs engine) come from a model of the kernel's
ip_vs_mh.c (bench/ipvs_mh_model.py; netns-lab/tests/test_ipvs_mh_model_kernel.py
checks it flow by flow against the real kernel in the full-kernel lab).  mh
hashes the client (address, and port with mh-port) with its own fixed-key
hsiphash into one of M = 4093 slots (Debian's build); that map from flows to
slots is the same whatever the destination list, and spreads flows evenly
over the slots (a keyed PRF; a 32-bit value mod 4093 favours some slots by
under 1e-6), so each slot carries 1/M of the flows and its interval of the
partition stands for them: balance, disruption and agreement are exact
at the table level (a flow moves iff its slot's owner changes), with no
sampling.  Two rows, because mh's table depends on the order of the
destination list and ``ipvsadm -a`` adds at the head of it:

- "ipvs mh, kdsr order": the list in kdsr's canonical (sorted) order, which
  kdsr converges every director to: directors agree whatever their history;
- "ipvs mh, insertion history": the list that adding the servers one by one
  gives (each at the head), as plain ipvsadm use does; the second director
  of the agreement column added them in shuffled order, and an added server
  lands at the head.

Strategies are plain objects in ``STRATEGIES``; another engine adds its own
with ``run(strategies=...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdsr import maglev  # noqa: E402
from kdsr.compile import compile_node  # noqa: E402
from kdsr.compile.selectors import default_table_size, selectors_for  # noqa: E402
from kdsr.intent import parse_intent  # noqa: E402
from kdsr.intent.model import DEFAULT_HASH_SEED  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import ipvs_mh_model  # noqa: E402

SPACE = maglev.HASH_SPACE
SIZES = (3, 16, 100, 1000)
SEED = DEFAULT_HASH_SEED
DEFAULT_JSON = ROOT / "bench" / "results" / "maglev.json"


# --------------------------------------------------------------------------
# Partitions of the hash space


@dataclass(frozen=True)
class Partition:
    """``owners[i]`` gets the hashes in [starts[i], starts[i + 1]); starts[-1] == 2^32."""

    starts: tuple[int, ...]
    owners: tuple[str, ...]

    def shares(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, owner in enumerate(self.owners):
            out[owner] = out.get(owner, 0) + (self.starts[i + 1] - self.starts[i]) / SPACE
        return out


def from_table(table: Sequence[str]) -> Partition:
    size = len(table)
    starts = tuple(-(-s * SPACE // size) for s in range(size)) + (SPACE,)
    return Partition(starts, tuple(table))


def moved(a: Partition, b: Partition) -> float:
    """Fraction of the hash space whose owner differs between a and b."""
    total = 0
    i = j = 0
    position = 0
    while position < SPACE:
        end = min(a.starts[i + 1], b.starts[j + 1])
        if a.owners[i] != b.owners[j]:
            total += end - position
        position = end
        if a.starts[i + 1] == end:
            i += 1
        if b.starts[j + 1] == end:
            j += 1
    return total / SPACE


# --------------------------------------------------------------------------
# Strategies


Servers = Sequence[tuple[str, int]]  # (key, weight), in the order a load balancer lists them


@dataclass(frozen=True)
class Strategy:
    name: str
    build: Callable[[Servers, int], Partition]  # (servers, table size for the *original* N) -> partition
    size_for: Callable[[int], int | None]  # N -> table size (None: no table)
    note: str = ""


def kdsr_default_size(n: int) -> int:
    """kdsr's default table size for a pool of n servers (compile/selectors.py)."""
    return default_table_size(n)[0]


def maglev_build(servers: Servers, size: int) -> Partition:
    backends = [maglev.Backend(key, weight) for key, weight in servers]
    return from_table(maglev.build(backends, size, SEED))


def maglev_default_size_build(servers: Servers, _size: int) -> Partition:
    # The default recomputed for the new member count, as compile does.
    return maglev_build(servers, kdsr_default_size(len(servers)))


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def ring_build(servers: Servers, _size: int, vnodes: int = 100) -> Partition:
    """Consistent hashing on a ring: vnodes points per unit of weight; a hash goes to the next point."""
    points = sorted((_point(f"{key}#{i}"), key) for key, weight in servers for i in range(vnodes * weight))
    # [0, p0] and (p_last, 2^32) belong to the first point, (p_i-1, p_i] to point i.
    starts = [0] + [points[i - 1][0] + 1 for i in range(1, len(points))] + [points[-1][0] + 1]
    owners = [points[0][1]] + [points[i][1] for i in range(1, len(points))] + [points[0][1]]
    merged_starts: list[int] = []
    merged_owners: list[str] = []
    for index, (start, owner) in enumerate(zip(starts, owners, strict=True)):
        end = starts[index + 1] if index + 1 < len(starts) else SPACE
        if start >= end:
            continue  # an empty arc (two equal points)
        if merged_owners and merged_owners[-1] == owner:
            continue
        merged_starts.append(start)
        merged_owners.append(owner)
    return Partition(tuple(merged_starts) + (SPACE,), tuple(merged_owners))


SH_BUCKETS = 256  # IPVS sh: CONFIG_IP_VS_SH_TAB_BITS = 8


def sh_build(servers: Servers, _size: int) -> Partition:
    """IPVS sh: 256 buckets filled round-robin over the destination list (weight w: w buckets in a row)."""
    turns = [key for key, weight in servers for _ in range(weight)]
    return from_table([turns[b % len(turns)] for b in range(SH_BUCKETS)])


IPVS_PORT = 80  # the destinations' port: mh hashes it into each destination's permutation


def _ipvs_mh_partition(servers: Servers) -> Partition:
    table = ipvs_mh_model.MhTable([(key, IPVS_PORT, weight) for key, weight in servers])
    return from_table(table.owners())


def ipvs_mh_kdsr_build(servers: Servers, _size: int) -> Partition:
    """IPVS mh with the list in kdsr's canonical order, whatever order the servers come in."""
    return _ipvs_mh_partition(ipvs_mh_model.kdsr_order(servers))


def ipvs_mh_history_build(servers: Servers, _size: int) -> Partition:
    """IPVS mh after ``ipvsadm -a`` of the servers in the given order (each new one at the list's head)."""
    return _ipvs_mh_partition(ipvs_mh_model.list_after_inserts(("add", server) for server in servers))


STRATEGIES = [
    Strategy("kdsr maglev", maglev_build, kdsr_default_size, "table size fixed across the change"),
    Strategy(
        "kdsr maglev, default M after",
        maglev_default_size_build,
        kdsr_default_size,
        "kdsr's default size, recomputed after the change",
    ),
    Strategy("ring, 100 vnodes", ring_build, lambda n: None),
    Strategy(
        "modulo (IPVS sh)",
        sh_build,
        lambda n: SH_BUCKETS,
        "256 buckets filled round-robin in list order; above 256 servers most get no flows at all",
    ),
    Strategy(
        "ipvs mh, kdsr order",
        ipvs_mh_kdsr_build,
        lambda n: ipvs_mh_model.TAB_SIZE,
        "model of the kernel's ip_vs_mh.c, M = 4093 (Debian), destination list in kdsr's sorted order",
    ),
    Strategy(
        "ipvs mh, insertion history",
        ipvs_mh_history_build,
        lambda n: ipvs_mh_model.TAB_SIZE,
        "the same, list from adding the servers one by one (ipvsadm -a puts each at the head); "
        "agree: the other director added them in shuffled order",
    ),
]


# --------------------------------------------------------------------------
# Measurements


def address(i: int) -> str:
    return f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"


def servers_of(n: int, weights: Callable[[int], int] = lambda i: 1) -> list[tuple[str, int]]:
    return [(address(i + 1), weights(i)) for i in range(n)]


def measure(strategy: Strategy, n: int) -> dict:
    size = strategy.size_for(n)
    servers = servers_of(n)
    base = strategy.build(servers, size)
    shares = base.shares()
    mean = 1 / n
    values = [shares.get(key, 0.0) for key, _ in servers]
    per_server = (size // n) if size else None
    balance_goal = 1 + 1 / per_server if per_server else None

    removed_key = servers[n // 2][0]
    without = strategy.build([s for s in servers if s[0] != removed_key], size)
    with_one = strategy.build(servers + [(address(n + 1), 1)], size)
    remove_moved, add_moved = moved(base, without), moved(base, with_one)

    weighted = servers_of(n, lambda i: 1 + i % 4)
    wshares = strategy.build(weighted, size).shares()
    total = sum(w for _, w in weighted)
    weight_dev = max(abs(wshares.get(k, 0.0) / (w / total) - 1) for k, w in weighted)

    # A second load balancer that lists the servers in another order (a
    # different history); the shuffle is bounded and never the same order.
    shuffled = list(servers)
    rng = random.Random(n)
    for _ in range(100):
        rng.shuffle(shuffled)
        if shuffled != servers:
            break
    agreement = 1 - moved(base, strategy.build(shuffled, size))

    return {
        "strategy": strategy.name,
        "n": n,
        "table_size": size,
        "max_over_mean": max(values) / mean,
        "min_over_mean": min(values) / mean,
        "balance_goal": balance_goal,
        "remove_moved": remove_moved,
        "remove_goal": 1 / n + 0.01,
        "add_moved": add_moved,
        "add_goal": 1 / (n + 1) + 0.01,
        "weights_worst_deviation": weight_dev,
        "weights_goal": 0.01,
        "agreement": agreement,
    }


def build_time(n: int = 100, size: int = 65537, repeat: int = 3) -> float:
    backends = [maglev.Backend(key, weight) for key, weight in servers_of(n)]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        maglev.build(backends, size, SEED)
        best = min(best, time.perf_counter() - started)
    return best


def intent_of_pools(pools: int, servers_per_pool: int) -> str:
    doc = {
        "version": 1,
        "services": {},
        "pools": {},
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.255.255.254/8"]}},
    }
    first = 1
    for p in range(pools):
        name = f"p{p}"
        doc["services"][f"s{p}"] = {"vip": f"10.200.{p // 250}.{p % 250 + 1}", "ports": 80, "pool": name}
        doc["pools"][name] = {"servers": [{"address": address(first + i)} for i in range(servers_per_pool)]}
        first += servers_per_pool
    return json.dumps(doc)


def intent_compile_time(pools: int = 1000, servers_per_pool: int = 3) -> dict:
    text = intent_of_pools(pools, servers_per_pool)
    started = time.perf_counter()
    intent = parse_intent(text, "bench.json")
    parsed = time.perf_counter()
    desired = compile_node(intent, "lb1")
    compiled = time.perf_counter()
    slots = sum(len(m.elements) for t in desired.tables for m in t.maps if m.name.startswith("pool-"))
    return {
        "pools": pools,
        "servers_per_pool": servers_per_pool,
        "selectors": len(selectors_for(intent)),
        "slot_elements": slots,
        "load_and_verify_s": parsed - started,
        "compile_s": compiled - parsed,
    }


def run(strategies: Sequence[Strategy] = STRATEGIES, sizes: Sequence[int] = SIZES) -> dict:
    rows = [measure(s, n) for n in sizes for s in strategies]
    return {
        "seed": SEED,
        "rows": rows,
        "build_time_n100_m65537_s": build_time(),
        "intent_1000_pools": intent_compile_time(),
        "notes": {s.name: s.note for s in strategies if s.note},
    }


# --------------------------------------------------------------------------
# Output


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def _mark(value: float, goal: float | None, lower_is_better: bool = True) -> str:
    if goal is None:
        return " "
    ok = value <= goal + 1e-12 if lower_is_better else value >= goal - 1e-12
    return " " if ok else "!"


def format_table(results: dict) -> str:
    header = (
        f"{'strategy':<28} {'N':>5} {'M':>6} {'max/mean':>9} {'min/mean':>9} {'goal':>7} "
        f"{'remove':>8} {'goal':>7} {'add':>8} {'goal':>7} {'w 1..4':>7} {'agree':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results["rows"]:
        goal = f"{r['balance_goal']:.4f}" if r["balance_goal"] else "-"
        lines.append(
            f"{r['strategy']:<28} {r['n']:>5} {r['table_size'] or '-':>6} "
            f"{r['max_over_mean']:>8.4f}{_mark(r['max_over_mean'], r['balance_goal'])} "
            f"{r['min_over_mean']:>9.4f} {goal:>7} "
            f"{_pct(r['remove_moved'])}{_mark(r['remove_moved'], r['remove_goal'])}{_pct(r['remove_goal'])} "
            f"{_pct(r['add_moved'])}{_mark(r['add_moved'], r['add_goal'])}{_pct(r['add_goal'])} "
            f"{_pct(r['weights_worst_deviation'])}{_mark(r['weights_worst_deviation'], r['weights_goal'])}"
            f"{_pct(r['agreement'])}"
        )
    lines.append("")
    lines.append(
        "! = misses the issue's goal.  remove/add: flows whose server changes; w 1..4: worst |share/fair - 1|;"
    )
    lines.append("agree: two load balancers listing the same servers in shuffled orders.")
    for name, note in results["notes"].items():
        lines.append(f"{name}: {note}.")
    lines.append("")
    lines.append(f"Maglev table build, N = 100, M = 65537: {1000 * results['build_time_n100_m65537_s']:.1f} ms")
    i = results["intent_1000_pools"]
    lines.append(
        f"Intent of {i['pools']} pools x {i['servers_per_pool']} servers: "
        f"load + verify {i['load_and_verify_s']:.2f} s, compile {i['compile_s']:.2f} s "
        f"({i['selectors']} tables, {i['slot_elements']} slot elements)"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results ({DEFAULT_JSON})")
    parser.add_argument("--quick", action="store_true", help="N in {3, 16} only (a smoke run)")
    args = parser.parse_args(argv)
    results = run(sizes=(3, 16) if args.quick else SIZES)
    print(format_table(results), end="")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
