#!/usr/bin/env python3
"""Health reaction bench: how long a dead server keeps receiving new flows.

    sudo .venv/bin/python bench/health_reaction.py [--trials 10] [--json bench/results/health.json]

Builds the health lab (netns-lab/healthlab.py: the L2 lab, `kdsr run` on the
load balancer with a tcp dsr check, interval 1 s, timeout 0.5 s, fall 3,
rise 2), streams a new TCP flow every 20 ms from the client, and per trial
stops s2's listener: the reaction is the time from the stop to the last new
flow that still reached s2 (refused by its kernel).  Then the listener comes
back and the bench times the rejoin (stop of the outage to the health view's
"up").  Prints a table with median and max and the ratio to interval x fall;
not a timed test (the figures depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "netns-lab"))

import healthlab  # noqa: E402
import lab as netns_lab  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "health.json"


def trial(hl: healthlab.HealthLab) -> dict:
    stream = hl.stream(9)
    time.sleep(2)
    killed_at = time.time()
    hl.responders["s2"].stop()
    hl.wait_for(lambda: hl.state_of("web", "10.10.0.12") == "down", 20, "s2 down")
    flows = healthlab.flows_of(stream, 9)
    refused = [f["t"] for f in flows if not f["ok"] and "refused" in (f["error"] or "").lower()]
    reaction = (max(refused) - killed_at) if refused else 0.0
    lost = sum(1 for f in flows if not f["ok"])
    hl.start_responder("s2")
    back = time.monotonic()
    hl.wait_for(lambda: hl.state_of("web", "10.10.0.12") == "up", 20, "s2 up")
    return {
        "reaction_s": round(reaction, 3),
        "rejoin_s": round(time.monotonic() - back, 3),
        "failed_flows": lost,
        "flows": len(flows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    reason = netns_lab.lab_unavailable_reason()
    if reason:
        print(f"health bench needs the namespace lab: {reason}", file=sys.stderr)
        return 2
    window = healthlab.INTERVAL * healthlab.FALL
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="kdsr-health-bench-") as tmp,
        netns_lab.L2Lab(workdir=Path(tmp) / "lab", vips=healthlab.VIPS) as lab,
    ):
        hl = healthlab.deploy(lab, Path(tmp))
        try:
            for number in range(1, args.trials + 1):
                row = {"trial": number, **trial(hl)}
                row["ratio"] = round(row["reaction_s"] / window, 3)
                rows.append(row)
                print(
                    f"trial {number:>2}: reaction {row['reaction_s']:.2f} s ({row['ratio']:.2f} x interval x fall), "
                    f"rejoin {row['rejoin_s']:.2f} s, {row['failed_flows']} of {row['flows']} flows failed",
                    flush=True,
                )
            log = hl.log()
        finally:
            healthlab.teardown(hl)
    # Each health change's apply (plan + one nft transaction + read-back), as the daemon logged it.
    applies = [float(m) for m in re.findall(r"event=applied node=\S+ reason=health changes=\d+ seconds=([\d.]+)", log)]
    reactions = [r["reaction_s"] for r in rows]
    rejoins = [r["rejoin_s"] for r in rows]
    summary = {
        "interval_s": healthlab.INTERVAL,
        "timeout_s": healthlab.TIMEOUT,
        "fall": healthlab.FALL,
        "rise": healthlab.RISE,
        "bound_s": healthlab.REACTION_BOUND,
        "reaction_median_s": statistics.median(reactions),
        "reaction_max_s": max(reactions),
        "ratio_median": round(statistics.median(reactions) / window, 3),
        "ratio_max": round(max(reactions) / window, 3),
        "rejoin_median_s": statistics.median(rejoins),
        "rejoin_max_s": max(rejoins),
        "apply_count": len(applies),
        "apply_median_s": statistics.median(applies) if applies else None,
        "apply_max_s": max(applies) if applies else None,
        "trials": rows,
    }
    print()
    print(f"{'':<22}{'median':>8}{'max':>8}")
    print(f"{'reaction (s)':<22}{summary['reaction_median_s']:>8.2f}{summary['reaction_max_s']:>8.2f}")
    print(f"{'/ (interval x fall)':<22}{summary['ratio_median']:>8.2f}{summary['ratio_max']:>8.2f}")
    print(f"{'rejoin (s)':<22}{summary['rejoin_median_s']:>8.2f}{summary['rejoin_max_s']:>8.2f}")
    if applies:
        print(f"{'apply per change (s)':<22}{summary['apply_median_s']:>8.2f}{summary['apply_max_s']:>8.2f}")
    print(f"bound interval x fall + timeout + 0.5 = {healthlab.REACTION_BOUND:g} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
