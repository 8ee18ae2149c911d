"""The full-kernel tier is real: modules load, IPVS and tunnels work, a tunnel carries a packet.

These tests run natively on a kernel that has ip_vs, ip_vs_mh, ipip, ip_gre
and ip6_tunnel, otherwise inside the virtme-ng guest that guest_tier.py boots
(`make test`, `make lab-full`); on the host kernel they are deselected.
Traffic stays inside namespaces the test creates (the `netns` fixture deletes
them by name).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import fullkernel
import pcap_reader
import pytest

pytestmark = pytest.mark.full_kernel

PYTHON = sys.executable or "python3"
# Guest Python starts ~10x slower than on the host (TCG): be generous.
HELPER_TIMEOUT = 60.0


def test_modules_load():
    result = subprocess.run(["modprobe", "-a", *fullkernel.MODULES], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert Path("/proc/net/ip_vs").exists()


def test_probe_reports_full_kernel():
    tier = fullkernel.probe()
    assert tier.capable, tier.details()


def test_tunnel_links_in_a_namespace(netns):
    netns.add("t")
    netns.run("t", "ip link add kipip type ipip local 192.0.2.1 remote 192.0.2.2")
    netns.run("t", "ip link add kgre type gre local 192.0.2.1 remote 192.0.2.3")
    netns.run("t", "ip link add kip6 type ip6tnl mode ip6ip6 local 2001:db8::1 remote 2001:db8::2")
    links = {link["ifname"]: link for link in json.loads(netns.run("t", "ip -j -d link show").stdout)}
    kinds = {name: links[name]["linkinfo"]["info_kind"] for name in ("kipip", "kgre", "kip6")}
    assert kinds == {"kipip": "ipip", "kgre": "gre", "kip6": "ip6tnl"}
    assert links["kgre"]["linkinfo"]["info_data"]["remote"] == "192.0.2.3"


def test_ipvs_mh_service_in_a_namespace(netns):
    netns.add("lb")
    netns.run("lb", "ipvsadm -A -t 192.0.2.100:80 -s mh -b mh-port")
    netns.run("lb", "ipvsadm -a -t 192.0.2.100:80 -r 192.0.2.11:80 -i --tun-type gre -w 1")
    netns.run("lb", "ipvsadm -a -t 192.0.2.100:80 -r 192.0.2.12:80 -i -w 1")
    listing = netns.run("lb", "ipvsadm -L -n").stdout
    assert "TCP  192.0.2.100:80 mh (mh-port)" in listing, listing
    assert "192.0.2.11:80" in listing and "192.0.2.12:80" in listing, listing
    assert listing.count("Tunnel") == 2, listing
    # IPVS is per namespace: the host's table does not see this service.
    host = subprocess.run(["ipvsadm", "-L", "-n"], capture_output=True, text=True, timeout=30)
    assert "192.0.2.100:80" not in host.stdout


# kdsr's tunnel links, made by kdsr's own socket (rtnl_routing.add_link)
# and then, in their place (the kernel refuses a second tunnel with the same
# ends), through pyroute2 with the arguments kdsr gave it before it wrote
# links itself, each as `ip -d` shows it; then kdsr makes them all, reads
# them, refuses a second add, deletes them.
TUNNEL_WRITER = """
import json, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
from pyroute2 import IPRoute
from kdsr.kernel import KernelError
from kdsr.kernel.system import SystemKernel
from kdsr.model import Link

def shown(name):
    return json.loads(subprocess.run(["ip", "-j", "-d", "link", "show", "dev", name], capture_output=True,
                                     text=True, check=True).stdout)[0]

k, ipr = SystemKernel(), IPRoute()
links = [Link("kdsr-a", "ipip", "192.0.2.1", "192.0.2.2", 64), Link("kdsr-b", "gre", "192.0.2.1", "192.0.2.3", 64),
         Link("kdsr-c", "ip6tnl", "2001:db8::1", "2001:db8::2", 64), Link("kdsr-d", "ipip", "192.0.2.1", "", 64),
         Link("kdsr-e", "ip6tnl", "2001:db8::1", "", 32)]
