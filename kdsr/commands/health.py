"""`kdsr run`, `kdsr drain` and `kdsr undrain`: the CLI's health commands."""

from __future__ import annotations

from kdsr import operations
from kdsr.compile import CompileCache, lb_ipvs
from kdsr.errors import UsageError
from kdsr.health import CHECK_INTERVAL, control, counter_reader, logs, metrics
from kdsr.health.daemon import Runner
from kdsr.health.drain import DrainOutcome, resolve_server, set_drain  # noqa: F401 (the CLI's names)
from kdsr.health.notify import Notifier
from kdsr.kernel.state import StateStore
from kdsr.kernel.system import SystemKernel


def run_daemon(
    load,
    node: str | None,
    kernel,
    store: StateStore,
    wait: float,
    adopt: bool,
    listen: str | None,
    verified=None,
    check_interval: float = CHECK_INTERVAL,
    log_format: str = "text",
    compile_cache: CompileCache | None = None,
) -> int:
    """``log_format``: "text" or "json" (kdsr/health/logs.py); ``compile_cache``:
    the one the daemon keeps (and ``load`` sizes its warnings with)."""
    runner = Runner(
        load,
        node,
        kernel,
        store,
        wait=wait,
        adopt=adopt,
        verified=verified,
        check_interval=check_interval,
        log_format=logs.formatter(log_format),
        # systemd's $NOTIFY_SOCKET (contrib/kdsr.service); READY=1 once the
        # first apply is verified and the control socket (and metrics) listen.
        notifier=Notifier.from_environment(held=True),
        compile_cache=compile_cache,
    )
    if listen:
        metrics.parse_listen(listen)  # a usage error before anything else
    runner.install_signals()
    held: list[control.DaemonLock] = []
    served: list = []

    def claim(name: str) -> None:
        # One daemon per node: the lock is taken before the first apply, so
        # a second `kdsr run` stops before it writes anything; then the
        # metrics port, so that a port another program holds stops this one
        # before it writes anything too.
        held.append(control.DaemonLock(store, name))
        if listen:
            served.append(_bind_metrics(runner, kernel, store, listen))

    runner.start(claim=claim)  # a bad intent raises here
    server_socket = None
    try:
        path = control.socket_path(store, runner.node)
        server_socket = control.ControlServer(path, runner.submit)
        held[0].record(path)
        runner.log("control", socket=str(path))
        if served:
            server, scrape = served[0]
            metrics.start(server)
            scrape.kernel.start()
            runner.log("metrics", listen=metrics.listening(server))
        runner.notify.release()
        return runner.run_forever()
    finally:
        if server_socket is not None:
            server_socket.close()
        held[0].release()


def _bind_metrics(runner: Runner, kernel, store: StateStore, listen: str):
    """`--metrics`: the daemon's registry (kdsr/health/metrics.py), with the
    kernel's counters read as `kdsr show` reads them, on a bound socket."""
    # (intent, lb_ipvs.service_labels of it): made again after a reload only.
    labelled: list[tuple] = [(None, {})]

    def ipvs_labels() -> dict:
        intent = runner.intent
        if labelled[0][0] is not intent:
            labelled[0] = (intent, lb_ipvs.service_labels(intent) if intent is not None else {})
        return labelled[0][1]

    if isinstance(kernel, SystemKernel):
        # A process of its own lists the table (kdsr/health/counter_reader.py).
        def read_kernel() -> dict:
            return counter_reader.read(str(store.directory), runner.node, ipvs_labels=ipvs_labels())
    else:
        # A fake kernel (tests) lives in this process only.
        def read_kernel() -> dict:
            return operations.show(kernel, store, runner.node, ipvs_labels=ipvs_labels())

    scrape = metrics.scrape_for(runner, read_kernel)
    try:
        return metrics.bind(listen, scrape), scrape
    except OSError as exc:
        raise UsageError(f"--metrics {listen}: cannot listen there: {exc.strerror or exc}") from None
