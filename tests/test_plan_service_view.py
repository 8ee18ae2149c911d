"""The plan opens in the operator's terms: services, and servers' shares.

What a change does to services and servers comes first (added, removed,
moved; each server's share of its pool's table before and after, and its
state), and a deletion of a live service is never hidden behind "and N more"
however large the plan.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from cli_in_process import install_kernel, run_kdsr

from kdsr import operations
from kdsr.intent import parse_intent
from kdsr.kernel.fake import FakeKernel
from kdsr.kernel.state import StateStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((ROOT / "examples" / "l2-web.json").read_text())


def _intent(doc):
    return parse_intent(json.dumps(doc), "intent.json")


def _applied(tmp_path, doc, node="lb1"):
    kernel, store = FakeKernel(), StateStore(tmp_path / "state")
    kernel.sysctl.values.update({"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"})
    operations.apply(operations.prepare(_intent(doc), node, kernel, store), kernel, store)
    return kernel, store


def test_a_drain_plan_shows_each_servers_share_before_and_after(tmp_path, monkeypatch):
    kernel = install_kernel(monkeypatch, FakeKernel())
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(EXAMPLE))
    assert run_kdsr(tmp_path, "apply", str(path), "--node", "lb1").exit_code == 0
    result = run_kdsr(tmp_path, "drain", str(path), "s2", "--node", "lb1", "--dry-run")
    assert kernel.writes and result.exit_code == 0, result.output
    text = result.output
    assert "Servers (share of the pool's Maglev table, before -> after):" in text
    assert "- 10.10.0.12  drained (s2)  33.3% -> 0.0%" in text, text
    assert "~ 10.10.0.11  weight 1 (s1)  33.3% -> 50.0%" in text, text
    assert "Services:" not in text  # no service changed
    # The summary comes before the object lines.
    assert text.index("Servers (share") < text.index("~ nft element")


def test_removed_live_services_are_listed_whatever_the_plan_size(tmp_path):
    kernel, store = _applied(tmp_path, EXAMPLE)
    big = copy.deepcopy(EXAMPLE)
    big["services"] = {
        f"svc{i:04d}": {"vip": f"10.20.{i // 250}.{i % 250 + 1}", "ports": 80, "protocols": "tcp", "pool": "web"}
        for i in range(300)
    }
    plan = operations.prepare(_intent(big), "lb1", kernel, store).plan
    from kdsr.plan_format import render_json, render_text

    text = render_text(plan, "intent.json")
    for name, what in (
        ("dns", "10.10.0.100 tcp/53 udp/53 -> pool web"),
        ("media", "10.10.0.101 udp/5000-5010 -> pool web"),
        ("web", "10.10.0.100 tcp/80,443 -> pool web"),
        ("web6", "fd00:10::100 tcp/80 udp/80 -> pool web6"),
    ):
        assert f"  - service {name}: {what} (no longer balanced here)" in text, text[:3000]
    assert "+ ... and 280 more services added (see --json)" in text
    doc = json.loads(render_json(plan, "intent.json"))
    assert len([s for s in doc["service_changes"]["services"] if s["action"] == "create"]) == 300


def test_pinned_and_l3_tables_are_read_as_servers(tmp_path):
    pinned = copy.deepcopy(EXAMPLE)
    for service in pinned["services"].values():
        service["hashing"] = {"flow_pinning": {"timeout": 30}}
    l3 = json.loads((ROOT / "examples" / "l3-ipip.json").read_text())
    for doc in (pinned, l3):
        kernel, store = _applied(tmp_path / str(id(doc)), doc)
        weighted = copy.deepcopy(doc)
        pool = next(iter(weighted["pools"].values()))
        pool["servers"][0]["weight"] = 2
        plan = operations.prepare(_intent(weighted), "lb1", kernel, store).plan
        rows = {r["server"]: r for p in plan.service_changes["pools"] for r in p["servers"]}
        first = sorted(rows)[0]
        assert rows[first]["share_before"] == "33.3%" and rows[first]["share_after"] == "50.0%", rows
        assert all(not r["server"].startswith("id ") for r in rows.values()), rows
