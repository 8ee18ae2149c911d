"""The xdp engine's L3 modes on the host kernel: what the balancer puts on the wire.

The routed lab (l3lab.py: client -- r1 -- lb -- r2 -- s1..s3) with the real
CLI applying an intent whose three VIPs are on ipip, gre and ip6tnl, all on
`"engine": "xdp"`.  The host kernel has no ipip, gre or ip6tnl module, so
its servers cannot decapsulate: flows answered end to end, and the choice of
server against the nft engine's, are the full-kernel tier's
(test_l3_dsr.py::test_xdp_l3_flows_encapsulation_and_agreement).  Here the
frames are read byte by byte where they land, on the servers' uplinks:

- the outer header the nft engine's tunnel links would give (source the
  balancer's intent address, destination the server, ttl 64 (63 once r2
  forwarded it), DF, checksum),
  GRE's four bytes, the inner packet as the client sent it, each flow at one
  server, and the counters `kdsr show` reads;
- the first packets toward a next hop whose MAC is not known yet go through
  the stack (which resolves it) and arrive, later ones straight;
- a packet too big for the tunnel: with DF (and IPv6) the client gets
  "fragmentation needed" / "packet too big" with the tunnel's MTU and learns
  it; without DF it arrives, the outer packet fragmented by the stack;
- an ICMP error about a flow, addressed to the VIP, goes to that flow's server.

As in test_xdp_l2_lab.py, the balancer's port on the bridge runs an XDP_PASS
program and the client's transmit checksum offload is off (lab artefacts).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path

import l3lab
import pytest
from test_xdp_l2_lab import PASS_OBJECT, _needs_bpf

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PORT = 53
LB = {4: "10.2.0.2", 6: "fd00:2::2"}
CLIENT = {4: "10.1.0.10", 6: "fd00:1::10"}
NEXT_HOP = {4: "10.2.0.254", 6: "fd00:2::254"}  # r2, toward the servers
# mode -> (VIP, capture filter, outer protocol, the tunnel's MTU on a 1500-byte path)
MODES = {
    "l3-ipip": ("10.9.0.100", "ip proto 4", 4, 1480),
    "l3-gre": ("10.9.0.101", "ip proto 47", 47, 1476),
    "l3-ip6tnl": ("fd00:9::100", "ip6 proto 41", 41, 1460),
}
SERVERS = {4: {"s1": "10.3.0.11", "s2": "10.3.0.12", "s3": "10.3.0.13"}}
SERVERS[6] = {"s1": "fd00:3::11", "s2": "fd00:3::12", "s3": "fd00:3::13"}


def intent() -> dict:
    services = {
        mode.removeprefix("l3-"): {
            "vip": vip,
            "ports": PORT,
            "protocols": "udp",
            "pool": "web6" if ":" in vip else "web",
            "dsr": {"mode": mode, "engine": "xdp"},
        }
        for mode, (vip, *_rest) in MODES.items()
    }
    return {
        "version": 1,
        "services": services,
        "pools": {
            "web": {"servers": [{"address": a} for a in SERVERS[4].values()]},
            "web6": {"servers": [{"address": a} for a in SERVERS[6].values()]},
        },
        "load_balancers": {"lb1": {"interface": "eth0", "addresses": ["10.2.0.2/24", "fd00:2::2/64"]}},
    }


# Sends one datagram per source port from the client; DF (PMTUDISC_DO) or not.
SEND = """
import socket, sys
vip, port, first, count, size, df = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    int(sys.argv[5]), sys.argv[6] == "df"
six = ":" in vip
for sport in range(first, first + count):
    s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
    if six:
        s.setsockopt(socket.IPPROTO_IPV6, 23, 2 if df else 0)  # IPV6_MTU_DISCOVER
        s.setsockopt(socket.IPPROTO_IPV6, 62, 0 if df else 1)  # IPV6_DONTFRAG off: the stack may fragment
    else:
        s.setsockopt(socket.IPPROTO_IP, 10, 2 if df else 0)  # IP_MTU_DISCOVER: DO / DONT
    s.bind(("", sport))
    payload = (b"kdsr-l3 %d " % sport).ljust(size, b".")
    try:
        s.sendto(payload, (vip, port))
    except OSError as exc:
        print(sport, exc, file=sys.stderr)
    s.close()
