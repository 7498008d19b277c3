"""``dsc cancel``, ``dsc retry`` and ``dsc purge``: the commands that change jobs."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from lxml import etree

from dsc_bindings.console.arguments import client_options, since
from dsc_bindings.console.confirm import add_yes_option, can_confirm, confirm
from dsc_bindings.console.job_lookup import (
    filter_destinations,
    resolve_token,
    summaries,
    wait_for_end,
)
from dsc_bindings.console.job_text import print_job, say
from dsc_bindings.console.output import (
    local_time,
)
from dsc_bindings.console.remote import Client
from dsc_bindings.console.support import EXIT_FAILED, EXIT_OK, CliError
from dsc_core import client as dc
from dsc_core import names

A = names.Action


def cmd_cancel(args: argparse.Namespace) -> int:
    client = Client(args)
    token = resolve_token(client, args.token)
    try:
        client.call(A.DSC_CANCEL, dc.token_request(names.DSC, "CancelPostScanJobRequest", token))
    except dc.ClientFault as fault:
        # bdsrr 3.2.4.2.1: only an active job can be canceled; the server answers "not found"
        # for a job in the history too.  Say which it is.
        ended = _ended_job(client, token, fault)
        if ended is None:
            raise
        reasons = ", ".join(r for r in ended.reasons if r != "None")
        raise CliError(
            f"job {token} has already ended ({ended.state}{f': {reasons}' if reasons else ''}); "
            "only an active job can be canceled"
        ) from None
    if args.json:
        print(json.dumps({"token": token, "canceled": True}))
    else:
        print(f"job {token} canceled")
    return EXIT_OK


def _ended_job(client: Client, token: str, fault: dc.ClientFault) -> dc.JobView | None:
    """The job in the history, when ``fault`` is the server's "not found" for it."""
    if not (fault.subcode or "").endswith("ClientErrorJobTokenNotFound"):
        return None
    history = summaries(client, A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory")
    return next((j for j in history if j.token.lower() == token.lower()), None)


def cmd_retry(args: argparse.Namespace) -> int:
    client = Client(args)
    token = resolve_token(client, args.token)
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest", nsmap={"ext": names.EXT})
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    try:
        response = client.call(A.EXT_RETRY_JOB, request)
    except dc.ClientFault as fault:
        if (fault.subcode or "").endswith("OperationFailed"):
            raise CliError(
                f"job {token} cannot be retried: only a completed job with a failed filter whose "
                "documents are still kept (see [jobs] spool_retention_seconds) can be"
            ) from None
        raise
    count = dc.text_of(response.payload, names.EXT, "FiltersToRun") or "?"
    say(args, f"job {token}: {count} filter(s) run again")
    view = wait_for_end(client, token, names.DSC, wait=args.wait, poll=0.2)
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
    else:
        print_job(view, filter_destinations(client, token))
    return EXIT_OK if view.succeeded else EXIT_FAILED


def cmd_purge(args: argparse.Namespace) -> int:
    before: datetime = args.before
    can_confirm(args.yes, "dsc purge")
    confirm(
        f"Remove every job that ended before {local_time(before.isoformat())} from the history "
        f"of {args.server}, with the documents still kept for them?",
        args.yes,
    )
    request = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest", nsmap={"ext": names.EXT})
    etree.SubElement(request, f"{{{names.EXT}}}Before").text = before.isoformat()
    response = Client(args).call(A.EXT_PURGE_JOB_HISTORY, request)
    purged = int(dc.text_of(response.payload, names.EXT, "Purged") or 0)
    if args.json:
        print(json.dumps({"purged": purged, "before": before.isoformat()}))
    else:
        print(
            f"{purged} job(s) that ended before {local_time(before.isoformat())} "
            "removed from the history"
        )
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cancel",
        help="cancel an active job",
        description="Cancel an active job (MS-BDSRR CancelPostScanJob).",
    )
    client_options(p)
    p.add_argument("token", metavar="TOKEN", help="the job token, or its first characters")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser(
        "retry",
        help="run the failed filters of a completed job again",
        description="Run the failed filters of a completed job again (vendor operation "
        "ext:RetryPostScanJob, scan administrators only), then wait for its end state. Only "
        "a job with a failed filter whose documents are still kept can be retried ([jobs] "
        "spool_retention_seconds). Exit status 1 if it still did not complete successfully.",
    )
    client_options(p)
    p.add_argument("token", metavar="TOKEN", help="the job token, or its first characters")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the end state")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=cmd_retry)
    p = sub.add_parser(
        "purge",
        help="remove old jobs from the history",
        description="Remove the completed jobs that ended before WHEN from the history, with "
        "any documents still kept for them (vendor operation ext:PurgeJobHistory, scan "
        "administrators only). Active jobs are never touched. Asks first on a terminal; "
        "scripts give --yes.",
    )
    client_options(p)
    p.add_argument(
        "--before",
        type=since,
        required=True,
        metavar="WHEN",
        help="a date/time (2026-11-01, 2026-11-01T08:00, local time unless an offset is "
        "given) or an age (30d: jobs that ended more than 30 days ago)",
    )
    add_yes_option(p)
    p.set_defaults(func=cmd_purge)
