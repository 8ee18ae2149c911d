"""pytest glue for the namespace lab.

Puts netns-lab/ on sys.path (so tests `import lab`, whatever pytest's import
mode) and offers fixtures:

- `lab_available`: skips the test, with the reason, when namespaces, veth or
  bridges are unusable (not root, no `ip`, a locked-down container).
- `l2lab`: a fresh L2Lab per test, torn down afterwards even when the test
  fails. Set KDSR_LAB_KEEP=1 to leave it up for inspection; the commands to
  enter and delete it are printed.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

LAB_DIR = Path(__file__).resolve().parent
if str(LAB_DIR) not in sys.path:
    sys.path.insert(0, str(LAB_DIR))

import lab as netns_lab  # noqa: E402  (needs the path above)


@functools.cache
def _lab_unavailable_reason() -> str | None:
    # Probed once per session: it creates and deletes a throw-away namespace.
    return netns_lab.lab_unavailable_reason()


def require_lab() -> None:
    """Skip when the lab cannot run here; in CI (CI=true) fail instead.

    A lab test that skips in CI has not been run, and CI runs as root on a
    machine that can build namespaces: a skip there is a broken set-up.
    """
    reason = _lab_unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"lab unavailable in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_available() -> None:
    require_lab()


@pytest.fixture
def l2lab(lab_available, tmp_path):
    keep = os.environ.get("KDSR_LAB_KEEP") == "1"
    with netns_lab.L2Lab(keep=keep, workdir=tmp_path / "lab") as built:
        yield built
