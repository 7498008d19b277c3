"""``dsc cluster status``: the instances serving one PostgreSQL store (issue 18 point 6).

Reads the ``instances`` table of the store ``--config`` names (store/instances.py): each
incarnation's name, advertised address, start, heartbeat age and state (up, down: no heartbeat
within its lease, stopped: a clean stop), and which one is the leader (it holds the leader's
advisory lock now, as PostgreSQL's ``pg_locks`` says, and took a term: one that holds the lock
and cannot take a term is shown ``lock held, not leading``, one that took it a moment ago
``taking the lead``, store/instances.py), the job leases each holds (jobs whose
filters it runs) and its outbox lag (notifications waiting for the subscribers it delivers to,
and the age of the oldest), then the whole outbox's lag.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsc_bindings.console.support import EXIT_OK, EXIT_USAGE, CliError

if TYPE_CHECKING:  # the store's modules are imported by the command that needs them
    from dsc_bindings.store.instances import OutboxLag

#: With the SQLite store there is no cluster to show (one line, exit status 1).
SQLITE_REFUSAL = (
    "one instance: the store is SQLite in {data}; cluster status needs [store] kind = postgresql"
)


#: Why a holder of the lock does not lead, and what to do (runtime/announcing.py).
_NO_TERM = (
    "it cannot take a term for its announcements (the database refuses the statement: see the "
    "WARNING in its log), so no instance runs the job timeouts and sweeps nor announces the "
    "repository state until it can"
)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def cmd_status(args: argparse.Namespace) -> int:
    import psycopg

    from dsc_bindings.console.output import Column, print_table
    from dsc_bindings.settings import ConfigError, load_settings
    from dsc_bindings.store.errors import one_line
    from dsc_bindings.store.instances import OutboxLag, list_instances, outbox_lag
    from dsc_bindings.store.postgresql import SCHEMA_VERSION, connection_kwargs, redacted

    logging.getLogger("psycopg").setLevel(logging.CRITICAL)
    try:
        settings = load_settings(args.config, data_dir=args.data)
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc
    storage = settings.storage
    if storage.store_kind != "postgresql":
        raise CliError(SQLITE_REFUSAL.format(data=settings.data_dir))
    try:
        with psycopg.connect(storage.dsn, **connection_kwargs(storage.password_file)) as conn:
            exists = conn.execute("SELECT to_regclass('instances') IS NOT NULL").fetchone()
            schema = None
            if exists and exists[0]:
                version = conn.execute("SELECT max(version) FROM dsc_schema").fetchone()
                schema = None if version is None or version[0] is None else int(version[0])
            # The columns it reads are this version's: an earlier schema (the servers of an
            # earlier version still running on it, a rolling upgrade) lacks some.
            if schema is not None and schema < SCHEMA_VERSION:
                upgrade = "dsc db upgrade" + (f" --config {args.config}" if args.config else "")
                raise CliError(
                    f"cluster status: the job store at {redacted(storage.dsn)} has schema "
                    f"{schema}, older than this dsc ({SCHEMA_VERSION}): the servers on it are of "
                    f"an earlier version; run their dsc cluster status, or upgrade the schema "
                    f"({upgrade}; a server of this version does it at start, and the running "
                    "ones go on)"
                )
            rows = list_instances(conn) if exists and exists[0] else []
            lag = outbox_lag(conn) if rows else OutboxLag()
    except psycopg.Error as exc:
        raise CliError(
            f"cluster status: PostgreSQL at {redacted(storage.dsn)}: {one_line(str(exc))}"
        ) from exc
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=1))
        return EXIT_OK
    if not rows:
        print(f"no instance has started on PostgreSQL {redacted(storage.dsn)} yet")
        return EXIT_OK
    columns = [
        Column("Name"),
        Column("Address"),
        Column("Started", keep=True),
        Column("Heartbeat", keep=True, numeric=True),
        Column("State", keep=True),
        Column("Leader", keep=True),
        Column("Leases", keep=True, numeric=True),
        Column("Outbox lag", keep=True, numeric=True),
        Column("Pid", numeric=True, wide_only=True),
        Column("Instance", wide_only=True),
    ]
    table = [
        [
            row.name,
            row.address,
            row.started.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            _age(row.heartbeat_age) + " ago",
            row.state,
            row.leadership_label,
            str(row.leases_held),
            _lag(row.outbox_lag),
            str(row.pid),
            row.id,
        ]
        for row in rows
    ]
    print_table(columns, table, wide=args.wide)
    up = sum(1 for row in rows if row.state == "up")
    leaders = [row.name for row in rows if row.leader]
    print(f"\n{up} of {len(rows)} instance(s) up; leader: {', '.join(leaders) or 'none'}")
    for row in rows:
        if row.fails_to_lead:
            print(f"{row.name} holds the leader's lock but does not lead: {_NO_TERM}")
    print(f"outbox: {_lag(lag)} notification(s) waiting, every subscription")
    return EXIT_OK


def _lag(lag: OutboxLag) -> str:
    """``0``, or the rows waiting and the age of the oldest: ``3 (oldest 12 s)``."""
    if lag.oldest_seconds is None:
        return str(lag.rows)
    return f"{lag.rows} (oldest {_age(lag.oldest_seconds)})"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cluster",
        help="the instances serving one PostgreSQL store (several instances, dsc serve --workers)",
        description="The instances of dsc serve (and their --workers) sharing the PostgreSQL "
        "store that --config names.",
    )
    commands = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    commands.required = True
    status = commands.add_parser(
        "status",
        help="a table of the instances: up, down or stopped, and the leader",
        description="One line per instance (a restarted server is a new line): its name "
        "([cluster] instance_name, else host:port), advertised address, start, the age of its "
        "last heartbeat, its state (up; down: no heartbeat within [cluster] lease_seconds; "
        "stopped: a clean stop) and the leader (it runs the job timeouts and retention "
        "sweeps; one that just took the leader's lock shows 'taking the lead' until its "
        "next tick takes a term, one that cannot take a term 'lock held, not leading', see "
        "its log), the job leases it holds (jobs whose filters it runs now) and its outbox lag "
        "(event notifications waiting for the subscriptions it delivers: how many, and the "
        "oldest's age; a subscriber that does not answer keeps its rows waiting), then the "
        "lag of the whole outbox. Rows of instances dead for [cluster] "
        "prune_after_seconds are removed by the leader. Needs [store] kind = postgresql.",
        epilog="Example: dsc cluster status --config /etc/dsc/dsc.toml",
    )
    status.add_argument("--config", type=Path, help="TOML configuration file ([store])")
    status.add_argument("--data", type=Path, help="data folder (default ./var)")
    status.add_argument("--json", action="store_true", help="a JSON list, one object per instance")
    status.add_argument(
        "--wide", action="store_true", help="all columns (pid, instance id), nothing cut"
    )
    status.set_defaults(func=cmd_status)
