"""`kdsr run` in the L2 lab: health checks that follow the DSR path, with real
servers, real packets and the real CLI (host tier).

- A server's listener stops: the daemon takes it out of the table, and the
  test dates the last new flow that still reached it (a refused connection)
  against interval x fall + timeout + 0.5 s; the other servers keep
  answering.  The listener comes back: the server rejoins after `rise`
  successes and new flows reach it again.
- A server loses the VIP on its loopback while its service keeps listening
  on its own address: the dsr check (probe to the VIP through the server's
  MAC) marks it down, the plain check (probe to its own address) does not.
- Drain: 100 long-lived TCP connections to a flow-pinned VIP; `kdsr drain`
  one server while `kdsr run` runs: its open connections keep exchanging data
  with it, no new flow reaches it; `kdsr undrain` brings new flows back.
- SIGHUP after an edit (weight 0 for one server): new flows leave it; an
  edit that does not validate is refused and the running intent stays.
- Drift: a service-map element and a selector slot deleted by hand with
  `nft delete element` are back within `--check-interval`, logged and counted.
- SIGTERM: the daemon exits 0 and leaves the kernel as its last apply made it.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import time

import healthlab
import lab as netns_lab
import pytest
from healthlab import FALL, INTERVAL, JITTER, REACTION_BOUND, RISE, TIMEOUT, VIP_DSR, VIP_PINNED, flows_of, held


@pytest.fixture(scope="module")
def health_lab(lab_available, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("health")
    with netns_lab.L2Lab(workdir=workdir / "lab", vips=healthlab.VIPS) as lab:
        hl = healthlab.deploy(lab, workdir)
        yield hl
        healthlab.teardown(hl)


def test_a_dead_listener_is_out_within_the_bound_and_rejoins_after_rise(health_lab):
    hl = health_lab
    assert all(hl.state_of("web", f"10.10.0.1{i}") == "up" for i in (1, 2, 3))
    stream = hl.stream(12)
    time.sleep(2)
    killed_at = time.time()
    hl.responders["s2"].stop()
    try:
        hl.wait_for(lambda: hl.state_of("web", "10.10.0.12") == "down", 15, "s2 marked down")
        flows = flows_of(stream, 12)
        last_on_s2 = healthlab.last_refused(flows, killed_at)
        print(f"\nlast new flow on the dead server {last_on_s2:.2f} s after its listener stopped", end="")
        print(f", bound {REACTION_BOUND} s")
        assert last_on_s2 <= REACTION_BOUND, hl.log()
        healthlab.assert_taken_out(flows, killed_at, REACTION_BOUND)
    except BaseException:
        hl.start_responder("s2")  # the module's other tests need all three servers
        raise

    hl.start_responder("s2")
    back_at = time.time()
    hl.wait_for(lambda: hl.state_of("web", "10.10.0.12") == "up", 15, "s2 back up")
    rejoin = time.time() - back_at
    print(f"s2 back in the table {rejoin:.2f} s after its listener restarted (rise {RISE} x interval {INTERVAL})")
    assert rejoin <= INTERVAL * (RISE + 1) * (1 + JITTER) + TIMEOUT + 1.0
    again = flows_of(hl.stream(3), 3)
    assert all(f["ok"] for f in again) and {f["server"] for f in again} == {"s1", "s2", "s3"}


def test_the_dsr_check_sees_a_lost_vip_that_the_plain_check_misses(health_lab):
    hl = health_lab
    hl.lab.run("s3", ["ip", "addr", "del", f"{VIP_DSR}/32", "dev", "lo"])
    try:
        hl.wait_for(lambda: hl.state_of("web", "10.10.0.13") == "down", 15, "the dsr check marking s3 down")
        # The plain check probed s3 all along, and s3's own address still answers.
        time.sleep(INTERVAL * FALL)
        assert hl.state_of("plainweb", "10.10.0.13") == "up"
        view = hl.view()
        s3 = next(s for s in view["servers"] if s["pool"] == "web" and s["server"] == "10.10.0.13")
        assert s3["last_error"] == "timeout" and not s3["in_table"]
        flows = flows_of(hl.stream(2), 2)
        assert all(f["ok"] for f in flows) and {f["server"] for f in flows} == {"s1", "s2"}, flows[:3]
    finally:
        hl.kdsr("s3", "apply", str(hl.intent_path), "--node", "s3")  # puts the VIP back (drift repaired)
    hl.wait_for(lambda: hl.state_of("web", "10.10.0.13") == "up", 15, "s3 back up")


def test_drain_keeps_open_connections_and_sends_no_new_flow(health_lab):
    hl = health_lab
    go = hl.workdir / "go-drain"
    holder = hl.hold(100, go)  # returns once all 100 connections did their first exchange
    try:
        hl.kdsr("lb", "drain", str(hl.intent_path), "s1", "--node", "lb1")
        view = hl.view() or {}
        assert "s1" in view.get("drained", []) or hl.wait_for(
            lambda: "s1" in (hl.view() or {}).get("drained", []), 5, "the health view showing the drain"
        )
        # New flows for a few seconds while the old connections stay open.
        flows = flows_of(hl.stream(3, vip=VIP_PINNED), 3)
        go.touch()
        report = held(holder)
    finally:
        go.touch()
        hl.kdsr("lb", "undrain", str(hl.intent_path), "s1", "--node", "lb1")
    assert all(f["ok"] for f in flows), [f for f in flows if not f["ok"]][:3]
    new_servers = {f["server"] for f in flows}
    assert new_servers == {"s2", "s3"}, f"new flows after the drain went to {new_servers}"

    connections = report["connections"]
    assert not [c for c in connections if c["before"] is None], [c for c in connections if c["before"] is None][:3]
    on_s1 = [c for c in connections if c["before"] == "s1"]
    print(f"\n{len(on_s1)} of 100 open connections were on s1 when it was drained; {len(flows)} new flows after")
    assert on_s1, "no open connection was on the drained server: the test proved nothing"
    broken = [c for c in connections if not c["ok"] or c["after"] != c["before"]]
    assert not broken, f"{len(broken)} of 100 open connections broke or moved: {broken[:3]}"

    # Undrained: new flows reach s1 again.
    again = flows_of(hl.stream(2, vip=VIP_PINNED), 2)
    assert all(f["ok"] for f in again) and "s1" in {f["server"] for f in again}


def _reload(hl, doc: dict, event: str) -> None:
    """Write ``doc`` as the daemon's intent, SIGHUP it, wait for ``event`` in its log."""
    seen = hl.log().count(f"event={event}")
    applies = (hl.view() or {}).get("applies", 0)
    hl.intent_path.write_text(json.dumps(doc, indent=1))
    hl.daemon.popen.send_signal(signal.SIGHUP)  # our own child, by its Popen
    hl.wait_for(lambda: hl.log().count(f"event={event}") > seen, 30, f"kdsr run logging {event}")
    if event == "reloaded":  # it logs, then applies
        hl.wait_for(lambda: (hl.view() or {}).get("applies", 0) > applies, 30, "kdsr run applying the reload")