"""


def payload(sport: int, size: int = 64) -> bytes:
    return (b"kdsr-l3 %d " % sport).ljust(size, b".")


def frames(pcap: Path) -> list[tuple[bytes, int]]:
    """(captured bytes, length on the wire) of each Ethernet frame of a classic pcap."""
    data = pcap.read_bytes() if pcap.exists() else b""
    found, offset = [], 24
    while offset + 16 <= len(data):
        _sec, _frac, incl, orig = struct.unpack_from("<IIII", data, offset)
        found.append((data[offset + 16 : offset + 16 + incl], orig))
        offset += 16 + incl
    return found


def checksum(data: bytes) -> int:
    data = data + b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class Outer:
    """An encapsulated frame as the balancer sent it: outer fields and the inner packet."""

    def __init__(self, frame: bytes, wire: int):
        self.ethertype = struct.unpack_from("!H", frame, 12)[0]
        ip = frame[14:]
        self.wire = wire
        if self.ethertype == 0x0800:
            ihl = (ip[0] & 15) * 4
            self.family, self.proto, self.ttl = 4, ip[9], ip[8]
            self.src, self.dst = (
                socket.inet_ntop(socket.AF_INET, ip[12:16]),
                socket.inet_ntop(socket.AF_INET, ip[16:20]),
            )
            self.length, (self.frag,) = struct.unpack_from("!H", ip, 2)[0], struct.unpack_from("!H", ip, 6)
            self.header_ok = checksum(ip[:ihl]) == 0xFFFF
            self.flowlabel = None
            rest = ip[ihl:]
        else:
            self.family, self.proto, self.ttl = 6, ip[6], ip[7]
            self.src, self.dst = (
                socket.inet_ntop(socket.AF_INET6, ip[8:24]),
                socket.inet_ntop(socket.AF_INET6, ip[24:40]),
            )
            self.length = 40 + struct.unpack_from("!H", ip, 4)[0]
            self.frag, self.header_ok = 0, True
            self.flowlabel = struct.unpack_from("!I", ip, 0)[0] & 0xFFFFF
            rest = ip[40:]
        self.gre = rest[:4] if self.proto == 47 else None
        self.inner = rest[4:] if self.proto == 47 else rest

    @property
    def df(self) -> bool:
        return bool(self.frag & 0x4000)


def inner_udp(packet: bytes) -> tuple[str, str, int, int, bytes, bool]:
    """(source, destination, sport, dport, payload, checksums valid) of an inner IPv4/IPv6 UDP packet."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        src, dst = packet[12:16], packet[16:20]
        udp = packet[ihl:]
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
        ok = checksum(packet[:ihl]) == 0xFFFF and checksum(pseudo + udp) == 0xFFFF
        af = socket.AF_INET
    else:
        src, dst = packet[8:24], packet[24:40]
        udp = packet[40:]
        ok = checksum(src + dst + struct.pack("!II", len(udp), 17) + udp) == 0xFFFF
        af = socket.AF_INET6
    sport, dport, length = struct.unpack_from("!HHH", udp)
    return socket.inet_ntop(af, src), socket.inet_ntop(af, dst), sport, dport, udp[8:length], ok


# A datagram from the balancer to r2 (discard port), so that its kernel
# resolves r2's MAC; then wait (bounded) until the entry is reachable.
RESOLVE = """
import json, socket, subprocess, sys, time
hop, family = sys.argv[1], sys.argv[2]
with socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.sendto(b"x", (hop, 9))
for _ in range(50):
    found = json.loads(subprocess.run(["ip", "-j", "neigh", "show", hop], capture_output=True, text=True).stdout)
    if any("REACHABLE" in n.get("state", []) for n in found):
        break
    time.sleep(0.1)
"""


def resolve_next_hop(lab, family: int) -> None:
    """The balancer learns r2's MAC (the first packets to a next hop it does
    not know yet take another path: see the test on that)."""
    lab.run("lb", [PYTHON, "-c", RESOLVE, NEXT_HOP[family], str(family)], timeout=30)


