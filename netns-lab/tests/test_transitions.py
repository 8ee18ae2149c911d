"""Intent transitions and a real rollback, against the host kernel.

Each transition is one nft transaction the kernel must accept, after which
the kernel equals a fresh apply of the new intent (compared as the kernel
lists it) and the next plan is empty.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = json.loads((ROOT / "examples" / "l2-web.json").read_text())


def variant(**changes):
    doc = copy.deepcopy(EXAMPLE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = doc
        for part in parents:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return doc


TRANSITIONS = [
    ("example", variant()),
    ("new seed", variant(services__web__hashing={"seed": 7})),
    ("other interface, no IPv6 service", variant(load_balancers__lb1__interface="eth1", services__web6=None)),
    (
        "pinned MACs",
        variant(
            pools__web__servers=[
                {"address": "10.10.0.11", "mac": "02:00:00:00:00:11"},
                {"address": "10.10.0.12", "mac": "02:00:00:00:00:12"},
            ]
        ),
    ),
    (
        "service moved to its own pool",
        variant(pools__media={"servers": [{"node": "s2"}, {"node": "s3", "weight": 2}]}, services__media__pool="media"),
    ),
    ("back to the example", variant()),
]


class Node:
    """A throw-away namespace with eth0 and eth1, standing in for a load balancer."""

    def __init__(self, tmp: Path):
        self.ns = f"kdsr-{secrets.token_hex(3)}-tr"
        self.tmp = tmp
        self.state = tmp / f"{self.ns}-state"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        for ifname in ("eth0", "eth1"):
            subprocess.run(
                ["ip", "-n", self.ns, "link", "add", ifname, "type", "veth", "peer", "name", f"p{ifname}"], check=True
            )

    def kdsr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "kdsr", "--state-dir", str(self.state), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    def apply(self, doc: dict, name: str) -> subprocess.CompletedProcess:
        path = self.tmp / f"{self.ns}-{name.replace(' ', '-').replace(',', '')}.json"
        path.write_text(json.dumps(doc))
        self.last = path
        return self.kdsr("apply", str(path), "--node", "lb1")

    def table(self) -> dict:
        """The kdsr table as the kernel lists it, independent of creation order:
        maps (with elements) and chains by name, rules in chain order, no handles."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "nft", "-j", "list", "table", "netdev", "kdsr"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        shape: dict = {"map": {}, "chain": {}, "rule": {}}
        for item in json.loads(out)["nftables"]:
            ((kind, obj),) = item.items()
            if kind not in shape:
                continue
            obj = {k: v for k, v in obj.items() if k != "handle"}
            if kind == "map":
                obj["elem"] = sorted(json.dumps(e, sort_keys=True) for e in obj.get("elem", []))
            if kind == "rule":
                shape["rule"].setdefault(obj["chain"], []).append(obj)
            else:
                shape[kind][obj["name"]] = obj
        return shape

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@pytest.fixture
def nodes(lab_available, tmp_path):
    made = []

    def make():
        made.append(Node(tmp_path))
        return made[-1]

    yield make
    for node in made:
        node.delete()


def test_transitions_equal_a_fresh_apply(nodes):
    walker = nodes()
    for name, doc in TRANSITIONS:
        result = walker.apply(doc, name)
        assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
        replan = walker.kdsr("plan", str(walker.last), "--node", "lb1", "--detailed-exitcode")
        assert replan.returncode == 0, f"{name}: plan not empty after apply:\n{replan.stdout}"
        fresh = nodes()
        assert fresh.apply(doc, name).returncode == 0
        assert walker.table() == fresh.table(), f"{name}: kernel differs from a fresh apply"
        fresh.delete()


def test_real_failure_rolls_back_the_nft_transaction(nodes):
    node = nodes()
    assert node.apply(variant(services__web__hashing={"seed": 7}), "before").returncode == 0
    before = node.table()
    # A record the kernel will refuse to restore: the sysctl step after the nft
    # transaction fails with EINVAL, so the transaction must be undone.
    state_file = node.state / "lb1.json"
    state = json.loads(state_file.read_text())
    state["sysctl_previous"] = {"net/ipv4/conf/eth0/arp_ignore": "not-a-number"}
    state_file.write_text(json.dumps(state))
    result = node.apply(variant(), "after")
    assert result.returncode == 6, result.stderr
    assert "previous state was restored" in result.stderr
    assert node.table() == before, "the rolled-back table differs from the one before"
    rules = [r for chain in node.table()["rule"].values() for r in chain]
    assert rules and all(r["expr"] for r in rules), "rollback left empty rules"
    replan = node.kdsr("plan", str(node.tmp / f"{node.ns}-before.json"), "--node", "lb1", "--detailed-exitcode")
    assert replan.returncode in (0, 2) and "pool-" not in replan.stdout, replan.stdout
