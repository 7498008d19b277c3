"""``dsc scan``: act as a scanner: create a job, upload each file (MTOM), end it, wait."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from dsc_bindings.console.arguments import DEFAULT_SERVER, client_options
from dsc_bindings.console.client import ConnectionFailed
from dsc_bindings.console.formats import VALID_FORMATS, format_for
from dsc_bindings.console.job_lookup import wait_for_end
from dsc_bindings.console.job_text import print_job, say
from dsc_bindings.console.progress import Progress
from dsc_bindings.console.remote import Client
from dsc_bindings.console.scan_files import scan_inputs
from dsc_bindings.console.support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import EmailInstructions, FileShareInstructions, SharePointInstructions

A = names.Action


def cmd_scan(args: argparse.Namespace) -> int:
    files = scan_inputs(args.files)
    if args.process:
        return _scan_with_process(args, files)
    args.server = args.server or os.environ.get("DSC_SERVER") or DEFAULT_SERVER
    instructions: list[Any] = []
    if args.share or not (args.email or args.email_scan_user or args.sharepoint):
        instructions.append(FileShareInstructions(tuple(args.share or [r"\\localhost\scans"])))
    if args.email or args.email_scan_user:
        instructions.append(EmailInstructions(args.email_scan_user, tuple(args.email or ())))
    if args.sharepoint:
        instructions.append(SharePointInstructions(False, tuple(args.sharepoint)))
    request = dc.create_post_scan_job(
        user_identifier=args.user,
        psp_identifier=args.process_id,
        instructions=instructions,
        document_root_name=args.root_name or files[0].stem,
        continue_on_error=args.continue_on_error,
        process_name=args.process_name,
    )
    return _run_scan(args, files, request)


def _scan_with_process(args: argparse.Namespace, files: list[Path]) -> int:
    """``--process NAME``: like a DSM device, read the process from the directory as the user
    and send its PostScanInstructions as they are, with its document format."""
    from dsc_bindings.console.process import device_scan

    scan = device_scan(args)
    args.server = scan.server_url
    args.format = args.format or scan.process.settings.format
    request = dc.create_post_scan_job(
        user_identifier=scan.user_sid, psp_identifier=scan.process.identifier, instructions=()
    )
    # The process's psp:PostScanInstructions content, as it is, becomes the request's
    # dsp:PostScanInstructions (same content model, the WS-DSP element name).
    target = request.find(f"{{{names.DSP}}}PostScanInstructions")
    assert target is not None
    target[:] = list(scan.instructions)
    s = scan.process.settings
    say(
        args,
        f"process {scan.process.name!r}: {s.format}, {s.resolution} dpi, {s.color}, "
        f"{'duplex' if s.duplex else 'simplex'}",
    )
    return _run_scan(args, files, request)


def _formats(args: argparse.Namespace, files: list[Path]) -> list[str]:
    """The format of each file (``--format`` or its name/content), warning about mismatches."""
    if args.format is not None and args.format not in VALID_FORMATS:
        raise CliError(
            f"--format {args.format!r} is not a WS-Scan document format; "
            f"valid values: {', '.join(VALID_FORMATS)}",
            EXIT_USAGE,
        )
    formats = []
    for f in files:
        fmt, warning = format_for(f, args.format)
        if warning:
            print(f"dsc: warning: {warning}", file=sys.stderr)
        formats.append(fmt)
    return formats


def _run_scan(args: argparse.Namespace, files: list[Path], request: Any) -> int:
    formats = _formats(args, files)
    client = Client(args)
    response = client.call(A.DSP_CREATE, request)
    token = dc.text_of(response.payload, names.DSP, "JobToken")
    say(args, f"job {token} created")
    try:
        for number, (path, fmt) in enumerate(zip(files, formats, strict=True), start=1):
            progress = Progress(path.name, path.stat().st_size, enabled=not args.quiet)
            try:
                client.send_image(token, number, fmt, path, progress)
            except (CliError, dc.ClientFault, ConnectionFailed, ValueError) as exc:
                raise CliError(f"uploading {path.name} failed: {exc}") from exc
            finally:
                progress.close()
        client.call(A.DSP_END, dc.token_request(names.DSP, "EndPostScanJobRequest", token))
    # A job left in Creating would hold one of the user's job slots until the server's timeout
    # ([jobs] timeout_seconds): cancel it, also on Ctrl-C (WS-DSP CancelPostScanJob).
    except KeyboardInterrupt:
        print(f"dsc: interrupted; {_cancel_unfinished(client, token)}", file=sys.stderr)
        raise
    except (CliError, dc.ClientFault, ConnectionFailed, ValueError) as exc:
        raise CliError(f"{str(exc).rstrip('.')}; {_cancel_unfinished(client, token)}") from exc
    say(args, f"job {token} ended; waiting for processing")
    view = wait_for_end(client, token, names.DSP, wait=args.wait, poll=args.poll)
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
    else:
        print_job(view, {})
    return EXIT_OK if view.succeeded else EXIT_FAILED


def _cancel_unfinished(client: Client, token: str) -> str:
    """Cancel the job this scan created and could not finish; returns what happened."""
    try:
        client.call(A.DSP_CANCEL, dc.token_request(names.DSP, "CancelPostScanJobRequest", token))
    except (CliError, dc.ClientFault, ConnectionFailed, ValueError, KeyboardInterrupt) as exc:
        return (
            f"job {token} could not be canceled ({exc or 'interrupted'}); the server ends it "
            "after its job timeout ([jobs] timeout_seconds)"
        )
    return f"job {token} canceled"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "scan",
        help="act as a scanner: send files as one scan job",
        description="Create a PostScan job, upload each FILE with SendImage "
        "(MTOM), end the job and wait until it is processed. Exit status 1 if the "
        "job did not complete successfully.",
    )
    client_options(p)
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="a file to send, or a directory: every file in it, sorted by name",
    )
    p.add_argument(
        "--user", default="S-1-5-21-0-0-0-1000", help="UserIdentifier (a SID) of the scanning user"
    )
    p.add_argument(
        "--process-id",
        default=str(uuid.uuid4()).upper(),
        metavar="GUID",
        help="only a label: the PSP_Identifier sent with the job (default: a new GUID); the "
        "destinations come from --share/--email/--sharepoint. To use a directory scan "
        "process, see --process",
    )
    p.add_argument(
        "--process-name",
        metavar="TEXT",
        help="only a label: the process name the job shows in `dsc jobs`/`dsc history` "
        "(PSP_DisplayName); it looks nothing up",
    )
    p.add_argument(
        "--share",
        action="append",
        metavar="UNC",
        help=r"file to this share (repeatable; default \\localhost\scans)",
    )
    p.add_argument("--email", action="append", metavar="ADDRESS", help="e-mail the documents")
    p.add_argument("--email-scan-user", action="store_true", help="e-mail the scanning user")
    p.add_argument(
        "--sharepoint", action="append", metavar="URL", help="upload to this SharePoint site URL"
    )
    p.add_argument(
        "--continue-on-error", action="store_true", help="run the other filters when one fails"
    )
    p.add_argument("--root-name", help="DocumentRootName (default: first file's name)")
    p.add_argument(
        "--format",
        metavar="FORMAT",
        help="document format of every FILE (default: from each file's extension, else its "
        f"content); one of: {', '.join(VALID_FORMATS)}",
    )
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the end state")
    p.add_argument("--poll", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only the result: no progress, no notes"
    )
    g = p.add_argument_group(
        "as a DSM device (--process NAME)",
        "Read the scan process NAME from the directory of --config, binding as --as USER, "
        "and send its instructions and format as that user. Without --server the job goes "
        "to the process's scan server.",
    )
    g.add_argument(
        "--process",
        metavar="NAME",
        help="look up the scan process NAME in the directory and scan with its destinations "
        "and format (unlike --process-name, which is only a label)",
    )
    from dsc_bindings.console.process import directory_options

    directory_options(g, as_help="the scanning user (UPN; default: the configured account)")
    p.set_defaults(func=cmd_scan, server=None)
