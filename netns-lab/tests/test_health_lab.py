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
- SIGTERM: the daemon exits 0 and leaves the kernel as its last apply made it.
"""

from __future__ import annotations

import signal
import time

import healthlab
import lab as netns_lab
import pytest
from healthlab import FALL, INTERVAL, JITTER, REACTION_BOUND, RISE, TIMEOUT, VIP_DSR, flows_of


@pytest.fixture(scope="module")
def health_lab(lab_available, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("health")
    with netns_lab.L2Lab(workdir=workdir / "lab") as lab:
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
    hl.wait_for(lambda: hl.state_of("web", "10.10.0.12") == "down", 15, "s2 marked down")
    flows = flows_of(stream, 12)
    refused = [f for f in flows if not f["ok"] and "refused" in (f["error"] or "").lower()]
    assert refused, "no flow reached s2 after its listener stopped: the test measured nothing"
    last_on_s2 = max(f["t"] for f in refused) - killed_at
    print(f"\nlast new flow on the dead server {last_on_s2:.2f} s after its listener stopped, bound {REACTION_BOUND} s")
    assert last_on_s2 <= REACTION_BOUND, hl.log()
    later = [f for f in flows if f["t"] > killed_at + REACTION_BOUND]
    assert later and all(f["ok"] and f["server"] in ("s1", "s3") for f in later), [f for f in later if not f["ok"]][:3]
    # Flows before the stop were spread over all three.
    assert {f["server"] for f in flows if f["t"] < killed_at} == {"s1", "s2", "s3"}

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
