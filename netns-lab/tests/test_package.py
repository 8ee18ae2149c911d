"""The Debian package, end to end on this host (host tier, root): `make deb`'s
build, `dpkg -i` + `apt-get -f install`, the installed CLI, man pages,
completion and unit, the L2 demo with /usr/bin/kdsr instead of this
checkout's, kdsr.service under systemd in a lab namespace, then a purge
that leaves nothing of kdsr behind.

Runs wherever it can (root, Debian's build tools from scripts/setup.sh); in
CI (CI=true) what it needs missing is a failure, not a skip.  It leaves a
kdsr that was installed before it alone (skipped: it would replace and
purge it), and removes the dependencies it installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import lab as netns_lab
import pytest
import systemdlab

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the package's programs, not a venv's or a pyenv's
SEARCHED = ("/etc", "/usr", "/var/lib")  # where a package's files live (/lib is /usr/lib)
TIMINGS: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("lab_available")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cannot(reason: str) -> None:
    if in_ci():
        pytest.fail(f"package check: {reason}")
    pytest.skip(reason)


def run(*argv: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive", **kwargs.pop("env", {})}
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def installed_packages() -> set[str]:
    out = run("dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n").stdout
    return {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}


def kdsr_files() -> set[str]:
    found = run("find", *SEARCHED, "-xdev", "-name", "*kdsr*", check=False).stdout
    return set(found.split())


def timed(name: str):
    class Timer:
        def __enter__(self):
            self.started = time.monotonic()

        def __exit__(self, *exc):
            TIMINGS[name] = time.monotonic() - self.started

    return Timer()


@pytest.fixture(scope="module")
def package():
    if os.geteuid() != 0:
        cannot("needs root (dpkg -i)")
    tools = ("dpkg-buildpackage", "dh", "apt-get", "man")
    missing = [tool for tool in tools if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        cannot(f"{', '.join(missing)} not installed; scripts/setup.sh installs the package's build tools")
    if "kdsr" in installed_packages():
        cannot("a kdsr package is installed on this host; the check would replace and purge it")
    if list(Path("/var/lib/kdsr").glob("*.json")):
        cannot("/var/lib/kdsr holds kdsr's records of this host; the purge would delete them")
    before_packages, before_files = installed_packages(), kdsr_files()
    brought: list[str] = []
    with timed("build"):
        deb = Path(run(str(ROOT / "scripts" / "deb.sh")).stdout.split()[-1])
    assert deb.name == f"kdsr_{VERSION}_all.deb" and deb.is_file()
    try:
        with timed("install"):
            # dpkg alone leaves kdsr unconfigured when a dependency is missing; apt fetches it.
            first = run("dpkg", "-i", str(deb), check=False)
            fixed = run("apt-get", "-f", "install", "-y", "-q", "--no-install-recommends", check=False)
            if fixed.returncode != 0 and "Unable to locate" in fixed.stderr + fixed.stdout:
                run("apt-get", "update", "-q")
                fixed = run("apt-get", "-f", "install", "-y", "-q", "--no-install-recommends", check=False)
        # What apt installed for kdsr (its Python dependencies, on a fresh machine), taken away afterwards.
        brought = sorted(installed_packages() - before_packages - {"kdsr"})
        assert "kdsr" in installed_packages(), f"dpkg -i:\n{first.stderr}\napt-get -f install:\n{fixed.stdout}"
        yield {"deb": deb, "files_before": before_files, "brought": brought}
    finally:
        if "kdsr" in installed_packages():
            run("dpkg", "--purge", "kdsr", check=False)
        if brought:
            run("apt-get", "purge", "-y", "-q", *brought, check=False)
        print(f"\npackage check timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}")


def test_the_package_installs_what_an_operator_expects(package):
    files = set(run("dpkg", "-L", "kdsr").stdout.split())
    expected = {
        "/usr/bin/kdsr",
        "/lib/systemd/system/kdsr.service",
        "/etc/kdsr/example.json",
        "/etc/kdsr/example.yaml",
        "/usr/share/kdsr/intent.schema.json",
        "/usr/share/kdsr/plan.schema.json",
        "/usr/share/man/man8/kdsr.8.gz",
        "/usr/share/man/man5/kdsr-intent.5.gz",
        "/usr/share/bash-completion/completions/kdsr",
        "/usr/share/zsh/vendor-completions/_kdsr",
        "/usr/lib/tmpfiles.d/kdsr.conf",
        "/usr/lib/python3/dist-packages/kdsr/cli.py",
    }
    assert expected - files == set()
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "kdsr").stdout
    assert "/etc/kdsr/example.json" in conffiles and "/etc/kdsr/example.yaml" in conffiles
    state = os.stat("/var/lib/kdsr")
    assert stat.S_ISDIR(state.st_mode) and stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == 0
    depends = run("dpkg-query", "-W", "-f", "${Depends}", "kdsr").stdout
    for name in (
        "python3-nftables",
        "python3-jsonschema",
        "python3-click",
        "python3-prometheus-client",
        "nftables",
        "iproute2",
    ):
        assert name in depends, depends


def test_the_installed_cli_man_pages_and_completion(package):
    assert run("/usr/bin/kdsr", "--version").stdout.strip() == f"kdsr, version {VERSION}"
    for example in ("/etc/kdsr/example.json", "/etc/kdsr/example.yaml"):
        assert "valid (4 services" in run("kdsr", "validate", example).stdout
    # Debian's interpreter and the installed module, not this checkout's.
    module = run("/usr/bin/python3", "-c", "import kdsr; print(kdsr.__file__)", cwd="/").stdout.strip()
    assert module == "/usr/lib/python3/dist-packages/kdsr/__init__.py"
    assert run("man", "-w", "kdsr").stdout.strip() == "/usr/share/man/man8/kdsr.8.gz"
    assert run("man", "-w", "5", "kdsr-intent").stdout.strip() == "/usr/share/man/man5/kdsr-intent.5.gz"
    page = run("man", "kdsr", env={"MANWIDTH": "100", "LC_ALL": "C.UTF-8"}).stdout
    assert "EXIT STATUS" in page and "kdsr run" in page and "--log-format" in page
    script = (
        "source /usr/share/bash-completion/completions/kdsr; COMP_WORDS=(kdsr run x.json --log-format ''); "
        'COMP_CWORD=4; _kdsr_completion kdsr; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    assert set(run("bash", "-c", script).stdout.split()) == {"text", "json"}


def test_the_installed_unit_verifies_clean_and_rates_ok(package):
    if shutil.which("systemd-analyze", path=SYSTEM_PATH) is None:
        cannot("systemd-analyze is not installed (Debian: systemd)")
    verify = run("systemd-analyze", "verify", "/lib/systemd/system/kdsr.service", check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    security = run("systemd-analyze", "security", "--offline=true", "/lib/systemd/system/kdsr.service").stdout
    score = re.search(r"Overall exposure level for kdsr\.service: (\d+\.\d+) (\w+)", security)
    print(f"\n{score.group(0)}")
    assert float(score.group(1)) <= 4.0


def test_the_l2_demo_with_the_installed_kdsr(package, tmp_path):
    with timed("l2 demo"):
        demo = subprocess.run(
            [sys.executable, str(ROOT / "netns-lab" / "demo.py"), "--kdsr", "/usr/bin/kdsr"]
            + ["--intent", "/etc/kdsr/example.json"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TMPDIR": str(tmp_path)},  # the demo's work directory, with pytest's
        )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "$ /usr/bin/kdsr apply example.json --node lb1" in demo.stdout
    assert "All checks held" in demo.stdout and "Second apply on lb1: No changes." in demo.stdout


def test_kdsr_service_runs_under_systemd_in_a_lab_namespace(package, tmp_path):
    """The installed unit as systemd 252 runs it, in the lab's load-balancer namespace:
    ready once the first apply is verified, the fast path serving, STATUS=, journald
    priorities, a reload, the watchdog fed by the loop and biting when it stops."""
    reason = systemdlab.unavailable_reason()
    if reason:
        cannot(reason)
    started = time.monotonic()
    intent = json.loads(Path("/etc/kdsr/example.json").read_text())
    intent_path = tmp_path / "intent.json"
    intent_path.write_text(json.dumps(intent))
    with netns_lab.L2Lab(workdir=tmp_path / "lab") as lab:
        for server in lab.SERVERS:
            lab.start_responder(server, tcp_ports=[80])
            lab.run(server, ["/usr/bin/kdsr", "--state-dir", str(tmp_path / server), "apply", str(intent_path)])
        binds = {str(intent_path): "/etc/kdsr/intent.json"}
        with systemdlab.Container(lab.ns("lb"), tmp_path / "container", binds, "kdsr.service") as box:
            up = box.wait_for("kdsr.service", lambda p: p["ActiveState"] in ("active", "failed"), 60, "kdsr started")
            assert up["ActiveState"] == "active" and up["SubState"] == "running", up
            assert up["StatusText"].startswith("verified (start): "), up
            assert up["WatchdogUSec"] == "30s" and up["NRestarts"] == "0"
            served = _served_by(lab, 30)
            assert served.keys() == {"s1", "s2", "s3"} and sum(served.values()) == 30, served

            # The sandbox as the kernel sees it: a read-only system, /proc/sys read-only but
            # for /proc/sys/net (the L3 and IPVS sysctls), the state directory writable.
            mounts = {}
            for line in box.run("cat", f"/proc/{up['MainPID']}/mountinfo").stdout.splitlines():
                fields = line.split()
                mounts[fields[4]] = fields[5].split(",")[0]
            assert mounts["/"] == "ro" and mounts["/proc/sys"] == "ro" and mounts["/proc/sys/net"] == "rw", mounts
            assert mounts["/var/lib/kdsr"] == "rw" and mounts.get("/etc/bird", "rw") == "rw", mounts

            # READY=1 came after the verified apply: systemd logged "Started" after kdsr's event=applied.
            journal = [json.loads(line) for line in box.run("journalctl", "-o", "json").stdout.splitlines()]
            messages = [(entry.get("PRIORITY"), entry.get("MESSAGE", "")) for entry in journal]
            applied = next(i for i, (_p, m) in enumerate(messages) if "event=applied" in m and "reason=start" in m)
            started_at = next(i for i, (_p, m) in enumerate(messages) if m.startswith("Started kdsr.service"))
            assert applied < started_at
            kdsr_lines = [
                e for e in journal if e.get("SYSLOG_IDENTIFIER") == "kdsr" and "event=" in str(e.get("MESSAGE"))
            ]
            assert kdsr_lines and all(e["PRIORITY"] == "6" and not e["MESSAGE"].startswith("<") for e in kdsr_lines)

            # Reload: validate, then `kdsr reload` (waits); s3 at weight 0 takes no new flows.
            intent["pools"]["web"]["servers"][2]["weight"] = 0
            intent_path.write_text(json.dumps(intent))  # in place: the container sees the same file
            assert box.systemctl("reload", "kdsr.service").returncode == 0
            # kdsr reload waited for the daemon: the new intent is applied when systemctl returns.
            assert box.show("kdsr.service", "StatusText")["StatusText"].startswith("verified (reload)")
            assert set(_served_by(lab, 30)) == {"s1", "s2"}
            pid = up["MainPID"]
            intent_path.write_text("{ not json")
            refused = box.systemctl("reload", "kdsr.service")
            assert refused.returncode != 0  # ExecReload's validate: the daemon was not even signalled
            assert box.show("kdsr.service", "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
            intent_path.write_text(json.dumps(intent))

            # The watchdog, at 3 s for the test: fed while the loop turns, biting when it stops.
            box.run("mkdir", "-p", "/run/systemd/system/kdsr.service.d")
            box.run("sh", "-c", "printf '[Service]\\nWatchdogSec=3\\n' > /run/systemd/system/kdsr.service.d/w.conf")
            box.systemctl("daemon-reload")
            assert box.systemctl("restart", "kdsr.service").returncode == 0
            fed = box.show("kdsr.service", *systemdlab.PROPERTIES)
            assert fed["WatchdogUSec"] == "3s"
            time.sleep(8)  # more than twice the watchdog interval
            fed_later = box.show("kdsr.service", *systemdlab.PROPERTIES)
            assert fed_later["NRestarts"] == fed["NRestarts"] and fed_later["MainPID"] == fed["MainPID"]
            assert int(fed_later["WatchdogTimestampMonotonic"]) > int(fed["WatchdogTimestampMonotonic"])
            box.run("kill", "-STOP", fed["MainPID"])  # a loop that no longer turns
            bitten = box.wait_for(
                "kdsr.service",
                lambda p: p["NRestarts"] != fed["NRestarts"] and p["ActiveState"] == "active",
                40,
                "the watchdog restarting a stopped kdsr",
            )
            assert bitten["MainPID"] != fed["MainPID"]
            log = box.run("journalctl", "-u", "kdsr", "--no-pager").stdout
            assert "Watchdog timeout" in log, log[-2000:]

            # Stop: STOPPING=1, exit 0, and the kernel keeps the fast path.
            assert box.systemctl("stop", "kdsr.service").returncode == 0
            stopped = box.show("kdsr.service", *systemdlab.PROPERTIES)
            assert stopped["ActiveState"] == "inactive" and stopped["Result"] == "success", stopped
            assert lab.run("lb", ["nft", "list", "table", "netdev", "kdsr"], check=False).returncode == 0
            assert set(_served_by(lab, 20)) == {"s1", "s2"}
    TIMINGS["systemd"] = time.monotonic() - started


def _served_by(lab, flows: int) -> dict[str, int]:
    report = lab.probe("10.10.0.100", "tcp", 80, flows=flows, first_sport=lab.next_sports(flows))
    assert all(flow.ok for flow in report.flows), report.describe_failures(3)
    return report.by_server()


def test_a_purge_leaves_nothing_of_kdsr(package):
    listed = set(run("dpkg", "-L", "kdsr").stdout.split())
    with timed("purge"):
        run("dpkg", "--purge", "kdsr")
    status = run("dpkg-query", "-W", "-f", "${db:Status-Status}", "kdsr", check=False)
    assert status.returncode != 0 or status.stdout == "not-installed", status.stdout  # no config-files left
    left = kdsr_files() - package["files_before"]
    assert left == set(), left
    # Nothing the package shipped either (shared directories such as /usr/share/man/man8 excepted).
    assert [p for p in listed if "kdsr" in p and os.path.lexists(p)] == []
    assert not os.path.exists("/var/lib/kdsr") and not os.path.exists("/etc/kdsr")
