"""The health lab: the L2 lab with `kdsr run` on the load balancer, two pools
(one checked through the DSR path, one plainly), responders on the servers,
and a client that streams new flows.  Used by netns-lab/tests/test_health_lab.py
and bench/health_reaction.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lab as netns_lab
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
FLOWSTREAM = ROOT / "netns-lab" / "flowstream.py"
HOLD = ROOT / "netns-lab" / "hold.py"
VIP_DSR, VIP_PLAIN, VIP_PINNED = "10.10.0.100", "10.10.0.101", "10.10.0.102"
VIPS = (VIP_DSR, VIP_PLAIN, VIP_PINNED)
INTERVAL, TIMEOUT, RISE, FALL, JITTER = 1.0, 0.5, 2, 3, 0.0
REACTION_BOUND = INTERVAL * FALL + TIMEOUT + 0.5  # the bound, from the listener's stop
SERVERS = ("s1", "s2", "s3")
MONITOR = {"type": "tcp", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL, "jitter": JITTER}

INTENT = {
    "version": 1,
    "services": {
        "web": {"vip": VIP_DSR, "ports": 80, "protocols": "tcp", "pool": "web"},
        "plainweb": {"vip": VIP_PLAIN, "ports": 80, "protocols": "tcp", "pool": "plainweb"},
        # Flow pinning keeps a drained server's open connections (the drain test).
        "pinned": {
            "vip": VIP_PINNED,
            "ports": 80,
            "protocols": "tcp",
            "pool": "pinned",
            "hashing": {"flow_pinning": {"timeout": 300}},
        },
    },
    "pools": {
        "web": {"servers": [{"node": s} for s in SERVERS], "health": MONITOR},
        "plainweb": {"servers": [{"node": s} for s in SERVERS], "health": {**MONITOR, "mode": "plain", "port": 80}},
        "pinned": {"servers": [{"node": s} for s in SERVERS], "health": MONITOR},
    },
    "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.10.0.2/24"]}},
    "servers": {s: {"interface": "eth0", "addresses": [f"10.10.0.1{i}/24"]} for i, s in enumerate(SERVERS, 1)},
}


class HealthLab:
    def __init__(self, lab: netns_lab.L2Lab, workdir: Path, intent: dict | None = None, port: int = 80) -> None:
        """``intent``: INTENT by default; the full-kernel tier passes an L3 one (same host names)."""
        self.lab = lab
        self.workdir = workdir
        self.port = port
        self.state_dir = workdir / "state"
        self.intent_path = workdir / "intent.json"
        self.intent_path.write_text(json.dumps(intent or INTENT, indent=1))
        self.responders: dict[str, netns_lab.Responder] = {}
        self.daemon: netns_lab.LabProcess | None = None

    def kdsr(self, host: str, *args: str) -> None:
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.state_dir / host), *args]
        result = self.lab.run(host, argv, check=False, cwd=ROOT, timeout=300)
        assert result.returncode == 0, f"kdsr {' '.join(args)} in {host}: {result.stdout}\n{result.stderr}"

    def start_responder(self, server: str) -> None:
        self.responders[server] = self.lab.start_responder(server, tcp_ports=[self.port], max_seconds=3600)

    def start_daemon(self, first_apply_within: float = 60, options: tuple[str, ...] = ()) -> None:
        """``options``: more `kdsr run` options (``--check-interval``, ``--metrics``)."""
        argv = [sys.executable, "-m", "kdsr", "--state-dir", str(self.state_dir / "lb"), "run", str(self.intent_path)]
        argv += ["--node", "lb1", *options]
        self.daemon = self.lab.spawn("lb", argv, tag="kdsr-run")
        pid = self.daemon.pid  # `ip netns exec` execs kdsr in place: the daemon's own pid

        def applied() -> bool:
            # This daemon's view: a daemon stopped before left its own, with its applies.
            view = self.view() or {}
            return view.get("pid") == pid and view.get("applies", 0) >= 1

        self.wait_for(applied, first_apply_within, "kdsr run's first apply")

    def view(self) -> dict | None:
        path = self.state_dir / "lb" / "health" / "lb1.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def state_of(self, pool: str, server: str) -> str:
        view = self.view() or {}
        return next(s["state"] for s in view.get("servers", []) if s["pool"] == pool and s["server"] == server)

    def wait_for(self, condition, seconds: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if condition():
                return time.monotonic() - started
            assert self.daemon is None or self.daemon.running(), f"kdsr run exited:\n{self.daemon.stderr()}"
            time.sleep(0.05)
        raise AssertionError(f"{what} did not happen within {seconds} s; kdsr run said:\n{self.log()}")

    def log(self) -> str:
        return self.daemon.stderr() if self.daemon else ""

    def metrics(self, listen: str, host: str = "lb") -> dict[str, float]:
        """The daemon's Prometheus samples (`kdsr run --metrics`), scraped from ``host``'s
        namespace and parsed by prometheus_client: by sample name, and a labelled sample
        also by ``name{label="value",...}`` (labels sorted)."""
        url = f"http://{listen}/metrics"
        code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
        text = self.lab.run(host, [sys.executable, "-c", code], timeout=30).stdout
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def stream(self, seconds: float, vip: str = VIP_DSR, every: float = 0.02) -> netns_lab.LabProcess:
        out = self.workdir / f"flows-{time.monotonic_ns()}.jsonl"
        argv = [sys.executable, str(FLOWSTREAM), "--vip", vip, "--port", str(self.port), "--every", str(every)]
        argv += ["--seconds", str(seconds), "--first-sport", str(self.lab.next_sports(int(seconds / every) + 1))]
        argv += ["--out", str(out)]
        proc = self.lab.spawn("client", argv, tag="flowstream", ready_marker="READY", ready_timeout=60)
        proc.out_path = out  # type: ignore[attr-defined]
        return proc

    def hold(self, connections: int, go_file: Path, vip: str = VIP_PINNED) -> netns_lab.LabProcess:
        """`connections` open TCP connections to vip:80, each used once; used
        again when go_file appears (netns-lab/hold.py)."""
        argv = [sys.executable, str(HOLD), "--vip", vip, "--port", "80", "--connections", str(connections)]
        argv += ["--first-sport", str(self.lab.next_sports(connections)), "--go-file", str(go_file)]
        argv += ["--deadline", "120"]
        return self.lab.spawn("client", argv, tag="hold", ready_marker="READY", ready_timeout=60)


def held(proc: netns_lab.LabProcess) -> dict:
    proc.popen.wait(timeout=130)
    return json.loads(proc.stdout().splitlines()[-1])


def last_refused(flows: list[dict], since: float) -> float:
    """Seconds from ``since`` to the last new flow a dead listener refused."""
    refused = [f for f in flows if not f["ok"] and "refused" in (f["error"] or "").lower()]
    assert refused, "no flow reached the dead server after its listener stopped: the test measured nothing"
    return max(f["t"] for f in refused) - since


def assert_taken_out(flows: list[dict], killed_at: float, bound: float, alive=("s1", "s3")) -> None:
    """After ``bound`` every new flow worked on the live servers; before the stop all three had flows."""
    later = [f for f in flows if f["t"] > killed_at + bound]
    assert later and all(f["ok"] and f["server"] in alive for f in later), [f for f in later if not f["ok"]][:3]
    # A flow started in the last moment before the stop may reach the server
    # just after its listener went (refused): that is the race being measured,
    # not a failure.  Flows well before the stop must all have worked.
    before = [f for f in flows if f["t"] < killed_at]
    early_failures = [f for f in before if not f["ok"] and f["t"] < killed_at - 0.5]
    assert not early_failures, early_failures[:3]
    assert {f["server"] for f in before if f["ok"]} == set(SERVERS), before[:3]


def flows_of(proc: netns_lab.LabProcess, seconds: float) -> list[dict]:
    proc.popen.wait(timeout=seconds + 90)
    return [json.loads(line) for line in Path(proc.out_path).read_text().splitlines()]  # type: ignore[attr-defined]


def deploy(lab: netns_lab.L2Lab, workdir: Path) -> HealthLab:
    """Responders and kdsr on every server, then `kdsr run` on the load balancer."""
    hl = HealthLab(lab, workdir)
    for server in SERVERS:
        hl.start_responder(server)
        hl.kdsr(server, "apply", str(hl.intent_path), "--node", server)
    hl.start_daemon()
    return hl


def teardown(hl: HealthLab) -> None:
    if hl.daemon and hl.daemon.running():
        hl.daemon.stop()
    for server in SERVERS:
        hl.kdsr(server, "destroy", "--node", server)
    hl.kdsr("lb", "destroy", "--node", "lb1")
