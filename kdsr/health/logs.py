"""How ``kdsr run`` writes its log lines: levels, JSON, journald priorities.

Every event has a level (``LEVELS``): info for what went as it should,
warning for what an operator should look at (a server down, a pool without
servers), error for what kdsr failed to do (an apply, a reload).

``--log-format text`` (default): ``ts=... event=... key=value``, one line
per event (kdsr/health/daemon.py ``log_line``).  ``--log-format json``: one
JSON object per line, ``{"ts": ..., "level": ..., "event": ..., fields}``,
for log shippers.

When stderr is the journal (systemd sets ``$JOURNAL_STREAM`` to its device
and inode), each line starts with the syslog priority, ``<6>`` info, ``<4>``
warning, ``<3>`` error: journald strips it and stores the priority, so
``journalctl -u kdsr -p warning`` shows the warnings and errors only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping

from kdsr.health.daemon import log_line, timestamp

INFO, WARNING, ERROR = "info", "warning", "error"
PRIORITY = {ERROR: 3, WARNING: 4, INFO: 6}  # syslog(3) LOG_ERR, LOG_WARNING, LOG_INFO
FORMATS = ("text", "json")

# Every event `kdsr run` logs (tests/test_logs.py holds the daemon to this table).
LEVELS = {
    "started": INFO,
    "applied": INFO,
    "reloaded": INFO,
    "metrics": INFO,
    "control": INFO,
    "drain": INFO,  # a drain or undrain asked of the daemon (kdsr drain while it runs)
    "undrain": INFO,
    "stopped": INFO,
    "health": INFO,  # WARNING when a server goes down: level_of
    "pool": WARNING,  # logged only when a pool has no server left to serve
    "drift-repaired": WARNING,
    "receipt-failed": WARNING,
    "apply-failed": ERROR,
    "reload-failed": ERROR,
}


def level_of(event: str, fields: Mapping[str, object]) -> str:
    if event == "health" and fields.get("state") == "down":
        return WARNING
    return LEVELS.get(event, INFO)


def json_line(event: str, fields: Mapping[str, object], ns: int | None = None) -> str:
    """One event as one line of JSON; fields that are None are left out, as in the text format."""
    record: dict[str, object] = {
        "ts": timestamp(time.time_ns() if ns is None else ns),
        "level": level_of(event, fields),
        "event": event,
    }
    for key, value in fields.items():
        if value is None or key in record:
            continue
        record[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def stderr_is_journal(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to journald ($JOURNAL_STREAM is "device:inode")."""
    env = os.environ if env is None else env
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def formatter(kind: str = "text", journal: bool | None = None) -> Callable[..., str]:
    """The daemon's ``log_format``: ``(event, **fields) -> line``.  ``journal``:
    prefix the syslog priority (default: when stderr is the journal)."""
    if kind not in FORMATS:
        raise ValueError(f"log format {kind!r}; one of {', '.join(FORMATS)}")
    if journal is None:
        journal = stderr_is_journal()

    def line(event: str, **fields: object) -> str:
        text = json_line(event, fields) if kind == "json" else log_line(event, **fields)
        return f"<{PRIORITY[level_of(event, fields)]}>{text}" if journal else text

    return line
