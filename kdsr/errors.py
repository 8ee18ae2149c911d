"""Errors a person can act on, and the exit codes scripts rely on."""

from __future__ import annotations

import json
from dataclasses import dataclass

# Exit codes (documented in README.md).
EXIT_OK = 0
EXIT_ERROR = 1  # kernel or runtime failure
EXIT_CHANGES = 2  # plan --detailed-exitcode: changes pending
EXIT_INVALID_INTENT = 3  # the intent file is malformed or inconsistent
EXIT_USAGE = 4  # wrong command line (unknown node, ambiguous node, ...)
EXIT_LOCKED = 5  # another kdsr run holds the lock
EXIT_ROLLED_BACK = 6  # apply failed part-way and was rolled back
EXIT_KERNEL_FEATURE = 7  # the host's kernel lacks what the intent needs
EXIT_FOREIGN = 8  # an object with a kdsr name exists that kdsr did not create
EXIT_PRIVILEGE = 9  # the command needs CAP_NET_ADMIN (root) and this process lacks it
EXIT_STALE_PLAN = 10  # apply --plan-file: the kernel changed since the plan was saved


# How much of a value from the user's file an error message quotes.  A
# megabyte-long value in a message would bury the one line that says what is wrong (and
# fill a terminal or a log shipper's line limit); a prefix and the length
# are enough to find it.
QUOTE_LIMIT = 60
# The last line of defence for text that reaches a message without quote().
MESSAGE_LIMIT = 1000


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A value from the intent as JSON text, cut to a prefix with its length when long."""
    if isinstance(value, str):
        if len(value) <= limit:
            return json.dumps(value)
        return f'{json.dumps(value[:limit])[:-1]}..." ({len(value):,} characters)'
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _short_pointer(pointer: str) -> str:
    """A JSON pointer whose over-long parts (keys from the file) are cut like quoted values."""
    if len(pointer) <= QUOTE_LIMIT * 2:
        return pointer
    return "/".join(_bounded(part, QUOTE_LIMIT) for part in pointer.split("/"))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an intent: where, what, and how to fix it."""

    source: str  # file name
    pointer: str  # JSON pointer, "" for the whole document
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: {_short_pointer(self.pointer) or '/'}"
        text = f"{where}: {_bounded(self.message, MESSAGE_LIMIT)}"
        if self.hint:
            text += f" {_bounded(self.hint, MESSAGE_LIMIT)}"
        return text


class KdsrError(Exception):
    exit_code = EXIT_ERROR


class IntentError(KdsrError):
    """The intent is invalid; carries every problem found, not just the first."""

    exit_code = EXIT_INVALID_INTENT

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(KdsrError):
    exit_code = EXIT_USAGE


class LockedError(KdsrError):
    exit_code = EXIT_LOCKED


class ApplyError(KdsrError):
    """A kernel write failed. ``rolled_back`` says whether the previous state is back."""

    def __init__(self, message: str, rolled_back: bool):
        self.rolled_back = rolled_back
        self.exit_code = EXIT_ROLLED_BACK if rolled_back else EXIT_ERROR
        super().__init__(message)


class KernelFeatureError(KdsrError):
    """The kernel lacks a module the intent needs (found before any write)."""

    exit_code = EXIT_KERNEL_FEATURE


class BirdUnavailableError(KdsrError):
    """The intent announces by BGP and BIRD is missing, stopped, or does not
    include kdsr's fragment (found before any write)."""

    exit_code = EXIT_KERNEL_FEATURE


class KeepalivedUnavailableError(KdsrError):
    """The intent owns a VIP by VRRP and keepalived is missing, stopped, or
    does not include kdsr's fragment (found before any write)."""

    exit_code = EXIT_KERNEL_FEATURE


class ForeignObjectError(KdsrError):
    """kdsr would have to take over an object it has no record of creating."""

    exit_code = EXIT_FOREIGN


class PrivilegeError(KdsrError):
    """The command reads or writes kernel network state and may not (found before anything)."""

    exit_code = EXIT_PRIVILEGE
