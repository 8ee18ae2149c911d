"""The kernel counters for `kdsr run --metrics`, read by a process of their own.

A read lists the whole ``netdev kdsr`` table (libnftables 1.0.6 has no
cheaper way to the element counters) and turns it into `kdsr show`'s rows.
At 10,000 VIPs that is tens of MB of JSON, decoded and walked in Python:
done in a thread of the daemon, it held the interpreter lock for seconds at
a time, so scrapes (served by another thread) and the daemon's own health
loop waited behind it (bench/metrics_scrape.py).  A child process does the
listing and the walk; the daemon reads back only the rows, a small part of
the listing, and renders them.

The child is ``python -m kdsr.health.counter_reader STATE_DIR NODE``: it
inherits the daemon's network namespace and privileges, reads what `kdsr
show` reads (operations.show, no intent), and prints the report as JSON.
IPVS keeps no names, so with ``--ipvs-labels`` it reads on stdin what each
of kdsr's IPVS services stands for in the daemon's intent (its service and
pool: lb_ipvs.service_labels), as `kdsr show INTENT` has them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kdsr import operations
from kdsr.kernel.state import StateStore
from kdsr.kernel.system import SystemKernel

# The directory this kdsr package is in: the child imports the very code
# the daemon runs, wherever the daemon was started from.
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)

# A read that takes longer than this is stopped (and counted as failed):
# the next scrape starts another.
READ_TIMEOUT_S = 300.0


class CounterReadError(RuntimeError):
    pass


def _command(state_dir: str, node: str) -> list[str]:
    return [sys.executable, "-m", "kdsr.health.counter_reader", str(state_dir), node, "--ipvs-labels"]


def read(
    state_dir: str, node: str, timeout: float = READ_TIMEOUT_S, ipvs_labels: dict[str, dict[str, str]] | None = None
) -> dict:
    """The report of one read, made by a child process (see the module
    docstring); ``ipvs_labels``: lb_ipvs.service_labels of the daemon's intent."""
    command = _command(state_dir, node)
    path = os.pathsep.join(p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    labels = json.dumps(ipvs_labels or {}, separators=(",", ":")).encode()
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as child:
        try:
            out, err = child.communicate(labels, timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()  # ours, by its pid
            child.communicate()
            raise CounterReadError(f"the counter read took longer than {timeout:g} s") from None
    if child.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {child.returncode}"]
        raise CounterReadError(f"the counter read failed: {last[0]}")
    return json.loads(out)


def main(argv: list[str]) -> int:
    state_dir, node, *options = argv
    labels = json.load(sys.stdin) if options == ["--ipvs-labels"] else None
    report = operations.show(SystemKernel(), StateStore(state_dir), node, ipvs_labels=labels)
    json.dump(report, sys.stdout, separators=(",", ":"), default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
