"""The full-kernel tier's plumbing, without root or a guest: tier reports, kernel choice, guest script, results."""

from __future__ import annotations

import subprocess
from pathlib import Path

import fullkernel
import guest_tier


def test_tier_report_lines():
    capable = fullkernel.KernelTier("6.1.0-56-amd64")
    assert capable.capable and "has the full-kernel features" in capable.describe()
    lacking = fullkernel.KernelTier("6.18", {"ipip": "Unknown device type", "ip_vs": "no /proc/net/ip_vs"})
    assert not lacking.capable
    assert lacking.describe() == "kernel 6.18 lacks ipip, ip_vs"
    assert lacking.details() == ["ipip: Unknown device type", "ip_vs: no /proc/net/ip_vs"]
    unprobed = fullkernel.KernelTier("6.18", dict.fromkeys(fullkernel.MODULES, "x"), unprobed="probing needs root")
    assert "not probed" in unprobed.describe() and unprobed.details() == ["not probed: probing needs root"]


def test_newest_kernel_sorts_by_version(monkeypatch):
    names = ["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-56-amd64", "vmlinuz-6.1.0-10-amd64"]
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [Path("/boot") / n for n in names])
    assert guest_tier.newest_kernel() == Path("/boot/vmlinuz-6.1.0-56-amd64")


def test_guest_script_runs_only_full_kernel_tests_and_records_the_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("KDSR_SOMETHING", "a b")
    monkeypatch.setenv("KDSR_GUEST_TIMEOUT", "5")
    script = guest_tier.guest_script(tmp_path, "/venv/bin/python", ["-k", "ipip"])
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert guest_tier.BOOT_MARKER in script
    assert "export KDSR_IN_GUEST=1" in script
    assert "export CI=true" in script and "export KDSR_SOMETHING='a b'" in script
    assert "KDSR_GUEST_TIMEOUT" not in script  # the runner's own knobs stay outside
    assert "-m full_kernel" in script and f"--junitxml={tmp_path}/junit.xml" in script
    assert "netns-lab -k ipip" in script
    assert 'echo "$rc" > "$R/exit-code"' in script


def test_junit_counts(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="full_kernel" tests="5" failures="1" errors="0" skipped="1" time="28.2">'
        "</testsuite></testsuites>"
    )
    assert guest_tier.junit_counts(junit) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 1, "time": 28.2}
    assert guest_tier.junit_counts(tmp_path / "absent.xml") is None
