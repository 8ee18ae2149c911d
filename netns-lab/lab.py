#!/usr/bin/env python3
"""Network-namespace lab: topologies, processes, probes and captures.

No kdsr logic lives here: the lab builds hosts and wires, starts the
responder/probe/tcpdump helpers inside them, and tears down exactly what it
created. Lab tests put kdsr in between (`lab.run("lb", ["kdsr", "apply", ...])`).

    with L2Lab() as lab:
        for s in lab.SERVERS:
            lab.start_responder(s, tcp_ports=[80], udp_ports=[53])
        report = lab.probe("10.10.0.11", "udp", 53, flows=20, first_sport=40000)
        assert report.all_ok

Run `python3 lab.py` (as root) to build an L2 lab and leave it up for poking.

Rules it keeps: namespace names carry a
random suffix so parallel runs never collide; teardown deletes only the
namespaces this object created, by name, and stops only processes it started,
by pid; every helper process is bounded in time by itself (responder
--max-seconds, probe --deadline, tcpdump under `timeout`), so even a crashed
test cannot leave anything running forever.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import pcap_reader
from pcap_reader import Packet
from probe import FlowResult

LAB_DIR = Path(__file__).resolve().parent
RESPONDER = LAB_DIR / "responder.py"
PROBE = LAB_DIR / "probe.py"
PYTHON = sys.executable or "python3"
COMMAND_TIMEOUT = 60.0
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class LabError(RuntimeError):
    """A lab step failed; the message carries the command and its stderr."""


# --------------------------------------------------------------------------
# Host-side command helpers


def _exec(
    argv: Sequence[str],
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
    input: str | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run one command, bounded in time; errors name the command and its stderr."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g}s: {shlex.join(argv)}") from exc
    if check and result.returncode != 0:
        raise LabError(f"exit {result.returncode}: {shlex.join(argv)}\n{result.stderr.strip()}")
    return result


def random_suffix() -> str:
    return secrets.token_hex(3)


def lab_unavailable_reason(prefix: str = "kdsr") -> str | None:
    """Why namespace labs cannot run here, or None if they can.

    Tries the real thing in a throw-away namespace (bridge + veth), because a
    container may have `ip` and root yet forbid creating namespaces or links.
    """
    if os.geteuid() != 0:
        return "netns lab needs root (network namespaces, veth, bridge)"
    if shutil.which("ip") is None:
        return "netns lab needs iproute2's `ip`"
    name = f"{prefix}-{random_suffix()}-check"
    try:
        _exec(["ip", "netns", "add", name], timeout=10)
    except LabError as exc:
        return f"`ip netns add` is not usable here: {exc}"
    try:
        _exec(["ip", "-n", name, "link", "add", "br0", "type", "bridge"], timeout=10)
        _exec(["ip", "-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb"], timeout=10)
    except LabError as exc:
        return f"bridge/veth not usable in a namespace: {exc}"
    finally:
        _exec(["ip", "netns", "del", name], check=False, timeout=10)
    return None


def capture_unavailable_reason() -> str | None:
    return None if shutil.which("tcpdump") else "packet captures need tcpdump"


# --------------------------------------------------------------------------
# Processes started inside namespaces


@dataclass
class LabProcess:
    """A process the lab started; stop() signals exactly this pid."""

    host: str
    argv: list[str]
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the process (by pid), wait, SIGKILL if it lingers; returns its exit code.

        Popen.send_signal only signals while the child is unreaped, so a pid
        recycled by the system is never hit.
        """
        if self.running():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""


@dataclass
class Responder(LabProcess):
    log_path: Path | None = None

    def requests(self) -> list[dict]:
        """Every request logged so far (one dict per JSON line)."""
        if not self.log_path or not self.log_path.exists():
            return []
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


# --------------------------------------------------------------------------
# Probe results


