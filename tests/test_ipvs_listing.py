"""Reading the kernel's IPVS table: ``ipvsadm -Sn`` (parse_save) and
/proc/net/ip_vs (parse_proc_order), then both together (in_kernel_order).

The readers take a service's destinations as one block of text, parsed once
for every service holding the same text.  The oracle here is the plain
reading, one line at a time by its words, as kdsr read listings before;
hypothesis builds listings of the shapes ipvsadm prints and of shapes it
does not (blocks out of order, a service twice, quoted words, fwmark and
IPv6 services), and the two must agree."""

import ipaddress
import shlex

from hypothesis import given, settings
from hypothesis import strategies as st

from kdsr.kernel.ipvs import in_kernel_order, parse_proc_order, parse_save
from kdsr.model import IpvsDest, IpvsService

SAVE = """\
-A -t 10.0.0.1:80 -s mh -b mh-port,mh-fallback
-a -t 10.0.0.1:80 -r 10.3.0.1:80 -g -w 1
-a -t 10.0.0.1:80 -r 10.3.0.2:80 -i -w 3 --tun-type gre
-A -t 10.0.0.2:80 -s mh -b mh-fallback,mh-port
-a -t 10.0.0.2:80 -r 10.3.0.1:80 -g -w 1
-a -t 10.0.0.2:80 -r 10.3.0.2:80 -i -w 3 --tun-type gre
-A -u [2001:db8::1]:53 -s mh
-a -u [2001:db8::1]:53 -r [2001:db8:0:0::7]:53 -i -w 2
-A -f 7 -6 -s mh
-a -f 7 -6 -r [2001:db8::8]:0 -i -w 1
-A -f 7 -s rr
-a -f 7 -r 10.3.0.9:0 -m -w 0
"""

PROC = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A000001:0050 mh
  -> 0A030002:0050      Tunnel  3      0          0
  -> 0A030001:0050      Route   1      4          17
TCP  0A000002:0050 mh
  -> 0A030001:0050      Route   1      0          0
  -> 0A030002:0050      Tunnel  3      0          0
UDP  [2001:0db8:0000:0000:0000:0000:0000:0001]:0035 mh
  -> [2001:0db8:0000:0000:0000:0000:0000:0007]:0035 Tunnel  2      0          0
FWM  00000007 mh
  -> [2001:0db8:0000:0000:0000:0000:0000:0008]:0000 Tunnel  1      0          0
FWM  00000007 rr
  -> 0A030009:0000      Masq    0      0          0
