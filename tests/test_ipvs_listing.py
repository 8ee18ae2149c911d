"""Reading the kernel's IPVS table: ``ipvsadm -L -n --nosort --tun-info``
(parse_list), and its statistics with it (parse_stats, for `kdsr show`).

The first listing is what ipvsadm 1.31 printed on kernel 6.1 (the guest)
for a table holding every kind of service and destination kdsr may meet,
written by ``ipvsadm -R`` in another order than the kernel lists it.  The
property test renders generated tables the way ipvsadm prints them, with
connection counters and column widths varied, and reads them back."""

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsr.kernel.ipvsadm import STATS_INPUT, IpvsCounters, parse_list, parse_stats, read_stats
from kdsr.model import IpvsDest, IpvsService

# ipvsadm -L -n --nosort --tun-info; "~" stands for the nine spaces ipvsadm prints at the end of a line.
LISTING = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn
TCP  10.100.0.1:80 mh (mh-fallback,mh-port)
  -> 10.200.1.3:8080              Masq    n/a           0      0          0~
  -> 10.200.1.1:80                Route   n/a           3      0          0~
  -> 10.200.1.2:80                Route   n/a           1      0          0~
UDP  10.100.0.1:53 mh
  -> 10.200.1.7:53                Tunnel  gue:6080:-c   2      0          0~
  -> 10.200.1.6:53                Tunnel  gre:-c        2      0          0~
  -> 10.200.1.4:53                Tunnel  gre:-c        2      0          0~
  -> 10.200.1.5:53                Tunnel  ipip          2      0          0~
TCP  [fd00:100::1]:443 mh (mh-port)
  -> [fd00:200::abcd:1]:443       Route   n/a           5      0          0~
  -> [fd00:200::2]:443            Tunnel  ipip          1      0          0~
FWM  5 IPv6 sh (sh-port)
  -> [fd00:200::9]:0              Route   n/a           1      0          0~
FWM  5 mh
  -> 10.200.1.8:0                 Route   n/a           1      0          0~
""".replace("~", " " * 9)


def test_a_listing_reads_into_services_with_destinations_in_the_kernel_s_order():
    tcp, udp, v6, fw6, fw4 = parse_list(LISTING)
    assert tcp == IpvsService(
        4,
        "tcp",
        "10.100.0.1",
        80,
        0,
        "mh",
        ("mh-fallback", "mh-port"),
        (
            IpvsDest("10.200.1.3", 8080, 0, "masq"),
            IpvsDest("10.200.1.1", 80, 3, "route"),
            IpvsDest("10.200.1.2", 80, 1, "route"),
        ),
    )
    assert udp.protocol == "udp" and udp.flags == ()
    assert [(d.address, d.method, d.tun_type) for d in udp.dests] == [
        ("10.200.1.7", "tunnel", "gue"),
        ("10.200.1.6", "tunnel", "gre"),
        ("10.200.1.4", "tunnel", "gre"),
        ("10.200.1.5", "tunnel", "ipip"),
    ]
    assert v6 == IpvsService(
        6,
        "tcp",
        "fd00:100::1",
        443,
        0,
        "mh",
        ("mh-port",),
        (IpvsDest("fd00:200::abcd:1", 443, 5, "route"), IpvsDest("fd00:200::2", 443, 1, "tunnel", "ipip")),
    )
    # One mark, two families: two services, each with its own destinations.
    assert (fw6.ident, fw6.scheduler, fw6.flags) == ("fwmark 0x5 ipv6", "sh", ("sh-port",))
    assert fw6.dests == (IpvsDest("fd00:200::9", 0, 1, "route"),)
    assert (fw4.ident, fw4.scheduler, fw4.dests) == ("fwmark 0x5 ipv4", "mh", (IpvsDest("10.200.1.8", 0, 1, "route"),))


def test_connection_counters_do_not_matter_and_a_destination_is_read_once():
    busy = LISTING.replace("2      0          0", "2      913        40211", 1)
    assert parse_list(busy) == parse_list(LISTING)
    two = """\
TCP  10.0.0.1:80 mh
  -> 10.3.0.1:80                  Route   n/a           1      12         7
  -> 10.3.0.2:80                  Tunnel  gre           3      0          0
TCP  10.0.0.2:80 mh
  -> 10.3.0.1:80                  Route   n/a           1      0          0
  -> 10.3.0.2:80                  Tunnel  gre           3      5          1