def test_a_sighup_applies_the_edited_intent_and_a_bad_edit_keeps_the_running_one(health_lab):
    """kdsr run's reload (kdsr/intent/reload.py validates and builds only the
    changed entries): an edit that takes s3 out of pool web by weight 0
    reaches the kernel, and new flows stop going to s3; an edit that does not
    validate is refused and the running intent keeps serving; the original
    file brings s3 back."""
    hl = health_lab
    original = json.loads(hl.intent_path.read_text())
    weighted = copy.deepcopy(original)
    weighted["pools"]["web"]["servers"][2]["weight"] = 0
    broken = copy.deepcopy(weighted)
    broken["pools"]["web"]["servers"][0]["weight"] = True  # not an integer, though True == 1 in Python
    broken["services"]["web"]["vip"] = "10.10.0.300"
    try:
        _reload(hl, weighted, "reloaded")
        flows = flows_of(hl.stream(2), 2)
        assert all(f["ok"] for f in flows), [f for f in flows if not f["ok"]][:3]
        assert {f["server"] for f in flows} == {"s1", "s2"}, "new flows after weight 0 for s3"

        _reload(hl, broken, "reload-failed")
        failed = [line for line in hl.log().splitlines() if "event=reload-failed" in line][-1]
        assert "/services/web/vip" in failed and "/pools/web/servers/0/weight" in failed, failed
        flows = flows_of(hl.stream(2), 2)
        assert all(f["ok"] for f in flows) and {f["server"] for f in flows} == {"s1", "s2"}
    finally:
        _reload(hl, original, "reloaded")
    flows = flows_of(hl.stream(2), 2)
    assert all(f["ok"] for f in flows) and "s3" in {f["server"] for f in flows}


