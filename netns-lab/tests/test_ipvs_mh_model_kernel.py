"""The IPVS mh model (bench/ipvs_mh_model.py) against the real kernel, flow by flow.

The bench's IPVS rows come from that model, so it has to be the kernel's
algorithm, not an approximation: here a real ``mh`` service is built in a
namespace, new UDP flows are sent to it, and the destination the kernel gave
each flow (its connection entry) must be the one the model predicts, for

- IPv4 with mh-port and mh-fallback, destinations added in a scrambled
  order with different weights (one added with weight 0, which gets no
  slots), then one drained (weight 0: its flows fall back), then one deleted
  and added back (it moves to the head of the list);
- IPv4 without mh-port (only the address is hashed), the list built the way
  kdsr builds it;
- IPv6 with mh-port (the address is folded to 32 bits first).

The kernel's list order is read the way kdsr reads it (``ipvsadm -L -n
--nosort --tun-info``, kdsr.kernel.ipvsadm.parse_list) and must also equal the
model's ``list_after_inserts`` of the add/delete history.  Connection
entries are read from /proc/net/ip_vs_conn, the table ``ipvsadm -Lnc``
prints (raw: addresses and ports unformatted).

The clients are local sockets in the load balancer's namespace: IPVS
schedules locally generated packets in its LOCAL_OUT hook, so no second
namespace is needed.  Destinations sit behind a dummy link (the DR
transmit drops the packets there; the connection entry exists by then).
Full-kernel tier: runs where IPVS does (the virtme-ng guest).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import ipvs_mh_model as mh  # noqa: E402

from kdsr.kernel.ipvsadm import parse_list  # noqa: E402

pytestmark = pytest.mark.full_kernel

PYTHON = sys.executable or "python3"
# Guest Python starts slowly under emulation (TCG): be generous.
SENDER_TIMEOUT = 120.0
PORT = 53
DUMMY = "kdsrmh0"
# IPv6 clients, each a /128 on lo; they differ in several 32-bit words.
V6_CLIENTS = ("2001:db8:aaaa:1::5", "fd00:199:5555:6666::77", "fd00:199::1")

# One datagram per (address, port), each from a fresh socket bound to it: a
# new flow, so a new scheduling decision and a new connection entry.
SENDER = """
import json, socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
vip, vport = sys.argv[2], int(sys.argv[3])
flows = json.loads(sys.argv[4])
for addr, port in flows:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((addr, port))
        s.sendto(b"kdsr-mh", (vip, vport))
