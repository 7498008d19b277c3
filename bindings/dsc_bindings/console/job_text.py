"""How the client commands print a job: the detail pairs, filters and reasons in a cell,
and the notes that --quiet and --json silence."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dsc_bindings.console.output import (
    local_time,
    print_pairs,
)
from dsc_core import client as dc
from dsc_core import names


def filters_text(job: dc.JobView) -> str:
    return " ".join(f"{names.filter_name(f.dialect)}:{f.state}" for f in job.filters)


def reasons_text(job: dc.JobView) -> str:
    return ",".join(r for r in job.reasons if r != "None")


def _destination_text(filter_detail: dict[str, Any]) -> str:
    places = [str(p) for p in filter_detail.get("destinations", [])]
    return f" -> {', '.join(places)}" if places else ""


def print_job(view: dc.JobView, destinations: dict[int, dict[str, Any]]) -> None:
    rows = [
        ("Job", view.token),
        ("State", view.state),
        ("Reasons", ", ".join(view.reasons)),
        ("Images", str(view.images_received)),
    ]
    if view.user_name:
        rows += [("User", view.user_name), ("Process", view.psp_display_name)]
    if view.created:
        rows.append(("Created", local_time(view.created, wide=True)))
    if view.completed:
        rows.append(("Completed", local_time(view.completed, wide=True)))
    for index, f in enumerate(view.filters):
        reasons = f" ({', '.join(f.reasons)})" if f.reasons else ""
        where = _destination_text(destinations.get(index, {}))
        rows.append((f"Filter {names.filter_name(f.dialect)}", f"{f.state}{reasons}{where}"))
    print_pairs(rows)


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text, file=sys.stderr)
