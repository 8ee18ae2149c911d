"""The BGP lab proves itself with real BIRD daemons and real ECMP, without kdsr (host tier).

bgplab.py: client -- router -- one segment with lb1..lb3 and s1..s3; BIRD on
the router (one eBGP session per load balancer, ECMP into its kernel FIB) and
on every load balancer (a main config including a fragment that kdsr will
own; here the test writes the fragment by hand).

- lb1 and lb2 announce 10.0.0.100/32: the router's FIB gets one route with
  both as next hops (convergence time printed).
- The router really spreads flows: `ip route get` for 200 TCP source ports
  picks both load balancers, and SYNs sent from the client from those ports
  arrive at exactly the load balancer `ip route get` named, port by port.
- lb1 dies (its link gone, BIRD SIGKILLed, no withdrawal): the router drops
  it within the hold time + 2 s; revived, it is back as a next hop.
- lb2's BIRD stopped gracefully (SIGTERM, a Cease): the route loses it at
  once, not after the hold time; restarted, it is back.
- Why the router hashes with policy 3: under policy 1 only unconnected UDP
  follows `ip route get`; TCP SYNs still spread, but per client socket.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import bgplab
import lab as netns_lab
import pytest
from bgplab import HOLD_TIME, KEEPALIVE_TIME, LB_ASN, ROUTER_ADDRESS, ROUTER_ASN, VIP, VIP_PREFIX, BgpLab

pytestmark = pytest.mark.lab

LB1, LB2 = BgpLab.HOSTS["lb1"].addr4, BgpLab.HOSTS["lb2"].addr4
CONVERGE_WITHIN = 10.0  # a new session: the router retries its connect every CONNECT_DELAY_TIME
FLOWS = 200
GRACEFUL_WITHIN = 1.0  # a Cease withdraws at once; the hold timer would take HOLD_TIME

# One packet per source port from the client, paced (a burst overruns
# tcpdump's buffer): an unconnected UDP datagram, or a TCP SYN from a
# non-blocking connect (closed before its first retransmission at 1 s).  The
# load balancers run no kdsr yet: they drop what they get, nothing answers.
SEND = """
import socket, sys, time
vip, port, first, count, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
socks = []
for sport in range(first, first + count):
    if proto == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", sport))
            s.sendto(b"kdsr", (vip, port))
    else:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.setblocking(False)
        s.connect_ex((vip, port))
        socks.append(s)
    time.sleep(0.002)
time.sleep(0.2)
for s in socks:
    s.close()
"""


def hand_fragment(lb: str) -> str:
    """What kdsr will write: the VIP in its own table, announced to the router."""
    address = BgpLab.HOSTS[lb].addr4
    return f"""# written by test_bgp_lab_smoke.py
