"""The xdp engine on Debian's 6.1 kernel (the full-kernel tier): its older
verifier accepts bpf/kdsr_xdp.c, the program attaches natively to a veth,
and L2 flows are answered, choosing the servers the nft engine chooses.

The same lab as test_xdp_l2_lab.py (whose helpers this reuses), cut down:
Python runs about ten times slower in the guest."""

from __future__ import annotations

import json
import sys

import lab as netns_lab
import pytest
from test_xdp_l2_lab import NODES, PASS_OBJECT, ROOT, VIP4, VIP6, Deployment, _assert_flows, _intent, _needs_bpf

pytestmark = pytest.mark.full_kernel


def test_xdp_l2_on_the_full_kernel(lab_available, tmp_path):
    reason = _needs_bpf()
    if reason:
        pytest.fail(reason)
    with netns_lab.L2Lab(workdir=tmp_path / "lab") as lab:
        dep = Deployment(lab, tmp_path)
        lab.run(lab.SWITCH, ["ip", "link", "set", "dev", "plb", "xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp"])
        lab.run("client", [sys.executable, str(ROOT / "netns-lab" / "txcsum.py"), "eth0"])
        for server in lab.SERVERS:
            lab.start_responder(server, tcp_ports=[80, 53], udp_ports="53,80")
        intent = dep.write("xdp", _intent(lab, "xdp"))
        for host, node in NODES.items():
            dep.kdsr(host, "apply", str(intent), "--node", node)
        (prog,) = dep.xdp_on("lb")
        assert prog["mode"] == "driver"
        uname = lab.run("lb", ["uname", "-r"]).stdout.strip()
        picks = {}
        first = lab.next_sports(80)
        for engine in ("xdp", "nft"):
            if engine == "nft":
                dep.kdsr("lb", "apply", str(dep.write("nft", _intent(lab, "nft"))), "--node", "lb1")
            for vip, proto, offset in ((VIP4, "udp", 0), (VIP6, "tcp", 40)):
                port = 53 if vip == VIP4 else 80
                report = lab.probe(vip, proto, port, flows=40, first_sport=first + offset, timeout=5)
                _assert_flows(report, vip)
                picks.setdefault(engine, {}).update({(vip, k): v for k, v in report.server_by_sport().items()})
        assert picks["xdp"] == picks["nft"], uname
        dep.kdsr("lb", "destroy", "--node", "lb1")
        assert dep.xdp_on("lb") == []
        print(json.dumps({"kernel": uname, "flows": len(picks["xdp"])}))