class Deployment:
    def __init__(self, lab: l3lab.L3Lab, workdir: Path):
        self.lab, self.workdir = lab, workdir
        self.intent = workdir / "intent.json"
        self.intent.write_text(json.dumps(intent()))

    def kdsr(self, *args: str) -> str:
        argv = [PYTHON, "-m", "kdsr", "--state-dir", str(self.workdir / "state"), *args]
        result = self.lab.run("lb", argv, check=False, cwd=ROOT, timeout=120)
        assert result.returncode == 0, f"kdsr {' '.join(args)}: {result.returncode}\n{result.stdout}{result.stderr}"
        return result.stdout

    def events(self) -> dict[str, int]:
        return json.loads(self.kdsr("show", "--node", "lb1", "--json"))["kernel"]["xdp"][0]["events"]

    def send(self, vip: str, first: int, count: int, size: int = 64, df: bool = True) -> None:
        argv = [PYTHON, "-c", SEND, vip, str(PORT), str(first), str(count), str(size), "df" if df else "nodf"]
        self.lab.run("client", argv, timeout=60)

    def at_servers(self, mode: str, send) -> dict[str, list[Outer]]:
        """What each server's uplink received of ``mode``'s tunnel while ``send()`` ran."""
        _vip, bpf, _proto, _mtu = MODES[mode]
        lab = self.lab
        with lab.capture("s1", "eth0", bpf) as c1, lab.capture("s2", "eth0", bpf) as c2:
            with lab.capture("s3", "eth0", bpf) as c3:
                send()
        return {s: [Outer(*f) for f in frames(c.pcap_path)] for s, c in (("s1", c1), ("s2", c2), ("s3", c3))}


@pytest.fixture(scope="module")
def deployed(lab_available, tmp_path_factory):
    reason = _needs_bpf()
    if reason:
        pytest.fail(reason)
    workdir = tmp_path_factory.mktemp("xdpl3")
    with l3lab.L3Lab(workdir=workdir / "lab") as lab:
        lab.run(lab.SWITCH, ["ip", "link", "set", "dev", "plb0", "xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp"])
        lab.run("client", [PYTHON, str(ROOT / "netns-lab" / "txcsum.py"), "eth0"])
        # Learned path MTUs expire soon, so one test's cannot leak into the next.
        lab.run("client", ["sysctl", "-w", "net.ipv6.route.mtu_expires=5"], check=False)
        dep = Deployment(lab, workdir)
        dep.kdsr("apply", str(dep.intent), "--node", "lb1")
        yield dep
        dep.kdsr("destroy", "--node", "lb1")
        assert json.loads(lab.run("lb", ["bpftool", "-j", "net", "show", "dev", "eth0"]).stdout)[0]["xdp"] == []


