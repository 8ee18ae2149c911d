#!/usr/bin/env python3
"""`make demo`: L2 DSR end to end in a namespace lab, with the real kdsr CLI.

Builds client / lb / s1-s3 on one bridge, applies examples/l2-web.json to the
load balancer and to every server, sends TCP and UDP flows (IPv4 and IPv6)
from the client, and reports which server answered, what the servers saw and
whether any reply crossed the load balancer.  Exit status 0 only when every
check holds.  --keep leaves the lab up.

--scenario l3-ipip | l3-gre | l3-ip6tnl [--engine nft|ipvs] runs the L3 DSR
demo instead (demo_l3.py): natively on a kernel with IPVS and the tunnel
drivers, otherwise inside one full-kernel virtme-ng guest (guest_tier.py),
its report streamed here.

--kdsr PATH runs that kdsr program (e.g. the Debian package's /usr/bin/kdsr)
instead of this checkout's (`python -m kdsr`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
ROOT = LAB_DIR.parent
sys.path.insert(0, str(LAB_DIR))

import lab as netns_lab  # noqa: E402

NODES = {"lb": "lb1", "s1": "s1", "s2": "s2", "s3": "s3"}
L3_MODES = ("l3-ipip", "l3-gre", "l3-ip6tnl")
TRAFFIC = [  # (vip, protocol, port, flows)
    ("10.10.0.100", "tcp", 80, 100),
    ("10.10.0.100", "udp", 53, 100),
    ("10.10.0.101", "udp", 5004, 50),
    ("fd00:10::100", "tcp", 80, 50),
    ("fd00:10::100", "udp", 80, 50),
]


KDSR = [sys.executable, "-m", "kdsr"]  # --kdsr replaces it


def kdsr(lab, host: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [*KDSR, "--state-dir", str(state_dir), *args]
    return lab.run(host, argv, check=False, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    parser.add_argument("--intent", default=str(ROOT / "examples" / "l2-web.json"))
    parser.add_argument("--scenario", choices=("l2", *L3_MODES), default="l2", help="DSR mode to demonstrate")
    parser.add_argument("--engine", choices=("nft", "ipvs"), default="nft", help="fast path (L3 scenarios)")
    parser.add_argument("--kdsr", metavar="PATH", help="the kdsr program to run (default: this checkout's)")
    args = parser.parse_args()
    if args.kdsr:
        if args.scenario != "l2":
            parser.error("--kdsr is for the l2 scenario")
        KDSR[:] = [args.kdsr]
    if args.scenario != "l2":
        return l3_demo(args)

    reason = netns_lab.lab_unavailable_reason()
    if reason:
        print(f"demo: {reason}", file=sys.stderr)
        return 2
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="kdsr-demo-"))
    state_dir = workdir / "state"
    with netns_lab.L2Lab(keep=args.keep, workdir=workdir / "lab") as lab:
        print(f"kdsr demo: L2 DSR on the nftables fast path (lab {lab.prefix}-*)")
        print(
            "  client 10.10.0.50  ->  lb 10.10.0.2  ->  s1 .11 / s2 .12 / s3 .13, one bridge; "
            "the client routes the VIPs to the lb\n"
        )
        for server in lab.SERVERS:
            lab.start_responder(server, tcp_ports=[80, 443, 53], udp_ports="53,80,5000-5010")

        for host, node in NODES.items():
            program = args.kdsr or "kdsr"
            print(f"$ {program} apply {Path(args.intent).name} --node {node}    (in namespace {lab.ns(host)})")
            result = kdsr(lab, host, state_dir, "apply", args.intent, "--node", node)
            print(_indent(result.stdout + result.stderr))
            if result.returncode != 0:
                failures.append(f"apply on {node} exited {result.returncode}")
        if failures:
            return _finish(failures, lab, args.keep)

        macs = {s: lab.mac(s) for s in lab.SERVERS}
        vips = sorted({v for v, *_ in TRAFFIC})
        dst_filter = " or ".join(f"dst host {v}" for v in vips)
        lb_filter = "-p " + " or ".join(f"host {v}" for v in vips)
        reports = []
        with (
            lab.capture("lb", "eth0", lb_filter) as lb_cap,
            lab.capture("s1", "eth0", dst_filter) as c1,
            lab.capture("s2", "eth0", dst_filter) as c2,
            lab.capture("s3", "eth0", dst_filter) as c3,
        ):
            for vip, proto, port, flows in TRAFFIC:
                reports.append(lab.probe(vip, proto, port, flows=flows, first_sport=lab.next_sports(flows)))

        print("Traffic from the client (each flow from its own source port):")
        print(
            f"  {'service':<20} {'proto':<5} {'flows':>5} {'answered':>8}   {'s1':>4} {'s2':>4} {'s3':>4}   "
            "server saw dst / reply src"
        )
        for report in reports:
            counts = report.by_server()
            answered = sum(counts.values())
            dsts = sorted({f.server_saw_dst for f in report.flows if f.ok})
            srcs = sorted({f.reply_src for f in report.flows if f.ok})
            service = f"{report.vip}:{report.port}" if ":" not in report.vip else f"[{report.vip}]:{report.port}"
            print(
                f"  {service:<20} {report.proto:<5} {len(report.flows):>5} {answered:>8}   "
                f"{counts.get('s1', 0):>4} {counts.get('s2', 0):>4} {counts.get('s3', 0):>4}   "
                f"{', '.join(dsts)} / {', '.join(srcs)}"
            )
            if answered != len(report.flows):
                failures.append(
                    f"{service}/{report.proto}: {len(report.flows) - answered} flows unanswered "
                    f"({report.describe_failures(2)})"
                )
            if len(counts) < 2:
                failures.append(f"{service}/{report.proto}: only {len(counts)} server(s) used")
            if dsts != [report.vip] or srcs != [report.vip]:
                failures.append(f"{service}/{report.proto}: server saw {dsts}, replies came from {srcs}")

        requests = 0
        wrong = 0
        for server, cap in (("s1", c1), ("s2", c2), ("s3", c3)):
            for packet in cap.packets:
                if packet.family in ("ipv4", "ipv6"):
                    requests += 1
                    wrong += packet.dst_mac != macs[server] or packet.dst not in vips
        replies_at_lb = [p for p in lb_cap.packets if p.src in vips]
        requests_at_lb = [p for p in lb_cap.packets if p.dst in vips]
        print(
            f"\nAt the servers: {requests} request packets captured; "
            f"{requests - wrong} carried the server's own MAC and the VIP as destination, {wrong} did not."
        )
        print(
            f"At the load balancer: {len(requests_at_lb)} request frames seen (each twice: in from the client, "
            f"out to a server), {len(replies_at_lb)} reply packets (replies go server -> client directly)."
        )
        if wrong:
            failures.append(f"{wrong} request packets at the servers had the wrong MAC or destination")
        if replies_at_lb:
            failures.append(f"{len(replies_at_lb)} replies crossed the load balancer")

        again = kdsr(lab, "lb", state_dir, "apply", args.intent, "--node", "lb1")
        verdict = "No changes" if "No changes" in again.stdout else "CHANGED"
        print(f"\nSecond apply on lb1: {verdict}.")
        if verdict != "No changes":
            failures.append("a second apply changed something")

        shown = kdsr(lab, "lb", state_dir, "show", "--node", "lb1")
        print("\n$ kdsr show --node lb1\n" + _indent(shown.stdout))

        if not args.keep:
            for host, node in NODES.items():
                result = kdsr(lab, host, state_dir, "destroy", "--node", node)
                if result.returncode != 0:
                    failures.append(f"destroy on {node} exited {result.returncode}: {result.stderr.strip()}")
            print("kdsr destroy ran on every node.")
        return _finish(failures, lab, args.keep)


def l3_demo(args) -> int:
    import fullkernel

    if fullkernel.in_guest() or fullkernel.probe().capable:
        import demo_l3

        return demo_l3.run(args.scenario, args.engine, keep=args.keep)
    import guest_tier

    if args.keep:
        print("demo: --keep is ignored: this kernel lacks the L3 drivers, the lab lives in a guest", file=sys.stderr)
    print(f"demo: {fullkernel.probe().describe()}: running the {args.scenario} demo in a full-kernel guest")
    command = [sys.executable, str(Path(__file__).resolve()), "--scenario", args.scenario, "--engine", args.engine]
    return guest_tier.run_command_in_guest(command)


def _finish(failures: list[str], lab, keep: bool) -> int:
    if keep:
        print("\n" + lab.keep_instructions())
    else:
        print("Tearing the lab down (make demo KEEP=1 leaves it up).")
    if failures:
        print("\nDEMO FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\nAll checks held: every flow answered from the VIP, spread over the servers, no reply through the LB.")
    return 0


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()) + "\n"


if __name__ == "__main__":
    sys.exit(main())
