# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: this entry point answers completion requests)
"""The ``dsc`` command: run the server, look at what it would answer, and talk to it.

dsc serve                        run the scan server (embedded default: SQLite + ./var)
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
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lxml import etree

from dsc_bindings.console.client import ConnectionFailed, client_ssl_context, get, post
from dsc_bindings.console.confirm import add_yes_option, can_confirm, confirm
from dsc_bindings.console.formats import VALID_FORMATS, format_for
from dsc_bindings.console.output import (
    Column,
    local_time,
    parse_time,
    print_pairs,
    print_table,
    printable,
    quiet_broken_pipe,
    short_token,
)
from dsc_bindings.console.progress import Progress, human
from dsc_bindings.console.scan_files import scan_inputs
from dsc_bindings.console.support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from dsc_bindings.http.driver import error_reply
from dsc_bindings.observe.statuspage import MAX_HISTORY_PAGE
from dsc_core import RequestInfo, ScanServer, ServerConfig, names
from dsc_core import client as dc
from dsc_core.content_type import soap_media_type_refusal
from dsc_core.model import EmailInstructions, FileShareInstructions, SharePointInstructions

A = names.Action
DEFAULT_SERVER = "http://127.0.0.1:5362/ScanServer"

UUID_LENGTH = 36


# --- dsc handle -------------------------------------------------------------------------------

_MIME_HEAD = re.compile(rb"^(?:mime-version|content-type)\s*:", re.I)


def split_mime_head(data: bytes) -> tuple[str | None, bytes]:
    """A request saved with its MIME headers (as the hardware-docs SendImage example is): take
    the Content-Type from them and return the body after the first blank line."""
    if not _MIME_HEAD.match(data):
        return None, data
    lines = data.split(b"\n")
    headers: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():  # a blank (or whitespace-only) line ends the head
            body = b"\n".join(lines[i + 1 :])
            break
        text = line.decode("latin-1").rstrip("\r")
        if text[:1] in (" ", "\t") and headers:
            headers[-1] += " " + text.strip()
        else:
            headers.append(text)
    else:
        return None, data
    for header in headers:
        name, _, value = header.partition(":")
        if name.strip().lower() == "content-type":
            return value.strip(), body
    return None, body


def cmd_handle(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file in (None, "-") else _read_file(args.file)
    content_type = args.content_type
    if content_type is None:
        content_type, data = split_mime_head(data)
    content_type = content_type or "application/soap+xml; charset=utf-8"
    server = ScanServer(ServerConfig(), new_id=lambda: str(uuid.uuid4()))
    info = RequestInfo(
        now=datetime.now().astimezone(),
        content_type=content_type,
        identity=args.identity,
    )
    # The server's HTTP driver refuses a request that is not SOAP before the core sees it
    # (issue 14); `dsc handle` answers as the server would.
    unsupported = soap_media_type_refusal(content_type)
    commands: Sequence[object] = ()
    if unsupported is not None:
        reply = error_reply(415, unsupported)
    else:
        outcome = server.handle(data, info)
        reply, commands = outcome.reply, outcome.commands
    body = reply.body
    if args.pretty and reply.content_type.startswith("application/soap+xml"):
        from lxml import etree

        body = etree.tostring(
            etree.fromstring(body), pretty_print=True, xml_declaration=True, encoding="utf-8"
        )
    out = sys.stdout.buffer
    out.write(f"HTTP/1.1 {reply.status} {_reason(reply.status)}\r\n".encode())
    out.write(f"Content-Type: {reply.content_type}\r\n\r\n".encode())
    out.write(body)
    if not body.endswith(b"\n"):
        out.write(b"\n")
    if args.commands:
        for command in commands:
            sys.stderr.write(f"command: {_describe(command)}\n")
    return EXIT_OK if reply.status < 300 else EXIT_FAILED


def _describe(command: object) -> str:
    fields = getattr(command, "__dataclass_fields__", {})
    parts = []
    for name in fields:
        value = getattr(command, name)
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        elif hasattr(value, "token") and hasattr(value, "state"):
            value = f"<job {value.token} {value.state.value}>"
        parts.append(f"{name}={value}")
    return f"{type(command).__name__}({', '.join(parts)})"


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _read_file(name: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror}", EXIT_USAGE) from exc


# --- client plumbing ------------------------------------------------------------------------


class Client:
    """Sends requests of both protocols to one server URL."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url = args.server
        self.timeout = args.timeout
        self.context = None
        if self.url.startswith("https:"):
            try:
                self.context = client_ssl_context(args.ca, args.cert, args.key)
            except (OSError, ValueError) as exc:
                raise CliError(f"cannot load TLS files: {exc}", EXIT_USAGE) from exc

    def message_id(self) -> str:
        return f"urn:uuid:{uuid.uuid4()}"

    def call(
        self,
        action: str,
        payload: Any,
        *,
        to: str | None = None,
        headers: Sequence[etree._Element] = (),
    ) -> dc.Response:
        body = dc.envelope(
            action, payload, message_id=self.message_id(), to=to or self.url, headers=headers
        )
        return self._send(body, dc.SOAP_XML)

    def status_json(self, query: str = "") -> Any:
        """The server's status endpoint (``GET /status.json``, served beside the SOAP services
        on the same listener): what MS-BDSRR does not carry (devices, destinations)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        url = f"{parts.scheme}://{parts.netloc}/status.json" + (f"?{query}" if query else "")
        reply = get(url, ssl_context=self.context, timeout=self.timeout)
        if reply.status == 403:
            raise CliError(
                "the server shows its status to scan administrators only (R10); "
                "give --cert/--key of an administrator"
            )
        if reply.status != 200 or not reply.content_type.startswith("application/json"):
            raise CliError(
                f"the server has no status endpoint (GET {url} answered HTTP {reply.status}); "
                "is it a dsc-server of this version?"
            )
        return json.loads(reply.body)

    def _send(
        self, body: bytes | Iterable[bytes], content_type: str, length: int | None = None
    ) -> dc.Response:
        reply = post(
            self.url,
            body,
            content_type=content_type,
            length=length,
            ssl_context=self.context,
            timeout=self.timeout,
        )
        if not reply.content_type.startswith("application/soap+xml"):
            text = printable(reply.body[:300].decode("utf-8", "replace").strip())
            if not text.startswith(str(reply.status)):
                text = f"HTTP {reply.status}: {text}"
            before = " before the upload ended" if reply.early else ""
            raise CliError(f"the server answered{before}: {text}")
        return dc.parse_response(reply.body, reply.status)

    def send_image(
        self, token: str, document_id: int, fmt: str, path: Path, progress: Progress
    ) -> None:
        content_id = f"{uuid.uuid4()}@dsc-scan"
        root = dc.envelope(
            A.DSP_SEND_IMAGE,
            dc.send_image_request(token, document_id, fmt, content_id),
            message_id=self.message_id(),
            to=self.url,
        )
        size = path.stat().st_size
        body = dc.mtom(
            root, content_id, _file_chunks(path, progress), boundary=f"dsc-{uuid.uuid4().hex}"
        )
        self._send(body.chunks(), body.content_type, body.length(size))


def _file_chunks(path: Path, progress: Progress, size: int = 256 * 1024) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            progress.advance(len(chunk))
            yield chunk


# --- dsc scan ---------------------------------------------------------------------------------


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
    _say(
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
    _say(args, f"job {token} created")
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
    _say(args, f"job {token} ended; waiting for processing")
    view = _wait_for_end(client, token, names.DSP, wait=args.wait, poll=args.poll)
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
    else:
        _print_job(view, {})
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


def _wait_for_end(client: Client, token: str, ns: str, *, wait: float, poll: float) -> dc.JobView:
    """Poll GetPostScanJobElements (WS-DSP or MS-BDSRR, by ``ns``) until the job ended (R6)."""
    action = A.DSP_GET_JOB_ELEMENTS if ns == names.DSP else A.DSC_GET_JOB_ELEMENTS
    deadline = time.monotonic() + wait
    while True:
        view = dc.read_job_elements(
            client.call(
                action, dc.job_elements_request(ns, token, ["JobStatus", "JobDescription"])
            ).payload,
            ns,
        )
        if view.ended:
            return view
        if time.monotonic() > deadline:
            raise CliError(f"job {token} still {view.state} after {wait:.0f} s")
        time.sleep(poll)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text, file=sys.stderr)


# --- management commands --------------------------------------------------------------------


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


def _summaries(client: Client, action: str, request: str, container: str) -> list[dc.JobView]:
    return dc.read_summaries(client.call(action, dc.empty_request(request)).payload, container)


def _with_times(client: Client, job: dc.JobView) -> dc.JobView:
    """A JobSummary has no times (bdsrr 2.2.4.x); the JobStatus of the same job has them."""
    try:
        status = dc.read_job_elements(
            client.call(
                A.DSC_GET_JOB_ELEMENTS,
                dc.job_elements_request(names.DSC, job.token, ["JobStatus"]),
            ).payload,
            names.DSC,
        )
    except dc.ClientFault:
        return job  # gone from the history in between: list it without times
    return dc.JobView(
        job.token,
        job.state,
        job.reasons,
        job.filters,
        job.images_received,
        job.psp_identifier,
        job.psp_display_name,
        job.user_name,
        status.created,
        status.completed,
    )


def _since(text: str) -> datetime:
    """--since: an ISO date or time (local unless it has an offset), or an age like 2h, 30m, 7d."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
        return datetime.now().astimezone() - timedelta(
            **{unit[match.group(2)]: int(match.group(1))}
        )
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date/time (2026-12-01, 2026-12-01T08:00) nor an age "
            "(30m, 2h, 7d)"
        ) from None
    return value if value.tzinfo is not None else value.astimezone()


