"""The service manager's notification protocol (``sd_notify(3)``) for ``kdsr run``.

Under systemd with ``Type=notify`` (contrib/kdsr.service) the daemon says:

- ``READY=1`` once the first apply was verified (read back from the kernel,
  or nothing to change) and its control socket listens (``release()``):
  units ordered after kdsr.service start only then;
- ``WATCHDOG=1`` from the main loop while it turns (``WatchdogSec=``): a loop
  stuck in an apply or a lock is restarted by systemd;
- ``RELOADING=1`` on SIGHUP and ``READY=1`` again when the reload is done;
- ``STOPPING=1`` on SIGTERM;
- ``STATUS=`` one line: what the last apply did, or why it failed
  (``systemctl status kdsr`` shows it).

Each message is one datagram to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).
Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every
call is a no-op.  A message that cannot be sent is dropped: the protocol
is advisory, and kdsr's work does not depend on it.

Standard library, not a binding: Debian's python3-systemd (235) wraps
libsystemd's ``sd_notify`` but has no ``sd_watchdog_enabled``, so
``WATCHDOG_USEC``/``WATCHDOG_PID`` would be parsed here anyway; it is a C
extension that ``pip install`` of kdsr would have to build against
libsystemd-dev, and the protocol it would save is one ``sendto``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

# The longest STATUS= kdsr sends; systemd keeps a status line, not a report.
STATUS_MAX = 200


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock (systemd 254+) and other forms are not for a system service


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None (no watchdog for this process)."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # another process's watchdog: this one inherited the environment
    return int(usec) / 1_000_000


class Notifier:
    """READY/WATCHDOG/RELOADING/STOPPING/STATUS to ``$NOTIFY_SOCKET``; every method is safe to call at any time."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None, held: bool = False) -> None:
        """``held``: READY=1 waits for ``release()`` as well as for a verified
        apply (`kdsr run` releases it once its control socket and metrics listen)."""
        self.address = address
        self.watchdog_seconds = watchdog
        self.ready = False  # READY=1 was sent: the first apply was verified
        self.reloading = False  # RELOADING=1 was sent and its READY=1 not yet
        self.held = held
        self._pending: str | None = None  # a verified apply's status, waiting for release()
        self._status = ""
        self._last_watchdog = 0.0

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None, held: bool = False) -> Notifier:
        env = os.environ if env is None else env
        address = _address(env.get("NOTIFY_SOCKET", ""))
        return cls(address, watchdog_interval(env, os.getpid()) if address else None, held)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when it could not be sent (dropped)."""
        if self.address is None:
            return False
        message = "\n".join(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError:
            return False
        return True

    # --- what the daemon calls ---------------------------------------------------

    def verified(self, status: str) -> None:
        """The kernel was verified against the intent: READY=1 the first time
        (and at the end of a reload), else the new status."""
        if self.held and not self.ready:
            self._pending = status
            return
        if not self.ready or self.reloading:
            self._status = _line(status)
            if self.send("READY=1", f"STATUS={self._status}"):
                self.ready, self.reloading = True, False
            return
        self.status(status)

    def release(self) -> None:
        """The rest of the service is up: READY=1 now if an apply was verified, else with the first that is."""
        self.held = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.verified(pending)

    def status(self, text: str) -> None:
        """STATUS=, when it changed."""
        text = _line(text)
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def reloading_started(self, status: str = "reloading the intent") -> None:
        """RELOADING=1, once ready (a reload before the first verified apply is part of starting)."""
        if self.ready and not self.reloading:
            self._status = _line(status)
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            if self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", f"STATUS={self._status}"):
                self.reloading = True

    def reload_finished(self, status: str) -> None:
        """READY=1 after RELOADING=1, whatever the reload's outcome (a failed
        reload keeps the running intent: the service is as ready as before)."""
        if self.reloading:
            self._status = _line(status)
            if self.send("READY=1", f"STATUS={self._status}"):
                self.reloading = False
        else:
            self.status(status)

    def watchdog(self) -> None:
        """WATCHDOG=1, at most four times per watchdog interval (systemd asks
        for at least one per interval; the loop turns far more often)."""
        if self.watchdog_seconds is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_seconds / 4:
            if self.send("WATCHDOG=1"):
                self._last_watchdog = now

    def watchdog_due_in(self) -> float | None:
        """Seconds until the next WATCHDOG=1 is due (for a loop that sleeps until something is due)."""
        if self.watchdog_seconds is None:
            return None
        return max(0.0, self._last_watchdog + self.watchdog_seconds / 4 - time.monotonic())

    def stopping(self, status: str = "stopping; the kernel stays as the last apply made it") -> None:
        self._status = _line(status)
        self.send("STOPPING=1", f"STATUS={self._status}")


def _line(text: str) -> str:
    text = " ".join(text.split())  # one line: systemd shows STATUS= as is
    return text if len(text) <= STATUS_MAX else text[: STATUS_MAX - 3] + "..."
