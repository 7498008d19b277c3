"""``dsc watch``: subscribe to the server's events and print them until interrupted (the
listener and the lines are in :mod:`dsc_bindings.console.watch`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dsc_bindings.console.arguments import client_options
from dsc_bindings.console.client import ConnectionFailed
from dsc_bindings.console.remote import Client
from dsc_bindings.console.support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from dsc_core import client as dc


def cmd_watch(args: argparse.Namespace) -> int:
    from dsc_bindings.console.watch import (
        CHECK_EVERY,
        Sink,
        Watcher,
        callback_url,
        install_stop_signals,
        loopback_warning,
        parse_listen,
    )

    try:
        listen = parse_listen(args.listen)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    client = Client(args)
    try:
        sink = Sink(*listen)
    except OSError as exc:
        raise CliError(
            f"cannot listen on {args.listen}: {exc.strerror or exc}", EXIT_USAGE
        ) from exc
    sink.start()
    try:
        callback = callback_url(listen, sink.port, args.callback, client.url)
        watcher = Watcher(
            client.call,
            client.url,
            sink,
            callback,
            sys.stdout,
            as_json=args.json,
            wide=args.wide,
            check_every=args.check_every or CHECK_EVERY,
            err=sys.stderr,
        )
        warning = loopback_warning(listen, args.callback, client.url)
        if warning:
            print(f"dsc: warning: {warning}", file=sys.stderr)
        watcher.subscribe()
        # On standard error also with --json: the JSON lines stay alone on standard output.
        print(
            f"watching {client.url} (events to {watcher.callback}); Ctrl-C to stop",
            file=sys.stderr,
        )
        restore = install_stop_signals(watcher)
        try:
            ended = watcher.run()
        finally:
            restore()
        if ended in ("lost", "failed"):
            how = (
                "ended this watch's subscription without a word here"
                if ended == "lost"
                else "gave up delivering events"
            )
            raise CliError(
                f"the server {how}: it could not deliver events to {watcher.callback} (the "
                "address this watch advertised); make that address reachable from the server, "
                "or give --listen ADDR:PORT (and --callback URL behind NAT)"
            )
        if ended == "stopped":
            try:
                watcher.unsubscribe()
            except (dc.ClientFault, ConnectionFailed, CliError) as exc:
                print(f"dsc: could not unsubscribe: {exc}", file=sys.stderr)
                return EXIT_FAILED
            print("unsubscribed", file=sys.stderr)
        return EXIT_OK
    finally:
        sink.close()


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "watch",
        help="follow the server's events live",
        description="Subscribe to the MS-BDSRR events (job status, job end state, repository "
        "status and configuration) through WS-Eventing and print one line per event until "
        "interrupted (Ctrl-C), then unsubscribe. The server delivers the events to a small "
        "HTTP listener this command runs (--listen); it must be able to connect to it. When "
        "the server drops the subscription, or jobs change and no event arrives, the watch "
        "says so (exit status 1).",
    )
    client_options(p)
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="ADDR:PORT",
        help="where to receive the events (default 127.0.0.1:0: this machine only, a free "
        "port); a server on another host needs an address it can reach, e.g. 0.0.0.0:5380",
    )
    # How often to ask the server whether the events get through (tests make it short).
    p.add_argument("--check-every", type=float, help=argparse.SUPPRESS)
    p.add_argument(
        "--callback",
        metavar="URL",
        help="the address the server should send events to (default: http://THIS-HOST:PORT "
        "with the address this host uses towards the server and the --listen port)",
    )
    p.set_defaults(func=cmd_watch)
