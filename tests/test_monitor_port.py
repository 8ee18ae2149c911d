"""A monitor probes what the operator means: its port is never a guess.

A pool that serves several port numbers, given a monitor without a port, used
to probe the port of the service whose name sorts first (a pool serving HTTP
on 80/443 and DNS on 53 was judged by 53).  Now that is an invalid intent that
names the ports; one port number is the default; with a port, the probe goes
through a service that carries that port and the monitor's protocol; and the
plan says what each monitor probes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdsr import cli
from kdsr.compile.targets import targets_for
from kdsr.errors import EXIT_INVALID_INTENT, IntentError
from kdsr.intent import parse_intent

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "l2-web.json"


def l2_web(monitor: dict, where: str = "pool") -> dict:
    doc = json.loads(EXAMPLE.read_text())
    if where == "pool":
        doc["pools"]["web"]["health"] = monitor
    else:
        doc["services"][where]["health"] = monitor
    return doc


def test_a_pool_monitor_without_a_port_over_several_ports_is_invalid(tmp_path):
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(l2_web({"type": "tcp"})))
    result = CliRunner().invoke(cli.main, ["validate", str(path)])
    assert result.exit_code == EXIT_INVALID_INTENT, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert f"{path}: /pools/web/health:" in line
    assert "53, 80, 443" in line and '"port"' in line


def test_a_service_monitor_without_a_port_over_two_ports_is_invalid():
    with pytest.raises(IntentError) as caught:
        parse_intent(json.dumps(l2_web({"type": "tcp"}, where="web")), "intent.json")
    assert "/services/web/health" in str(caught.value) and "80, 443" in str(caught.value)


def test_one_port_number_is_the_default():
    doc = l2_web({"type": "udp"}, where="dns")  # dns serves 53 over tcp and udp: one number
    targets = targets_for(parse_intent(json.dumps(doc), "intent.json"))
    assert {t.port for t in targets} == {53}


def test_a_pool_monitor_probes_through_a_service_that_carries_its_port_and_protocol():
    doc = l2_web({"type": "tcp", "port": 80})
    # A service that sorts first, on another VIP, carrying neither port 80 nor tcp.
    doc["services"]["alpha"] = {"vip": "10.10.0.102", "ports": 5353, "protocols": "udp", "pool": "web"}
    targets = [t for t in targets_for(parse_intent(json.dumps(doc), "intent.json")) if t.family == 4]
    assert {(t.service, t.address, t.port) for t in targets} == {("web", "10.10.0.100", 80)}


def test_the_plan_names_each_monitors_probe_target(tmp_path, monkeypatch):
    from cli_in_process import install_kernel, run_kdsr

    from kdsr.kernel.fake import FakeKernel

    install_kernel(monkeypatch, FakeKernel())
    path = tmp_path / "intent.json"
    path.write_text(json.dumps(l2_web({"type": "tcp", "port": 443})))
    result = run_kdsr(tmp_path, "plan", str(path), "--node", "lb1")
    assert result.exit_code == 0, result.output
    assert "tcp 10.10.0.100:443 (service web) through each server's DSR path, 3 servers of pool web" in result.output