"""
    first, second = parse_list(two)
    assert first.dests == second.dests
    assert all(a is b for a, b in zip(first.dests, second.dests, strict=True))


def test_one_service_listed_an_empty_service_and_an_empty_table():
    one = "Prot LocalAddress:Port Scheduler Flags\n"
    one += "  -> RemoteAddress:Port  Forward TunnelInfo  Weight ActiveConn InActConn\n"
    one += "UDP  10.0.0.1:53 mh persistent 300\n"
    assert parse_list(one) == [IpvsService(4, "udp", "10.0.0.1", 53, 0, "mh", (), ())]
    assert parse_list(LISTING.split("TCP")[0]) == []
    assert parse_list("") == []


# ---------------------------------------------------------------- generated tables, printed as ipvsadm prints them

VIPS = ["10.0.0.1", "10.0.0.2", "192.0.2.77", "2001:db8::1", "2001:db8::a:1"]
SERVERS = ["10.3.0.1", "10.3.0.2", "10.3.1.20", "2001:db8::7", "2001:db8:1234:5678:9abc:def0:1234:5678"]
METHODS = [("route", ""), ("tunnel", "ipip"), ("tunnel", "gre"), ("masq", "")]


def _bracket(address, port):
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@st.composite
def services(draw):
    kind = draw(st.sampled_from(["tcp", "udp", "fwmark"]))
    family = draw(st.sampled_from([4, 6]))
    servers = [s for s in SERVERS if (":" in s) == (family == 6)]
    if kind == "fwmark":
        address, port, mark = "", 0, draw(st.integers(1, 70000))
    else:
        address = draw(st.sampled_from([v for v in VIPS if (":" in v) == (family == 6)]))
        port, mark = draw(st.sampled_from([80, 443, 53])), 0
    flags = draw(st.sampled_from([(), ("mh-port",), ("mh-fallback", "mh-port")]))
    dests = tuple(
        IpvsDest(server, port, draw(st.integers(0, 300)), *draw(st.sampled_from(METHODS)))
        for server in draw(st.lists(st.sampled_from(servers), max_size=3, unique=True))
    )
    return IpvsService(family, kind, address, port, mark, draw(st.sampled_from(["mh", "rr"])), flags, dests)


def _printed(svc, draw):
    if svc.protocol == "fwmark":
        head = f"FWM  {svc.fwmark}{' IPv6' if svc.family == 6 else ''} {svc.scheduler}"
    else:
        head = f"{svc.protocol.upper()}  {_bracket(svc.address, svc.port)} {svc.scheduler}"
    # ipvsadm prints its own flag order; kdsr keeps them sorted.
    head += f" ({','.join(reversed(svc.flags))})" if svc.flags else ""
    head += draw(st.sampled_from(["", " persistent 300", " persistent 60 mask 255.255.255.0"]))
    lines = [head]
    for d in svc.dests:
        forward = {"route": "Route", "tunnel": "Tunnel", "masq": "Masq"}[d.method]
        tunnel = {"ipip": "ipip", "gre": draw(st.sampled_from(["gre", "gre:-c"])), "": "n/a"}[d.tun_type]
        counters = f"{draw(st.integers(0, 99999))}{' ' * draw(st.integers(1, 10))}{draw(st.integers(0, 99999))}"
        pad = " " * draw(st.integers(1, 30))
        lines.append(f"  -> {_bracket(d.address, d.port)}{pad}{forward:<8}{tunnel:<14}{d.weight:<7}{counters}      ")
    return lines


@settings(max_examples=300, deadline=None)
@given(st.lists(services(), max_size=6, unique_by=lambda s: s.ident), st.data())
def test_a_printed_table_reads_back_as_it_was(table, data):
    lines = [
        "IP Virtual Server version 1.2.1 (size=4096)",
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn",
    ]
    for svc in table:
        lines += _printed(svc, data.draw)
    assert parse_list("\n".join(lines) + "\n") == table


# ---------------------------------------------------------------- statistics: parse_stats

# What ``ipvsadm -R`` printed for ipvs.STATS_INPUT (both listings, one
# process) with ipvsadm 1.31 on kernel 6.1 (the guest), after three TCP
# connections to 10.9.0.100:80 that mh gave 10.3.0.12, then a weight 0 for
# 10.3.0.11 ("~": the nine spaces at the end of a configuration line).
STATS = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn
TCP  [fd00:9::100]:443 mh
  -> [fd00:3::11]:443             Tunnel  ipip          3      0          0~
UDP  10.9.0.100:53 mh (mh-fallback)
  -> 10.3.0.11:53                 Route   n/a           1      0          0~
TCP  10.9.0.100:80 mh (mh-fallback,mh-port)
  -> 10.3.0.12:80                 Tunnel  ipip          2      0          3~
  -> 10.3.0.11:80                 Tunnel  gre:-c        0      0          0~
FWM  7 mh (mh-fallback)
  -> 10.3.0.11:0                  Tunnel  ipip          1      0          0~
FWM  8 IPv6 mh (mh-fallback)
  -> [fd00:3::11]:0               Tunnel  ipip          1      0          0~
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
TCP  10.9.0.100:80                       3        3        3      180      264
  -> 10.3.0.11:80                        0        0        0        0        0
  -> 10.3.0.12:80                        3        3        3      180      264
UDP  10.9.0.100:53                       0        0        0        0        0
  -> 10.3.0.11:53                        0        0        0        0        0
TCP  [fd00:9::100]:443                   0        0        0        0        0
  -> [fd00:3::11]:443                    0        0        0        0        0
FWM  7                                   0        0        0        0        0
  -> 10.3.0.11:0                         0        0        0        0        0
FWM  8 IPv6                              0        0        0        0        0
  -> [fd00:3::11]:0                      0        0        0        0        0
""".replace("~", " " * 9)


