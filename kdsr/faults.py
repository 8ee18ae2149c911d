"""Crash points: where a test may SIGKILL a real apply.

The crash-convergence lab test (netns-lab/tests/test_safety_lab.py) runs
`kdsr apply` with KDSR_TEST_KILL_AT=N and the process kills itself with
SIGKILL at the N-th crash point it reaches: before each journaled step,
right after each ownership record is saved (before the write it announces),
before each ipvsadm batch (one per IPVS step), and after the last step.
Then `kdsr plan` and `kdsr apply` must converge.  Without the variable a
crash point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "KDSR_TEST_KILL_AT"
_reached = 0


def crash_point(where: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    global _reached
    _reached += 1
    if _reached == int(target):
        sys.stderr.write(f"kdsr: {ENV}={target}: killing myself at crash point {_reached}: {where}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