CHECK_INTERVAL = 2.0  # `kdsr run --check-interval` in the drift test
REPAIR_SLACK = 5.0  # on top of the interval: the repair lists the table and applies, slow on a loaded 2-CPU box
METRICS = "127.0.0.1:9469"  # in the lb namespace


def _has_element(hl, nmap: str, key: str) -> bool:
    result = hl.lab.run("lb", ["nft", "get", "element", "netdev", "kdsr", nmap, "{", key, "}"], check=False)
    return result.returncode == 0


def test_kdsr_run_repairs_hand_deleted_map_elements_within_its_check_interval(health_lab):
    """While `kdsr run` runs (--check-interval 2), a service-map element (the
    DSR VIP's port 80) and a slot of pool web's selector are deleted by hand
    with `nft delete element`: both are back within the interval (+ slack),
    the log names them in a drift-repaired line, the metric counts the
    repair, and new flows reach all three servers again."""
    hl = health_lab
    hl.daemon.stop(signal.SIGTERM)
    hl.start_daemon(options=("--check-interval", f"{CHECK_INTERVAL:g}", "--metrics", METRICS))
    try:
        hl.wait_for(lambda: "event=metrics" in hl.log(), 30, "kdsr run serving metrics")
        terse = hl.lab.run("lb", ["nft", "-t", "list", "table", "netdev", "kdsr"]).stdout
        (slot_map,) = re.findall(r"map (pool-web-v4-\w+) ", terse)
        service_key, slot_key = f"{VIP_DSR} . tcp . 80", "0"
        assert _has_element(hl, "services-v4", service_key) and _has_element(hl, slot_map, slot_key)
        # Checks run and find nothing while nothing changed.
        hl.wait_for(lambda: hl.metrics(METRICS)["kdsr_drift_check_duration_seconds_count"] >= 2, 30, "two drift checks")
        assert hl.metrics(METRICS)["kdsr_drift_repairs_total"] == 0 and "event=drift-repaired" not in hl.log()

        deleted_at = time.monotonic()
        hl.lab.run("lb", ["nft", "delete", "element", "netdev", "kdsr", "services-v4", "{", service_key, "}"])
        hl.lab.run("lb", ["nft", "delete", "element", "netdev", "kdsr", slot_map, "{", slot_key, "}"])
        assert not _has_element(hl, "services-v4", service_key) and not _has_element(hl, slot_map, slot_key)
        hl.wait_for(
            lambda: _has_element(hl, "services-v4", service_key) and _has_element(hl, slot_map, slot_key),
            CHECK_INTERVAL + REPAIR_SLACK + 5,
            "both elements back",
        )
        took = time.monotonic() - deleted_at
        print(f"\nboth elements back {took:.2f} s after the delete (check interval {CHECK_INTERVAL:g} s)")
        assert took <= CHECK_INTERVAL + REPAIR_SLACK, hl.log()

        repaired = [line for line in hl.log().splitlines() if "event=drift-repaired" in line]
        named = " ".join(repaired)
        assert f"services-v4[{service_key}]" in named and f"{slot_map}[{slot_key}]" in named, repaired
        # The two deletes are two commits: one check or two may see them.
        assert hl.metrics(METRICS)["kdsr_drift_repairs_total"] == len(repaired) >= 1
        flows = flows_of(hl.stream(2), 2)
        assert all(f["ok"] for f in flows) and {f["server"] for f in flows} == {"s1", "s2", "s3"}, flows[:3]
    finally:
        hl.daemon.stop(signal.SIGTERM)
        hl.start_daemon()


