"""``dsc serve``: check the configuration before anything starts, then run the server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dsc_bindings.console.support import EXIT_USAGE, CliError


def cmd_serve(args: argparse.Namespace) -> int:
    from dsc_bindings.exposure import UnsafeExposure, check_exposure
    from dsc_bindings.serve import WorkerRole, run_server
    from dsc_bindings.settings import ConfigError, Settings, load_settings, prepare_data_dir

    def load() -> Settings:
        return load_settings(
            args.config,
            data_dir=args.data,
            host=args.host,
            port=args.port,
            binding=args.binding,
            cert=args.tls_cert,
            key=args.tls_key,
            client_ca=args.client_ca,
        )

    try:
        settings = load()
        # Before anything starts: a data directory or TLS files the server cannot use, or a
        # listener exposed unsafely (issue 14), are one line and exit status 2 here, not a
        # server that then fails every request.
        check_exposure(settings)
        prepare_data_dir(settings.data_dir)
        settings.server_ssl_context()
    except (ConfigError, UnsafeExposure) as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc
    if args.workers < 1:
        raise CliError(f"--workers {args.workers}: give 1 or more", EXIT_USAGE)
    if args.workers > 1:
        return _supervise(args, settings)
    return run_server(
        settings,
        log_level=args.log_level,
        reload=load if args.config else None,
        log_format=args.log_format,
        worker=WorkerRole(args.worker_index) if args.worker_index is not None else None,
    )


def _supervise(args: argparse.Namespace, settings: Any) -> int:
    """``--workers N`` (console/workers.py): refused on SQLite and with port 0 (each worker
    would get a port of its own), one line, exit status 2."""
    from dsc_bindings.console import workers
    from dsc_bindings.serve import configure_logging
    from dsc_bindings.store.errors import StoreError

    if settings.storage.store_kind != "postgresql":
        raise CliError(workers.SQLITE_REFUSAL.format(n=args.workers), EXIT_USAGE)
    if settings.listen.port == 0:
        raise CliError(
            f"--workers {args.workers}: --port 0 would give each worker a port of its own; "
            "name the port",
            EXIT_USAGE,
        )
    configure_logging(args.log_level, args.log_format)
    try:
        # Once, in the parent: a database without an identity adopts the data folder's
        # (identity.json) before the workers, whose folders have none, start.
        settings.with_installation_identity()
    except (OSError, ValueError, StoreError) as exc:
        raise CliError(
            f"cannot read the installation identity: {' '.join(str(exc).split())}"
        ) from exc
    return workers.supervise(sys.argv[1:], args.workers)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the scan server",
        description="Run the scan server. With no options: 127.0.0.1:5362, plain "
        "HTTP (development mode), SQLite job store and spool under ./var, "
        "file shares under ./var/shares.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 5362)")
    p.add_argument(
        "--data", type=Path, help="data directory: job store, spool, shares (default ./var)"
    )
    p.add_argument("--config", type=Path, help="TOML configuration file (see docs/operating.md)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables HTTPS")
    p.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    p.add_argument(
        "--client-ca",
        type=Path,
        help="require client certificates signed by this CA; the certificate names the user (R10)",
    )
    p.add_argument(
        "--binding",
        choices=("async", "blocking"),
        help="HTTP binding: async (trio, default) or blocking (threads)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N server processes sharing the port (SO_REUSEPORT), each an instance on the "
        "PostgreSQL store with its own folder DATA/workers/<n>; needs [store] kind = "
        "postgresql (default 1)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text lines (default) or one JSON object per line for log collectors",
    )
    p.set_defaults(func=cmd_serve)
