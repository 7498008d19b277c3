"""``dsc repo``, ``dsc jobs``, ``dsc history`` and ``dsc job``: what the server holds, read
through MS-BDSRR (and its status endpoint for what MS-BDSRR does not carry)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dsc_bindings.console.arguments import client_options, since
from dsc_bindings.console.client import ConnectionFailed
from dsc_bindings.console.job_lookup import (
    filter_destinations,
    resolve_token,
    summaries,
    with_times,
)
from dsc_bindings.console.job_text import filters_text, print_job, reasons_text
from dsc_bindings.console.output import (
    Column,
    local_time,
    parse_time,
    print_table,
    short_token,
)
from dsc_bindings.console.progress import human
from dsc_bindings.console.remote import Client
from dsc_bindings.console.support import EXIT_OK, CliError
from dsc_core import client as dc
from dsc_core import names

A = names.Action


def cmd_repo(args: argparse.Namespace) -> int:
    response = Client(args).call(
        A.DSC_GET_REPOSITORY_ELEMENTS,
        dc.repository_elements_request(["RepositoryConfiguration", "RepositoryStatus"]),
    )
    payload = response.payload
    state = ""
    filters: list[str] = []
    for data in dc.all_of(
        dc.find_path(payload, names.DSC, "RepositoryElements"), names.DSC, "ElementData"
    ):
        state = state or dc.text_of(data, names.DSC, "RepositoryStatus", "RepositoryState")
        for f in dc.all_of(
            dc.find_path(data, names.DSC, "RepositoryConfiguration", "Filters"), names.DSC, "Filter"
        ):
            filters.append(dc.text_of(f, names.DSC, "Dialect"))
    if args.json:
        print(json.dumps({"state": state, "filters": filters}, indent=2))
    else:
        print(f"Repository state: {state}")
        print(f"Filters:          {', '.join(filters) or '(none)'}")
    return EXIT_OK


def _print_history(args: argparse.Namespace, jobs: list[dc.JobView]) -> None:
    """Completed jobs: the OUTCOME (dsc_core.outcomes) is the column that is never cut, so a
    job whose filter failed cannot pass for a success in a narrow terminal."""
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return
    if not jobs:
        print("(no jobs)")
        return
    columns = [
        Column("TOKEN", keep=True),
        Column("OUTCOME", keep=True),
        Column("COMPLETED", keep=True),
        Column("IMAGES", keep=True, numeric=True),
        Column("USER"),
        Column("PROCESS"),
        Column("FILTERS"),
        Column("STATE", wide_only=True),
        Column("REASONS", wide_only=True),
    ]
    rows = [
        [
            short_token(j.token, args.wide),
            j.outcome.value,
            local_time(j.completed or j.created, wide=args.wide),
            str(j.images_received),
            j.user_name,
            j.psp_display_name,
            filters_text(j),
            j.state,
            reasons_text(j),
        ]
        for j in jobs
    ]
    print_table(columns, rows, wide=args.wide)


def _seconds_text(value: object) -> str:
    """12 s, 3 min, 2 h 5 min: how long ago or how long, for a table."""
    if not isinstance(value, (int, float)):
        return "-"
    seconds = int(value)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _progress(client: Client) -> dict[str, dict[str, Any]]:
    """The active jobs' progress from the server's status endpoint (MS-BDSRR carries no bytes,
    elapsed time or last byte); empty when the endpoint is not there or refuses."""
    try:
        state = client.status_json("limit=1")
    except (CliError, ConnectionFailed, ValueError):
        return {}
    active = state.get("active", []) if isinstance(state, dict) else []
    return {j["token"]: j for j in active if isinstance(j, dict) and "token" in j}


def _in_trouble(job: dc.JobView, progress: dict[str, Any]) -> bool:
    """``dsc jobs --failed``: stalled, or a filter already failed (ContinueOnError runs on)."""
    return bool(progress.get("stalled")) or any(
        f.state in ("CompletedWithErrors", "Canceled") and f.reasons for f in job.filters
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    client = Client(args)
    jobs = summaries(client, A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest", "ActiveJobs")
    progress = _progress(client) if jobs else {}
    jobs = [with_times(client, j) for j in jobs]
    if args.failed:
        jobs = [j for j in jobs if _in_trouble(j, progress.get(j.token, {}))]
    if args.json:
        entries = []
        for j in jobs:
            entry = j.as_dict()
            known = progress.get(j.token, {})
            for key in ("elapsed_seconds", "bytes", "idle_seconds", "stalled"):
                entry[key] = known.get(key)
            entries.append(entry)
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    if not jobs:
        print("(no jobs)")
        return EXIT_OK
    columns = [
        Column("TOKEN", keep=True),
        Column("STATE", keep=True),
        Column("ELAPSED", keep=True, numeric=True),
        Column("IMAGES", keep=True, numeric=True),
        Column("RECEIVED", keep=True, numeric=True),
        Column("LAST BYTE", keep=True, numeric=True),
        Column("USER"),
        Column("PROCESS"),
        Column("FILTERS"),
        Column("CREATED", wide_only=True),
        Column("REASONS", wide_only=True),
    ]
    rows = []
    for j in jobs:
        known = progress.get(j.token, {})
        received = known.get("bytes")
        rows.append(
            [
                short_token(j.token, args.wide),
                j.state + (" STALLED" if known.get("stalled") else ""),
                _seconds_text(known.get("elapsed_seconds")),
                str(j.images_received),
                human(received) if isinstance(received, int) else "-",
                _seconds_text(known.get("idle_seconds")) + (" ago" if known else ""),
                j.user_name,
                j.psp_display_name,
                filters_text(j),
                local_time(j.created, wide=args.wide),
                reasons_text(j),
            ]
        )
    print_table(columns, rows, wide=args.wide)
    return EXIT_OK


#: R6's completed states, as ``dsc history --state`` takes them.
COMPLETED_STATE_NAMES = ("Completed", "Aborted", "Canceled")


def _state_name(text: str) -> str:
    """--state: an R6 completed state, in any case (``aborted`` is ``Aborted``)."""
    for state in COMPLETED_STATE_NAMES:
        if state.lower() == text.strip().lower():
            return state
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a completed state; use one of {', '.join(COMPLETED_STATE_NAMES)}"
    )


def cmd_history(args: argparse.Namespace) -> int:
    client = Client(args)
    jobs = summaries(client, A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory")
    states = set(args.state or ())
    picked: list[dc.JobView] = []
    for job in jobs:  # newest first (R6), so --since can stop at the first older job
        if states and job.state not in states:
            continue
        if args.failed and not job.outcome.is_failure:
            continue
        if args.user and args.user.lower() not in job.user_name.lower():
            continue
        job = with_times(client, job)
        if args.since is not None:
            ended = parse_time(job.completed or job.created)
            if ended is not None and ended < args.since:
                break
        picked.append(job)
        if args.limit and len(picked) >= args.limit:
            break
    _print_history(args, picked)
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    client = Client(args)
    token = resolve_token(client, args.token)
    response = client.call(
        A.DSC_GET_JOB_ELEMENTS,
        dc.job_elements_request(names.DSC, token, ["JobStatus", "JobDescription", "Documents"]),
    )
    view = dc.read_job_elements(response.payload, names.DSC)
    docs = []
    for data in dc.all_of(
        dc.find_path(response.payload, names.DSC, "JobElements"), names.DSC, "ElementData"
    ):
        for doc in dc.all_of(dc.find_path(data, names.DSC, "Documents"), names.DSC, "Document"):
            docs.append(
                {
                    "id": dc.text_of(doc, names.DSC, "DocumentDescription", "DocumentId"),
                    "format": dc.text_of(doc, names.DSC, "DocumentDescription", "Format"),
                }
            )
    destinations = filter_destinations(client, token)
    if args.json:
        detail: dict[str, Any] = view.as_dict()
        filters: list[dict[str, Any]] = detail["filters"]
        for index, entry in enumerate(filters):
            place = destinations.get(index, {})
            entry["destinations"] = place.get("destinations", [])
            entry["delivered"] = place.get("delivered", [])
            entry["delivered_truncated"] = bool(place.get("delivered_truncated", False))
        print(json.dumps({**detail, "documents": docs}, indent=2))
    else:
        print_job(view, destinations)
        for d in docs:
            print(f"  document {d['id']}: {d['format']}")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "repo",
        help="repository state and filters",
        description="Show the repository state and the filters it offers.",
    )
    client_options(p)
    p.set_defaults(func=cmd_repo)
    p = sub.add_parser(
        "jobs",
        help="active jobs",
        description="Show the active jobs: time since their creation (ELAPSED), bytes "
        "received and the time since the device's last byte (LAST BYTE); a Creating job whose "
        "device sent nothing for [jobs] stalled_after_seconds is shown STALLED. Tokens are "
        "shortened to their first 8 characters (every TOKEN argument takes such a prefix); "
        "--wide shows them whole.",
    )
    client_options(p)
    p.add_argument(
        "--failed",
        action="store_true",
        help="only jobs in trouble: STALLED, or a filter already failed",
    )
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser(
        "history",
        help="completed jobs, newest first",
        description="Show completed jobs, newest first, with their completion time.",
    )
    client_options(p)
    p.add_argument(
        "--since",
        type=since,
        metavar="WHEN",
        help="only jobs completed since WHEN: a date/time (2026-12-01, 2026-12-01T08:00, "
        "local time unless an offset is given) or an age (30m, 2h, 7d)",
    )
    p.add_argument("--user", help="only jobs of users whose name contains USER")
    p.add_argument(
        "--state",
        action="append",
        type=_state_name,
        metavar="STATE",
        help="only jobs that ended in this state: Completed, Aborted or Canceled, in any case "
        "(repeatable)",
    )
    p.add_argument(
        "--failed",
        action="store_true",
        help="only jobs that failed: OUTCOME failed, partial (a filter failed, another "
        "delivered) or aborted; a Completed job whose filter failed is one of them",
    )
    p.add_argument("--limit", type=int, metavar="N", help="at most N jobs")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser(
        "job",
        help="one job in detail",
        description="Show one job in detail: status, times, documents, and where each "
        "filter delivered.",
    )
    client_options(p)
    p.add_argument("token", metavar="TOKEN", help="the job token, or its first characters")
    p.set_defaults(func=cmd_job)
