"""Rise/fall state of one probe target, and of a server across its targets.

A target goes down after ``fall`` failed probes in a row and comes back
after ``rise`` successes in a row; any other result resets the count.  So a
server that flaps (alternate results, however fast) changes state at most
once per ``min(rise, fall)`` probes, and the table with it: that is the flap
damping.  A server is up when every one of its targets is up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UP = "up"
DOWN = "down"


@dataclass
class TargetState:
    rise: int
    fall: int
    state: str = UP  # a new target starts up: starting kdsr run never empties a table
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    since: float = 0.0  # wall-clock time of the last change (0: never changed)
    last_error: str = ""
    last_latency: float = 0.0
    probes: int = 0
    probes_failed: int = 0
    transitions: int = 0
    history: list[bool] = field(default_factory=list, repr=False)  # the last few results, newest last

    def record(self, ok: bool, error: str, latency: float, now: float) -> bool:
        """Count one probe result; True when the state changed."""
        self.probes += 1
        self.last_latency = latency
        self.history = [*self.history[-9:], ok]
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
            self.probes_failed += 1
            self.last_error = error
        if self.state == UP and self.failures >= self.fall:
            return self._change(DOWN, now)
        if self.state == DOWN and self.successes >= self.rise:
            return self._change(UP, now)
        return False

    def _change(self, state: str, now: float) -> bool:
        self.state, self.since = state, now
        self.transitions += 1
        return True

    def to_json(self) -> dict:
        return {
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "latency_ms": round(self.last_latency * 1000, 3),
            "probes": self.probes,
            "probes_failed": self.probes_failed,
            "transitions": self.transitions,
            "successes": self.successes,
            "failures": self.failures,
        }
