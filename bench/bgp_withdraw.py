#!/usr/bin/env python3
"""BGP withdraw bench: from `kdsr run`'s health decision to the router's FIB.

    sudo .venv/bin/python bench/bgp_withdraw.py [--trials 15] [--json bench/results/bgp_withdraw.json]

Builds the BGP lab (netns-lab/bgplab.py: real BIRD on a router and the load
balancers), applies an active-active VIP on lb1 and lb2 and runs `kdsr run`
on lb1 with a tcp check (interval 0.5 s, timeout 0.3 s, fall 2, rise 2).
Per trial the servers drop lb1's probes: lb1 sees every server down and
withdraws the VIP; then they answer again and lb1 announces it again.  The
bench polls the router's FIB for the VIP every 10 ms and reports, from the
daemon's last `event=health` line of the change (the decision) to the FIB
without lb1 (withdraw) or with it again (announce), and the daemon's apply
time for that change.  Prints a table with median and max; not a timed test
(the figures depend on the machine).
"""

from __future__ import annotations

import argparse
import calendar
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "netns-lab"))

import bgplab  # noqa: E402
import lab as netns_lab  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "bgp_withdraw.json"
LBS = {"lb1": "10.10.0.2", "lb2": "10.10.0.3"}
SERVERS = {"s1": "10.10.0.11", "s2": "10.10.0.12", "s3": "10.10.0.13"}
PORT = 80
POLL = 0.01


def intent(lab: bgplab.BgpLab) -> dict:
    load_balancers = {}
    for lb, address in LBS.items():
        paths = lab.bird_paths(lb)
        load_balancers[lb] = {
            "interface": "eth0",
            "addresses": [f"{address}/24"],
            "bgp": {
                "asn": bgplab.LB_ASN,
                "router_id": address,
                "hold_time": bgplab.HOLD_TIME,
                "neighbors": [{"address": bgplab.ROUTER_ADDRESS, "asn": bgplab.ROUTER_ASN}],
                "bird": {k: str(paths[k]) for k in ("config", "fragment", "socket")},
            },
        }
    health = {"type": "tcp", "interval": 0.5, "timeout": 0.3, "fall": 2, "rise": 2}
    return {
        "version": 1,
        "services": {
            "web": {
                "vip": bgplab.VIP,
                "ports": PORT,
                "protocols": "tcp",
                "pool": "web",
                "health": health,
                "announce": {"mode": "active-active"},
            }
        },
        "pools": {"web": {"servers": [{"node": s} for s in SERVERS]}},
        "load_balancers": load_balancers,
        "servers": {s: {"interface": "eth0", "addresses": [f"{a}/24"]} for s, a in SERVERS.items()},
    }


def kdsr(lab: bgplab.BgpLab, workdir: Path, host: str, *args: str) -> None:
    argv = [netns_lab.PYTHON, "-m", "kdsr", "--state-dir", str(workdir / "state" / host), *args]
    result = lab.run(host, argv, check=False, cwd=ROOT, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"kdsr {' '.join(args)} in {host}: {result.stdout}\n{result.stderr}")


def block(lab: bgplab.BgpLab, on: bool) -> None:
    """The servers drop TCP from lb1 to the service: its probes fail, nothing else does."""
    for server in SERVERS:
        if on:
            batch = (
                "table inet labblock {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
                f"  ip saddr {LBS['lb1']} tcp dport {PORT} drop\n }}\n}}\n"
            )
            lab.run(server, ["nft", "-f", "-"], input=batch)
        else:
            lab.run(server, ["nft", "delete", "table", "inet", "labblock"])


def wait_fib(lab: bgplab.BgpLab, expected: set[str], timeout: float = 20.0) -> float:
    """Wall-clock time the router's next hops for the VIP were first seen as ``expected``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.router_nexthops(bgplab.VIP_PREFIX) == expected:
            return time.time()
        time.sleep(POLL)
    raise SystemExit(f"router next hops not {sorted(expected)} within {timeout:g} s")


def events(log: str) -> list[dict]:
    found = []
    for line in log.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "ts" in fields and "event" in fields:
            ts = fields["ts"]
            fields["t"] = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float(ts[19:-1])
            found.append(fields)
    return found


def measure(daemon, since: float, seen: float, state: str) -> tuple[float, float]:
    """(decision -> FIB seconds, apply seconds) of the change the FIB showed
    at ``seen``: the decision is the health event that made lb1 see no
    server (the last ``down``) or one again (the first ``up`` since ``since``)."""
    deadline = time.monotonic() + 10
    while True:
        log = events(daemon.stderr())
        decided = [e for e in log if e["event"] == "health" and e.get("state") == state and since <= e["t"] <= seen]
        decision = decided[-1] if state == "down" else decided[0]
        applied = [e for e in log if e["event"] == "applied" and e["t"] >= decision["t"]]
        if applied or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # the daemon logs an apply when it is over
    return seen - decision["t"], float(applied[0]["seconds"]) if applied else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    reason = netns_lab.lab_unavailable_reason() or bgplab.bird_unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    rows = []
    with bgplab.BgpLab() as lab:
        workdir = Path(lab.workdir)
        path = workdir / "intent.json"
        path.write_text(json.dumps(intent(lab)))
        for server in SERVERS:
            lab.start_responder(server, tcp_ports=[PORT], max_seconds=60 + 30 * args.trials)
            kdsr(lab, workdir, server, "apply", str(path), "--node", server)
        for lb in LBS:
            kdsr(lab, workdir, lb, "apply", str(path), "--node", lb)
        run = [netns_lab.PYTHON, "-m", "kdsr", "--state-dir", str(workdir / "state" / "lb1"), "run", str(path)]
        daemon = lab.spawn("lb1", [*run, "--node", "lb1"], tag="kdsr-run")
        wait_fib(lab, set(LBS.values()))
        for number in range(args.trials):
            blocked = time.time()
            block(lab, True)
            gone = wait_fib(lab, {LBS["lb2"]})
            withdraw, withdraw_apply = measure(daemon, blocked, gone, "down")
            unblocked = time.time()
            block(lab, False)
            back = wait_fib(lab, set(LBS.values()))
            announce, announce_apply = measure(daemon, unblocked, back, "up")
            time.sleep(2)  # every server up again before the next trial
            rows.append(
                {
                    "withdraw_s": round(withdraw, 3),
                    "withdraw_apply_s": withdraw_apply,
                    "announce_s": round(announce, 3),
                    "announce_apply_s": announce_apply,
                }
            )
            print(f"trial {number + 1}: {rows[-1]}", file=sys.stderr)
        daemon.stop()
    print(f"{'':28} {'median':>8} {'max':>8}")
    for key, title in (
        ("withdraw_s", "withdraw: decision -> FIB"),
        ("withdraw_apply_s", "  its apply"),
        ("announce_s", "announce: decision -> FIB"),
        ("announce_apply_s", "  its apply"),
    ):
        values = [row[key] for row in rows]
        print(f"{title:28} {statistics.median(values):8.3f} {max(values):8.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"trials": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