pairs = {}
for link in links:
    k.links.link_add(link)
    ours = shown(link.name)
    k.links.link_del(link.name)
    prefix = link.kind
    kwargs = {"ifname": link.name, "kind": link.kind, f"{prefix}_local": link.local, f"{prefix}_ttl": link.ttl}
    if link.remote:
        kwargs[f"{prefix}_remote"] = link.remote
    if link.kind == "ip6tnl":
        kwargs["ip6tnl_proto"] = 41
        kwargs["ip6tnl_flags"] = 0x1
    ipr.link("add", **kwargs)
    ipr.link("set", index=socket.if_nametoindex(link.name), state="up")
    theirs = shown(link.name)
    ipr.link("del", index=socket.if_nametoindex(link.name))
    pairs[link.name] = [ours, theirs]
for link in links:
    k.links.link_add(link)
read = sorted([l.name, l.kind, l.local, l.remote, l.ttl] for l in k.links.link_list("kdsr-"))
refused = []
for write in (lambda: k.links.link_add(links[0]), lambda: k.links.link_del("kdsr-none")):
    try:
        write()
    except KernelError as exc:
        refused.append(str(exc))
for link in links:
    k.links.link_del(link.name)
left = [l.name for l in k.links.link_list("kdsr-")]
print(json.dumps({"pairs": pairs, "read": read, "refused": refused, "left": left, "writes": k.writes}))
"""


def test_tunnel_links_written_as_pyroute2_wrote_them(netns):
    """Each kind of tunnel kdsr makes (ipip, gre, ip6tnl; with a remote end
    and with any) is, as `ip -d` shows it, what kdsr's earlier pyroute2
    writes made, and up; kdsr reads them back as written, refuses a second
    add with the kernel's EEXIST, and deletes them."""
    netns.add("t")
    root = str(Path(__file__).resolve().parents[2])
    out = json.loads(netns.run("t", [PYTHON, "-c", TUNNEL_WRITER, root], timeout=HELPER_TIMEOUT * 2).stdout)
    for name, (ours, theirs) in out["pairs"].items():
        assert ours["linkinfo"] == theirs["linkinfo"], (name, ours["linkinfo"], theirs["linkinfo"])
        assert ours["flags"] == theirs["flags"] and "UP" in ours["flags"], (name, ours["flags"], theirs["flags"])
        assert ours["mtu"] == theirs["mtu"], (name, ours["mtu"], theirs["mtu"])
    assert out["pairs"]["kdsr-c"][0]["linkinfo"]["info_data"]["proto"] == "ip6ip6"
    assert out["read"] == [
        ["kdsr-a", "ipip", "192.0.2.1", "192.0.2.2", 64],
        ["kdsr-b", "gre", "192.0.2.1", "192.0.2.3", 64],
        ["kdsr-c", "ip6tnl", "2001:db8::1", "2001:db8::2", 64],
        ["kdsr-d", "ipip", "192.0.2.1", "", 64],
        ["kdsr-e", "ip6tnl", "2001:db8::1", "", 32],
    ]
    assert "add ipip link kdsr-a: EEXIST" in out["refused"][0], out["refused"]
    assert out["refused"][1] == "interface kdsr-none does not exist", out["refused"]
    assert out["left"] == [] and out["writes"] == 5 * 2 + 5 + 5


# SystemKernel's two IPVS readers, run inside the namespace; prints JSON.
IPVS_READERS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kdsr.kernel.system import SystemKernel
from kdsr.model import IpvsService
k = SystemKernel()
whole = k.ipvs.list_all()
def ask(kind, address, port, mark=0, family=4):
    return IpvsService(family, kind, address, port, mark, "", ())
some = k.ipvs.list_some([
    ask("tcp", "192.0.2.100", 80), ask("tcp", "192.0.2.199", 80), ask("fwmark", "", 0, 7, 6),
    ask("udp", "2001:db8::100", 53, family=6), ask("fwmark", "", 0, 9), ask("fwmark", "", 0, 7),
])
def shown(services):
    return [[s.ident, s.scheduler, list(s.flags), [[d.ident, d.weight, d.method, d.tun_type] for d in s.dests]]
            for s in services]
