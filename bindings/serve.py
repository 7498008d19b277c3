"""`dsc serve`: wire settings, the scan service and one HTTP binding, and stop cleanly.

SIGINT and SIGTERM stop accepting, let in-flight requests finish (grace period), persist jobs,
set the repository Stopped and end subscriptions (SourceShuttingDown).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from .discovery import UdpDiscovery
    from .service import ScanService

log = logging.getLogger("dsc.serve")
GRACE_SECONDS = 10.0


def _log_start(settings: Settings, port: int) -> None:
    listen = settings.listen
    server = settings.server
    base = f"{listen.scheme}://{listen.host}:{port}"
    log.info("dsc-server listening on %s (%s binding)", base, listen.binding)
    log.info("  device (metadata, Probe):   %s/ScanServer", base)
    log.info("  WS-DSP (scanners):          %s/ScanServer/%s", base, server.dsp_service_uuid)
    log.info("  MS-BDSRR (management):      %s/ScanServer/%s", base, server.dsc_service_uuid)
    log.info("  advertised base URL:        %s", server.base_url)
    log.info("job store: SQLite + spool in %s", settings.data_dir.resolve())
    for prefix, local in settings.filters.share_roots:
        log.info("file shares: %s -> %s", prefix, local.resolve())
    if not listen.tls:
        log.warning("security: plain HTTP, development mode (use --tls-cert/--tls-key in "
                    "production)")
    elif listen.client_ca:
        log.info("security: HTTPS, client certificates required (CA %s); users are the "
                 "certificate names (R10)", listen.client_ca)
    else:
        log.info("security: HTTPS with server certificate %s", listen.cert)


def run_server(settings: Settings, *, log_level: str = "INFO") -> int:
    from dsc_core import ServerConfig

    from .service import ScanService
    from .settings import ConfigError

    logging.basicConfig(level=getattr(logging, log_level),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        ssl_context = settings.server_ssl_context()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    config: ServerConfig = settings.server
    service = ScanService(config, settings.data_dir, settings.filters)
    try:
        service.start()
    except Exception as exc:  # the store is locked, unreadable, ...: say what to do
        log.error("cannot start: %s (is another `dsc serve` using %s?)", exc, settings.data_dir)
        return 1
    discovery = _start_discovery(settings, service)
    try:
        if settings.listen.binding == "blocking":
            return _run_blocking(settings, service, ssl_context)
        return _run_async(settings, service, ssl_context)
    finally:
        if discovery is not None:
            discovery.close()
        service.shutdown()


def _start_discovery(settings: Settings, service: "ScanService") -> "UdpDiscovery | None":
    """UDP port 5362 answers directed Probes (bdsrr 3.2.3, R11); failing to bind it is not
    fatal: scanners that probe over HTTP still work."""
    from .discovery import UdpDiscovery
    try:
        discovery = UdpDiscovery(service, settings.listen.host, settings.listen.port)
    except OSError as exc:
        log.warning("no UDP discovery on port %d: %s", settings.listen.port, exc.strerror)
        return None
    discovery.start()
    return discovery


def _run_blocking(settings: Settings, service: object, ssl_context: object) -> int:
    from .http_blocking import BlockingServer

    server = BlockingServer(service, settings.listen.host, settings.listen.port,  # type: ignore
                            ssl_context, settings.server.limits, grace=GRACE_SECONDS)
    try:
        port = server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.listen.host, settings.listen.port,
                  exc.strerror)
        return 1
    _log_start(settings, port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.shutdown()
    return 0


def _run_async(settings: Settings, service: object, ssl_context: object) -> int:
    import trio

    from .http_async import serve

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            try:
                port = await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: serve(
                    service, host=settings.listen.host, port=settings.listen.port,  # type: ignore
                    ssl_context=ssl_context, limits=settings.server.limits,
                    grace=GRACE_SECONDS, task_status=task_status))
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", settings.listen.host,
                          settings.listen.port, exc.strerror)
                return 1
            _log_start(settings, port)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
        return 0

    return trio.run(main)
