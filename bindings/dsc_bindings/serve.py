"""`dsc serve`: wire settings, the scan service and one HTTP binding, and stop cleanly.

SIGINT and SIGTERM stop accepting, let in-flight requests finish (grace period), persist jobs,
set the repository Stopped and end subscriptions (SourceShuttingDown).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import gc
import logging
import os
import queue
import signal
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from dsc_bindings.exposure import UnsafeExposure, check_exposure, url_host
from dsc_bindings.http.driver import DEFAULT_GRACE
from dsc_bindings.settings import Settings
from dsc_bindings.store.backends import describe
from dsc_bindings.store.errors import StoreError

if TYPE_CHECKING:
    from dsc_bindings.discovery.udp import UdpDiscovery
    from dsc_bindings.filters.settings import FilterSettings
    from dsc_bindings.http.site import Site
    from dsc_bindings.observe.devices import DeviceLimits
    from dsc_bindings.observe.health import HealthMonitor
    from dsc_bindings.observe.observer import Observer
    from dsc_bindings.runtime.service import ScanService
    from dsc_core import ServerConfig

log = logging.getLogger("dsc.serve")


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process as worker ``index`` of ``dsc serve --workers`` (console/workers.py)."""

    index: int

    @property
    def suffix(self) -> str:
        """Added to the instance name (``dsc cluster status``)."""
        return f"/w{self.index}"

    def data_dir(self, data_dir: Path) -> Path:
        """Its own local folder (job store lock, spool copies, device book)."""
        return data_dir / "workers" / str(self.index)

    @property
    def discovery(self) -> bool:
        """UDP discovery is answered by one worker only (worker 0)."""
        return self.index == 0


#: The file of ``DATA/workers/<n>`` whose flock says worker ``n`` is taken (:func:`worker_slot`).
SLOT_NAME = "slot"
#: Worker folders tried for a free one (far more than any machine's cores).
MAX_WORKER_SLOTS = 256


@contextlib.contextmanager
def worker_slot(data_dir: Path, index: int | None = None) -> Iterator[WorkerRole]:
    """Hold worker slot ``index`` of ``data_dir`` (``DATA/workers/<index>/slot``, flock'ed)
    for the ``with``; ``index`` None: the first free one, so an ASGI server's restarted worker
    takes a slot its dead predecessor freed (the kernel drops a dead process's flock).  The one
    place where workers get their number: ``dsc serve --workers`` (given by the parent) and
    ASGI workers (``dsc_bindings.asgi``) on one data folder never share one.  StartFailure when
    the slot is taken or none is free."""
    from dsc_bindings.settings import ConfigError, prepare_data_dir
    from dsc_bindings.store.split import flock_file

    candidates = range(MAX_WORKER_SLOTS) if index is None else (index,)
    for candidate in candidates:
        worker = WorkerRole(candidate)
        folder = worker.data_dir(data_dir)
        try:
            prepare_data_dir(folder)
        except ConfigError as exc:
            raise StartFailure(str(exc), 2) from exc
        try:
            fd = flock_file(folder / SLOT_NAME)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise StartFailure(f"cannot lock {folder / SLOT_NAME}: {exc.strerror}", 1) from exc
        try:
            yield worker
        finally:
            if fd is not None:
                os.close(fd)
        return
    if index is not None:
        raise StartFailure(
            f"worker {index} of {data_dir} is already running (another `dsc serve --workers` "
            "on this data folder?): stop it, or give this one another --data",
            1,
        )
    raise StartFailure(
        f"all {MAX_WORKER_SLOTS} worker folders of {data_dir / 'workers'} are taken: "
        "run fewer workers on this data folder",
        1,
    )


@dataclass(frozen=True, slots=True)
class Composition:
    """A scan service wired to its observer, its health checks and its web endpoints."""

    service: ScanService
    observer: Observer
    health: HealthMonitor
    #: What the HTTP bindings serve (``dsc_bindings.http.site``).
    site: Site


def compose(
    config: ServerConfig,
    data_dir: Path | str,
    filter_settings: FilterSettings,
    *,
    device_limits: DeviceLimits | None = None,
    health_max_age: float | None = None,
    **options: Any,
) -> Composition:
    """The one place the layers are wired (tests/project/test_module_graph.py): the runtime
    reports to the observer and checks its health through Protocols it declares
    (``runtime.observing``); the HTTP driver reads the service, the status page and the
    observer through the Protocols of ``http.site``.  ``options`` go to ScanService."""
    from dsc_bindings.http.site import Site
    from dsc_bindings.observe.health import MAX_AGE_SECONDS, HealthMonitor
    from dsc_bindings.observe.observer import Observer
    from dsc_bindings.observe.probes import health_probes
    from dsc_bindings.observe.web import StatusPages, own_origins
    from dsc_bindings.runtime.service import ScanService
    from dsc_bindings.webconsole.api import WebConsole

    # The device book and the totals live where the job records do (issue 17): the storage
    # settings pick SQLite in the data folder or the PostgreSQL database.
    observer = Observer(Path(data_dir), device_limits=device_limits, storage=options.get("storage"))
    health = HealthMonitor(
        lambda: health_probes(service),
        max_age=MAX_AGE_SECONDS if health_max_age is None else health_max_age,
    )
    service = ScanService(
        config, Path(data_dir), filter_settings, observer=observer, health=health, **options
    )
    console = WebConsole(service, observer, StatusPages(service, observer, health))
    site = Site(
        requests=service,
        pages=console,
        api=console,
        observer=observer,
        own_origins=lambda: own_origins(service),
        owner=service.owner,
    )
    return Composition(service, observer, health, site)


