"""`kdsr run`, `kdsr drain` and `kdsr undrain`: the CLI's health commands."""

from __future__ import annotations

from kdsr import operations
from kdsr.compile import CompileCache
from kdsr.errors import UsageError
from kdsr.health import CHECK_INTERVAL, control, logs, metrics
from kdsr.health.daemon import Runner
from kdsr.health.drain import DrainOutcome, resolve_server, set_drain  # noqa: F401 (the CLI's names)
from kdsr.health.notify import Notifier
from kdsr.kernel.state import StateStore


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
    runner.install_signals()
    held: list[control.DaemonLock] = []
    # One daemon per node: the lock is taken before the first apply, so a
    # second `kdsr run` stops before it writes anything.
    runner.start(claim=lambda name: held.append(control.DaemonLock(store, name)))  # a bad intent raises here
    server_socket = None
    try:
        path = control.socket_path(store, runner.node)
        server_socket = control.ControlServer(path, runner.submit)
        held[0].record(path)
        runner.log("control", socket=str(path))
        if listen:
            _serve_metrics(runner, kernel, store, listen)
        runner.notify.release()
        return runner.run_forever()
    finally:
        if server_socket is not None:
            server_socket.close()
        held[0].release()


def _serve_metrics(runner: Runner, kernel, store: StateStore, listen: str) -> None:
    if listen:

        def text() -> str:
            try:
                report = operations.show(kernel, store, runner.node)
            except Exception:  # counters are a bonus; health metrics still render
                report = None
            return metrics.render(runner.view(), runner.counters, report)

        try:
            server = metrics.serve(listen, text)
        except OSError as exc:
            raise UsageError(f"--metrics {listen}: cannot listen there: {exc.strerror or exc}") from None
        runner.log("metrics", listen=f"{server.server_address[0]}:{server.server_address[1]}")