print(json.dumps({"whole": sorted(shown(whole)), "some": shown(some)}))
"""

IPVS_TABLE = """\
-A -t 192.0.2.100:80 -s mh -b mh-port,mh-fallback
-a -t 192.0.2.100:80 -r 192.0.2.11:80 -g -w 1
-a -t 192.0.2.100:80 -r 192.0.2.12:80 -i -w 2 --tun-type gre
-a -t 192.0.2.100:80 -r 192.0.2.13:80 -i -w 3
-A -u [2001:db8::100]:53 -s mh
-a -u [2001:db8::100]:53 -r [2001:db8::12]:53 -i -w 1
-a -u [2001:db8::100]:53 -r [2001:db8::11]:53 -g -w 0
-A -f 7 -s mh
-a -f 7 -r 192.0.2.11:0 -g -w 1
-A -f 7 -6 -s mh -b mh-port
-a -f 7 -6 -r [2001:db8::11]:0 -i -w 4
"""


def test_system_kernel_reads_ipvs_whole_and_by_service(netns):
    """One listing has every field kdsr compares, destinations in the
    kernel's order (the newest at the head, whatever ipvsadm would sort);
    a listing by service skips those that are not there and goes on."""
    netns.add("lb")
    netns.run("lb", "ip link add kd0 type dummy")
    netns.run("lb", "ip addr add 192.0.2.1/24 dev kd0")
    netns.run("lb", "ip addr add 2001:db8::1/64 dev kd0 nodad")
    netns.run("lb", "ip link set kd0 up")
    restore = ["ip", "netns", "exec", netns.ns("lb"), "ipvsadm", "-R"]
    written = subprocess.run(restore, input=IPVS_TABLE, capture_output=True, text=True, timeout=HELPER_TIMEOUT)
    assert written.returncode == 0 and not written.stderr, written.stderr
    root = str(Path(__file__).resolve().parents[2])
    read = json.loads(netns.run("lb", [PYTHON, "-c", IPVS_READERS, root], timeout=HELPER_TIMEOUT).stdout)
    tcp = [
        "tcp 192.0.2.100:80",
        "mh",
        ["mh-fallback", "mh-port"],
        [
            ["192.0.2.13:80", 3, "tunnel", "ipip"],
            ["192.0.2.12:80", 2, "tunnel", "gre"],
            ["192.0.2.11:80", 1, "route", ""],
        ],
    ]
    udp = [
        "udp [2001:db8::100]:53",
        "mh",
        [],
        [["[2001:db8::11]:53", 0, "route", ""], ["[2001:db8::12]:53", 1, "tunnel", "ipip"]],
    ]
    fw6 = ["fwmark 0x7 ipv6", "mh", ["mh-port"], [["[2001:db8::11]:0", 4, "tunnel", "ipip"]]]
    fw4 = ["fwmark 0x7 ipv4", "mh", [], [["192.0.2.11:0", 1, "route", ""]]]
    assert read["whole"] == sorted([tcp, udp, fw6, fw4])
    assert read["some"] == [tcp, fw6, udp, fw4]


# A receiver that answers one datagram and says what it got, as JSON.
RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("READY", flush=True)
data, peer = s.recvfrom(2048)
s.sendto(b"echo:" + data, peer)
print(json.dumps({"peer": list(peer), "data": data.decode()}), flush=True)
"""

SENDER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(2.0)
for attempt in range(10):
    s.sendto(sys.argv[5].encode(), (sys.argv[3], int(sys.argv[4])))
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    print(json.dumps({"peer": list(peer), "data": data.decode(), "attempts": attempt + 1}))
    break
else:
    sys.exit("no reply")
"""


def _wait_for(path: Path, marker: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `marker` appears in the file `proc` writes to; fails if proc dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode} before {marker!r}")
        time.sleep(0.05)
    raise AssertionError(f"{proc.args}: no {marker!r} after {timeout:g}s")


def _wait_for_capture(pcap: Path, *pairs: tuple[str, str], timeout: float) -> None:
    """Until the capture holds an ipip packet for every (outer src, outer dst) pair, or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pcap.exists():
            seen = {(p.src, p.dst) for p in pcap_reader.read_pcap(pcap) if p.proto == "ipip"}
            if all(pair in seen for pair in pairs):
                return
        time.sleep(0.2)