@dataclass
class ProbeReport:
    vip: str
    proto: str
    port: int
    flows: list[FlowResult]
    elapsed_s: float
    exit_code: int

    @property
    def all_ok(self) -> bool:
        return bool(self.flows) and all(f.ok for f in self.flows)

    @property
    def failed(self) -> list[FlowResult]:
        return [f for f in self.flows if not f.ok]

    def by_server(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for flow in self.flows:
            if flow.ok:
                counts[flow.server] = counts.get(flow.server, 0) + 1
        return dict(sorted(counts.items()))

    def server_by_sport(self) -> dict[int, str | None]:
        """Which server answered each source port: compare runs for hash stability."""
        return {f.sport: f.server for f in self.flows}

    def describe_failures(self, limit: int = 5) -> str:
        return "; ".join(f"sport {f.sport}: {f.error}" for f in self.failed[:limit])


# --------------------------------------------------------------------------
# Link counters


@dataclass(frozen=True)
class LinkCounters:
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_dropped: int
    tx_dropped: int

    def __sub__(self, earlier: LinkCounters) -> LinkCounters:
        """after - before: the traffic in between."""
        return LinkCounters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


# --------------------------------------------------------------------------
# Captures


@dataclass
class Capture:
    """One tcpdump run; `packets` and `stats` are filled when the context exits."""

    host: str
    iface: str
    bpf_filter: str
    pcap_path: Path
    process: LabProcess | None = None
    packets: list[Packet] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def select(self, **criteria) -> list[Packet]:
        """Packets whose fields equal every criterion, e.g. select(src="10.10.0.100", proto="udp")."""
        unknown = set(criteria) - {f.name for f in fields(Packet)}
        if unknown:
            raise TypeError(f"unknown Packet field(s) {sorted(unknown)}; fields: {[f.name for f in fields(Packet)]}")
        wanted = {key: _normalise(value) for key, value in criteria.items()}
        return [p for p in self.packets if all(getattr(p, k) == v for k, v in wanted.items())]


def _normalise(value):
    """Addresses and MACs compare in their canonical text form."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
        if value.count(":") == 5:
            return value.lower()
    return value


def _tcpdump_stats(stderr: str) -> dict[str, int]:
    """'12 packets captured' / 'received by filter' / 'dropped by kernel' -> counts."""
    stats = {}
    for line in stderr.splitlines():
        words = line.split()
        for key, phrase in (
            ("captured", "packets captured"),
            ("received", "received by filter"),
            ("dropped", "dropped by kernel"),
        ):
            if phrase in line and words and words[0].isdigit():
                stats[key] = int(words[0])
    return stats


# --------------------------------------------------------------------------
# Topology


@dataclass(frozen=True)
class Host:
    name: str
    ipv4: str  # with prefix length
    ipv6: str

    @property
    def addr4(self) -> str:
        return self.ipv4.split("/")[0]

    @property
    def addr6(self) -> str:
        return self.ipv6.split("/")[0]


class L2Lab:
    """client, lb, s1..s3 on one bridge (in namespace `sw`), as examples/l2-web.json expects.

    The client routes the VIPs to the LB's address, so requests reach the LB
    the way a router would hand them over; the LB has neither the VIP nor
    ip_forward (kdsr's netdev-ingress `fwd` bypasses routing), and servers on
    the same segment answer the client directly.
    """

    HOSTS = {
        "client": Host("client", "10.10.0.50/24", "fd00:10::50/64"),
        "lb": Host("lb", "10.10.0.2/24", "fd00:10::2/64"),
        "s1": Host("s1", "10.10.0.11/24", "fd00:10::11/64"),
        "s2": Host("s2", "10.10.0.12/24", "fd00:10::12/64"),
        "s3": Host("s3", "10.10.0.13/24", "fd00:10::13/64"),
    }
    SERVERS = ("s1", "s2", "s3")
    SWITCH = "sw"
    BRIDGE = "br0"
    VIPS = ("10.10.0.100", "10.10.0.101", "fd00:10::100")

    def __init__(
        self, keep: bool = False, prefix: str = "kdsr", workdir: str | Path | None = None, vips: Iterable[str] = VIPS
    ):
        self.keep = keep
        self.suffix = random_suffix()
        self.prefix = f"{prefix}-{self.suffix}"
        self.vips = tuple(vips)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.prefix}-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created: list[str] = []  # namespaces we made, in creation order
        self._processes: list[LabProcess] = []
        self._spawned = 0  # names helper files uniquely
        self._sport_cursor = 0

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> L2Lab:
        # Safety net for an interpreter that exits without running __exit__
        # (e.g. sys.exit from a signal handler); SIGKILL cannot be covered.
        atexit.register(self._down_at_exit)
        try:
            self.up()
        except BaseException:
            self._down_quietly()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        atexit.unregister(self._down_at_exit)
        if self.keep:
            self._stop_captures()
            print(self.keep_instructions(), file=sys.stderr)
        else:
            self.down()

    def _down_at_exit(self) -> None:
        if not self.keep:
            self._down_quietly()

    def _down_quietly(self) -> None:
        """Teardown while another error is on its way: report, do not mask it."""
        try:
            self.down()
        except LabError as exc:
            print(exc, file=sys.stderr)

    def up(self) -> None:
        for name in (self.SWITCH, *self.HOSTS):
            self._add_namespace(name)
        self._build_switch()
        for host in self.HOSTS.values():
            self._attach(host)
        self._client_routes()

    def down(self) -> None:
        """Stop our processes (by pid), then delete our namespaces (by name).

        Processes go first: a namespace lives on while any process is in it,
        so deleting the name alone would leak the veths and the bridge.
        """
        errors = []
        for proc in reversed(self._processes):
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"stop pid {proc.pid}: {exc}")
        self._processes.clear()
        for ns in reversed(self._created):
            result = _exec(["ip", "netns", "del", ns], check=False, timeout=20)
            if result.returncode != 0:
                errors.append(f"ip netns del {ns}: {result.stderr.strip()}")
        self._created.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    def namespaces(self) -> list[str]:
        """The namespaces this lab created (and will delete)."""
        return list(self._created)

    def keep_instructions(self) -> str:
        lines = [f"lab kept: namespaces {' '.join(self._created)}"]
        lines += [f"  enter {h:6}: ip netns exec {self.ns(h)} bash" for h in (*self.HOSTS, self.SWITCH)]
        pids = [str(p.pid) for p in self._processes if p.running()]
        if pids:
            lines.append(f"  stop helpers : kill {' '.join(pids)}")
        lines.append("  delete       : " + "; ".join(f"ip netns del {ns}" for ns in reversed(self._created)))
        lines.append(f"  files        : {self.workdir}" + ("  (rm -r it when done)" if self._own_workdir else ""))
        return "\n".join(lines)

    # --- building ------------------------------------------------------------

    def _add_namespace(self, name: str) -> None:
        ns = self.ns(name)
        _exec(["ip", "netns", "add", ns])
        self._created.append(ns)
        self.run(name, ["ip", "link", "set", "lo", "up"])
        # `default` is copied into every interface created later, so eth0 is
        # born without DAD (v6 addresses usable at once) and without router
        # solicitations (less noise in captures and link counters).
        for key, value in (("accept_dad", 0), ("dad_transmits", 0), ("router_solicitations", 0), ("accept_ra", 0)):
            self.sysctl(name, f"net.ipv6.conf.default.{key}", value)
            self.sysctl(name, f"net.ipv6.conf.all.{key}", value)
        if name == self.SWITCH:
            # The switch is pure L2: no IPv6 on its ports, no MLD/RS of its own.
            self.sysctl(name, "net.ipv6.conf.default.disable_ipv6", 1)
            self.sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1)

    def _build_switch(self) -> None:
        # No STP: ports forward as soon as they have carrier. No multicast
        # snooping: IPv6 neighbour discovery must be flooded without a querier.
        self.run(
            self.SWITCH, ["ip", "link", "add", self.BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"]
        )
        self.run(self.SWITCH, ["ip", "link", "set", self.BRIDGE, "up"])

    def _attach(self, host: Host) -> None:
        port = f"p{host.name}"
        # Created straight into both namespaces: nothing ever appears in the
        # host's namespace, and names cannot collide with a parallel lab.
        _exec(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                self.ns(host.name),
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.ns(self.SWITCH),
            ]
        )
        self.run(self.SWITCH, ["ip", "link", "set", port, "master", self.BRIDGE, "up"])
        self.run(host.name, ["ip", "link", "set", "eth0", "up"])
        self.run(host.name, ["ip", "addr", "add", host.ipv4, "dev", "eth0"])
        self.run(host.name, ["ip", "-6", "addr", "add", host.ipv6, "dev", "eth0", "nodad"])

    def _client_routes(self) -> None:
        lb = self.HOSTS["lb"]
        for vip in self.vips:
            if ":" in vip:
                self.run("client", ["ip", "-6", "route", "add", f"{vip}/128", "via", lb.addr6])
            else:
                self.run("client", ["ip", "route", "add", f"{vip}/32", "via", lb.addr4])

    # --- inspection ------------------------------------------------------------

    def ns(self, name: str) -> str:
        """Full namespace name of a lab host ('lb' -> 'kdsr-1a2b3c-lb')."""
        if name not in self.HOSTS and name != self.SWITCH:
            raise KeyError(f"no host {name!r} in this lab; hosts: {', '.join([*self.HOSTS, self.SWITCH])}")
        return f"{self.prefix}-{name}"

    def host(self, name: str) -> Host:
        return self.HOSTS[name]

    def run(
        self,
        name: str,
        cmd: Sequence[str] | str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess:
        """`ip netns exec <ns> cmd` (cmd as a list, or a string split like a shell would).

        check=True raises LabError carrying the command, exit code and stderr.
        """
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return _exec(["ip", "netns", "exec", self.ns(name), *argv], check=check, timeout=timeout, input=input, cwd=cwd)

    def sysctl(self, name: str, key: str, value) -> None:
        self.run(name, ["sysctl", "-q", "-w", f"{key}={value}"])

    def _link(self, name: str, iface: str, stats: bool = False) -> dict:
        argv = ["ip", "-j", *(["-s"] if stats else []), "link", "show", "dev", iface]
        return json.loads(self.run(name, argv).stdout)[0]

    def mac(self, name: str, iface: str = "eth0") -> str:
        return self._link(name, iface)["address"].lower()

    def link_counters(self, name: str, iface: str = "eth0") -> LinkCounters:
        """rx/tx counters of one interface. They include ARP/ND, so compare deltas with margin."""
        link = self._link(name, iface, stats=True)
        stats = link.get("stats64") or link["stats"]
        rx, tx = stats["rx"], stats["tx"]
        return LinkCounters(rx["packets"], tx["packets"], rx["bytes"], tx["bytes"], rx["dropped"], tx["dropped"])

    # --- processes -------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        tag: str,
        ready_marker: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> LabProcess:
        """Start a background process in a host; it is stopped on teardown.

        `ip netns exec` execs the command in place, so the pid we hold is the
        command's own pid, not a wrapper's.
        """
        self._spawned += 1
        base = f"{name}-{tag}-{self._spawned}"
        stdout_path, stderr_path = self.workdir / f"{base}.out", self.workdir / f"{base}.err"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(name), *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        proc = LabProcess(name, list(argv), popen, stdout_path, stderr_path)
        self._processes.append(proc)
        if ready_marker:
            self._wait_for_marker(proc, proc.stdout_path, ready_marker, ready_timeout)
        return proc

    def _wait_for_marker(self, proc: LabProcess, path: Path, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in path.read_text(errors="replace"):
                return
            if not proc.running():
                raise LabError(
                    f"{shlex.join(proc.argv)} in {proc.host} exited {proc.popen.returncode} "
                    f"before it was ready:\n{proc.stderr().strip()}"
                )
            time.sleep(0.02)
        proc.stop()
        raise LabError(f"{shlex.join(proc.argv)} in {proc.host} not ready after {timeout:g}s:\n{proc.stderr().strip()}")

    def start_responder(
        self,
        name: str,
        tcp_ports: Iterable[int] = (),
        udp_ports: Iterable[int] = (),
        log_path: str | Path | None = None,
        bind: str | Iterable[str] = "::",
        max_seconds: float = 300,
        server_name: str | None = None,
    ) -> Responder:
        """Run responder.py in host `name`; returns once its sockets are bound."""
        tcp, udp = _port_list(tcp_ports), _port_list(udp_ports)
        log = Path(log_path) if log_path else self.workdir / f"{name}-responder.jsonl"
        binds = [bind] if isinstance(bind, str) else list(bind)
        argv = [
            PYTHON,
            str(RESPONDER),
            "--name",
            server_name or name,
            "--log",
            str(log),
            "--max-seconds",
            str(max_seconds),
            *(a for b in binds for a in ("--bind", b)),
        ]
        argv += ["--tcp", tcp] if tcp else []
        argv += ["--udp", udp] if udp else []
        proc = self.spawn(name, argv, tag="responder", ready_marker="READY")
        responder = Responder(proc.host, proc.argv, proc.popen, proc.stdout_path, proc.stderr_path, log)
        self._processes[self._processes.index(proc)] = responder
        return responder

    def probe(
        self,
        vip: str,
        proto: str,
        port: int,
        flows: int,
        first_sport: int,
        payload_bytes: int = 64,
        timeout: float = 2.0,
        workers: int = 8,
        source: str | None = None,
        client: str = "client",
        deadline: float | None = None,
        ipv6_ext: str = "",
    ) -> ProbeReport:
        """Run probe.py in the client; returns every flow's result (it does not assert)."""
        deadline = deadline if deadline is not None else min(120.0, 5.0 + flows * timeout / max(workers, 1) * 2)
        argv = [
            PYTHON,
            str(PROBE),
            "--vip",
            vip,
            "--proto",
            proto,
            "--port",
            str(port),
            "--flows",
            str(flows),
            "--first-sport",
            str(first_sport),
            "--payload-bytes",
            str(payload_bytes),
            "--timeout",
            str(timeout),
            "--workers",
            str(workers),
            "--deadline",
            str(deadline),
            "--json",
        ]
        argv += ["--source", source] if source else []
        argv += ["--ipv6-ext", ipv6_ext] if ipv6_ext else []
        result = self.run(client, argv, check=False, timeout=deadline + 15)
        if result.returncode not in (0, 1):
            raise LabError(f"probe failed (exit {result.returncode}): {result.stderr.strip()}")
        data = json.loads(result.stdout)
        return ProbeReport(
            data["vip"],
            data["proto"],
            data["port"],
            [FlowResult(**flow) for flow in data["flows"]],
            data["elapsed_s"],
            result.returncode,
        )

    def next_sports(self, count: int, base: int = 20000) -> int:
        """A fresh block of source ports, so successive probes never share 4-tuples."""
        first = base + self._sport_cursor
        self._sport_cursor += count
        if first + count > 65535:
            raise LabError("source port space exhausted; reuse ports explicitly")
        return first

    # --- captures --------------------------------------------------------------

    @contextlib.contextmanager
    def capture(
        self,
        name: str,
        iface: str = "eth0",
        bpf_filter: str = "",
        count_limit: int = 10000,
        seconds: float = 60,
        settle: float = 0.3,
    ) -> Iterator[Capture]:
        """Capture inside a host while the block runs; parsed packets afterwards.

            with lab.capture("s1", "eth0", "udp port 53") as cap:
                lab.probe(...)
            assert all(p.dst_mac == lab.mac("s1") for p in cap.packets)

        tcpdump is bounded twice: `-c count_limit` and `timeout seconds`.
        """
        cap = Capture(name, iface, bpf_filter, self.workdir / f"{name}-{iface}-{self._spawned + 1}.pcap")
        argv = [
            "timeout",
            "-s",
            "INT",
            f"{seconds:g}",
            "tcpdump",
            "-n",
            "-e",
            "-l",
            "-U",
            "--immediate-mode",
            # Headers are all the reader needs (the wire length stays in the
            # pcap).  Immediate mode makes libpcap use a ring of one frame per
            # packet, sized for the snap length: at the default (262,144) a
            # 2 MiB ring held a few dozen packets, and a burst met while
            # tcpdump was descheduled was "dropped by kernel" (10 of 240 in
            # one CI run).  512 bytes cover two IPv6 headers, a tunnel
            # header and TCP with options.
            "-s",
            "512",
            "-B",
            "4096",
            "-Z",
            "root",
            "-i",
            iface,
            "-c",
            str(count_limit),
            "-w",
            str(cap.pcap_path),
            *shlex.split(bpf_filter),
        ]
        # -Z root: tcpdump otherwise drops to user `tcpdump` before opening the
        # file and cannot write into a 0700 temporary directory.
        cap.process = self.spawn(name, argv, tag="tcpdump")
        try:
            # "listening on" is printed once the packet socket is attached:
            # traffic sent after this point is seen.
            self._wait_for_marker(cap.process, cap.process.stderr_path, "listening on", READY_TIMEOUT)
            yield cap
            time.sleep(settle)  # let the last replies cross the wire before we stop
        finally:
            cap.process.stop(signal.SIGINT)
            self._processes.remove(cap.process)
        cap.stats = _tcpdump_stats(cap.process.stderr())
        cap.packets = pcap_reader.read_pcap(cap.pcap_path) if cap.pcap_path.exists() else []

    def _stop_captures(self) -> None:
        for proc in [p for p in self._processes if p.argv and p.argv[0] == "timeout"]:
            proc.stop(signal.SIGINT)
            self._processes.remove(proc)


def _port_list(ports: Iterable[int] | str) -> str:
    """[80, 443] or '5000-5010' -> the comma list responder.py parses."""
    if isinstance(ports, str):
        return ports
    return ",".join(str(int(p)) for p in ports)


def main() -> int:
    reason = lab_unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    with L2Lab(keep=True) as lab:
        print(f"L2 lab up (suffix {lab.suffix}).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
