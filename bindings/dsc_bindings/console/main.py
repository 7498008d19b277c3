# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: this entry point answers completion requests)
"""The ``dsc`` command: run the server, look at what it would answer, and talk to it.

dsc serve                        run the scan server (embedded default: SQLite + ./var)
dsc db upgrade | migrate         the job store's schema; move to PostgreSQL and S3
dsc cluster status               the instances sharing a PostgreSQL store, and the leader
dsc handle [FILE]                answer one request with a fresh core, no network
dsc scan --server URL FILE...    act as a scanner: create a job, upload, end, wait
dsc process list|show|add|edit|rm  scan processes in the directory ([directory] of --config)
dsc repo | jobs | history        the management client (MS-BDSRR)
dsc job TOKEN | cancel TOKEN
dsc watch                        follow the server's events live (WS-Eventing)
dsc devices                      the scanners that created jobs (the server's status endpoint)
dsc purge --before WHEN          trim the history
dsc retry TOKEN                  run a completed job's failed filters again
dsc completion bash|zsh          the shell completion script
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dsc_bindings.console import (
    cluster,
    completion,
    db,
    devices,
    handle,
    job_actions,
    jobs,
    process,
    scan,
    serve_cmd,
    watch_cmd,
)
from dsc_bindings.console.client import ConnectionFailed
from dsc_bindings.console.output import quiet_broken_pipe
from dsc_bindings.console.support import EXIT_FAILED, CliError
from dsc_core import client as dc

#: Each command module adds its own sub-parsers; this order is the order ``dsc --help`` lists.
COMMANDS = (
    serve_cmd,
    db,
    cluster,
    handle,
    scan,
    process,
    jobs,
    job_actions,
    devices,
    watch_cmd,
    completion,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"dsc {version('dsc-server')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "dsc (dsc-server, not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsc",
        description="Open Distributed Scan Server: WS-DSP (scanners) and "
        "MS-BDSRR (management) on one port.",
        epilog="Start with `dsc serve`, then `dsc scan FILE` and `dsc jobs`.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dsc_bindings.console.completion import autocomplete

    parser = build_parser()
    autocomplete(parser)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except dc.ClientFault as fault:
        print(f"dsc: {fault.line()}", file=sys.stderr)
        return EXIT_FAILED
    except (CliError, ConnectionFailed) as exc:
        print(f"dsc: {exc}", file=sys.stderr)
        return getattr(exc, "code", EXIT_FAILED)
    except ValueError as exc:
        print(f"dsc: unexpected reply: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
