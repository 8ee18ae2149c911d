"""The demo's L3 scenarios: DSR over ipip, gre or ip6tnl, on the nft or ipvs engine.

Needs a kernel with ip_vs, ip_vs_mh, ipip, ip_gre and ip6_tunnel; demo.py
boots a full-kernel guest for it when this kernel lacks them.  Routed lab
(l3lab.py): client - r1 - lb - r2 - s1..s3, so the servers are a router hop
away from the load balancer.  The real kdsr CLI applies the example intent to
lb1 and the servers; the client sends TCP and UDP flows; the report shows
which server answered, what arrived on the servers' wire (the outer header
LB -> server, the client -> VIP packet inside) and that no reply crossed the
load balancer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import l3lab

ROOT = Path(__file__).resolve().parent.parent
MODES = ("l3-ipip", "l3-gre", "l3-ip6tnl")
ENGINES = ("nft", "ipvs")
EXAMPLE = {"l3-ipip": "l3-ipip.json", "l3-gre": "l3-gre-ipvs.json", "l3-ip6tnl": "l3-ip6tnl.json"}
TRAFFIC = {  # (vip, protocol, port, flows)
    4: [("10.9.0.100", "tcp", 80, 40), ("10.9.0.100", "udp", 53, 40), ("10.9.0.101", "udp", 5004, 20)],
    6: [("fd00:9::100", "tcp", 80, 40), ("fd00:9::100", "udp", 80, 40), ("fd00:9::101", "udp", 5004, 20)],
}
OUTER = {
    "l3-ipip": ("ip proto 4", "ipip", 4),
    "l3-gre": ("ip proto 47", "gre", 47),
    "l3-ip6tnl": ("ip6 proto 41", "ipv6", 41),
}
NODES = {"lb": "lb1", "s1": "s1", "s2": "s2", "s3": "s3"}
LB_ADDRESS = {4: "10.2.0.2", 6: "fd00:2::2"}


def intent_for(mode: str, engine: str) -> dict:
    doc = json.loads((ROOT / "examples" / EXAMPLE[mode]).read_text())
    for service in doc["services"].values():
        service["dsr"] = {**service.get("dsr", {}), "mode": mode, "engine": engine}
    return doc


def kdsr(lab, host: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "kdsr", "--state-dir", str(state_dir / host), *args]
    return lab.run(host, argv, check=False, cwd=ROOT, timeout=600)


def run(mode: str, engine: str, keep: bool = False) -> int:
    family = 6 if mode == "l3-ip6tnl" else 4
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="kdsr-demo-l3-"))
    state_dir = workdir / "state"
    intent = workdir / f"{mode}-{engine}.json"
    intent.write_text(json.dumps(intent_for(mode, engine), indent=1))
    with l3lab.L3Lab(keep=keep, workdir=workdir / "lab") as lab:
        print(f"kdsr demo: L3 DSR, mode {mode}, engine {engine} (lab {lab.prefix}-*)")
        print(
            "  client 10.1.0.10 -> r1 -> lb 10.2.0.2 -> r2 -> s1 .11 / s2 .12 / s3 .13 (10.3.0.0/24);\n"
            "  r1 routes the VIPs to the lb; the servers are a router hop away from it\n"
        )
        lab.run("lb", ["modprobe", "-a", "ip_vs", "ip_vs_mh", "ipip", "ip_gre", "ip6_tunnel"])
        for server in lab.SERVERS:
            lab.start_responder(server, tcp_ports=[80], udp_ports="53,80,5000-5010", max_seconds=1800)

        def apply(item):
            host, node = item
            return node, kdsr(lab, host, state_dir, "apply", str(intent), "--node", node)

        print(f"$ kdsr apply {intent.name} --node <node>    (lb1, s1, s2, s3, each in its namespace)")
        with ThreadPoolExecutor(max_workers=len(NODES)) as pool:
            for node, result in pool.map(apply, NODES.items()):
                print(f"  [{node}]\n" + _indent(result.stdout + result.stderr))
                if result.returncode != 0:
                    failures.append(f"apply on {node} exited {result.returncode}")
        if failures:
            return _finish(failures, lab, keep)

        bpf, outer_name, outer_number = OUTER[mode]
        vips = sorted({vip for vip, *_ in TRAFFIC[family]})
        reports = []
        with (
            lab.capture("lb", "eth0", " or ".join(f"src host {v}" for v in vips)) as replies_at_lb,
            lab.capture("s1", "eth0", bpf) as c1,
            lab.capture("s2", "eth0", bpf) as c2,
            lab.capture("s3", "eth0", bpf) as c3,
        ):
            for vip, proto, port, flows in TRAFFIC[family]:
                first = lab.next_sports(flows)
                reports.append(lab.probe(vip, proto, port, flows=flows, first_sport=first, timeout=4.0))

        print("Traffic from the client (each flow from its own source port):")
        print(f"  {'service':<22} {'proto':<5} {'flows':>5} {'answered':>8}   {'s1':>4} {'s2':>4} {'s3':>4}")
        for report in reports:
            counts = report.by_server()
            answered = sum(counts.values())
            service = f"{report.vip}:{report.port}" if family == 4 else f"[{report.vip}]:{report.port}"
            print(
                f"  {service:<22} {report.proto:<5} {len(report.flows):>5} {answered:>8}   "
                f"{counts.get('s1', 0):>4} {counts.get('s2', 0):>4} {counts.get('s3', 0):>4}"
            )
            if answered != len(report.flows):
                failures.append(f"{service}/{report.proto}: {len(report.flows) - answered} flows unanswered")
            if len(counts) < 2:
                failures.append(f"{service}/{report.proto}: only {len(counts)} server(s) used")
            wrong = [f for f in report.flows if f.ok and (f.server_saw_dst != report.vip or f.reply_src != report.vip)]
            if wrong:
                failures.append(f"{service}/{report.proto}: {len(wrong)} flows not served from the VIP")

        packets = [(server, p) for server, cap in (("s1", c1), ("s2", c2), ("s3", c3)) for p in cap.packets]
        good = [
            p
            for server, p in packets
            if p.proto == outer_name
            and p.src == LB_ADDRESS[family]
            and p.dst == (lab.HOSTS[server].addr4 if family == 4 else lab.HOSTS[server].addr6)
            and p.inner is not None
            and p.inner.dst in vips
        ]
        print(
            f"\nOn the servers' wire: {len(packets)} encapsulated packets (IP protocol {outer_number}); "
            f"{len(good)} had outer {LB_ADDRESS[family]} -> the server and a client -> VIP packet inside."
        )
        if good:
            outer, inner = good[0], good[0].inner
            print(
                f"  e.g. outer {outer.src} -> {outer.dst} proto {outer_number}, "
                f"inner {inner.src}:{inner.sport} -> {inner.dst}:{inner.dport} {inner.proto}"
            )
        replies = len(replies_at_lb.packets)
        print(f"At the load balancer: {replies} reply packets (replies go server -> r2 -> r1 -> client).")
        if not packets or len(good) != len(packets):
            failures.append(
                f"{len(packets) - len(good)} of {len(packets)} packets at the servers not tunnelled from the LB"
            )
        if replies_at_lb.packets:
            failures.append(f"{len(replies_at_lb.packets)} replies crossed the load balancer")

        again = kdsr(lab, "lb", state_dir, "apply", str(intent), "--node", "lb1")
        verdict = "No changes" if "No changes" in again.stdout else "CHANGED"
        print(f"\nSecond apply on lb1: {verdict}.")
        if verdict != "No changes":
            failures.append("a second apply changed something")
        shown = kdsr(lab, "lb", state_dir, "show", "--node", "lb1")
        print("\n$ kdsr show --node lb1\n" + _indent(shown.stdout))

        if not keep:
            with ThreadPoolExecutor(max_workers=len(NODES)) as pool:
                done = pool.map(
                    lambda item: (item[1], kdsr(lab, item[0], state_dir, "destroy", "--node", item[1])), NODES.items()
                )
                for node, result in done:
                    if result.returncode != 0:
                        failures.append(f"destroy on {node} exited {result.returncode}: {result.stderr.strip()}")
            print("kdsr destroy ran on every node.")
        return _finish(failures, lab, keep)


def _finish(failures: list[str], lab, keep: bool) -> int:
    if keep:
        print("\n" + lab.keep_instructions())
    if failures:
        print("\nDEMO FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\nAll checks held: every flow answered from the VIP by servers a hop away, tunnelled from the LB,")
    print("and no reply crossed the load balancer.")
    return 0


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()) + "\n"