@pytest.mark.parametrize("mode", list(MODES))
def test_the_outer_header_is_the_tunnels_and_the_inner_packet_is_the_clients(deployed, mode):
    vip, _bpf, proto, _mtu = MODES[mode]
    family = 6 if ":" in vip else 4
    first = deployed.lab.next_sports(40)
    resolve_next_hop(deployed.lab, family)
    before = json.loads(deployed.kdsr("show", "--node", "lb1", "--json"))["kernel"]
    got = deployed.at_servers(mode, lambda: deployed.send(vip, first, 40))
    where: dict[int, str] = {}
    for server, packets in got.items():
        for outer in packets:
            assert (outer.family, outer.proto, outer.ttl) == (family, proto, 64 - 1), vars(outer)  # r2 forwarded it
            assert (outer.src, outer.dst) == (LB[family], SERVERS[family][server]), vars(outer)
            assert outer.header_ok and outer.wire == 14 + outer.length, vars(outer)
            if family == 4:
                assert outer.df and outer.frag & 0x1FFF == 0, vars(outer)
            else:
                assert outer.flowlabel != 0, vars(outer)  # the flow's hash, for ECMP on the way
            if proto == 47:
                assert outer.gre == b"\x00\x00\x08\x00", outer.gre  # no key, checksum or sequence; IPv4 inside
            src, dst, sport, dport, data, ok = inner_udp(outer.inner)
            assert (src, dst, dport, data, ok) == (CLIENT[family], vip, PORT, payload(sport), True), (src, dst, dport)
            assert sport not in where, f"flow {sport} arrived twice ({where[sport]}, {server})"
            where[sport] = server
    assert sorted(where) == list(range(first, first + 40)), f"{40 - len(where)} of 40 datagrams missing"
    assert len(set(where.values())) >= 2, where
    # the same flows again: the same servers
    again = deployed.at_servers(mode, lambda: deployed.send(vip, first, 40))
    assert {inner_udp(o.inner)[2]: s for s, packets in again.items() for o in packets} == where
    after = json.loads(deployed.kdsr("show", "--node", "lb1", "--json"))["kernel"]

    def service(report):
        return next(r["packets"] for r in report["services"] if r.get("engine") == "xdp" and r["vip"] == vip)

    def servers(report):
        return sum(
            r["packets"] for r in report["servers"] if r.get("engine") == "xdp" and r["server"] in where.values()
        )

    assert service(after) - service(before) == 80
    moved = {SERVERS[family][s] for s in where.values()}
    assert (
        sum(r["packets"] for r in after["servers"] if r["server"] in moved)
        - sum(r["packets"] for r in before["servers"] if r["server"] in moved)
        >= 80
    )


@pytest.mark.parametrize("mode", ["l3-ipip", "l3-ip6tnl"])
def test_packets_to_a_next_hop_not_resolved_yet_go_through_the_stack(deployed, mode):
    """No neighbour entry for r2: bpf_fib_lookup() says NO_NEIGH, the program
    hands the encapsulated packet to the stack, which forwards it (one hop
    more: ttl 62 at the server) and resolves r2; every datagram arrives."""
    vip, *_rest = MODES[mode]
    family = 6 if ":" in vip else 4
    lab = deployed.lab
    lab.run("lb", ["ip", f"-{family}", "neigh", "flush", "dev", "eth0"])
    before = deployed.events()
    first = lab.next_sports(20)

    def send():
        for i in range(20):
            deployed.send(vip, first + i, 1)

    got = deployed.at_servers(mode, send)
    after = deployed.events()
    arrived = sorted(inner_udp(o.inner)[2] for packets in got.values() for o in packets)
    assert arrived == list(range(first, first + 20)), arrived
    ttls = [o.ttl for packets in got.values() for o in packets]
    print(f"\n{mode}: ttls {ttls}; events {before} -> {after}")
    assert 62 in ttls and 63 in ttls, ttls  # through the stack first, then straight
    assert after["to_stack"] > before["to_stack"] and after["no_neighbour"] > before["no_neighbour"]


BIG = 1500  # the client's whole path MTU: the datagram fits every link but the tunnel


@pytest.mark.parametrize("mode", list(MODES))
def test_too_big_with_df_gets_the_tunnels_mtu_back(deployed, mode):
    """The client's kernel accepts the program's ICMP error (so its checksum
    and quote are right) and learns the tunnel's MTU."""
    from test_l3_dsr import BIG_DATAGRAM, forget_path_mtus

    vip, _bpf, _proto, mtu = MODES[mode]
    family = 6 if ":" in vip else 4
    lab = deployed.lab
    forget_path_mtus(lab)
    before = deployed.events()
    icmp = "icmp[0] == 3 and icmp[1] == 4" if family == 4 else "icmp6 and ip6[40] == 2"
    with lab.capture("client", "eth0", icmp) as errors:
        argv = [PYTHON, "-c", BIG_DATAGRAM, vip, str(family), str(PORT)]
        learned = int(lab.run("client", argv, timeout=60).stdout.strip())
    forget_path_mtus(lab)
    assert errors.packets, "no ICMP error reached the client"
    assert {p.src for p in errors.packets} == {LB[family]}
    assert learned == mtu, f"the client learned path MTU {learned}"
    assert deployed.events()["too_big"] > before["too_big"]