print(len(flows))
"""


def norm(address: str) -> str:
    return str(ipaddress.ip_address(address))


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class MhService:
    """A UDP mh service in namespace `name`, with the history of its destination list."""

    def __init__(self, netns, name: str, vip: str, flags: tuple[str, ...]):
        self.netns, self.name, self.vip, self.flags = netns, name, norm(vip), flags
        self.history: list[tuple[str, str]] = []
        self.weight: dict[str, int] = {}
        self.last_weight: dict[str, int] = {}
        self.ipvsadm("-A", "-u", hostport(self.vip, PORT), "-s", "mh", *(["-b", ",".join(flags)] if flags else []))

    def ipvsadm(self, *args: str) -> None:
        self.netns.run(self.name, ["ipvsadm", *args])

    def add(self, address: str, weight: int) -> None:
        address = norm(address)
        self.ipvsadm("-a", "-u", hostport(self.vip, PORT), "-r", hostport(address, PORT), "-g", "-w", str(weight))
        self.history.append(("add", address))
        # __ip_vs_update_dest: an add always sets last_weight, an edit only to a nonzero weight.
        self.weight[address] = self.last_weight[address] = weight

    def edit(self, address: str, weight: int) -> None:
        address = norm(address)
        self.ipvsadm("-e", "-u", hostport(self.vip, PORT), "-r", hostport(address, PORT), "-g", "-w", str(weight))
        self.weight[address] = weight
        if weight != 0:
            self.last_weight[address] = weight

    def delete(self, address: str) -> None:
        address = norm(address)
        self.ipvsadm("-d", "-u", hostport(self.vip, PORT), "-r", hostport(address, PORT))
        self.history.append(("del", address))

    def kernel_order(self) -> list[str]:
        """The destination list as the kernel holds it, head first."""
        selector = ["-u", hostport(self.vip, PORT)]
        text = self.netns.run(self.name, ["ipvsadm", "-L", "-n", "--nosort", "--tun-info", *selector]).stdout
        services = parse_list(text)
        assert len(services) == 1, f"no UDP {self.vip}:{PORT} in ipvsadm's listing:\n{text}"
        return [d.address for d in services[0].dests]

    def model(self) -> mh.MhTable:
        """The model's table, after checking that its list order is the kernel's."""
        order = mh.list_after_inserts(self.history)
        assert self.kernel_order() == order, f"history {self.history}"
        return mh.MhTable([mh.MhDest(a, PORT, self.weight[a], self.last_weight[a]) for a in order])

    def send(self, flows: list[tuple[str, int]]) -> None:
        family = "6" if ":" in self.vip else "4"
        result = self.netns.run(
            self.name,
            [PYTHON, "-c", SENDER, family, self.vip, str(PORT), json.dumps(flows)],
            timeout=SENDER_TIMEOUT,
        )
        assert result.stdout.strip() == str(len(flows)), result.stdout + result.stderr

    def connections(self) -> dict[tuple[str, int], str]:
        """(client address, client port) -> destination address, from /proc/net/ip_vs_conn."""
        text = self.netns.run(self.name, ["cat", "/proc/net/ip_vs_conn"]).stdout
        found: dict[tuple[str, int], str] = {}
        for line in text.splitlines():
            words = line.split()
            if len(words) < 7 or words[0] not in ("UDP", "TCP"):
                continue  # the header
            caddr, cport, vaddr, vport, daddr = words[1:6]
            if (_proc_addr(vaddr), int(vport, 16)) != (self.vip, PORT):
                continue
            found[(_proc_addr(caddr), int(cport, 16))] = _proc_addr(daddr)
        return found

    def check(self, flows: list[tuple[str, int]], mh_port: bool) -> tuple[mh.MhTable, dict]:
        """Send `flows`; every one must reach the destination the model picks."""
        table = self.model()
        self.send(flows)
        conns = self.connections()
        missing = [f for f in flows if f not in conns]
        assert not missing, f"{len(missing)} of {len(flows)} flows have no connection entry, e.g. {missing[:5]}"
        got = {f: conns[f] for f in flows}
        expected = {f: table.schedule(*f, mh_port=mh_port, fallback="mh-fallback" in self.flags) for f in flows}
        wrong = [(f, got[f], expected[f]) for f in flows if got[f] != expected[f]]
        assert not wrong, (
            f"{len(wrong)} of {len(flows)} flows disagree with the model (flow, kernel, model), "
            f"list {[(d.address, d.weight, d.last_weight) for d in table.dests]}: {wrong[:10]}"
        )
        return table, got


def _proc_addr(text: str) -> str:
    # IPv4 as 8 hex digits (host order), IPv6 as %pI6 (8 groups of 4).
    if ":" in text:
        return str(ipaddress.IPv6Address(text))
    return str(ipaddress.IPv4Address(int(text, 16)))


def _lab(netns, name: str, family: int) -> None:
    netns.add(name)
    netns.run(name, ["ip", "link", "add", DUMMY, "type", "dummy"])
    netns.run(name, ["ip", "link", "set", DUMMY, "up"])
    if family == 4:
        netns.run(name, ["ip", "addr", "add", "10.200.0.1/32", "dev", "lo"])
        # A prefix on lo makes all of it local: clients bind to any 10.199.0.x.
        netns.run(name, ["ip", "addr", "add", "10.199.0.1/24", "dev", "lo"])
        netns.run(name, ["ip", "route", "add", "10.201.0.0/24", "dev", DUMMY])
    else:
        for address in ("fd00:200::1", *V6_CLIENTS):
            netns.run(name, ["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"])
        netns.run(name, ["ip", "-6", "route", "add", "fd00:201::/32", "dev", DUMMY])


def test_ipv4_mh_port_with_weights_fallback_and_history(netns):
    _lab(netns, "lb", 4)
    svc = MhService(netns, "lb", "10.200.0.1", ("mh-fallback", "mh-port"))
    # A scrambled history (the list ends up reversed), unequal weights, and
    # .6 added with weight 0: present in the list, never in the table.
    for last_octet, weight in ((3, 2), (1, 1), (5, 3), (2, 1), (4, 2), (6, 0)):
        svc.add(f"10.201.0.{last_octet}", weight)
    assert svc.kernel_order() == [f"10.201.0.{i}" for i in (6, 4, 2, 5, 1, 3)]
    clients = [f"10.199.0.{i}" for i in range(2, 10)]

    def flows(base: int, count: int = 130) -> list[tuple[str, int]]:
        return [(clients[i % len(clients)], base + i) for i in range(count)]

    table, got = svc.check(flows(20000), mh_port=True)
    assert table.slot_counts()["10.201.0.6"] == 0
    assert set(got.values()) == {f"10.201.0.{i}" for i in range(1, 6)}

    # Drained: weight 0 keeps its slots (last weight 3); mh-fallback re-hashes its flows.
    svc.edit("10.201.0.5", 0)
    table, got = svc.check(flows(21000), mh_port=True)
    assert "10.201.0.5" not in got.values()
    primary = [table.dests[table.table[mh.mh_hashkey(a, p, mh.HASH1) % mh.TAB_SIZE]].address for a, p in got]
    assert primary.count("10.201.0.5") > 10, "too few flows exercised the fallback"

    # Deleted and added back: now at the head of the list, so the table changes.
    svc.delete("10.201.0.3")
    svc.add("10.201.0.3", 2)
    assert svc.kernel_order()[0] == "10.201.0.3"
    svc.check(flows(22000), mh_port=True)


def test_ipv4_without_mh_port_in_kdsr_order(netns):
    _lab(netns, "lb", 4)
    svc = MhService(netns, "lb", "10.200.0.1", ("mh-fallback",))
    wanted = mh.kdsr_order(["10.201.0.20", "10.201.0.3", "10.201.0.100", "10.201.0.7"])
    # kdsr adds last-first (apply.py converge_commands) so the list reads sorted.
    for address in reversed(wanted):
        svc.add(address, 1)
    assert svc.kernel_order() == wanted
    # One flow per client address, then one client from many ports: without
    # mh-port only the address counts.
    flows = [(f"10.199.0.{i}", 30000 + i) for i in range(10, 110)]
    flows += [("10.199.0.200", 31000 + i) for i in range(40)]
    _, got = svc.check(flows, mh_port=False)
    assert len({got[f] for f in flows if f[0] == "10.199.0.200"}) == 1
    assert len(set(got.values())) == 4


def test_ipv6_mh_port_folds_the_address(netns):
    _lab(netns, "lb", 6)
    svc = MhService(netns, "lb", "fd00:200::1", ("mh-fallback", "mh-port"))
    # Destinations that differ in several 32-bit words, so the XOR fold matters.
    for address, weight in (
        ("fd00:201:0:1::a", 1),
        ("fd00:201:1234:2::b", 2),
        ("fd00:201:0:3:ffff::c", 1),
        ("fd00:201:abcd:4::d", 1),
    ):
        svc.add(address, weight)
    flows = [(norm(V6_CLIENTS[i % len(V6_CLIENTS)]), 40000 + i) for i in range(150)]
    _, got = svc.check(flows, mh_port=True)
    assert len(set(got.values())) == 4