def test_metrics_on_every_address_count_real_traffic_per_service_and_server(health_lab):
    """`kdsr run --metrics :PORT` listens on every address: the client
    scrapes it at the load balancer's own address, from its namespace.
    After flows to the DSR VIP, the kernel's counters are in the scrape by
    service and by pool and server (never by nft map), with bytes beside
    packets, and the pool's servers carry one label set."""
    hl = health_lab
    hl.daemon.stop(signal.SIGTERM)
    hl.start_daemon(options=("--metrics", ":9469"))
    try:
        hl.wait_for(lambda: "event=metrics" in hl.log(), 30, "kdsr run serving metrics")
        assert "listen=[::]:9469" in hl.log() or "listen=0.0.0.0:9469" in hl.log(), hl.log()
        scraped = hl.metrics("10.10.0.2:9469", host="client")
        assert scraped['kdsr_server_up{pool="web",server="10.10.0.12",server_node="s2"}'] == 1
        build = [k for k in scraped if k.startswith("kdsr_build_info{")]
        assert len(build) == 1 and scraped[build[0]] == 1
        flows = flows_of(hl.stream(2), 2)
        assert all(f["ok"] for f in flows) and {f["server"] for f in flows} == {"s1", "s2", "s3"}, flows[:3]
        web80 = 'port="80",protocol="tcp",service="web",vip="10.10.0.100"'

        def counted() -> bool:
            now = hl.metrics("10.10.0.2:9469", host="client")
            return now.get(f"kdsr_service_packets_total{{{web80}}}", 0) >= len(flows)

        hl.wait_for(counted, 10, "the flows in the service's counter")
        scraped = hl.metrics("10.10.0.2:9469", host="client")
        assert scraped[f"kdsr_service_bytes_total{{{web80}}}"] > scraped[f"kdsr_service_packets_total{{{web80}}}"]
        for i, server in enumerate(("s1", "s2", "s3"), 1):
            labels = f'pool="web",server="10.10.0.1{i}",server_node="{server}"'
            assert scraped[f"kdsr_server_packets_total{{{labels}}}"] > 0, sorted(scraped)
            assert scraped[f"kdsr_server_bytes_total{{{labels}}}"] > 0
            assert f"kdsr_server_in_table{{{labels}}}" in scraped
        assert not any("pool-web-" in name or "table=" in name for name in scraped), sorted(scraped)
    finally:
        hl.daemon.stop(signal.SIGTERM)
        hl.start_daemon()


def test_sigterm_leaves_the_kernel_as_the_last_apply_made_it(health_lab):
    hl = health_lab
    before = hl.lab.run("lb", ["nft", "-s", "list", "ruleset"]).stdout
    assert hl.daemon is not None
    code = hl.daemon.stop(signal.SIGTERM)
    assert code == 0, hl.log()
    assert "event=stopped" in hl.log()
    assert hl.lab.run("lb", ["nft", "-s", "list", "ruleset"]).stdout == before
    hl.start_daemon()  # a restart changes nothing either
    assert hl.lab.run("lb", ["nft", "-s", "list", "ruleset"]).stdout == before
