"""The nft engine's L3 chains and maps against the host's real nftables: the
compiled batch loads and reads back equal, the dry run of a first apply
(before its tunnel links exist) passes only with stand-ins, and a tunnel
link made again under its old name is noticed although no nftables
generation moved.

The host kernel has no ipip module, so the tunnel links are veth pairs with
the tunnels' names: nftables resolves a name to an interface index whatever
the kind of link.  Packets through real tunnels are the guest tier's
(netns-lab/tests/test_l3_dsr.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PYTHON = sys.executable or "python3"
ROOT = str(Path(__file__).resolve().parents[2])

# Runs inside the namespace; prints what it found as JSON.
HELPER = """
import json, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
from kdsr.apply import _rehearsal
from kdsr.compile import compile_node
from kdsr.diff import diff
from kdsr.intent.load import load_intent
from kdsr.kernel import KernelError, nft_json
from kdsr.kernel.system import SystemKernel
from kdsr.model import Observed

intent = load_intent(sys.argv[1] + "/examples/l3-ipip.json")
desired = compile_node(intent, "lb1")
plan = diff(desired, Observed())
(td,) = [t for t in plan.tables if t.family == "netdev"]
out = {"links": [link.name for link in desired.links]}
cache = tempfile.mkdtemp()
kernel = SystemKernel(cache_dir=cache)

def check(batch):
    try:
        kernel.nft.apply(batch, check_only=True)
        return "accepted"
    except KernelError as exc:
        return str(exc)

commands = nft_json.batch_for(td)
out["dry run before the links"] = check(commands)
out["rehearsal before the links"] = check(_rehearsal(plan, td, commands))
for link in desired.links:
    subprocess.run(["ip", "link", "add", link.name, "type", "veth", "peer", "name", "p" + link.name[5:]], check=True)
kernel.nft.apply(commands)
read = kernel.nft.read_table("netdev", "kdsr")
out["read back equal"] = read == td.desired
selector = next(c.name for c in td.desired.chains if c.name.startswith("pool-"))
out["fwd rule"] = [r.expr for r in read.chain(selector).rules if "fwd" in r.expr_json]
# Made again: same name, new index, and no nftables transaction.
first = desired.links[0].name
subprocess.run(["ip", "link", "del", first], check=True)
subprocess.run(["ip", "link", "add", first, "type", "veth", "peer", "name", "p" + first[5:]], check=True)
again = SystemKernel(cache_dir=cache)
reread = again.nft.read_table("netdev", "kdsr", reuse=True)
links = {m.name: m for m in reread.maps}["l3-tunnel-links"]
out["links map after"] = {str(k): e.value for k, e in links.elements}
out["read equal after"] = reread == td.desired
print(json.dumps(out))
"""


def test_l3_chains_load_read_back_and_a_remade_tunnel_link_is_noticed(netns):
    netns.add("a")
    netns.run("a", "ip link add eth0 type veth peer name eth9")
    out = json.loads(netns.run("a", [PYTHON, "-c", HELPER, ROOT], timeout=180).stdout)
    assert len(out["links"]) == 3
    # nft resolves the link map's names when it parses: before the links
    # exist the plain dry run is refused, the rehearsal (lo standing in) is not.
    assert "Interface does not exist" in out["dry run before the links"]
    assert out["rehearsal before the links"] == "accepted"
    assert out["read back equal"] is True
    assert out["fwd rule"] and "l3-tunnel-links" in json.dumps(out["fwd rule"])
    # The remade link's element now holds an index that is nobody's: the read
    # (not the record kept at the same generation) shows it as a number.
    remade = out["links"][0]
    assert remade not in out["links map after"].values()
    assert sorted(out["links map after"].values())[0].isdigit()
    assert set(out["links"][1:]) <= set(out["links map after"].values())
    assert out["read equal after"] is False
