"""Prometheus metrics for `kdsr run --metrics ADDRESS:PORT` (off by default), with prometheus_client.

Three sources, in registries of the daemon's own (never the library's
global one, so nothing of another library's registers into it):

- what the daemon counts as it goes: applies and reloads (success,
  failure), apply and drift-check durations (histograms), drift repairs;
  instruments that the daemon's loop updates (``DaemonMetrics``);
- the health view and the pools' conditions, collected at each scrape
  (``HealthCollector``);
- the kernel's per-service and per-server packet and byte counters
  (``KernelFamilies``), from a listing of kdsr's whole nft table, and
  for the ipvs engine IPVS's own (with connections; `kdsr show`'s rows,
  kdsr/service_view.py read_ipvs).  At
  10,000 VIPs that listing, and formatting its samples, take longer
  than a scrape should: ``KernelCounters`` reads and formats in a thread of
  its own, one read at a time, and a scrape adds the last read's text to
  what it renders itself (``Scrape``).  While reads are quick a scrape
  waits for a fresh one; see ``KernelCounters``.

Every per-server series carries the same labels (pool, server,
server_node), the per-check ones add ``check``; services are named by the
intent's service names, pools by the intent's pool names: never by nft
object names.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import ipaddress
import platform
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from kdsr.compile.effective import POOL_ALL_DOWN_DROPPED, POOL_ALL_DOWN_KEPT
from kdsr.errors import UsageError
from kdsr.health.state import UP

SERVER_LABELS = ("pool", "server", "server_node")
CHECK_LABELS = (*SERVER_LABELS, "check")
SERVICE_LABELS = ("service", "vip", "protocol", "port")
# Applies run from a few milliseconds (nothing to change) to tens of
# seconds (a first apply of 10,000 VIPs); drift checks from a millisecond
# (nothing changed) to a full plan.
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DRIFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
KERNEL_WAIT = 0.1  # seconds a scrape waits for the kernel read it started
KERNEL_FRESH = 1.0  # seconds a read counts as fresh: scrapes closer than that share it
RESULTS = ("success", "failure")
# A scrape's answer is compressed when the scraper accepts gzip (Prometheus
# does): level 1 keeps most of the gain at a fraction of level 9's time.
GZIP_LEVEL = 1
_SELECTOR = re.compile(r"^pool-(?P<pool>.+)-v[46]-[0-9a-f]{6}$")  # kdsr/compile/selectors.py: Selector.name


def version() -> str:
    try:
        return importlib.metadata.version("kdsr")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class DaemonMetrics:
    """The daemon's registry and the instruments its loop updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.applies = Counter("kdsr_applies", "Applies made by kdsr run, by result.", ["result"], registry=r)
        self.apply_seconds = Histogram(
            "kdsr_apply_duration_seconds",
            "Duration of kdsr run's successful applies: plan, transaction, read-back.",
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self.changes = Counter("kdsr_apply_changes", "Changes applied by kdsr run (plan lines).", registry=r)
        self.reloads = Counter(
            "kdsr_reloads", "Reloads of the intent (SIGHUP, kdsr reload), by result.", ["result"], registry=r
        )
        self.drift_seconds = Histogram(
            "kdsr_drift_check_duration_seconds",
            "Duration of the checks that the kernel still holds what kdsr run last verified, repairs not included "
            "(kdsr run --check-interval; _count: the checks made).",
            buckets=DRIFT_BUCKETS,
            registry=r,
        )
        self.drift_repairs = Counter(
            "kdsr_drift_repairs",
            "Drift checks that found kdsr's objects changed behind its back, repaired.",
            registry=r,
        )
        for result in RESULTS:  # both series from the start: rate() and alerts see a 0, not a missing series
            self.applies.labels(result)
            self.reloads.labels(result)
        Info("kdsr_build", "kdsr's version and the Python it runs on.", registry=r).info(
            {"version": version(), "python": platform.python_version()}
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def applied(self, seconds: float, changes: int) -> None:
        self.applies.labels("success").inc()
        self.apply_seconds.observe(seconds)
        self.changes.inc(changes)

    def apply_failed(self) -> None:
        self.applies.labels("failure").inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()

    def drift_checked(self, seconds: float) -> None:
        self.drift_seconds.observe(seconds)

    def drift_repaired(self) -> None:
        self.drift_repairs.inc()


# --- names: the intent's, not nft's ----------------------------------------------


class Names:
    """What the kernel's rows are in the intent's terms: services by their
    VIP, protocol and port; servers by a member's address or MAC (a pool
    that pins MACs keeps those in its slots); pools by their selectors'
    names, whose format (``pool-<pool>-v<family>-<digest>``) is
    kdsr/compile/selectors.py's Selector.name, read back as
    service_view.selector_pool reads it.  Not through selectors_for: the
    metrics thread would replace compile's memory of the last intent (the
    effective one the daemon's applies compile) with the intent as loaded.
    Rows that name their pool or service themselves are taken as named."""

    def __init__(self, intent) -> None:
        self.intent = intent
        self.services: dict[tuple[str, str, str], str] = {}
        self.nodes: dict[tuple[str, str], str] = {}  # (pool, address) -> server node name
        self.addresses: dict[tuple[str, str], str] = {}  # (pool, address or MAC) -> address
        self.pools: set[str] = set()
        self.pools_of: dict[str, list[str]] = {}  # address -> the pools it is a member of, by name
        if intent is None:
            return
        for service in intent.services:
            vip = str(service.vip)
            for protocol in service.protocols:
                for ports in service.ports:
                    port = str(ports.first) if ports.first == ports.last else f"{ports.first}-{ports.last}"
                    self.services[(vip, protocol, port)] = service.name
        for pool in sorted(intent.pools, key=lambda p: p.name):
            self.pools.add(pool.name)
            for member in pool.members:
                address = str(member.address)
                self.nodes[(pool.name, address)] = member.node or ""
                self.addresses[(pool.name, address)] = address
                self.pools_of.setdefault(address, []).append(pool.name)
                if member.mac:
                    self.addresses[(pool.name, member.mac)] = address

    def service(self, row: dict) -> str:
        named = row.get("service")
        if named:
            return str(named)
        return self.services.get((str(row.get("vip")), str(row.get("protocol")), str(row.get("port"))), "")

    def pool(self, row: dict) -> str:
        named = row.get("pool")
        if named:
            return str(named)
        match = _SELECTOR.match(str(row.get("selector", "")))
        if match and (match["pool"] in self.pools or not self.pools):
            return match["pool"]
        # A row of the xdp engine for a server that holds no slot now (down,
        # drained): the pool the intent puts it in (the first, by name, of
        # several: the program counts per server, not per pool).
        owners = self.pools_of.get(str(row.get("server", "")))
        return owners[0] if owners else ""

    def server(self, pool: str, value: object) -> tuple[str, str]:
        """(address, server node) of one pool member, from what the kernel holds for it."""
        text = str(value)
        address = self.addresses.get((pool, text))
        if address is None:
            try:
                address = str(ipaddress.ip_address(text))
            except ValueError:
                address = text
        return address, self.nodes.get((pool, address), "")


class NamesCache:
    """Names of the intent the daemon runs, made again only when it changes (a reload)."""

    def __init__(self) -> None:
        self._names = Names(None)
        self._lock = threading.Lock()

    def of(self, intent) -> Names:
        with self._lock:
            if self._names.intent is not intent:
                self._names = Names(intent)
            return self._names


# --- the health view --------------------------------------------------------------


class HealthCollector(Collector):
    """Per scrape, one health view of the daemon: servers, checks, pools.

    ``runner``: kdsr/health/daemon.py's Runner: its ``view()``, the intent
    it runs (members no monitor checks, server nodes) and the members it
    took out of the tables (``out``: health or drain)."""

    def __init__(self, runner, names: NamesCache) -> None:
        self._runner = runner
        self._names = names

    def collect(self) -> Iterable:
        view = self._runner.view()
        names = self._names.of(self._runner.intent)
        up = GaugeMetricFamily(
            "kdsr_server_up", "1 when the server passes every health check of its pool.", labels=SERVER_LABELS
        )
        for s in view.get("servers", []):
            labels = [s["pool"], s["server"], s.get("node") or names.nodes.get((s["pool"], s["server"]), "")]
            up.add_metric(labels, 1 if s["state"] == UP else 0)
        yield up
        families = {
            "up": GaugeMetricFamily(
                "kdsr_check_up", "1 when one health check of one server is up.", labels=CHECK_LABELS
            ),
            "transitions": CounterMetricFamily(
                "kdsr_check_transitions", "Up/down changes of one check.", labels=CHECK_LABELS
            ),
            "probes": CounterMetricFamily("kdsr_check_probes", "Probes sent by one check.", labels=CHECK_LABELS),
            "probes_failed": CounterMetricFamily(
                "kdsr_check_probe_failures", "Probes of one check that failed.", labels=CHECK_LABELS
            ),
            "latency": GaugeMetricFamily(
                "kdsr_check_latency_seconds", "Duration of the check's last probe.", labels=CHECK_LABELS
            ),
        }
        for t in view.get("targets", []):
            labels = [t["pool"], t["server"], names.nodes.get((t["pool"], t["server"]), ""), t["check"]]
            families["up"].add_metric(labels, 1 if t["state"] == UP else 0)
            families["transitions"].add_metric(labels, t["transitions"])
            families["probes"].add_metric(labels, t["probes"])
            families["probes_failed"].add_metric(labels, t.get("probes_failed", 0))
            families["latency"].add_metric(labels, t["latency_ms"] / 1000)
        yield from families.values()
        all_down = GaugeMetricFamily(
            "kdsr_pool_all_down",
            "1 when every server of the pool that should serve is down (its all_down then keeps or drops them).",
            labels=["pool"],
        )
        dropping = GaugeMetricFamily(
            "kdsr_pool_dropping",
            "1 when the pool's table is empty because all its servers are down and its all_down is drop: "
            "the load balancer drops the pool's traffic.",
            labels=["pool"],
        )
        for pool, condition in view.get("pools", {}).items():
            all_down.add_metric([pool], 1 if condition in (POOL_ALL_DOWN_KEPT, POOL_ALL_DOWN_DROPPED) else 0)
            dropping.add_metric([pool], 1 if condition == POOL_ALL_DOWN_DROPPED else 0)
        yield all_down
        yield dropping


class InTableCollector(Collector):
    """``kdsr_server_in_table``: every member of the intent the daemon runs,
    checked or not.  It changes only with the intent or the members the
    daemon took out (``runner.out``, a new object on every change), so its
    rendering is kept until either changes (``Rendered``): at 10,000 VIPs x
    16 servers that is 16,000 samples no scrape has to encode again."""

    def __init__(self, runner, names: NamesCache) -> None:
        self._runner = runner
        self._names = names

    def key(self) -> tuple:
        return (self._runner.intent, self._runner.out)

    def collect(self) -> Iterable:
        intent, out = self.key()
        in_table = GaugeMetricFamily(
            "kdsr_server_in_table",
            "1 when the server holds slots of its pool's table (not down, not drained, weight above 0).",
            labels=SERVER_LABELS,
        )
        # At weight 0 in the intent, or taken out by health or a drain, a
        # member holds no slot.
        for pool in intent.pools if intent is not None else ():
            for member in pool.members:
                address = str(member.address)
                serving = member.weight > 0 and address not in out.get(pool.name, ())
                in_table.add_metric([pool.name, address, member.node or ""], 1 if serving else 0)
        yield in_table


class Rendered:
    """A collector's exposition per content type, made again only when its
    ``key()`` (compared by identity) changes."""

    def __init__(self, collector: InTableCollector) -> None:
        self._collector = collector
        self._lock = threading.Lock()
        self._key: tuple = ()
        self._bytes: dict[str, bytes] = {}

    def exposition(self, content_type: str, encoder: Callable) -> bytes:
        key = self._collector.key()
        with self._lock:
            same = len(key) == len(self._key) and all(a is b for a, b in zip(key, self._key, strict=True))
            if not same:
                self._key, self._bytes = key, {}
            if content_type not in self._bytes:
                registry = CollectorRegistry()
                registry.register(self._collector)
                self._bytes[content_type] = encoder(registry)
            return self._bytes[content_type]


# --- the kernel's counters ----------------------------------------------------------


class KernelFamilies(Collector):
    """The kernel's packet and byte counters of one read, per service and per
    pool and server, as metric families (built once per read)."""

    def __init__(self, report: dict, names: Names) -> None:
        self.families = list(_kernel_families(report, names))

    def collect(self) -> Iterable:
        return self.families


def _kernel_families(report: dict, names: Names) -> Iterable:
    service_packets = CounterMetricFamily(
        "kdsr_service_packets",
        "Packets the load balancer matched per service, VIP, protocol and port.",
        labels=SERVICE_LABELS,
    )
    service_bytes = CounterMetricFamily(
        "kdsr_service_bytes",
        "Bytes the load balancer matched per service, VIP, protocol and port.",
        labels=SERVICE_LABELS,
    )
    service_connections = CounterMetricFamily(
        "kdsr_service_connections",
        "Connections IPVS scheduled per service, VIP, protocol and port (ipvs engine: IPVS's own counter; "
        "the nft and xdp engines keep no connection table).",
        labels=SERVICE_LABELS,
    )
    for s in report.get("services", []):
        labels = [names.service(s), str(s.get("vip", "")), str(s.get("protocol", "")), str(s.get("port", ""))]
        service_packets.add_metric(labels, s.get("packets", 0))
        service_bytes.add_metric(labels, s.get("bytes", 0))
        if s.get("connections") is not None:
            service_connections.add_metric(labels, s["connections"])
    yield service_packets
    yield service_bytes
    if service_connections.samples:
        yield service_connections
    # Per pool and server: the rows of a pool's selectors (one per address
    # family and hashing) add up, except where one nft map counts for
    # several selectors (flow pinning's servers map, ``counted_in``), which
    # counts once.
    totals: dict[tuple[str, str, str], list[int]] = {}
    connections: dict[tuple[str, str, str], int] = {}
    seen_shared: set[tuple[str, str]] = set()
    for s in report.get("servers", []):
        shared = s.get("counted_in")
        if shared:
            if (shared, str(s.get("server"))) in seen_shared:
                continue
            seen_shared.add((shared, str(s.get("server"))))
        pool = names.pool(s)
        address, node = names.server(pool, s.get("server", ""))
        entry = totals.setdefault((pool, address, node), [0, 0])
        entry[0] += s.get("packets", 0)
        entry[1] += s.get("bytes", 0)
        if s.get("connections") is not None:
            connections[(pool, address, node)] = connections.get((pool, address, node), 0) + s["connections"]
    server_packets = CounterMetricFamily(
        "kdsr_server_packets", "Packets the load balancer forwarded per pool and server.", labels=SERVER_LABELS
    )
    server_bytes = CounterMetricFamily(
        "kdsr_server_bytes", "Bytes the load balancer forwarded per pool and server.", labels=SERVER_LABELS
    )
    server_connections = CounterMetricFamily(
        "kdsr_server_connections",
        "Connections IPVS scheduled to the server, per pool (ipvs engine only).",
        labels=SERVER_LABELS,
    )
    for labels, (packets, nbytes) in sorted(totals.items()):
        server_packets.add_metric(list(labels), packets)
        server_bytes.add_metric(list(labels), nbytes)
    for labels, count in sorted(connections.items()):
        server_connections.add_metric(list(labels), count)
    yield server_packets
    yield server_bytes
    if server_connections.samples:
        yield server_connections


class KernelCounters:
    """The kernel's counters, read and rendered in a thread of their own.

    ``read()`` returns the report of `kdsr show` (kdsr/operations.py: its
    ``services`` and ``servers`` rows); ``families(report)`` makes them a
    Collector.  One read at a time: scrapes that come while one runs share
    it, so scrapers never pile reads up.  Each read is rendered, in the
    reading thread, in every format a scrape asked for so far, so that a
    scrape of a large table only copies bytes.

    A read counts as fresh for ``fresh`` seconds.  While reads are quick
    (the last took at most ``wait`` seconds) a scrape with nothing fresh
    starts one and waits for it up to ``wait``; once they are not, a scrape
    takes the last read and starts the next after its answer (``refresh``),
    so that no read competes with the scrape it serves."""

    def __init__(
        self,
        read: Callable[[], dict],
        families: Callable[[dict], Collector],
        wait: float = KERNEL_WAIT,
        fresh: float = KERNEL_FRESH,
    ) -> None:
        self._read = read
        self._families = families
        self.wait, self.fresh = wait, fresh
        self._cond = threading.Condition()
        self._reading = False
        self._read_started = 0.0  # time.monotonic() the read under way started at
        self._reads = 0  # reads finished
        self._encoders: dict[str, Callable] = {}  # content type -> encoder, as scrapes asked
        self.collector: Collector | None = None  # the last read's families
        self._rendered: dict[str, bytes] = {}  # content type -> the last read, rendered
        self.read_at = 0.0  # time.time() of the last read that succeeded
        self.read_seconds = 0.0
        self.errors = 0
        self.error = ""

    def start(self) -> None:
        """A first read, so that the first scrape finds one."""
        with self._cond:
            self._start()

    def _start(self) -> None:
        if not self._reading:
            self._reading = True
            self._read_started = time.monotonic()
            threading.Thread(target=self._run, name="metrics kernel read", daemon=True).start()

    def _stale(self) -> bool:
        return self.collector is None or time.time() - self.read_at >= self.fresh

    def _run(self) -> None:
        started = time.monotonic()
        read_at = time.time()
        with self._cond:
            encoders = dict(self._encoders)
        try:
            collector = self._families(self._read())
            rendered = {content_type: encoder(collector) for content_type, encoder in encoders.items()}
            error = ""
        except Exception as exc:  # noqa: BLE001 - a failed read is a metric; the daemon's own still render
            collector, rendered, error = None, {}, f"{type(exc).__name__}: {exc}"
        with self._cond:
            self.read_seconds = time.monotonic() - started
            if collector is not None:
                self.collector, self._rendered, self.read_at = collector, rendered, read_at
            else:
                self.errors += 1
            self.error = error
            self._reading = False
            self._reads += 1
            self._cond.notify_all()

    def exposition(self, content_type: str, encoder: Callable) -> bytes:
        """The last read in ``content_type`` (b"" before the first read ends)."""
        with self._cond:
            self._encoders.setdefault(content_type, encoder)
            if self._stale() and self.read_seconds <= self.wait:
                now = time.monotonic()
                # A read under way for ``wait`` already is no quick one: no wait for it.
                until = (self._read_started if self._reading else now) + self.wait
                self._start()
                target = self._reads + 1
                self._cond.wait_for(lambda: self._reads >= target, timeout=max(until - now, 0.0))
            collector, rendered = self.collector, self._rendered.get(content_type)
        if rendered is None and collector is not None:  # a format no scrape asked for before this read
            rendered = encoder(collector)
            with self._cond:
                if self.collector is collector:
                    self._rendered[content_type] = rendered
        return rendered or b""

    def refresh(self) -> None:
        """After a scrape's answer: the next read, unless the last is fresh."""
        with self._cond:
            if self._stale():
                self._start()


class KernelReadCollector(Collector):
    """Per scrape: how old the kernel counters it serves are, and how reads go."""

    def __init__(self, counters: KernelCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterable:
        counters = self._counters
        age = GaugeMetricFamily(
            "kdsr_kernel_counters_age_seconds",
            "Age of the kernel counters in this scrape (read in the background: a large table takes a while).",
        )
        if counters.collector is not None:
            age.add_metric([], max(time.time() - counters.read_at, 0.0))
        duration = GaugeMetricFamily(
            "kdsr_kernel_read_duration_seconds", "Duration of the last read of the kernel's counters."
        )
        duration.add_metric([], counters.read_seconds)
        errors = CounterMetricFamily("kdsr_kernel_read_errors", "Reads of the kernel's counters that failed.")
        errors.add_metric([], counters.errors)
        return [age, duration, errors]


# --- serving ---------------------------------------------------------------------


class _Registry(Collector):
    """Another registry's metrics, as one collector of this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable:
        return self._registry.collect()


class Scrape:
    """What a scrape of one daemon answers: ``registry`` (its instruments,
    its health view, the state of the kernel reads) rendered now, then the
    kernel's counters as their last read rendered them."""

    def __init__(
        self, registry: CollectorRegistry, kernel: KernelCounters | None, kept: tuple[Rendered, ...] = ()
    ) -> None:
        self.registry = registry
        self.kernel = kernel
        self.kept = kept

    def body(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format ``accept`` (an Accept header) asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        parts = [encoder(self.registry)] + [kept.exposition(content_type, encoder) for kept in self.kept]
        if self.kernel is not None:
            parts.append(self.kernel.exposition(content_type, encoder))
        parts = [p for p in parts if p]
        if content_type.startswith("application/openmetrics-text"):
            # One EOF, at the very end.
            parts = [p.removesuffix(b"# EOF\n") for p in parts[:-1]] + parts[-1:]
        return b"".join(parts), content_type


def scrape_for(runner, read_kernel: Callable[[], dict] | None, wait: float = KERNEL_WAIT) -> Scrape:
    """What a scrape of ``runner`` (kdsr/health/daemon.py's Runner) serves:
    its instruments, its health view and, with ``read_kernel`` (the kernel
    counter report, as `kdsr show` has it), the kernel's counters."""
    names = NamesCache()
    registry = CollectorRegistry()
    registry.register(_Registry(runner.metrics.registry))
    registry.register(HealthCollector(runner, names))
    kept = (Rendered(InTableCollector(runner, names)),)
    counters = None
    if read_kernel is not None:
        counters = KernelCounters(read_kernel, lambda report: KernelFamilies(report, names.of(runner.intent)), wait)
        registry.register(KernelReadCollector(counters))
    return Scrape(registry, counters, kept)


def exposition(scrape: Scrape, accept: str | None = None) -> str:
    """The text a scrape gets (the 0.0.4 text format unless ``accept`` asks for another)."""
    return scrape.body(accept)[0].decode()


def parse_listen(address: str) -> tuple[str, int]:
    """``--metrics``'s ADDRESS:PORT: (host, port), host "" for every address.

    ":9469" listens on every address, IPv4 and IPv6, as other exporters do;
    "[::]:9469" too; "0.0.0.0:9469" on every IPv4 address; "[::1]:9469",
    "127.0.0.1:9469" or a host name on that address only."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise UsageError(
            f"--metrics {address}: expected ADDRESS:PORT, e.g. :9469 (every address), 127.0.0.1:9469 or [::1]:9469"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--metrics {address}: put an IPv6 address in brackets, e.g. [{host}]:{port}")
    return ("" if host == "::" else host), int(port)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape under way never holds up the daemon's exit
    allow_reuse_address = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # Dual stack, whatever net.ipv6.bindv6only says: "::" means
            # every address, IPv4 ones included (IPv4-mapped).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Quiet(WSGIRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass  # scrapes are not events


def bind(address: str, scrape: Scrape) -> WSGIServer:
    """A server of ``scrape`` on GET /metrics, bound to ``address`` (see
    parse_listen); ``start`` serves.  Raises OSError (the port is taken)."""
    host, port = parse_listen(address)
    if host:
        family, *_rest, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        host = sockaddr[0]
    else:
        family, host = (socket.AF_INET6, "::") if socket.has_ipv6 and _ipv6_works() else (socket.AF_INET, "0.0.0.0")

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"kdsr: metrics are on /metrics\n"]
        body, content_type = scrape.body(environ.get("HTTP_ACCEPT"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        if scrape.kernel is not None:
            scrape.kernel.refresh()
        return [body]

    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server = server_class((host, port), _Quiet)
    server.set_app(app)
    return server


def start(server: WSGIServer) -> None:
    """Serve in a daemon thread (scrapes that came since ``bind`` wait in the listen queue)."""
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def _ipv6_works() -> bool:
    """Whether this host (or namespace) can open an IPv6 socket (ipv6.disable=1 says no)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def listening(server: WSGIServer) -> str:
    """The address ``server`` listens on, for the log: 127.0.0.1:9469, [::]:9469."""
    host, port = server.server_address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