def test_statistics_join_the_configuration_listing_service_by_service():
    found = {s.service.ident: s for s in parse_stats(STATS)}
    assert list(found) == [
        "tcp [fd00:9::100]:443",
        "udp 10.9.0.100:53",
        "tcp 10.9.0.100:80",
        "fwmark 0x7 ipv4",
        "fwmark 0x8 ipv6",
    ]  # the configuration listing's order (--nosort): the statistics one is sorted
    web = found["tcp 10.9.0.100:80"]
    assert web.counters == IpvsCounters(connections=3, packets=3, bytes=180)  # inbound: OutPkts/OutBytes left out
    assert web.dests == {"10.3.0.11:80": IpvsCounters(0, 0, 0), "10.3.0.12:80": IpvsCounters(3, 3, 180)}
    assert [(d.address, d.weight) for d in web.service.dests] == [("10.3.0.12", 2), ("10.3.0.11", 0)]
    assert found["fwmark 0x8 ipv6"].dests == {"[fd00:3::11]:0": IpvsCounters(0, 0, 0)}


def test_a_service_in_one_listing_only_is_left_out_and_a_missing_listing_is_an_error():
    config, stats = STATS.split("IP Virtual Server version 1.2.1 (size=4096)\n")[1:]
    title = "IP Virtual Server version 1.2.1 (size=4096)\n"
    # Deleted between the two dumps: in the configuration listing only.
    gone = stats.replace("UDP  10.9.0.100:53", "UDP  10.9.0.100:54")
    assert "udp 10.9.0.100:53" not in {s.service.ident for s in parse_stats(title + config + title + gone)}
    with pytest.raises(ValueError, match="0 statistics listings"):
        parse_stats(title + config)
    assert parse_stats(title + config.split("TCP")[0] + title + stats.split("TCP")[0]) == []


def test_read_stats_runs_one_restore_and_says_what_failed():
    seen = []

    def restore(text, out=STATS, err="", code=0):
        seen.append(text)
        return subprocess.CompletedProcess(["ipvsadm", "-R"], code, out, err)

    assert len(read_stats(restore)) == 5
    assert seen == [STATS_INPUT] and STATS_INPUT.splitlines() == [
        "-L -n --nosort --tun-info",
        "-L -n --stats --exact",
    ]
    with pytest.raises(ValueError, match="Can't initialize ipvs"):
        read_stats(lambda text: restore(text, "", "Can't initialize ipvs: Protocol not available", 1))


def _stats_line(head: str, counters: tuple[int, ...]) -> str:
    """As ipvsadm 1.31 prints --stats --exact: the name in 33 columns, each
    number right-aligned in 9 or, when longer, in its length plus one."""
    return f"{head:<33}" + "".join(f"{n:>{9 if len(str(n)) <= 8 else len(str(n)) + 1}}" for n in counters)


@settings(max_examples=200, deadline=None)
@given(st.lists(services(), max_size=6, unique_by=lambda s: s.ident), st.data())
def test_printed_statistics_of_any_size_read_back(table, data):
    numbers = st.integers(0, 2**64 - 1) | st.integers(0, 999)
    config = ["IP Virtual Server version 1.2.1 (size=4096)", "Prot LocalAddress:Port Scheduler Flags"]
    stats = [
        "IP Virtual Server version 1.2.1 (size=4096)",
        "Prot LocalAddress:Port  Conns InPkts OutPkts InBytes OutBytes",
    ]
    stats.append("  -> RemoteAddress:Port")
    want = {}
    for svc in table:
        config += _printed(svc, data.draw)
        if svc.protocol == "fwmark":
            head = f"FWM  {svc.fwmark}{' IPv6' if svc.family == 6 else ''}"
        else:
            head = f"{svc.protocol.upper()}  {_bracket(svc.address, svc.port)}"
        own = tuple(data.draw(numbers) for _ in range(5))
        stats.append(_stats_line(head, own))
        dests = {}
        for d in svc.dests:
            counted = tuple(data.draw(numbers) for _ in range(5))
            stats.append(_stats_line(f"  -> {_bracket(d.address, d.port)}", counted))
            dests[d.ident] = IpvsCounters(counted[0], counted[1], counted[3])
        want[svc.ident] = (IpvsCounters(own[0], own[1], own[3]), dests)
    found = parse_stats("\n".join(config + stats) + "\n")
    assert [s.service for s in found] == table
    assert {s.service.ident: (s.counters, s.dests) for s in found} == want