def _filters_text(job: dc.JobView) -> str:
    return " ".join(f"{_dialect(f.dialect)}:{f.state}" for f in job.filters)


def _reasons_text(job: dc.JobView) -> str:
    return ",".join(r for r in job.reasons if r != "None")


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
            _filters_text(j),
            j.state,
            _reasons_text(j),
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
    jobs = _summaries(client, A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest", "ActiveJobs")
    progress = _progress(client) if jobs else {}
    jobs = [_with_times(client, j) for j in jobs]
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
                _filters_text(j),
                local_time(j.created, wide=args.wide),
                _reasons_text(j),
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
    jobs = _summaries(client, A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory")
    states = set(args.state or ())
    picked: list[dc.JobView] = []
    for job in jobs:  # newest first (R6), so --since can stop at the first older job
        if states and job.state not in states:
            continue
        if args.failed and not job.outcome.is_failure:
            continue
        if args.user and args.user.lower() not in job.user_name.lower():
            continue
        job = _with_times(client, job)
        if args.since is not None:
            ended = parse_time(job.completed or job.created)
            if ended is not None and ended < args.since:
                break
        picked.append(job)
        if args.limit and len(picked) >= args.limit:
            break
    _print_history(args, picked)
    return EXIT_OK


def _resolve_token(client: Client, token: str) -> str:
    """A TOKEN argument may be the first characters of a token, as listings show it."""
    if len(token) >= UUID_LENGTH:
        return token
    found = {
        j.token
        for action, request, container in (
            (A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest", "ActiveJobs"),
            (A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory"),
        )
        for j in _summaries(client, action, request, container)
        if j.token.lower().startswith(token.lower())
    }
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        raise CliError(f"{token!r} matches {len(found)} jobs; give more of the token")
    return token  # let the server say it is not found


def _destinations(client: Client, token: str) -> dict[int, dict[str, Any]]:
    """Where each filter was told to deliver, from the server's status endpoint (MS-BDSRR has
    no element for it); empty when the server has no such endpoint or refuses it."""
    try:
        detail = client.status_json(f"job={token}")
    except (CliError, ConnectionFailed, ValueError):
        return {}
    job = detail.get("job") if isinstance(detail, dict) else None
    if not isinstance(job, dict):
        return {}
    return {i: f for i, f in enumerate(job.get("filters", [])) if isinstance(f, dict)}


def cmd_job(args: argparse.Namespace) -> int:
    client = Client(args)
    token = _resolve_token(client, args.token)
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
    destinations = _destinations(client, token)
    if args.json:
        detail: dict[str, Any] = view.as_dict()
        filters: list[dict[str, Any]] = detail["filters"]
        for index, entry in enumerate(filters):
            entry["destinations"] = destinations.get(index, {}).get("destinations", [])
        print(json.dumps({**detail, "documents": docs}, indent=2))
    else:
        _print_job(view, destinations)
        for d in docs:
            print(f"  document {d['id']}: {d['format']}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    client = Client(args)
    token = _resolve_token(client, args.token)
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
    history = _summaries(client, A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory")
    return next((j for j in history if j.token.lower() == token.lower()), None)


def cmd_retry(args: argparse.Namespace) -> int:
    client = Client(args)
    token = _resolve_token(client, args.token)
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
    _say(args, f"job {token}: {count} filter(s) run again")
    view = _wait_for_end(client, token, names.DSC, wait=args.wait, poll=0.2)
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
    else:
        _print_job(view, _destinations(client, token))
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


def _dialect(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].split(":")[-1]


def _destination_text(filter_detail: dict[str, Any]) -> str:
    places = [str(p) for p in filter_detail.get("destinations", [])]
    return f" -> {', '.join(places)}" if places else ""


def _print_job(view: dc.JobView, destinations: dict[int, dict[str, Any]]) -> None:
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
        rows.append((f"Filter {_dialect(f.dialect)}", f"{f.state}{reasons}{where}"))
    print_pairs(rows)


# --- dsc serve --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from dsc_bindings.exposure import UnsafeExposure, check_exposure
    from dsc_bindings.serve import run_server
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
    return run_server(
        settings,
        log_level=args.log_level,
        reload=load if args.config else None,
        log_format=args.log_format,
    )


# --- argument parsing -------------------------------------------------------------------------


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("DSC_SERVER", DEFAULT_SERVER),
        help=f"scan server URL (default: $DSC_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument("--ca", type=Path, help="CA certificate to trust for an https server")
    p.add_argument(
        "--cert", type=Path, help="client certificate (PEM) when the server requires one"
    )
    p.add_argument("--key", type=Path, help="private key of --cert, if not in the same file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--wide", action="store_true", help="print every column and whole tokens, never cut"
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
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text lines (default) or one JSON object per line for log collectors",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "handle",
        help="answer one request with a fresh core (no network)",
        description="Run one SOAP request (FILE or standard input) through a "
        "fresh core and print the HTTP status line, the content type and the "
        "reply body. A file that starts with MIME headers (Content-Type: "
        "multipart/related ...) is read as such.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="request body (default: stdin)")
    p.add_argument(
        "--content-type",
        metavar="TYPE",
        help="HTTP Content-Type of the request (default: application/soap+xml, or "
        "the file's own MIME headers)",
    )
    p.add_argument("--identity", help="act as this authenticated TLS identity")
    p.add_argument("--pretty", action="store_true", help="indent the reply XML")
    p.add_argument(
        "--commands",
        action="store_true",
        help="also list the commands the core emitted (on stderr)",
    )
    p.set_defaults(func=cmd_handle)

    p = sub.add_parser(
        "scan",
        help="act as a scanner: send files as one scan job",
        description="Create a PostScan job, upload each FILE with SendImage "
        "(MTOM), end the job and wait until it is processed. Exit status 1 if the "
        "job did not complete successfully.",
    )
    _client_options(p)
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

    directory_options(g, as_help="the scanning user (UPN; default: the configured account)")  # type: ignore[arg-type]
    p.set_defaults(func=cmd_scan, server=None)

    from dsc_bindings.console import process as process_cli

    process_cli.add_parser(sub)
    p = sub.add_parser(
        "repo",
        help="repository state and filters",
        description="Show the repository state and the filters it offers.",
    )
    _client_options(p)
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
    _client_options(p)
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
    _client_options(p)
    p.add_argument(
        "--since",
        type=_since,
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
    _client_options(p)
    p.add_argument("token", metavar="TOKEN", help="the job token, or its first characters")
    p.set_defaults(func=cmd_job)
    p = sub.add_parser(
        "cancel",
        help="cancel an active job",
        description="Cancel an active job (MS-BDSRR CancelPostScanJob).",
    )
    _client_options(p)
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
    _client_options(p)
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
    _client_options(p)
    p.add_argument(
        "--before",
        type=_since,
        required=True,
        metavar="WHEN",
        help="a date/time (2026-11-01, 2026-11-01T08:00, local time unless an offset is "
        "given) or an age (30d: jobs that ended more than 30 days ago)",
    )
    add_yes_option(p)
    p.set_defaults(func=cmd_purge)
    p = sub.add_parser(
        "devices",
        help="scanners that created jobs",
        description="List the devices that created jobs: client address, certificate "
        "identity, first and last contact, job counts (recorded by the server, kept across "
        "restarts).",
    )
    _client_options(p)
    p.set_defaults(func=cmd_devices)
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
    _client_options(p)
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
    from dsc_bindings.console import completion

    completion.add_parser(sub)
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
