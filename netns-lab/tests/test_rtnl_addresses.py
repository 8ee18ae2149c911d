"""kdsr's own rtnetlink address code (kdsr/kernel/rtnl_addr.py) against the
real kernel, checked with iproute2: what a batch writes is what ``ip``
shows, the dump reads it back in the kernel's order, and a refused message
inside a batch is named while the kernel goes on with the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PYTHON = sys.executable or "python3"
ROOT = str(Path(__file__).resolve().parents[2])

# Runs inside the namespace: each operation in argv[2] (JSON) through
# SystemKernel, printing what came of each as JSON.
HELPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kdsr.kernel import KernelError
from kdsr.kernel.system import SystemKernel
from kdsr.model import Address
k = SystemKernel()
out = []
for op, args in json.loads(sys.argv[2]):
    if op == "local":
        out.append(sorted(k.links.local_addresses()))
        continue
    if op == "list":
        out.append([[a.ifname, a.cidr, a.label] for name in args for a in k.links.addr_list(name)])
        continue
    done, error = [], None
    try:
        k.links.addr_write(op == "add", [Address(*a) for a in args], done)
    except KernelError as exc:
        error = str(exc)
    out.append({"done": [a.cidr for a in done], "error": error, "writes": k.writes})
print(json.dumps(out))
"""


def kdsr_ops(netns, ops: list) -> list:
    return json.loads(netns.run("a", [PYTHON, "-c", HELPER, ROOT, json.dumps(ops)], timeout=120).stdout)


def ip_shows(netns, ifname: str) -> list[list[str]]:
    """[ifname, cidr, label] as iproute2 reads them, kdsr's conventions: the
    IPv4 label only when it is not the interface's own name."""
    shown = json.loads(netns.run("a", ["ip", "-j", "addr", "show", "dev", ifname]).stdout)
    found = []
    for info in shown[0]["addr_info"]:
        label = info.get("label", "")
        found.append([ifname, f"{info['local']}/{info['prefixlen']}", "" if label == ifname else label])
    return found


def lab(netns) -> None:
    netns.add("a")
    netns.run("a", "ip link add v0 type veth peer name v1")
    netns.run("a", "ip link set v0 up")
    netns.run("a", "ip link set v1 up")


def test_a_batch_of_addresses_is_what_ip_shows_and_reads_back_in_kernel_order(netns):
    lab(netns)
    v4 = [["v0", f"10.30.{i // 250}.{i % 250 + 1}/32", ""] for i in range(600)]  # more than one batch
    labelled = [["v0", "192.0.2.1/24", "v0:kdsr"], ["v0", "192.0.2.9/32", "v0:kdsr"]]
    v6 = [["v1", "2001:db8::1/128", ""], ["v1", "2001:db8:0:1::/64", ""], ["v1", "fd00::ffff:a/128", ""]]
    wrote, listed, local = kdsr_ops(
        netns, [["add", v4 + labelled + v6], ["list", ["v0", "v1", "absent"]], ["local", []]]
    )
    assert wrote["error"] is None
    assert wrote["done"] == [a[1] for a in v4 + labelled + v6]
    assert wrote["writes"] == len(v4 + labelled + v6)
    # The kernel's order is iproute2's: both read the same dump.
    assert listed == ip_shows(netns, "v0") + ip_shows(netns, "v1")
    mine = [tuple(a) for a in listed if not a[1].startswith("fe80:")]  # less the links' own
    assert sorted(mine) == sorted(map(tuple, v4 + labelled + v6))
    # Every interface's, lo's included, as a set of plain addresses.
    every = json.loads(netns.run("a", ["ip", "-j", "addr", "show"]).stdout)
    assert local == sorted({info["local"] for link in every for info in link["addr_info"]})
    assert "127.0.0.1" in local and "::1" in local and "10.30.2.100" in local
    # IPv4: local and peer address are the same, as `ip addr add` makes them.
    shown = json.loads(netns.run("a", ["ip", "-j", "addr", "show", "dev", "v0"]).stdout)[0]["addr_info"]
    assert all("address" not in info or info["address"] == info["local"] for info in shown)

    (deleted,) = kdsr_ops(netns, [["del", v4 + labelled + v6]])
    assert deleted["error"] is None and len(deleted["done"]) == len(v4 + labelled + v6)
    assert [a for a in ip_shows(netns, "v0") + ip_shows(netns, "v1") if not a[1].startswith("fe80:")] == []


def test_a_refused_address_is_named_and_the_kernel_goes_on_with_the_batch(netns):
    lab(netns)
    netns.run("a", "ip addr add 10.40.0.2/32 dev v0")
    batch = [["v0", "10.40.0.1/32", ""], ["v0", "10.40.0.2/32", ""], ["v0", "10.40.0.3/32", ""]]
    gone = [["v0", "10.40.0.1/32", ""], ["v0", "10.40.0.9/32", ""], ["v0", "10.40.0.3/32", ""]]
    nowhere = [["v0", "10.40.0.5/32", ""], ["nosuch0", "10.40.0.6/32", ""]]
    added, deleted, missing = kdsr_ops(netns, [["add", batch], ["del", gone], ["add", nowhere]])

    assert added["done"] == ["10.40.0.1/32", "10.40.0.3/32"]
    assert added["error"].startswith("add address 10.40.0.2/32 on v0: EEXIST"), added["error"]
    assert deleted["done"] == ["10.40.0.1/32", "10.40.0.3/32"]
    assert deleted["error"].startswith("del address 10.40.0.9/32 on v0: EADDRNOTAVAIL"), deleted["error"]
    assert missing["done"] == ["10.40.0.5/32"]
    assert "nosuch0 does not exist" in missing["error"], missing["error"]
    assert [a[1] for a in ip_shows(netns, "v0") if a[1].startswith("10.")] == ["10.40.0.2/32", "10.40.0.5/32"]