def test_ipip_tunnel_carries_udp_end_to_end(netns, tmp_path):
    """a --veth (underlay 10.99.0.0/24)-- b, an ipip tunnel over it, one UDP datagram and its echo."""
    netns.add("a")
    netns.add("b")
    netns.veth("a", "eth0", "b", "eth0")
    for host, mine, peer, inner in (
        ("a", "10.99.0.1", "10.99.0.2", "172.16.0.1"),
        ("b", "10.99.0.2", "10.99.0.1", "172.16.0.2"),
    ):
        netns.run(host, f"ip addr add {mine}/24 dev eth0")
        netns.run(host, f"ip link add tun0 type ipip local {mine} remote {peer}")
        netns.run(host, f"ip addr add {inner}/32 dev tun0")
        netns.run(host, "ip link set tun0 up")
    netns.run("a", "ip route add 172.16.0.2/32 dev tun0")
    netns.run("b", "ip route add 172.16.0.1/32 dev tun0")

    pcap = tmp_path / "b-eth0.pcap"
    cap_err = tmp_path / "tcpdump.err"
    recv_out = tmp_path / "receiver.out"
    helpers: list[subprocess.Popen] = []
    try:
        with open(cap_err, "wb") as err:
            tcpdump = subprocess.Popen(
                ["ip", "netns", "exec", netns.ns("b"), "timeout", "-s", "INT", "120"]
                + ["tcpdump", "-n", "-U", "-Z", "root", "-i", "eth0", "-c", "100", "-w", str(pcap), "ip proto 4"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        helpers.append(tcpdump)
        _wait_for(cap_err, "listening on", tcpdump, HELPER_TIMEOUT)
        with open(recv_out, "wb") as out:
            receiver = subprocess.Popen(
                ["ip", "netns", "exec", netns.ns("b"), PYTHON, "-c", RECEIVER, "172.16.0.2", "5000", "90"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        helpers.append(receiver)
        _wait_for(recv_out, "READY", receiver, HELPER_TIMEOUT)

        sent = netns.run(
            "a", [PYTHON, "-c", SENDER, "172.16.0.1", "40000", "172.16.0.2", "5000", "kdsr-ipip"], timeout=90
        )
        reply = json.loads(sent.stdout)
        assert reply["data"] == "echo:kdsr-ipip"
        assert reply["peer"] == ["172.16.0.2", 5000]
        receiver.wait(timeout=HELPER_TIMEOUT)
        got = json.loads(recv_out.read_text().splitlines()[-1])
        assert got == {"peer": ["172.16.0.1", 40000], "data": "kdsr-ipip"}
        # tcpdump drops what it has not yet read when it is stopped, and under
        # emulation it can lag by seconds: wait until both directions are on file.
        _wait_for_capture(pcap, ("10.99.0.1", "10.99.0.2"), ("10.99.0.2", "10.99.0.1"), timeout=HELPER_TIMEOUT)
    finally:
        for proc in helpers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    # On the underlay the datagram travelled encapsulated: outer a -> b, protocol 4,
    # inner client address and port unchanged.
    packets = pcap_reader.read_pcap(pcap)
    outer = [p for p in packets if p.proto == "ipip"]
    assert outer, f"no ipip packets on b's eth0: {packets}"
    requests = [p for p in outer if p.src == "10.99.0.1" and p.dst == "10.99.0.2"]
    assert requests and requests[0].inner is not None
    inner = requests[0].inner
    assert (inner.src, inner.dst, inner.proto, inner.sport, inner.dport) == (
        "172.16.0.1",
        "172.16.0.2",
        "udp",
        40000,
        5000,
    )
    assert any(p.src == "10.99.0.2" and p.dst == "10.99.0.1" for p in outer), "the echo went back through the tunnel"
