"""Cross-object rules for health monitors (``pools.*.health``, ``services.*.health``).

The schema checks each monitor's shape and ranges; these rules check what a
monitor needs from the rest of the intent: a VIP and port to probe, a
protocol the service carries, and a DSR path the load balancer can send a
probe down (``kdsr/compile/targets.py`` builds the probes from the same facts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kdsr.intent.model import ANNOUNCE_VRRP, ENGINE_IPVS, MONITOR_DSR, MONITOR_PLAIN
from kdsr.intent.values import parse_port, port_entries, service_engine, service_protocols

Report = Callable[[str, str, str], None]

# The protocol each monitor type speaks (kdsr/compile/targets.py has the same).
MONITOR_PROTOCOL = {"tcp": "tcp", "http": "tcp", "https": "tcp", "udp": "udp"}


def monitors_at(value: object, pointer: str) -> Iterator[tuple[dict, str]]:
    """(monitor, pointer) for the one object or the list written at ``pointer``."""
    if isinstance(value, dict):
        yield value, pointer
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield item, f"{pointer}/{i}"


def services_by_pool(services: dict) -> dict[str, list[str]]:
    """Names of the services on each pool, sorted: a pool monitor probes the first one's VIP."""
    by_pool: dict[str, list[str]] = {}
    for name in sorted(services):
        pool = services[name].get("pool")
        if isinstance(pool, str):
            by_pool.setdefault(pool, []).append(name)
    return by_pool


def _port_ranges(service: dict) -> list[tuple[int, int]]:
    ranges = []
    for _pointer, item in port_entries(service.get("ports", []), ""):
        try:
            ranges.append(parse_port(item))
        except (TypeError, ValueError):
            continue  # reported where the port is checked
    return ranges


def port_numbers(services, most: int = 9) -> list[int]:
    """The port numbers the services use, sorted; at most ``most`` of them
    (enough to tell one from several, and to list some in a message)."""
    numbers: set[int] = set()
    for service in services:
        for first, last in _port_ranges(service):
            numbers.update(range(first, min(last, first + most) + 1))
    return sorted(numbers)[:most]


def probed_service(names: list[str], services: dict, port: object, protocol: str | None) -> str:
    """The service a monitor probes through: with a port, the first (by name)
    that carries that port and the monitor's protocol; else the first."""
    if isinstance(port, int):
        for name in names:
            service = services[name]
            carries = protocol is None or protocol in service_protocols(service)
            if carries and any(first <= port <= last for first, last in _port_ranges(service)):
                return name
    return names[0]


def check_health(services: dict, pools: dict, report: Report) -> None:
    for name, service in services.items():
        for monitor, pointer in monitors_at(service.get("health"), f"/services/{name}/health"):
            _check_monitor(monitor, pointer, [name], services, report)
    by_pool = services_by_pool(services)
    for name, pool in pools.items():
        on_pool = by_pool.get(name, [])
        for monitor, pointer in monitors_at(pool.get("health"), f"/pools/{name}/health"):
            _check_monitor(monitor, pointer, on_pool, services, report, pool=name)


def _check_monitor(
    monitor: dict, pointer: str, names: list[str], services: dict, report: Report, pool: str | None = None
) -> None:
    kind = monitor.get("type")
    mode = monitor.get("mode", MONITOR_DSR)
    interval = monitor.get("interval", 1)
    timeout = monitor.get("timeout", 0.5)
    if isinstance(interval, int | float) and isinstance(timeout, int | float) and timeout >= interval:
        report(
            f"{pointer}/timeout",
            f"timeout {timeout} s is not less than interval {interval} s: probes of one server would overlap.",
            f"Use a timeout below {interval} s, or a longer interval.",
        )
    if not names:
        if mode == MONITOR_DSR:
            report(
                f"{pointer}/mode",
                f"pool {pool} has no service, so a dsr monitor has no VIP to send its probe to.",
                'Add a service on the pool, or use "mode": "plain" (probes the servers\' own addresses).',
            )
        elif "port" not in monitor:
            report(
                pointer,
                f"pool {pool} has no service to take a port from.",
                'Give the monitor a "port".',
            )
        return
    if "port" not in monitor:
        numbers = port_numbers(services[n] for n in names)
        if len(numbers) > 1:
            listed = ", ".join(str(p) for p in numbers[:8]) + (", ..." if len(numbers) > 8 else "")
            covers = f"pool {pool}'s services use" if pool is not None else f"service {names[0]} uses"
            report(
                pointer,
                f"{covers} more than one port ({listed}), and the monitor names none: it would probe "
                "one of them and judge every port by it.",
                f'Give the monitor the "port" to probe, e.g. "port": {numbers[0]}.',
            )
            return
    name = probed_service(names, services, monitor.get("port"), MONITOR_PROTOCOL.get(kind))
    target = services[name]
    protocol = MONITOR_PROTOCOL.get(kind)
    # A plain monitor with its own port may probe anything the server runs
    # (a health endpoint beside the service); otherwise it probes the service.
    own_port = mode == MONITOR_PLAIN and "port" in monitor
    if protocol and not own_port and protocol not in service_protocols(target):
        carried = "/".join(service_protocols(target))
        article = "an" if kind.startswith("http") else "a"
        report(
            f"{pointer}/type",
            f"{article} {kind} monitor needs {protocol}, but service {name} carries only {carried}.",
            f'Use a "{"udp" if protocol == "tcp" else "tcp"}" monitor, or add {protocol} to the service\'s protocols.',
        )
    if mode == MONITOR_DSR and service_engine(target) == ENGINE_IPVS:
        report(
            f"{pointer}/mode",
            f"a dsr monitor cannot follow service {name}'s ipvs engine: IPVS makes the VIP a local address "
            "of the load balancer, so a probe addressed to it never leaves the host.",
            f'Use "mode": "{MONITOR_PLAIN}" (probes the server\'s own address), or the nft engine.',
        )
    announce = target.get("announce")
    if mode == MONITOR_DSR and isinstance(announce, dict) and announce.get("mode") == ANNOUNCE_VRRP:
        report(
            f"{pointer}/mode",
            f"a dsr monitor cannot probe through service {name}'s VIP: it is owned by VRRP, so on the load "
            "balancer that holds it the VIP is a local address, and a probe addressed to it never leaves the host.",
            f'Use "mode": "{MONITOR_PLAIN}" (probes the server\'s own address).',
        )
    if "port" not in monitor and not port_entries(target.get("ports", []), ""):
        report(pointer, f"service {name} has no port to probe.", 'Give the monitor a "port".')