router id {address};
ipv4 table kdsr4;
protocol static kdsr_vips4 {{ ipv4 {{ table kdsr4; }}; route {VIP_PREFIX} blackhole; }}
protocol bgp kdsr_n1 {{
  local {address} as {LB_ASN};
  neighbor {ROUTER_ADDRESS} as {ROUTER_ASN};
  hold time {HOLD_TIME};
  keepalive time {KEEPALIVE_TIME};
  ipv4 {{ table kdsr4; import none; export all; next hop self; }};
}}
"""


@contextlib.contextmanager
def announcing_lab(workdir, **options):
    """A BgpLab whose lb1 and lb2 announce the VIP, once the router has both."""
    reason = bgplab.bird_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with BgpLab(workdir=workdir, **options) as lab:
        for lb in ("lb1", "lb2"):
            lab.write_fragment(lb, hand_fragment(lb))
        took = lab.wait_nexthops(VIP_PREFIX, {LB1, LB2}, CONVERGE_WITHIN)
        print(f"\nrouter FIB: {VIP_PREFIX} via lb1 and lb2 {took:.2f} s after `birdc configure`")
        yield lab


@pytest.fixture(scope="module")
def bgp_lab(lab_available, tmp_path_factory):
    with announcing_lab(tmp_path_factory.mktemp("bgp") / "lab") as lab:
        yield lab


def arrivals(lab: BgpLab, proto: str, port: int, first: int) -> dict[int, str]:
    """Send FLOWS packets (source ports first...) to VIP:port; which LB got each."""
    bpf = f"{proto} dst port {port} and dst host {VIP}"
    with lab.capture("lb1", "eth0", bpf) as cap1, lab.capture("lb2", "eth0", bpf) as cap2:
        lab.run("client", [netns_lab.PYTHON, "-c", SEND, VIP, str(port), str(first), str(FLOWS), proto], timeout=30)
    assert not cap1.stats.get("dropped") and not cap2.stats.get("dropped"), (cap1.stats, cap2.stats)
    got = [(p.sport, LB1) for p in cap1.packets] + [(p.sport, LB2) for p in cap2.packets]
    assert len(got) == len(dict(got)) == FLOWS, f"{len(got)} packets for {FLOWS} flows: lost or seen twice"
    return dict(got)


def mismatches(predicted: dict[int, str | None], arrived: dict[int, str]) -> dict[int, tuple]:
    return {sport: (hop, arrived.get(sport)) for sport, hop in predicted.items() if arrived.get(sport) != hop}


def test_the_router_spreads_flows_over_both_announcing_lbs(bgp_lab):
    lab = bgp_lab
    assert lab.router_nexthops(VIP_PREFIX) == {LB1, LB2}
    first = lab.next_sports(FLOWS)
    predicted = lab.ecmp_choices(VIP, range(first, first + FLOWS), dport=80, proto="tcp")
    counts = Counter(predicted.values())
    print(f"ip route get, {FLOWS} TCP source ports to {VIP}:80: {dict(sorted(counts.items()))}")
    assert set(counts) == {LB1, LB2}, counts
    assert min(counts.values()) >= FLOWS // 5, counts  # an L4 hash, not one flow pinned

    arrived = arrivals(lab, "tcp", 80, first)
    print(f"TCP SYNs captured: {dict(sorted(Counter(arrived.values()).items()))}, each where ip route get said")
    assert not mismatches(predicted, arrived)


def test_a_killed_lb_is_withdrawn_within_the_hold_time_and_comes_back(bgp_lab):
    lab = bgp_lab
    lab.kill_lb("lb1")
    took = lab.wait_nexthops(VIP_PREFIX, {LB2}, HOLD_TIME + 2)
    print(f"lb1 killed (SIGKILL, link deleted): out of the router's FIB after {took:.2f} s (hold time {HOLD_TIME} s)")

    lab.revive_lb("lb1")
    took = lab.wait_nexthops(VIP_PREFIX, {LB1, LB2}, CONVERGE_WITHIN)
    print(f"lb1 revived: back in the router's FIB after {took:.2f} s")


def test_a_gracefully_stopped_bird_is_withdrawn_at_once(bgp_lab):
    lab = bgp_lab
    others = lab.router_nexthops(VIP_PREFIX) - {LB2}
    started = time.monotonic()
    lab.stop_bird("lb2")
    took = lab.wait_nexthops(VIP_PREFIX, others, GRACEFUL_WITHIN)
    print(f"lb2's BIRD stopped (SIGTERM): out of the router's FIB {time.monotonic() - started:.2f} s after the signal")
    assert took < HOLD_TIME

    lab.start_bird("lb2")
    took = lab.wait_nexthops(VIP_PREFIX, others | {LB2}, CONVERGE_WITHIN)
    print(f"lb2's BIRD restarted: back in the router's FIB after {took:.2f} s")


def test_with_hash_policy_1_only_unconnected_udp_follows_ip_route_get(lab_available, tmp_path):
    """Why the lab's router uses policy 3 (bgplab.MULTIPATH_HASH_POLICY)."""
    with announcing_lab(tmp_path / "lab", multipath_hash_policy=1) as lab:
        first = lab.next_sports(FLOWS)
        udp = arrivals(lab, "udp", 53, first)
        assert not mismatches(lab.ecmp_choices(VIP, range(first, first + FLOWS), dport=53, proto="udp"), udp)
        syns = arrivals(lab, "tcp", 80, first)
        moved = mismatches(lab.ecmp_choices(VIP, range(first, first + FLOWS), dport=80, proto="tcp"), syns)
        print(
            f"hash policy 1: unconnected UDP {dict(sorted(Counter(udp.values()).items()))} all as ip route get said; "
            f"TCP SYNs {dict(sorted(Counter(syns.values()).items()))}, {len(moved)}/{FLOWS} elsewhere (socket hash)"
        )
        assert set(syns.values()) == {LB1, LB2}  # still spread, per socket