def _log_start(settings: Settings, port: int, service: ScanService) -> None:
    listen = settings.listen
    server = service.config
    base = f"{listen.scheme}://{url_host(listen.host)}:{port}"
    log.info("dsc-server listening on %s (%s binding)", base, listen.binding)
    # Issue 14: the page an administrator opens, at the address the server advertises.
    log.info("  web console:                %s/", server.base_url)
    log.info("  device (metadata, Probe):   %s/ScanServer", base)
    log.info("  WS-DSP (scanners):          %s/ScanServer/%s", base, server.dsp_service_uuid)
    log.info("  MS-BDSRR (management):      %s/ScanServer/%s", base, server.dsc_service_uuid)
    log.info("  advertised base URL:        %s", server.base_url)
    log.info("job store: %s", describe(settings.storage, settings.data_dir.resolve()))
    for prefix, local in settings.filters.share_roots:
        log.info("file shares: %s -> %s", prefix, local.resolve())
    if not listen.tls:
        log.warning(
            "security: plain HTTP, development mode (use --tls-cert/--tls-key in production)"
        )
    elif listen.client_ca:
        log.info(
            "security: HTTPS, client certificates required (CA %s); users are the "
            "certificate names (R10)",
            listen.client_ca,
        )
    else:
        log.info("security: HTTPS with server certificate %s", listen.cert)


def _addresses(settings: Settings) -> str:
    listen = settings.listen
    where = f"{listen.host}:{listen.port}"
    if listen.monitor is not None:
        where += f", monitor_listen {listen.monitor[0]}:{listen.monitor[1]}"
    return where


def _log_monitor(settings: Settings, port: int) -> None:
    assert settings.listen.monitor is not None
    log.info(
        "monitoring: http://%s:%d/healthz and /metrics, no client certificate (monitor_listen)",
        settings.listen.monitor[0],
        port,
    )


def _bound(settings: Settings, service: ScanService, port: int) -> None:
    """With --port 0 the advertised address (metadata, ProbeMatches) needs the real port."""
    if settings.listen.port == 0 and settings.server.base_url.endswith(":0"):
        base = settings.server.base_url[:-2] + f":{port}"
        service.reconfigure(settings.server.replace(base_url=base))


def _reload(reload: Callable[[], Settings] | None, current: Settings, service: ScanService) -> None:
    """SIGHUP: read the configuration again and apply what can change without a restart."""
    if reload is None:
        log.warning("SIGHUP: nothing to reload (no --config file)")
        return
    try:
        fresh = reload()
    except Exception as exc:  # a broken file keeps the running configuration
        log.error("SIGHUP: configuration not reloaded: %s", exc)
        return
    if fresh.listen != current.listen or fresh.data_dir != current.data_dir:
        log.warning("SIGHUP: listener, TLS and data directory changes need a restart")
    if fresh.directory != current.directory:
        log.warning("SIGHUP: [directory] changes need a restart")
    if fresh.devices != current.devices:
        log.warning("SIGHUP: [devices] changes need a restart")
    try:
        fresh = fresh.with_installation_identity()
    except (OSError, ValueError, StoreError) as exc:
        log.error("SIGHUP: configuration not reloaded: %s", exc)
        return
    server = fresh.server
    if current.listen.port == 0:  # keep the address actually bound
        server = server.replace(base_url=service.config.base_url)
    service.reconfigure(server, fresh.filters)