def test_too_big_without_df_arrives_as_outer_fragments(deployed):
    """IPv4 without DF: the nft engine's stack fragments such a packet; here
    the outer packet (no DF) is handed to the stack, which fragments it; the
    server reassembles it before decapsulating.  A packet without DF that
    fits is encapsulated with DF, as the kernel's tunnels do."""
    vip, *_rest = MODES["l3-ipip"]
    first = deployed.lab.next_sports(3)
    got = deployed.at_servers("l3-ipip", lambda: deployed.send(vip, first, 3, size=BIG - 28, df=False))
    by_server = {s: packets for s, packets in got.items() if packets}
    assert len(by_server) >= 1
    for server, packets in by_server.items():
        assert all(not o.df for o in packets), [o.frag for o in packets]
        firsts = [o for o in packets if o.frag & 0x1FFF == 0]
        assert firsts and all(o.frag & 0x2000 for o in firsts), [hex(o.frag) for o in packets]  # more fragments
        carried = sum(o.length - 20 for o in packets)
        assert carried == len(firsts) * BIG, (server, carried, len(firsts))  # every fragment of each packet
    assert sum(len([o for o in p if o.frag & 0x1FFF == 0]) for p in by_server.values()) == 3
    # Without DF but short enough: the outer header has DF, as the kernel's tunnels set it.
    first = deployed.lab.next_sports(3)
    got = deployed.at_servers("l3-ipip", lambda: deployed.send(vip, first, 3, df=False))
    outers = [o for packets in got.values() for o in packets]
    assert len(outers) == 3 and all(o.df for o in outers), [hex(o.frag) for o in outers]


# An ICMP error about the reply VIP:53 -> client:SPORT, as a router on the
# servers' way back would send it to the VIP (quoting the reply's header).
ICMP_ERROR = """
import socket, struct, sys
vip, client, sport = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(b):
    b += b"\\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
if ":" in vip:
    quoted = struct.pack("!IHBB", 6 << 28, 8 + 1400, 17, 64) + socket.inet_pton(socket.AF_INET6, vip) \\
        + socket.inet_pton(socket.AF_INET6, client) + struct.pack("!HHHH", 53, sport, 1408, 0)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)  # the kernel sums ICMPv6
    s.sendto(struct.pack("!BBHI", 2, 0, 0, 1280) + quoted, (vip, 0))
else:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 1400, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(vip), socket.inet_aton(client))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    body = ip + struct.pack("!HHHH", 53, sport, 1408, 0)
    head = struct.pack("!BBHHH", 3, 4, 0, 0, 1300)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.sendto(head[:2] + struct.pack("!H", csum(head + body)) + head[4:] + body, (vip, 0))
"""


@pytest.mark.parametrize("mode", ["l3-ipip", "l3-ip6tnl"])
def test_an_icmp_error_about_a_flow_goes_to_the_flows_server(deployed, mode):
    vip, *_rest = MODES[mode]
    family = 6 if ":" in vip else 4
    lab = deployed.lab
    first = lab.next_sports(12)
    flows = deployed.at_servers(mode, lambda: deployed.send(vip, first, 12))
    owner = {inner_udp(o.inner)[2]: s for s, packets in flows.items() for o in packets}
    assert len(owner) == 12 and len(set(owner.values())) >= 2, owner
    before = deployed.events()

    def errors():
        for sport in range(first, first + 12):
            lab.run("client", [PYTHON, "-c", ICMP_ERROR, vip, CLIENT[family], str(sport)], timeout=30)

    got = deployed.at_servers(mode, errors)
    reached = {}
    for server, packets in got.items():
        for outer in packets:
            inner = outer.inner
            ihl = (inner[0] & 15) * 4 if family == 4 else 40
            assert inner[ihl] == (3 if family == 4 else 2), inner[: ihl + 1].hex()  # the ICMP error, unchanged
            quoted = inner[ihl + 8 :]
            at = 20 if family == 4 else 40
            reached[struct.unpack_from("!H", quoted, at + 2)[0]] = server
    assert reached == owner
    assert deployed.events()["icmp_error"] - before["icmp_error"] == 12
