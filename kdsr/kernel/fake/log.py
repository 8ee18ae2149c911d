"""What every fake backend of one FakeKernel shares: the writes they
received, in order, and the fault to inject."""

from __future__ import annotations

from kdsr.kernel import KernelError


class FakeLog:
    def __init__(self) -> None:
        self.writes = 0
        self.ops: list[str] = []  # one line per write, for assertions
        self.fail_at: int | None = None  # fail the write with this 1-based number
        self.fail_message = "EBUSY (injected)"

    def write(self, what: str) -> None:
        """Count (and record) a write, or refuse it when it is the one ``fail_at`` names."""
        number = self.writes + 1
        if self.fail_at is not None and number == self.fail_at:
            self.fail_at = None  # one fault; the rollback that follows succeeds
            raise KernelError(f"{what}: {self.fail_message}")
        self.writes = number
        self.ops.append(what)
