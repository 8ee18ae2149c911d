"""The lab toolkit proves itself without kdsr.

Root tests build a real L2Lab and talk to the servers directly (no load
balancer in the path); parser tests run anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import subprocess

import lab as netns_lab
import pcap_reader
import pytest
import responder

FLOWS = 20


# --------------------------------------------------------------------------
# Parsers (no root needed)


def _pcap(frames: list[bytes], linktype: int = pcap_reader.LINKTYPE_ETHERNET) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype)
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", 1000 + i, 500, len(frame), len(frame)) + frame
    return out


def _eth(dst: str, src: str, ethertype: int, vlan: int | None = None) -> bytes:
    macs = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return macs + tag + struct.pack("!H", ethertype)


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            1,
            0,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + payload
    )


def _ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(payload),
            next_header,
            63,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + payload
    )


def _udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def _tcp(sport: int, dport: int, flags: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + data


def test_pcap_reader_parses_headers_tunnels_and_truncation(tmp_path):
    mac_a, mac_b = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
    frames = [
        _eth(mac_b, mac_a, 0x0800, vlan=42) + _ipv4("10.10.0.50", "10.10.0.100", 17, _udp(40000, 53, b"x" * 7)),
        _eth(mac_b, mac_a, 0x86DD) + _ipv6("fd00:10::50", "fd00:10::100", 6, _tcp(40001, 80, 0x02)),
        # GRE (with key) carrying IPv4/UDP: the L3 DSR shape on the full kernel.
        _eth(mac_b, mac_a, 0x0800)
        + _ipv4(
            "10.20.0.2",
            "10.30.0.11",
            47,
            struct.pack("!HHI", 0x2000, 0x0800, 7) + _ipv4("10.10.0.50", "10.10.0.100", 17, _udp(40002, 53, b"")),
        ),
    ]
    data = _pcap(frames)
    path = tmp_path / "t.pcap"
    path.write_bytes(data + struct.pack("<IIII", 9, 0, 100, 100) + b"short")  # truncated tail record
    packets = pcap_reader.read_pcap(path)

    assert len(packets) == 3
    udp, tcp, gre = packets
    assert (udp.src_mac, udp.dst_mac, udp.vlans) == (mac_a, mac_b, (42,))
    assert (udp.src, udp.dst, udp.proto, udp.sport, udp.dport, udp.payload_len) == (
        "10.10.0.50",
        "10.10.0.100",
        "udp",
        40000,
        53,
        7,
    )
    assert (tcp.family, tcp.dst, tcp.tcp_flags, tcp.is_syn, tcp.ttl) == ("ipv6", "fd00:10::100", "S", True, 63)
    assert (gre.proto, gre.dst) == ("gre", "10.30.0.11")
    assert (gre.inner.dst, gre.inner.proto, gre.inner.sport) == ("10.10.0.100", "udp", 40002)

    ip6ip6 = list(
        pcap_reader.iter_pcap(
            _pcap(
                [_ipv6("fd00:20::2", "fd00:30::11", 41, _ipv6("fd00:10::50", "fd00:10::100", 17, _udp(1, 80, b"")))],
                linktype=pcap_reader.LINKTYPE_RAW,
            )
        )
    )
    assert (ip6ip6[0].src_mac, ip6ip6[0].proto, ip6ip6[0].inner.dst) == (None, "ipv6", "fd00:10::100")


def test_pcap_reader_rejects_pcapng(tmp_path):
    path = tmp_path / "x.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)
    with pytest.raises(pcap_reader.PcapError, match="pcapng"):
        pcap_reader.read_pcap(path)


def test_responder_port_specs():
    assert responder.parse_ports("80,443,5000-5002") == [80, 443, 5000, 5001, 5002]
    assert netns_lab._port_list([53, 80]) == "53,80"
    with pytest.raises(Exception, match="1-65535"):
        responder.parse_ports("0-10")


# --------------------------------------------------------------------------
# Real namespaces (root)


def _own_addresses(lab, server):
    host = lab.host(server)
    return [host.addr4, host.addr6]


def _netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


@pytest.mark.lab
def test_flows_to_a_server_address_are_answered_and_captured(lab_available, tmp_path):
    with netns_lab.L2Lab(workdir=tmp_path / "lab") as lab:
        names = lab.namespaces()
        assert names and all(n.startswith(lab.prefix) for n in names) and set(names) <= _netns_names()
        responders = {s: lab.start_responder(s, [80], [53], bind=_own_addresses(lab, s)) for s in lab.SERVERS}
        s1 = lab.host("s1")
        s1_mac, client_mac = lab.mac("s1"), lab.mac("client")
        before = lab.link_counters("s1")

        with (
            lab.capture(
                "s1", "eth0", f"host {s1.addr4} and (tcp port 80 or udp port 53)", count_limit=2000, seconds=30
            ) as s1_cap,
            lab.capture("lb", "eth0", f"ip src {s1.addr4}", count_limit=100, seconds=30) as lb_cap,
        ):
            tcp = lab.probe(s1.addr4, "tcp", 80, FLOWS, first_sport=40000, payload_bytes=300)
            udp = lab.probe(s1.addr4, "udp", 53, FLOWS, first_sport=40000, payload_bytes=300)

        for report in (tcp, udp):
            assert report.all_ok, report.describe_failures()
            assert report.by_server() == {"s1": FLOWS}
            assert [f.sport for f in report.flows] == list(range(40000, 40000 + FLOWS))
            assert {(f.server_saw_dst, f.reply_src, f.server_saw_peer) for f in report.flows} == {
                (s1.addr4, s1.addr4, lab.host("client").addr4)
            }
            assert all(f.server_saw_peer_port == f.sport for f in report.flows)

        # What the wire carried, parsed from tcpdump's pcap.
        assert s1_cap.stats.get("dropped") == 0
        requests = s1_cap.select(dst=s1.addr4, src_mac=client_mac)
        syns = [p for p in requests if p.proto == "tcp" and p.is_syn]
        datagrams = s1_cap.select(dst=s1.addr4, proto="udp", dport=53)
        assert sorted(p.sport for p in syns) == list(range(40000, 40000 + FLOWS))
        assert sorted(p.sport for p in datagrams) == list(range(40000, 40000 + FLOWS))
        assert {p.dst_mac for p in requests} == {s1_mac}
        assert {p.payload_len for p in datagrams} == {300}
        replies = s1_cap.select(src=s1.addr4, proto="udp", dst_mac=client_mac)
        assert len(replies) == FLOWS
        # A switch, not a hub: s1's unicast replies never reach the LB's port.
        assert lb_cap.packets == []

        delta = lab.link_counters("s1") - before
        assert delta.rx_packets >= len(requests)

        # The responders' logs agree with the probes; s2/s3 saw nothing.
        logged = responders["s1"].requests()
        assert sorted((r["proto"], r["peer_port"]) for r in logged) == sorted(
            (proto, 40000 + i) for proto in ("tcp", "udp") for i in range(FLOWS)
        )
        assert responders["s2"].requests() == [] == responders["s3"].requests()

        # Same source ports again at once: TIME_WAIT must be on the server side.
        again = lab.probe(s1.addr6, "tcp", 80, 5, first_sport=40000)
        assert again.all_ok and again.by_server() == {"s1": 5}, again.describe_failures()
        pids = [r.pid for r in responders.values()]

    assert not set(names) & _netns_names(), "lab namespaces survived teardown"
    assert all(r.popen.returncode is not None for r in responders.values())
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


@pytest.mark.lab
def test_dual_stack_responder_answers_from_the_vip(l2lab):
    """A VIP on s1's loopback, reached straight from the client (no LB):
    the '::' responder must see the VIP and answer from it, in v4 and v6."""
    lab = l2lab
    vip4, vip6 = "10.10.0.100", "fd00:10::100"
    lab.run("s1", ["ip", "addr", "add", f"{vip4}/32", "dev", "lo"])
    lab.run("s1", ["ip", "addr", "add", f"{vip6}/128", "dev", "lo"])
    lab.sysctl("s1", "net.ipv4.conf.all.arp_ignore", 1)
    lab.sysctl("s1", "net.ipv4.conf.all.arp_announce", 2)
    lab.run("client", ["ip", "route", "replace", f"{vip4}/32", "via", lab.host("s1").addr4])
    lab.run("client", ["ip", "-6", "route", "replace", f"{vip6}/128", "via", lab.host("s1").addr6])
    s1 = lab.start_responder("s1", tcp_ports=[80], udp_ports="5000-5001")

    with lab.capture("s1", "eth0", "tcp port 80 or udp port 5001", count_limit=500, seconds=30) as cap:
        reports = [
            lab.probe(vip, proto, port, 8, first_sport=41000)
            for vip in (vip4, vip6)
            for proto, port in (("tcp", 80), ("udp", 5001))
        ]

    for report in reports:
        assert report.all_ok, report.describe_failures()
        assert {(f.server, f.server_saw_dst, f.reply_src) for f in report.flows} == {("s1", report.vip, report.vip)}
    inbound = [p for p in cap.packets if p.dst in (vip4, vip6)]
    assert inbound and {p.dst_mac for p in inbound} == {lab.mac("s1")}
    assert {p.src for p in cap.packets if p.sport in (80, 5001)} == {vip4, vip6}
    assert {r["dst"] for r in s1.requests()} == {vip4, vip6}


@pytest.mark.lab
def test_teardown_on_failure_removes_namespaces_and_processes(lab_available, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with netns_lab.L2Lab(workdir=tmp_path / "lab") as lab:
            names = lab.namespaces()
            helper = lab.start_responder("s2", udp_ports=[53])
            raise RuntimeError("boom")
    assert not set(names) & _netns_names()
    assert helper.popen.returncode is not None