def settle_heap() -> None:
    """Move what start-up built (modules, the restored jobs, caches) out of the collector's
    sight: a full collection would otherwise walk all of it, about 13 ms with the loop stopped
    (measured under wrk, 64 keep-alive connections: one such pause every ~9 s, each delaying
    every request in flight).  Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def configure_logging(level: str, log_format: str = "text") -> None:
    """Standard error, one line per record: text for people, or one JSON object per line
    (``--log-format json``, for log collectors; job events carry their fields)."""
    from dsc_bindings.observe.observer import JsonFormatter

    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])


class StartFailure(Exception):
    """The server cannot start; the message is one line saying what to do, ``status`` the
    exit status of ``dsc serve`` (2: the configuration, 1: the machine or the store)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def running_service(
    settings: Settings, *, discovery: bool = True, instance_suffix: str = ""
) -> Iterator[tuple[Settings, Composition]]:
    """Start what runs beside a listener (the store, writer, engine, delivery hub and ticker
    of the scan service, and UDP discovery when ``discovery``), and stop it all at the end:
    ``dsc serve``'s listeners and the ASGI app (``dsc_bindings.asgi``) both run inside this.
    Yields the settings with the installation identity, and the composition.  Raises
    :class:`StartFailure`."""
    from dsc_bindings.settings import ConfigError, prepare_data_dir

    try:
        waived = check_exposure(settings)
        prepare_data_dir(settings.data_dir)
    except (ConfigError, UnsafeExposure) as exc:
        raise StartFailure(str(exc), 2) from exc
    if waived:
        log.warning("%s", waived)
    try:
        settings = settings.with_installation_identity()
    except (OSError, ValueError, StoreError) as exc:
        # libpq's messages span lines; a start failure is one line.
        why = " ".join(str(exc).split())
        raise StartFailure(f"cannot read the installation identity: {why}", 1) from exc
    directory = None
    if settings.directory is not None:
        from dsc_bindings.directory.ldap import Directory

        directory = Directory(settings.directory)
        log.info(
            "directory: %s as %s, base %s, scan administrators: members of %s",
            settings.directory.url,
            settings.directory.bind_user,
            settings.directory.base_dn,
            settings.directory.admin_group or "(no group)",
        )
    try:
        composition = compose(
            settings.server,
            settings.data_dir,
            settings.filters,
            directory=directory,
            device_limits=settings.devices,
            health_max_age=settings.health_max_age_seconds,
            storage=settings.storage,
            cluster=settings.cluster,
            instance_suffix=instance_suffix,
            max_processing_jobs=settings.processing_slots,
        )
        service = composition.service
        try:
            service.start()
        except Exception as exc:  # the store is locked, unreadable, ...: say what to do
            raise StartFailure(
                f"{exc} (is another `dsc serve` or ASGI worker using {settings.data_dir}? "
                "One process serves a data folder with the SQLite store: run one worker, or "
                'use [store] kind = "postgresql", where each worker takes a folder of its own)',
                1,
            ) from exc
        try:
            udp = _start_discovery(settings, composition) if discovery else None
            settle_heap()
            try:
                yield settings, composition
            finally:
                if udp is not None:
                    udp.close()
        finally:
            service.shutdown()
    finally:
        if directory is not None:
            directory.close()


def run_server(
    settings: Settings,
    *,
    log_level: str = "INFO",
    reload: Callable[[], Settings] | None = None,
    log_format: str = "text",
    worker: WorkerRole | None = None,
) -> int:
    from dsc_bindings.settings import ConfigError

    configure_logging(log_level, log_format)
    # SIGUSR1: every thread's stack to stderr, at once and without stopping anything
    # (docs/operating.md): where a server that does not answer is waiting.  Not without a
    # file behind stderr (run inside another program that captures it).
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    slot: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if worker is not None:
        slot = worker_slot(settings.data_dir, worker.index)
        settings = as_worker(settings, worker)
        if reload is not None:
            fresh_settings = reload
            reload = lambda: as_worker(fresh_settings(), worker)  # noqa: E731
    try:
        ssl_context = settings.server_ssl_context()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        with (
            slot,
            running_service(
                settings,
                discovery=worker is None or worker.discovery,
                instance_suffix=worker.suffix if worker is not None else "",
            ) as (settings, composition),
        ):
            reuse_port = worker is not None
            if settings.listen.binding == "blocking":
                return _run_blocking(settings, composition, ssl_context, reload, reuse_port)
            return _run_async(settings, composition, ssl_context, reload, reuse_port)
    except StartFailure as exc:
        log.error("cannot start: %s", exc)
        return exc.status


def as_worker(settings: Settings, worker: WorkerRole) -> Settings:
    """A worker's settings: its own data folder (the filters' folders, resolved against the
    data folder, stay shared); connection threads not pinned ("auto" would put every worker
    on the same CPU)."""
    listen = settings.listen
    if listen.blocking_cpu == "auto":
        listen = dataclasses.replace(listen, blocking_cpu=None)
    return dataclasses.replace(settings, data_dir=worker.data_dir(settings.data_dir), listen=listen)


