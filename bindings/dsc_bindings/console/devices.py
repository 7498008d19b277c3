"""``dsc devices``: the scanners that created jobs, from the server's status endpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dsc_bindings.console.arguments import client_options
from dsc_bindings.console.output import (
    Column,
    local_time,
    print_table,
)
from dsc_bindings.console.remote import Client
from dsc_bindings.console.support import EXIT_OK
from dsc_bindings.observe.statuspage import MAX_HISTORY_PAGE


def cmd_devices(args: argparse.Namespace) -> int:
    # The most recent contacts first, as many as the status endpoint lists at once.
    devices = Client(args).status_json(f"devices={MAX_HISTORY_PAGE}").get("devices", [])
    if args.json:
        print(json.dumps(devices, indent=2))
        return EXIT_OK
    if not devices:
        print("(no devices yet: a device is recorded when it creates a job)")
        return EXIT_OK
    columns = [
        Column("ADDRESS", keep=True),
        Column("IDENTITY"),
        Column("LAST CONTACT", keep=True),
        Column("JOBS", keep=True, numeric=True),
        Column("OK", keep=True, numeric=True),
        Column("FAILED", keep=True, numeric=True),
        Column("FIRST CONTACT", wide_only=True),
    ]
    rows = [
        [
            str(d.get("address", "")),
            str(d.get("identity") or "-"),
            local_time(str(d.get("last_contact", "")), wide=args.wide),
            str(d.get("jobs", 0)),
            str(d.get("completed", 0)),
            str(d.get("failed", 0)),
            local_time(str(d.get("first_contact", "")), wide=args.wide),
        ]
        for d in devices
    ]
    print_table(columns, rows, wide=args.wide)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "devices",
        help="scanners that created jobs",
        description="List the devices that created jobs: client address, certificate "
        "identity, first and last contact, job counts (recorded by the server, kept across "
        "restarts).",
    )
    client_options(p)
    p.set_defaults(func=cmd_devices)
