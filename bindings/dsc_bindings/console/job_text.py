"""How the client commands print a job: the detail pairs, filters and reasons in a cell,
and the notes that --quiet and --json silence."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dsc_bindings.console.output import (
    local_time,
    print_pairs,
    printable,
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


def delivered_rows(filter_detail: dict[str, Any]) -> list[tuple[str, str]]:
    """One row per thing the filter delivered (issue 19): a file's path, a document's URL,
    a Message-ID and its recipients; a last row when the server kept only the first of them."""
    rows = [("  delivered", printable(str(n))) for n in filter_detail.get("delivered", [])]
    if filter_detail.get("delivered_truncated"):
        rows.append(("  delivered", "(more: the server's job log names every one)"))
    return rows


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
        detail = destinations.get(index, {})
        where = _destination_text(detail)
        rows.append((f"Filter {names.filter_name(f.dialect)}", f"{f.state}{reasons}{where}"))
        rows += delivered_rows(detail)
    print_pairs(rows)


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text, file=sys.stderr)