"""

ROUTE1 = IpvsDest("10.3.0.1", 80, 1, "route")
GRE2 = IpvsDest("10.3.0.2", 80, 3, "tunnel", "gre")


def test_a_listing_reads_into_services_with_their_destinations():
    services = parse_save(SAVE)
    assert services == [
        IpvsService(4, "tcp", "10.0.0.1", 80, 0, "mh", ("mh-fallback", "mh-port"), (ROUTE1, GRE2)),
        IpvsService(4, "tcp", "10.0.0.2", 80, 0, "mh", ("mh-fallback", "mh-port"), (ROUTE1, GRE2)),
        IpvsService(6, "udp", "2001:db8::1", 53, 0, "mh", (), (IpvsDest("2001:db8::7", 53, 2, "tunnel", "ipip"),)),
        IpvsService(6, "fwmark", "", 0, 7, "mh", (), (IpvsDest("2001:db8::8", 0, 1, "tunnel", "ipip"),)),
        IpvsService(4, "fwmark", "", 0, 7, "rr", (), (IpvsDest("10.3.0.9", 0, 0, "masq"),)),
    ]
    # Two services whose destinations read the same share one tuple.
    assert services[0].dests is services[1].dests


def test_the_kernel_order_comes_from_proc_and_counters_do_not_matter():
    order = parse_proc_order(PROC)
    assert order[("tcp", "10.0.0.1", 80)] == ["10.3.0.2:80", "10.3.0.1:80"]
    assert order[("tcp", "10.0.0.2", 80)] == ["10.3.0.1:80", "10.3.0.2:80"]
    assert order[("udp", "2001:db8::1", 53)] == ["[2001:db8::7]:53"]
    assert order[("fwmark", 7)] == ["[2001:db8::8]:0", "10.3.0.9:0"]
    first, second, v6, fw6, fw4 = in_kernel_order(parse_save(SAVE), order)
    assert first.dests == (GRE2, ROUTE1) and second.dests == (ROUTE1, GRE2)
    assert [d.address for d in fw6.dests] == ["2001:db8::8"] and [d.address for d in fw4.dests] == ["10.3.0.9"]


def test_empty_listings():
    assert parse_save("") == [] and parse_save("\n\n") == []
    assert parse_proc_order(PROC.split("TCP")[0]) == {}
    assert in_kernel_order([], {}) == []


# ---------------------------------------------------------------- the oracle: one line at a time


def _hostport(text):
    host, port = text[1:].rsplit("]:", 1) if text.startswith("[") else text.rsplit(":", 1)
    return str(ipaddress.ip_address(host)), int(port)


def plain_save(text):
    services, dests = {}, {}
    for line in text.splitlines():
        words = shlex.split(line)
        opts, flags, i = {}, set(), 1
        while i < len(words):
            if words[i] in ("-t", "-u", "-f", "-s", "-b", "-r", "-w", "--tun-type", "-p", "-M", "--pe", "-x", "-y"):
                opts[words[i]] = words[i + 1] if i + 1 < len(words) else ""
                i += 2
            else:
                flags.add(words[i])
                i += 1
        if "-f" in opts:
            svc = IpvsService(6 if "-6" in flags else 4, "fwmark", "", 0, int(opts["-f"]), "", ())
        elif "-t" in opts or "-u" in opts:
            flag = "-t" if "-t" in opts else "-u"
            address, port = _hostport(opts[flag])
            svc = IpvsService(6 if ":" in address else 4, {"-t": "tcp", "-u": "udp"}[flag], address, port, 0, "", ())
        else:
            continue
        if words[0] == "-A":
            sched_flags = tuple(sorted(f for f in opts.get("-b", "").split(",") if f))
            config = {"scheduler": opts.get("-s", ""), "flags": sched_flags}
            services[svc.ident] = IpvsService(**{**svc.__dict__, **config})
            dests.setdefault(svc.ident, [])
        elif words[0] == "-a":
            address, port = _hostport(opts["-r"])
            method = "route" if "-g" in flags else "tunnel" if "-i" in flags else "masq"
            tun = opts.get("--tun-type", "ipip") if method == "tunnel" else ""
            dests.setdefault(svc.ident, []).append(IpvsDest(address, port, int(opts.get("-w", "1")), method, tun))
    return [
        IpvsService(s.family, s.protocol, s.address, s.port, s.fwmark, s.scheduler, s.flags, tuple(dests[k]))
        for k, s in services.items()
    ]


# ---------------------------------------------------------------- generated listings

VIPS = ["10.0.0.1", "10.0.0.2", "192.0.2.77", "2001:db8::1", "2001:db8::a:1"]
SERVERS = ["10.3.0.1", "10.3.0.2", "10.3.1.20", "2001:db8::7", "2001:db8:0:0::8"]


def _bracket(address, port):
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@st.composite
def service_blocks(draw):
    kind = draw(st.sampled_from(["-t", "-u", "-f", "-f6"]))
    if kind.startswith("-f"):
        selector = f"-f {draw(st.integers(1, 3))}" + (" -6" if kind == "-f6" else "")
        port = 0
    else:
        port = draw(st.sampled_from([80, 443, 53]))
        selector = f"{kind} {_bracket(draw(st.sampled_from(VIPS)), port)}"
    flags = draw(st.sampled_from(["", " -b mh-port", " -b mh-port,mh-fallback", " -b mh-fallback,mh-port"]))
    head = f"-A {selector} -s {draw(st.sampled_from(['mh', 'rr']))}{flags}"
    lines = []
    for server in draw(st.lists(st.sampled_from(SERVERS), max_size=4, unique=True)):
        method = draw(st.sampled_from([" -g", " -i", " -i --tun-type gre", " -m", ""]))
        weight = draw(st.sampled_from([" -w 0", " -w 1", " -w 7", ""]))
        lines.append(f"-a {selector} -r {_bracket(server, port)}{method}{weight}")
    return [head, *lines]


@st.composite
def listings(draw):
    blocks = draw(st.lists(service_blocks(), max_size=6))
    lines = [line for block in blocks for line in block]
    if draw(st.booleans()):  # shapes ipvsadm does not print: moved, repeated, blank or quoted lines
        for _ in range(draw(st.integers(1, 3))):
            edit = draw(st.sampled_from(["move", "repeat", "blank", "quote"]))
            if not lines:
                break
            at = draw(st.integers(0, len(lines) - 1))
            if edit == "move":
                lines.insert(draw(st.integers(0, len(lines))), lines.pop(at))
            elif edit == "repeat":
                lines.insert(draw(st.integers(0, len(lines))), lines[at])
            elif edit == "blank":
                lines.insert(at, "")
            else:
                lines[at] = lines[at].replace(" -s ", " -s 'mh' ").replace(" -s 'mh' mh", " -s 'mh'")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))


@settings(max_examples=400, deadline=None)
@given(listings())
def test_the_block_reader_agrees_with_the_line_reader(text):
    assert parse_save(text) == plain_save(text)
