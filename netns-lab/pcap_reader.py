"""A small classic-pcap reader (stdlib only) for lab assertions.

Lab tests ask questions about headers, not payloads: which MAC a request was
sent to, which address it carried, whether any reply left through the load
balancer, what outer/inner addresses a tunnelled packet had. Parsing the
binary capture ourselves is more robust than scraping `tcpdump -r` text, whose
format shifts between versions and protocols.

Supported link types: Ethernet (with 802.1Q/802.1ad tags), raw IP (what
tcpdump reports on ipip/ip6tnl devices), Linux cooked v1/v2 (`-i any`, gre).
Inner packets of IP-in-IP, 6in4, ip6ip6 and GRE are parsed one level deep into
`Packet.inner`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Link-layer header types (https://www.tcpdump.org/linktypes.html).
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
# Some libpcap builds write the DLT value instead of the LINKTYPE for raw IP.
_DLT_RAW_ALIASES = (12, 14)
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)

_IPPROTO_NAMES = {1: "icmp", 4: "ipip", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre", 58: "icmpv6"}
_IPV6_EXT_HEADERS = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
_TCP_FLAG_LETTERS = "FSRPAUEC"  # bit 0 .. bit 7, as tcpdump names them
_MAX_NESTING = 2  # outer + one inner: enough for every DSR tunnel we build


class PcapError(ValueError):
    """The file is not a classic pcap we can read."""


@dataclass(frozen=True)
class Packet:
    """Headers of one captured frame; fields absent in the frame are None."""

    ts: float
    wire_len: int
    src_mac: str | None = None
    dst_mac: str | None = None
    vlans: tuple[int, ...] = ()
    ethertype: int | None = None
    family: str | None = None  # "ipv4", "ipv6", "arp"
    src: str | None = None  # IP source (ARP: sender protocol address)
    dst: str | None = None  # IP destination (ARP: target protocol address)
    proto: str | None = None  # "tcp", "udp", "icmp", "icmpv6", "gre", "ipip", ... or the number
    ttl: int | None = None  # IPv4 TTL or IPv6 hop limit
    sport: int | None = None
    dport: int | None = None
    tcp_flags: str | None = None  # letters from "FSRPAUEC", e.g. "S", "SA", "FA"
    payload_len: int | None = None  # L4 payload bytes according to the headers
    icmp_type: int | None = None
    arp_op: int | None = None
    inner: Packet | None = field(default=None, repr=False)

    @property
    def is_syn(self) -> bool:
        """A connection-opening SYN (not the SYN-ACK)."""
        return self.tcp_flags is not None and "S" in self.tcp_flags and "A" not in self.tcp_flags


def read_pcap(path: str | Path) -> list[Packet]:
    """All packets of a classic pcap file; a truncated last record is ignored.

    tcpdump killed mid-write can leave half a record at the end; that packet is
    lost either way and must not make the whole capture unreadable.
    """
    return list(iter_pcap(Path(path).read_bytes()))


def iter_pcap(data: bytes) -> Iterator[Packet]:
    endian, ts_divisor, linktype = _global_header(data)
    record = struct.Struct(endian + "IIII")
    offset = 24
    while offset + record.size <= len(data):
        ts_sec, ts_frac, incl_len, orig_len = record.unpack_from(data, offset)
        offset += record.size
        if offset + incl_len > len(data):
            return
        frame = data[offset : offset + incl_len]
        offset += incl_len
        yield parse_frame(frame, linktype, ts_sec + ts_frac / ts_divisor, orig_len)


def _global_header(data: bytes) -> tuple[str, int, int]:
    if len(data) < 24:
        raise PcapError(f"pcap file too short ({len(data)} bytes); did tcpdump start?")
    magics = {
        b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
        b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
        b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
        b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
    }
    if data[:4] not in magics:
        raise PcapError(f"not a classic pcap file (magic {data[:4].hex()}); pcapng is not supported")
    endian, divisor = magics[data[:4]]
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    return endian, divisor, linktype


def parse_frame(frame: bytes, linktype: int, ts: float = 0.0, wire_len: int | None = None) -> Packet:
    """Parse one link-layer frame into a Packet (never raises on short frames)."""
    wire_len = len(frame) if wire_len is None else wire_len
    fields: dict = {"ts": ts, "wire_len": wire_len}
    try:
        ethertype, offset = _link_header(frame, linktype, fields)
        if ethertype is not None:
            fields["ethertype"] = ethertype
            _network_layer(frame, offset, ethertype, fields, depth=0)
    except (struct.error, IndexError, ValueError):
        pass  # a snapped/short frame keeps whatever was parsed so far
    return Packet(**fields)


def _link_header(frame: bytes, linktype: int, fields: dict) -> tuple[int | None, int]:
    if linktype == LINKTYPE_ETHERNET:
        fields["dst_mac"] = _mac(frame[0:6])
        fields["src_mac"] = _mac(frame[6:12])
        ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
        vlans = []
        while ethertype in _VLAN_TPIDS and len(vlans) < 2:
            tci, ethertype = struct.unpack_from("!HH", frame, offset)
            vlans.append(tci & 0x0FFF)
            offset += 4
        fields["vlans"] = tuple(vlans)
        return ethertype, offset
    if linktype == LINKTYPE_RAW or linktype in _DLT_RAW_ALIASES:
        version = frame[0] >> 4
        return {4: ETH_P_IP, 6: ETH_P_IPV6}.get(version), 0
    if linktype == LINKTYPE_LINUX_SLL:
        _pkttype, hatype, halen = struct.unpack_from("!HHH", frame, 0)
        if hatype == 1 and halen == 6:  # ARPHRD_ETHER: the address is the sender's MAC
            fields["src_mac"] = _mac(frame[6:12])
        return struct.unpack_from("!H", frame, 14)[0], 16
    if linktype == LINKTYPE_LINUX_SLL2:
        protocol = struct.unpack_from("!H", frame, 0)[0]
        hatype, _pkttype, halen = struct.unpack_from("!HBB", frame, 8)
        if hatype == 1 and halen == 6:
            fields["src_mac"] = _mac(frame[12:18])
        return protocol, 20
    raise PcapError(f"unsupported link type {linktype}; supported: Ethernet, raw IP, Linux cooked v1/v2")


def _network_layer(frame: bytes, offset: int, ethertype: int, fields: dict, depth: int) -> None:
    if ethertype == ETH_P_IP:
        _ipv4(frame, offset, fields, depth)
    elif ethertype == ETH_P_IPV6:
        _ipv6(frame, offset, fields, depth)
    elif ethertype == ETH_P_ARP:
        _arp(frame, offset, fields)


def _ipv4(frame: bytes, offset: int, fields: dict, depth: int) -> None:
    ver_ihl, _tos, total_len, _ident, frag, ttl, proto = struct.unpack_from("!BBHHHBB", frame, offset)
    header_len = (ver_ihl & 0x0F) * 4
    fields.update(
        family="ipv4",
        src=str(ipaddress.IPv4Address(frame[offset + 12 : offset + 16])),
        dst=str(ipaddress.IPv4Address(frame[offset + 16 : offset + 20])),
        ttl=ttl,
        proto=_IPPROTO_NAMES.get(proto, str(proto)),
    )
    if frag & 0x1FFF:
        return  # a non-first fragment carries no transport header
    l4_len = total_len - header_len
    _transport(frame, offset + header_len, proto, l4_len, fields, depth)


def _ipv6(frame: bytes, offset: int, fields: dict, depth: int) -> None:
    payload_len, next_header, hop_limit = struct.unpack_from("!HBB", frame, offset + 4)
    fields.update(
        family="ipv6",
        src=str(ipaddress.IPv6Address(frame[offset + 8 : offset + 24])),
        dst=str(ipaddress.IPv6Address(frame[offset + 24 : offset + 40])),
        ttl=hop_limit,
    )
    offset += 40
    remaining = payload_len
    for _ in range(8):  # bounded walk over extension headers
        if next_header in _IPV6_EXT_HEADERS:
            ext_len = (frame[offset + 1] + 1) * 8
        elif next_header == _IPV6_AH:
            ext_len = (frame[offset + 1] + 2) * 4
        elif next_header == _IPV6_FRAGMENT:
            if struct.unpack_from("!H", frame, offset + 2)[0] & 0xFFF8:
                fields["proto"] = _IPPROTO_NAMES.get(frame[offset], str(frame[offset]))
                return  # non-first fragment
            ext_len = 8
        else:
            break
        next_header = frame[offset]
        offset += ext_len
        remaining -= ext_len
    fields["proto"] = _IPPROTO_NAMES.get(next_header, str(next_header))
    _transport(frame, offset, next_header, remaining, fields, depth)


def _arp(frame: bytes, offset: int, fields: dict) -> None:
    _htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, offset)
    fields.update(family="arp", proto="arp", arp_op=op)
    if ptype == ETH_P_IP and hlen == 6 and plen == 4:
        fields["src"] = str(ipaddress.IPv4Address(frame[offset + 14 : offset + 18]))
        fields["dst"] = str(ipaddress.IPv4Address(frame[offset + 24 : offset + 28]))


def _transport(frame: bytes, offset: int, proto: int, l4_len: int, fields: dict, depth: int) -> None:
    if proto == 6:
        sport, dport, _seq, _ack, data_off, flags = struct.unpack_from("!HHIIBB", frame, offset)
        fields.update(sport=sport, dport=dport, tcp_flags=_tcp_flags(flags), payload_len=l4_len - (data_off >> 4) * 4)
    elif proto == 17:
        sport, dport, udp_len = struct.unpack_from("!HHH", frame, offset)
        fields.update(sport=sport, dport=dport, payload_len=udp_len - 8)
    elif proto in (1, 58):
        fields["icmp_type"] = frame[offset]
    elif depth + 1 < _MAX_NESTING and proto in (4, 41):
        fields["inner"] = _inner(frame, offset, ETH_P_IP if proto == 4 else ETH_P_IPV6, fields, depth)
    elif depth + 1 < _MAX_NESTING and proto == 47:
        _gre(frame, offset, fields, depth)


def _gre(frame: bytes, offset: int, fields: dict, depth: int) -> None:
    flags, protocol = struct.unpack_from("!HH", frame, offset)
    header_len = 4 + 4 * sum(1 for bit in (0x8000, 0x2000, 0x1000) if flags & bit)  # C, K, S
    if protocol in (ETH_P_IP, ETH_P_IPV6):
        fields["inner"] = _inner(frame, offset + header_len, protocol, fields, depth)


def _inner(frame: bytes, offset: int, ethertype: int, outer: dict, depth: int) -> Packet:
    inner_fields: dict = {"ts": outer["ts"], "wire_len": outer["wire_len"], "ethertype": ethertype}
    try:
        _network_layer(frame, offset, ethertype, inner_fields, depth + 1)
    except (struct.error, IndexError, ValueError):
        pass
    return Packet(**inner_fields)


def _tcp_flags(bits: int) -> str:
    return "".join(letter for i, letter in enumerate(_TCP_FLAG_LETTERS) if bits & (1 << i))


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)
