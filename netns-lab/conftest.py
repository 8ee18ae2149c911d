"""pytest glue for the namespace lab.

Puts netns-lab/ on sys.path (so tests `import lab`, whatever pytest's import
mode) and offers fixtures:

- `lab_available`: skips the test, with the reason, when namespaces, veth or
  bridges are unusable (not root, no `ip`, a locked-down container).
- `l2lab`: a fresh L2Lab per test, torn down afterwards even when the test
  fails. Set KDSR_LAB_KEEP=1 to leave it up for inspection; the commands to
  enter and delete it are printed.
- `netns`: a fullkernel.Namespaces per test (namespaces named by the test,
  deleted by name afterwards; KDSR_LAB_KEEP=1 keeps them).

Full-kernel tier (`@pytest.mark.full_kernel`, tests that need ip_vs, ip_vs_mh,
ipip, ip_gre or ip6_tunnel): on a host kernel without them these tests are
deselected, with a one-line note, and netns-lab/guest_tier.py runs them in a
virtme-ng guest on Debian's full kernel (`make test` does both). Inside that
guest (KDSR_IN_GUEST=1) only full_kernel tests run, and a missing feature or
an unusable lab fails them rather than skipping. On a host kernel that has
the features they run in the host tier.
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

import fullkernel  # noqa: E402
import lab as netns_lab  # noqa: E402  (needs the path above)

_NOTES = pytest.StashKey[list]()


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
        if os.environ.get("CI", "").lower() in ("1", "true", "yes") or fullkernel.in_guest():
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


@pytest.fixture
def netns():
    keep = os.environ.get("KDSR_LAB_KEEP") == "1"
    with fullkernel.Namespaces(keep=keep) as nss:
        yield nss


# --------------------------------------------------------------------------
# Full-kernel tier


@functools.cache
def _kernel_tier() -> fullkernel.KernelTier:
    # Probed once per session, and only when full_kernel tests were collected.
    return fullkernel.probe()


def pytest_collection_modifyitems(config, items):
    full = [item for item in items if item.get_closest_marker("full_kernel")]
    if fullkernel.in_guest():
        keep, drop = full, [item for item in items if not item.get_closest_marker("full_kernel")]
        note = f"{fullkernel.IN_GUEST_ENV}=1: {len(drop)} non-full_kernel tests deselected (they run in the host tier)"
    else:
        if not full or _kernel_tier().capable:
            return
        keep, drop = [item for item in items if not item.get_closest_marker("full_kernel")], full
        note = (
            f"full_kernel: {len(drop)} tests deselected here ({_kernel_tier().describe()}); "
            "they run in the virtme-ng guest tier (netns-lab/guest_tier.py, `make lab-full`)"
        )
    if drop:
        items[:] = keep
        config.hook.pytest_deselected(items=drop)
        config.stash.setdefault(_NOTES, []).append(note)


def pytest_runtest_setup(item):
    if item.get_closest_marker("full_kernel") is None:
        return
    require_lab()
    tier = _kernel_tier()
    if not tier.capable:
        # Only reachable in the guest (or with a kernel that changed under us):
        # a full-kernel test that cannot run there is a broken tier, not a skip.
        pytest.fail(f"full_kernel test on a kernel without the features: {'; '.join(tier.details())}")


def pytest_terminal_summary(terminalreporter, config):
    for note in config.stash.get(_NOTES, []):
        terminalreporter.write_line(note)


def pytest_runtest_logreport(report):
    # In the guest, print a failure's traceback as soon as it happens: if the
    # tier times out and the guest is killed, pytest's end-of-run FAILURES
    # section (and junit.xml) never arrive, and this is all the CI log has.
    if fullkernel.in_guest() and report.failed:
        print(f"\n----- {report.when} failed: {report.nodeid}\n{report.longreprtext}\n-----", flush=True)