def _start_discovery(settings: Settings, composition: Composition) -> UdpDiscovery | None:
    """UDP port 5362 answers directed Probes (bdsrr 3.2.3, R11); failing to bind it is not
    fatal: scanners that probe over HTTP still work."""
    from dsc_bindings.discovery.udp import UdpDiscovery

    try:
        discovery = UdpDiscovery(
            composition.service,
            settings.listen.host,
            settings.listen.port,
            dropped=composition.observer.metrics.probes_dropped.inc,
        )
    except OSError as exc:
        log.warning("no UDP discovery on port %d: %s", settings.listen.port, exc.strerror)
        return None
    discovery.start()
    return discovery


class SignalInbox:
    """The signals the blocking binding's main thread waits for (SIGINT, SIGTERM, SIGHUP).

    ``handler`` only queues the signal: a Python signal handler runs in the main thread between
    any two steps of what it was doing, so it may take no lock that thread could hold
    (Python's ``signal`` docs).  ``threading.Event.set()`` takes the Condition that
    ``Event.wait(timeout)`` holds on its way out of each timed wait: a SIGTERM arriving then
    hung ``dsc serve`` for good (tests/bindings/test_serve_signals.py).  ``SimpleQueue.put``
    is reentrant (its documentation: safe where a call may interrupt another); logging and
    the rest happen in :meth:`next`, outside the handler."""

    def __init__(self, poll: float = 0.2) -> None:
        self._received: queue.SimpleQueue[int] = queue.SimpleQueue()
        #: The wait wakes this often: a signal the kernel delivered to another thread runs its
        #: handler only when the main thread next runs Python code.
        self._poll = poll

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self._received.put(signum)

    def next(self) -> int:
        """The next signal received (waits for it)."""
        while True:
            try:
                return self._received.get(timeout=self._poll)
            except queue.Empty:
                continue


def _run_blocking(
    settings: Settings,
    composition: Composition,
    ssl_context: ssl.SSLContext | None,
    reload: Callable[[], Settings] | None,
    reuse_port: bool = False,
) -> int:
    from dsc_bindings.http.blocking_server import BlockingServer

    service = composition.service
    server = BlockingServer(
        composition.site,
        settings.listen.host,
        settings.listen.port,
        ssl_context,
        settings.server.limits,
        grace=DEFAULT_GRACE,
        cpu=settings.listen.blocking_cpu,
        reuse_port=reuse_port,
    )
    monitor: BlockingServer | None = None
    try:
        port = server.start()
        if settings.listen.monitor is not None:
            from dsc_bindings.http.monitor import monitor_site
            from dsc_bindings.observe.statuspage import OPEN_PATHS

            host, monitor_port = settings.listen.monitor
            monitor = BlockingServer(
                monitor_site(composition.site, OPEN_PATHS),
                host,
                monitor_port,
                None,
                settings.server.limits,
                reuse_port=reuse_port,
            )
            _log_monitor(settings, monitor.start())
    except OSError as exc:
        log.error("cannot listen: %s (%s)", exc.strerror, _addresses(settings))
        server.shutdown()
        return 1
    _bound(settings, service, port)
    _log_start(settings, port, service)
    signals = SignalInbox()
    previous = {
        s: signal.signal(s, signals.handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        while (signum := signals.next()) == signal.SIGHUP:
            _reload(reload, settings, service)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if monitor is not None:
            monitor.shutdown()
        server.shutdown()
    return 0


def _run_async(
    settings: Settings,
    composition: Composition,
    ssl_context: ssl.SSLContext | None,
    reload: Callable[[], Settings] | None,
    reuse_port: bool = False,
) -> int:
    import trio

    from dsc_bindings.http.async_server import serve

    service = composition.service

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            try:
                port = await nursery.start(
                    lambda task_status=trio.TASK_STATUS_IGNORED: serve(
                        composition.site,
                        host=settings.listen.host,
                        port=settings.listen.port,
                        ssl_context=ssl_context,
                        limits=settings.server.limits,
                        grace=DEFAULT_GRACE,
                        task_status=task_status,
                        reuse_port=reuse_port,
                    )
                )
                if settings.listen.monitor is not None:
                    from dsc_bindings.http.monitor import monitor_site
                    from dsc_bindings.observe.statuspage import OPEN_PATHS

                    host, monitor_port = settings.listen.monitor
                    bound = await nursery.start(
                        lambda task_status=trio.TASK_STATUS_IGNORED: serve(
                            monitor_site(composition.site, OPEN_PATHS),
                            host=host,
                            port=monitor_port,
                            limits=settings.server.limits,
                            grace=1.0,
                            task_status=task_status,
                            reuse_port=reuse_port,
                        )
                    )
                    _log_monitor(settings, bound)
            except OSError as exc:
                log.error("cannot listen: %s (%s)", exc.strerror, _addresses(settings))
                nursery.cancel_scope.cancel()
                return 1
            _bound(settings, service, port)
            _log_start(settings, port, service)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await trio.to_thread.run_sync(_reload, reload, settings, service)
                        continue
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
        return 0

    return trio.run(main)
