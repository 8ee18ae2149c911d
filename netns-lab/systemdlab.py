"""systemd as PID 1 of a throw-away container that lives in a lab host's
network namespace: the installed kdsr.service runs there as systemd runs it
on a load balancer (Type=notify, watchdog, sandbox, journald).

The container's root is an overlay of this host's root file system with a
tmpfs on top: it sees the installed package, and whatever it writes (its
/var, /etc, the state directory) goes to the tmpfs and is gone afterwards.
/dev, /run and /tmp start empty.  systemd-nspawn (systemd-container) runs
it with --keep-unit --register=no (no systemd on the host, no D-Bus) and
CAP_NET_ADMIN; it boots straight into the unit under test
(systemd.unit=kdsr.service), so nothing else of the host's boot runs.

All of it happens in a mount namespace of its own (``unshare -m``): the
overlay, and a tmpfs over /run/systemd where nspawn keeps its state (this
host's /run is on disk, and nspawn will not clean up a disk file system),
vanish with the process; nothing is mounted or left on the host.

Why not systemd as PID 1 of plain namespaces sharing this root: its boot
runs systemd-tmpfiles --remove (which empties the host's /tmp),
systemd-sysctl and udev against the host.  nspawn's container keeps /proc/sys
and /sys read-only and starts none of those.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NSPAWN = "systemd-nspawn"


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in (NSPAWN, "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: systemd-container, util-linux); scripts/setup.sh installs it"
    return None


class Container:
    """``with Container(netns, workdir, binds) as c:`` boots; ``c.systemctl(...)`` inside; leaving halts it."""

    def __init__(
        self, netns: str, workdir: Path, binds_ro: dict[str, str], unit: str, capabilities=("CAP_NET_ADMIN",)
    ) -> None:
        self.netns = netns
        self.workdir = Path(workdir)
        self.binds_ro = binds_ro  # host path -> container path
        self.unit = unit
        self.capabilities = capabilities
        self.process: subprocess.Popen | None = None
        self.pid1 = 0
        self.log_path = self.workdir / "nspawn.log"

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Container:
        self.workdir.mkdir(parents=True, exist_ok=True)
        nspawn = [
            NSPAWN,
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--link-journal=no",
            f"--network-namespace-path=/run/netns/{self.netns}",
            *(f"--capability={cap}" for cap in self.capabilities),
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()),
            # timers.target would start the host's timers (apt-daily...) in the container.
            "--bind-ro=/dev/null:/lib/systemd/system/timers.target",
            "--boot",
            "--",
            f"systemd.unit={self.unit}",
        ]
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable, __file__, str(self.workdir), *nspawn]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_for_boot(60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_boot(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.process.returncode}:\n{self.log()}")
            if not self.pid1:
                self.pid1 = _container_init(self.process.pid)
            elif self.systemctl("is-system-running").stdout.strip() in ("running", "degraded", "maintenance"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the container did not finish booting within {seconds:g} s:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # nspawn: an orderly halt of the container
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    # --- inside ----------------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in the container's mount, PID, UTS and IPC namespaces (its network is the lab host's)."""
        enter = ["nsenter", "--target", str(self.pid1), "--mount", "--pid", "--uts", "--ipc", "--net"]
        return subprocess.run([*enter, *argv], capture_output=True, text=True, timeout=timeout)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, condition, seconds: float, what: str) -> dict[str, str]:
        """Poll ``systemctl show`` until ``condition(properties)`` holds."""
        deadline = time.monotonic() + seconds
        props: dict[str, str] = {}
        while time.monotonic() < deadline:
            props = self.show(unit, *PROPERTIES)
            if condition(props):
                return props
            time.sleep(0.1)
        journal = self.run("journalctl", "-u", unit, "--no-pager", "-n", "40").stdout
        raise AssertionError(f"{what}: not within {seconds:g} s; {unit}: {props}\n{journal}")


PROPERTIES = (
    "ActiveState",
    "SubState",
    "Result",
    "StatusText",
    "NRestarts",
    "MainPID",
    "WatchdogUSec",
    "WatchdogTimestampMonotonic",
)


def _container_init(nspawn: int) -> int:
    """The container's PID 1: nspawn's child once it runs systemd (before, the
    launcher's own children, mount, come and go under the same parent)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 1 :]
        if int(rest.split()[1]) == nspawn and name == "systemd":
            return int(entry.name)
    return 0


def _launch(workdir: Path, nspawn: list[str]) -> None:
    """In the private mount namespace: the overlay root, a tmpfs for nspawn's /run/systemd, then nspawn."""
    rw, root = workdir / "rw", workdir / "root"
    rw.mkdir(exist_ok=True)
    root.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "kdsr-lab-rw", str(rw)], check=True)
    (rw / "upper").mkdir()
    (rw / "work").mkdir()
    for name, mode in (("dev", 0o755), ("run", 0o755), ("tmp", 0o1777)):
        path = rw / "upper" / name
        path.mkdir()
        path.chmod(mode)
        os.setxattr(path, "trusted.overlay.opaque", b"y")  # empty, not the host's
    options = f"lowerdir=/,upperdir={rw}/upper,workdir={rw}/work"
    subprocess.run(["mount", "-t", "overlay", "kdsr-lab-root", "-o", options, str(root)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "kdsr-lab-run", "/run/systemd"], check=True)
    os.execvp(nspawn[0], [*nspawn[:1], f"--directory={root}", *nspawn[1:]])


if __name__ == "__main__":
    _launch(Path(sys.argv[1]), sys.argv[2:])
