"""``dsc_bindings.asgi:create_app``: the scan server for any ASGI server (issue 20).

::

    DSC_CONFIG=/etc/dsc/dsc.toml uvicorn --factory dsc_bindings.asgi:create_app --port 5362
    hypercorn 'dsc_bindings.asgi:create_app()'

The composition of ``dsc serve`` (:func:`dsc_bindings.serve.running_service`: store, writer,
engine, delivery hub, ticker, and UDP discovery when asked) runs for the app's lifespan; the
ASGI server is the listener (TLS, ports and connection limits are its options).  The app itself
is :class:`dsc_bindings.http.asgi.AsgiApp`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from dsc_bindings.http.asgi import AsgiApp, Served
from dsc_bindings.http.asgi_identity import ClientIdentity
from dsc_bindings.serve import (
    StartFailure,
    as_worker,
    configure_logging,
    running_service,
    worker_slot,
)
from dsc_bindings.settings import Settings, load_settings

__all__ = [
    "CONFIG_VARIABLE",
    "DATA_VARIABLE",
    "DISCOVERY_VARIABLE",
    "PORT_VARIABLE",
    "AsgiApp",
    "create_app",
]

log = logging.getLogger("dsc.serve")

#: Names the configuration file when ``create_app`` is given no path.
CONFIG_VARIABLE = "DSC_CONFIG"
#: The data directory and the port the ASGI server listens on (for the advertised base URL
#: when there is no ``public_url``): ``dsc serve --data/--port``, for ``uvicorn --factory``.
DATA_VARIABLE = "DSC_DATA"
PORT_VARIABLE = "DSC_PORT"
#: "1": answer directed Probes on UDP (the port of ``[server] port``); one worker only can.
DISCOVERY_VARIABLE = "DSC_DISCOVERY"


def create_app(
    config_path: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    port: int | None = None,
    discovery: bool | None = None,
) -> AsgiApp:
    """The ASGI 3 application of the configuration at ``config_path`` (else ``$DSC_CONFIG``,
    else the embedded defaults); ``data_dir``, ``port`` and ``discovery`` default to
    ``$DSC_DATA``, ``$DSC_PORT`` and ``$DSC_DISCOVERY``.  The file is read and checked here, so a broken one stops the
    ASGI server before it listens; the service starts with the app's lifespan."""
    if config_path is None:
        config_path = os.environ.get(CONFIG_VARIABLE) or None
    if discovery is None:
        discovery = os.environ.get(DISCOVERY_VARIABLE, "") == "1"
    data_dir = data_dir or os.environ.get(DATA_VARIABLE) or None
    if port is None and os.environ.get(PORT_VARIABLE):
        port = int(os.environ[PORT_VARIABLE])
    settings = load_settings(
        Path(config_path) if config_path is not None else None,
        data_dir=Path(data_dir) if data_dir is not None else None,
        port=port,
    )
    if not logging.getLogger().handlers:  # the ASGI server configures its own loggers only
        configure_logging("INFO")
    if settings.listen.monitor is not None:
        log.warning(
            "[server] monitor_listen is not served by the ASGI app: /healthz and "
            "/metrics are on the app's own address"
        )
    listen = settings.listen
    identity = ClientIdentity.of(listen.trusted_proxies, listen.client_cert_header)
    return AsgiApp(lambda: _serving(settings, discovery=discovery), identity)


@contextlib.asynccontextmanager
async def _serving(settings: Settings, *, discovery: bool) -> AsyncIterator[Served]:
    """``running_service`` on a worker thread (it blocks: the store opens, the jobs load), the
    loop free meanwhile; StartFailure keeps its one-line message."""
    stack = contextlib.ExitStack()

    def start() -> Served:
        suffix = ""
        current = settings
        discover = discovery
        if settings.storage.store_kind == "postgresql":
            # Each worker of the ASGI server (uvicorn --workers N, gunicorn) is an instance of
            # the cluster with a local folder of its own: the first free DATA/workers/<n>
            # (issue 20 point 4); on SQLite the data folder's lock lets one worker in.
            worker = stack.enter_context(worker_slot(settings.data_dir))
            current = as_worker(settings, worker)
            suffix = worker.suffix
            discover = discovery and worker.discovery
            log.info("ASGI worker %d: data folder %s", worker.index, current.data_dir)
        started, composition = stack.enter_context(
            running_service(current, discovery=discover, instance_suffix=suffix)
        )
        log.info("dsc-server ASGI app started: advertised base URL %s", started.server.base_url)
        return Served(composition.site, started.server.limits)

    try:
        served = await anyio.to_thread.run_sync(start)
    except StartFailure:
        stack.close()
        raise
    try:
        yield served
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stack.close)
