#!/usr/bin/env python3
"""What each part of the incremental reload buys ``kdsr run`` on an edit.

    .venv/bin/python bench/reload_parts.py [--vips 10000] [--rounds 7]

No root, no kernel: it loads the bench intent of bench/control_plane.py
(N VIPs, pools of 16 servers), then times a reload of the same file with
one server's weight edited, the way ``kdsr run`` does on SIGHUP
(``kdsr.intent.reload.Reloader``), in four variants side by side, round by
round:

- ``incremental``: the Reloader as shipped: the JSON text parsed again only
  where it changed (intent/json_entries.py), the schema checked and the
  model built per changed entry (intent/reload.py), the cross-object rules
  run on what the edit can reach (intent/reverify.py);
- ``stdlib json``: the same, but the whole text parsed by ``json`` (the
  library json_entries.py stands in for);
- ``whole verify``: the same, but verify run on the whole document;
- ``whole reload``: ``load.parse_intent``, what a reload without any of the
  three is (jsonschema-rs and jsonschema for the schema, the whole build).

The daemon's goal for an edit, end to end, is 150 ms at 10,000 VIPs
(docs/performance.md); the reload is one part of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from control_plane import bench_intent, with_weight  # noqa: E402

from kdsr.intent import json_entries, load, reload  # noqa: E402
from kdsr.intent import verify as rules  # noqa: E402

VARIANTS = ("incremental", "stdlib json", "whole verify", "whole reload")


def _unreadable(*_args, **_kwargs):
    raise json_entries.Unreadable("bench: parse the whole text")


def _whole_verify(_self, doc, source):
    return rules.verify(doc, source)


def time_variant(variant: str, texts: list[str], source: str) -> float:
    """Seconds for the reload of ``texts[1]`` after ``texts[0]`` was loaded."""
    if variant == "whole reload":
        load.parse_intent(texts[0], source)
        start = time.perf_counter()
        load.parse_intent(texts[1], source)
        return time.perf_counter() - start
    patches = []
    if variant == "stdlib json":
        patches.append(mock.patch.object(json_entries, "read", _unreadable))
    if variant == "whole verify":
        patches.append(mock.patch.object(reload._Since, "verify", _whole_verify))
    for patch in patches:
        patch.start()
    try:
        reloader = reload.Reloader()
        reloader.parse(texts[0], source)
        start = time.perf_counter()
        reloader.parse(texts[1], source)
        return time.perf_counter() - start
    finally:
        for patch in patches:
            patch.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vips", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    doc = bench_intent(args.vips, 16, "nft")
    before = json.dumps(doc, indent=1)
    after = json.dumps(with_weight(json.loads(before), "p0", 0, 3), indent=1)
    source = "bench-intent.json"
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            times[variant].append(time_variant(variant, [before, after], source))
    base = statistics.median(times["incremental"])
    print(f"reload after one weight change, {args.vips} VIPs, median of {args.rounds} rounds (interleaved)")
    print(f"{'variant':<16}{'median ms':>12}{'min ms':>10}{'x incremental':>16}")
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        print(f"{variant:<16}{med * 1000:>12.1f}{min(times[variant]) * 1000:>10.1f}{med / base:>16.1f}")


if __name__ == "__main__":
    main()
