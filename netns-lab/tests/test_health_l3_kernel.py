"""`kdsr run` on the L3 modes (full-kernel tier): one mode per engine.

- nft, l3-ipip, `dsr` monitor: each probe to the VIP carries its server's
  tunnel mark, so it leaves through that server's ipip tunnel, as the
  traffic does.  A dead listener is taken out and rejoins after `rise`; a
  server that loses the VIP from its decap link is marked down by this
  check although its listener is fine (the DSR path is what is checked).
- ipvs, l3-gre, `plain` monitor (a dsr probe cannot leave a director whose
  VIP is local): the same stop/rejoin, through IPVS weights (mh scheduler).

The client streams new TCP flows; a flow that reaches the dead server is
refused, which dates the last new flow it got.  Under emulation (TCG) an
apply takes seconds rather than the host's 0.3 s, so the bound is the
issue's (interval x fall + timeout + 0.5 s) plus the apply time the daemon
itself reported for that change; both are printed.  Monitor timings are
longer than the defaults for the same reason (a slow guest must not fail
healthy probes).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import healthlab
import l3lab
import pytest

pytestmark = pytest.mark.full_kernel

ROOT = Path(__file__).resolve().parents[2]
VIP, PORT = "10.9.0.102", 8080
INTERVAL, TIMEOUT, RISE, FALL = 2.0, 1.0, 2, 3
SERVERS = l3lab.SERVERS
SCENARIOS = [("l3-ipip", "nft", "dsr"), ("l3-gre", "ipvs", "plain")]


def intent_for(mode: str, engine: str, check: str) -> dict:
    monitor = {"type": "tcp", "mode": check, "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL}
    if check == "plain":
        monitor["port"] = PORT
    pool = {"servers": [{"node": s} for s in SERVERS], "health": monitor}
    return l3lab.one_service_intent(VIP, PORT, {"mode": mode, "engine": engine}, pool)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("health-l3")
    with l3lab.L3Lab(workdir=workdir / "lab") as built:
        built.run("lb", ["modprobe", "-a", "ip_vs", "ip_vs_mh", "ipip", "ip_gre"])
        yield built


@pytest.fixture(params=SCENARIOS, ids=[f"{m}-{e}-{c}" for m, e, c in SCENARIOS])
def deployed(request, lab, tmp_path):
    mode, engine, check = request.param
    hl = healthlab.HealthLab(lab, tmp_path, intent_for(mode, engine, check), port=PORT)
    for server in SERVERS:
        hl.start_responder(server)
        hl.kdsr(server, "apply", str(hl.intent_path), "--node", server)
    hl.start_daemon(first_apply_within=300)
    hl.scenario = request.param  # type: ignore[attr-defined]
    yield hl
    if hl.daemon and hl.daemon.running():
        hl.daemon.stop()
    for responder in hl.responders.values():
        if responder.running():
            responder.stop()
    for server in SERVERS:
        hl.kdsr(server, "destroy", "--node", server)
    hl.kdsr("lb", "destroy", "--node", "lb1")


def state(hl: healthlab.HealthLab, server: str) -> str:
    return hl.state_of("app", SERVERS[server])


def applied_seconds(log: str, after: float) -> float:
    """The duration of the first apply the daemon logged after wall-clock ``after``."""
    for line in log.splitlines():
        match = re.search(r"ts=(\S+) event=applied .*seconds=([\d.]+)", line)
        if match and datetime.fromisoformat(match[1].replace("Z", "+00:00")).timestamp() >= after:
            return float(match[2])
    raise AssertionError(f"no apply logged after the stop:\n{log}")


def test_a_dead_listener_is_out_and_rejoins_after_rise(deployed):
    hl = deployed
    mode, engine, check = hl.scenario
    hl.wait_for(lambda: all(state(hl, s) == "up" for s in SERVERS), 60, "all servers up")
    stream = hl.stream(30, vip=VIP, every=0.05)
    time.sleep(4)
    killed_at = time.time()
    hl.responders["s2"].stop()
    hl.wait_for(lambda: state(hl, "s2") == "down", 60, "s2 marked down")
    flows = healthlab.flows_of(stream, 30)
    last_on_s2 = healthlab.last_refused(flows, killed_at)
    apply_took = applied_seconds(hl.log(), killed_at)
    bound = INTERVAL * FALL + TIMEOUT + 0.5 + apply_took
    print(
        f"\n{mode}/{engine}/{check}: last new flow on the dead server {last_on_s2:.2f} s after its listener "
        f"stopped; bound {bound:.2f} s = {INTERVAL * FALL + TIMEOUT + 0.5:g} s + the apply ({apply_took:.2f} s)"
    )
    assert last_on_s2 <= bound, hl.log()
    healthlab.assert_taken_out(flows, killed_at, bound)

    hl.start_responder("s2")
    back_at = time.time()
    hl.wait_for(lambda: state(hl, "s2") == "up", 60, "s2 back up")
    print(f"s2 back in the table {time.time() - back_at:.2f} s after its listener restarted (rise {RISE})")
    again = healthlab.flows_of(hl.stream(6, vip=VIP, every=0.05), 6)
    assert all(f["ok"] for f in again) and {f["server"] for f in again} == {"s1", "s2", "s3"}, again[:3]


# Only the dsr check can see this (a plain check probes the server's own address).
@pytest.mark.parametrize("deployed", SCENARIOS[:1], ids=["l3-ipip-nft-dsr"], indirect=True)
def test_the_tunnel_probe_sees_a_server_without_the_vip(deployed):
    hl = deployed
    hl.wait_for(lambda: all(state(hl, s) == "up" for s in SERVERS), 60, "all servers up")
    addrs = json.loads(hl.lab.run("s3", ["ip", "-j", "addr", "show"]).stdout)
    holders = sorted({a["ifname"] for a in addrs for i in a.get("addr_info", []) if i.get("local") == VIP})
    assert holders, addrs
    for holder in holders:  # lo and the decap link may both hold it
        hl.lab.run("s3", ["ip", "addr", "del", f"{VIP}/32", "dev", holder])
    try:
        hl.wait_for(lambda: state(hl, "s3") == "down", 60, "the tunnel check marking s3 down")
        flows = healthlab.flows_of(hl.stream(6, vip=VIP, every=0.05), 6)
        assert all(f["ok"] for f in flows) and {f["server"] for f in flows} == {"s1", "s2"}, flows[:3]
        print(f"\ns3 without the VIP (was on {', '.join(holders)}): down by the tunnel probe; new flows on s1, s2 only")
    finally:
        hl.kdsr("s3", "apply", str(hl.intent_path), "--node", "s3")  # drift repaired: the VIP is back
    hl.wait_for(lambda: state(hl, "s3") == "up", 60, "s3 back up")
