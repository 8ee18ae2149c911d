"""Prometheus text metrics for `kdsr run --metrics ADDRESS:PORT` (off by default).

Rendered from the daemon's health view and, at scrape time, the kernel's own
packet counters (the same read `kdsr show` does).  Standard library only: a
threaded HTTP server that answers GET /metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kdsr.health.state import UP


def _labels(**labels: object) -> str:
    def esc(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items() if v is not None) + "}"


def render(view: dict, counters, kernel_report: dict | None) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{_labels(**labels) if labels else ''} {value:g}")

    servers = view.get("servers", [])
    targets = view.get("targets", [])
    metric(
        "kdsr_server_up",
        "gauge",
        "1 when the server passes every health check of its pool.",
        [({"pool": s["pool"], "server": s["server"], "node": s.get("node")}, s["state"] == UP) for s in servers],
    )
    metric(
        "kdsr_server_in_table",
        "gauge",
        "1 when the server holds slots of its pool's table (not down, not drained).",
        [({"pool": s["pool"], "server": s["server"]}, s.get("in_table", True)) for s in servers],
    )
    metric(
        "kdsr_check_up",
        "gauge",
        "1 when one health check of one server is up.",
        [({"pool": t["pool"], "server": t["server"], "check": t["check"]}, t["state"] == UP) for t in targets],
    )
    metric(
        "kdsr_check_transitions_total",
        "counter",
        "Up/down changes of one check.",
        [({"pool": t["pool"], "server": t["server"], "check": t["check"]}, t["transitions"]) for t in targets],
    )
    metric(
        "kdsr_check_probes_total",
        "counter",
        "Probes sent by one check.",
        [({"pool": t["pool"], "server": t["server"], "check": t["check"]}, t["probes"]) for t in targets],
    )
    metric(
        "kdsr_check_latency_seconds",
        "gauge",
        "Duration of the check's last probe.",
        [({"pool": t["pool"], "server": t["server"], "check": t["check"]}, t["latency_ms"] / 1000) for t in targets],
    )
    metric(
        "kdsr_pool_all_down",
        "gauge",
        "1 when every server of the pool is down (see the pool's all_down).",
        [({"pool": p, "handling": c}, c.startswith("all-down")) for p, c in view.get("pools", {}).items()],
    )
    metric("kdsr_applies_total", "counter", "Applies made by kdsr run.", [({}, counters.applies)])
    metric("kdsr_apply_failures_total", "counter", "Applies that failed.", [({}, counters.apply_failures)])
    metric(
        "kdsr_apply_duration_seconds_sum",
        "counter",
        "Time spent in applies (sum; divide by kdsr_applies_total).",
        [({}, counters.apply_seconds_total)],
    )
    metric(
        "kdsr_apply_last_duration_seconds", "gauge", "Duration of the last apply.", [({}, counters.last_apply_seconds)]
    )
    metric(
        "kdsr_drift_checks_total",
        "counter",
        "Checks that the kernel still holds what kdsr run last verified (kdsr run --check-interval).",
        [({}, counters.drift_checks)],
    )
    metric(
        "kdsr_drift_check_duration_seconds_sum",
        "counter",
        "Time spent in drift checks, repairs not included (sum; divide by kdsr_drift_checks_total).",
        [({}, counters.drift_check_seconds_total)],
    )
    metric(
        "kdsr_drift_repairs_total",
        "counter",
        "Drift checks that found kdsr's objects changed behind its back and applied the repair.",
        [({}, counters.drift_repairs)],
    )
    if kernel_report is not None:
        metric(
            "kdsr_vip_packets_total",
            "counter",
            "Packets the load balancer matched per VIP, protocol and port (nft engine).",
            [
                ({"vip": s["vip"], "protocol": s["protocol"], "port": s["port"]}, s["packets"])
                for s in kernel_report.get("services", [])
            ],
        )
        metric(
            "kdsr_server_packets_total",
            "counter",
            "Packets the load balancer forwarded per table and server (nft engine).",
            [({"table": s["selector"], "server": s["server"]}, s["packets"]) for s in kernel_report.get("servers", [])],
        )
    return "\n".join(out) + "\n"


def serve(address: str, text: Callable[[], str]) -> ThreadingHTTPServer:
    """Serve GET /metrics on ``address`` ("127.0.0.1:9469", "[::1]:9469") in a daemon thread."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics here")
                return
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass  # scrapes are not events

    server_class = ThreadingHTTPServer
    if ":" in host:
        import socket

        class V6Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_class = V6Server
    server = server_class((host, int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
