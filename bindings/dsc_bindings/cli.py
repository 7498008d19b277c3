"""The ``dsc`` command: run the server, look at what it would answer, and talk to it.

dsc serve                        run the scan server (embedded default: SQLite + ./var)
dsc handle [FILE]                answer one request with a fresh core, no network
dsc scan --server URL FILE...    act as a scanner: create a job, upload, end, wait
dsc process list|show|add|edit|rm  scan processes in the directory ([directory] of --config)
dsc repo | jobs | history        the management client (MS-BDSRR)
dsc job TOKEN | cancel TOKEN
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
from datetime import datetime
from pathlib import Path
from typing import Any

from dsc_core import RequestInfo, ScanServer, ServerConfig, names
from dsc_core import client as dc
from dsc_core.model import EmailInstructions, FileShareInstructions, SharePointInstructions

from .cli_support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, table
from .http_client import ConnectionFailed, client_ssl_context, post
from .progress import Progress

A = names.Action
DEFAULT_SERVER = "http://127.0.0.1:5362/ScanServer"

#: File extension -> WS-Scan document format (dsm-and-stack §1.4 Format values).
FORMATS = {
    ".png": "png",
    ".pdf": "pdf-a",
    ".jpg": "jfif",
    ".jpeg": "jfif",
    ".tif": "tiff-single-uncompressed",
    ".tiff": "tiff-single-uncompressed",
    ".xps": "xps",
    ".bmp": "dib",
    ".jp2": "jpeg2k",
}


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
    server = ScanServer(ServerConfig(), new_id=lambda: str(uuid.uuid4()))
    info = RequestInfo(
        now=datetime.now().astimezone(),
        content_type=content_type or "application/soap+xml; charset=utf-8",
        identity=args.identity,
    )
    outcome = server.handle(data, info)
    reply = outcome.reply
    body = reply.body
    if args.pretty:
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
        for command in outcome.commands:
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

    def call(self, action: str, payload: Any) -> dc.Response:
        body = dc.envelope(action, payload, message_id=self.message_id(), to=self.url)
        return self._send(body, dc.SOAP_XML)

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
            raise CliError(
                f"the server answered HTTP {reply.status} "
                f"({reply.body[:200].decode('utf-8', 'replace').strip()})"
            )
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
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise CliError(f"no such file: {f}", EXIT_USAGE)
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
    from .process_cli import device_scan

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


def _run_scan(args: argparse.Namespace, files: list[Path], request: Any) -> int:
    client = Client(args)
    response = client.call(A.DSP_CREATE, request)
    token = dc.text_of(response.payload, names.DSP, "JobToken")
    _say(args, f"job {token} created")
    for number, path in enumerate(files, start=1):
        fmt = args.format or FORMATS.get(path.suffix.lower(), "pdf-a")
        progress = Progress(path.name, path.stat().st_size, enabled=not args.quiet)
        try:
            client.send_image(token, number, fmt, path, progress)
        finally:
            progress.close()
    client.call(A.DSP_END, dc.token_request(names.DSP, "EndPostScanJobRequest", token))
    _say(args, f"job {token} ended; waiting for processing")
    deadline = time.monotonic() + args.wait
    while True:
        view = dc.read_job_elements(
            client.call(
                A.DSP_GET_JOB_ELEMENTS,
                dc.job_elements_request(names.DSP, token, ["JobStatus", "JobDescription"]),
            ).payload,
            names.DSP,
        )
        if view.ended:
            break
        if time.monotonic() > deadline:
            raise CliError(f"job {token} still {view.state} after {args.wait:.0f} s")
        time.sleep(args.poll)
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
    else:
        _print_job(view)
    return EXIT_OK if view.succeeded else EXIT_FAILED


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


def _list(args: argparse.Namespace, action: str, request: str, container: str) -> int:
    response = Client(args).call(action, dc.empty_request(request))
    jobs = dc.read_summaries(response.payload, container)
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return EXIT_OK
    if not jobs:
        print("(no jobs)")
        return EXIT_OK
    rows = [["TOKEN", "STATE", "REASON", "IMAGES", "USER", "PROCESS", "FILTERS"]]
    for j in jobs:
        rows.append(
            [
                j.token,
                j.state,
                ",".join(j.reasons),
                str(j.images_received),
                j.user_name,
                j.psp_display_name,
                " ".join(f"{_dialect(f.dialect)}:{f.state}" for f in j.filters),
            ]
        )
    print(table(rows))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    return _list(args, A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest", "ActiveJobs")


def cmd_history(args: argparse.Namespace) -> int:
    return _list(args, A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory")


def cmd_job(args: argparse.Namespace) -> int:
    response = Client(args).call(
        A.DSC_GET_JOB_ELEMENTS,
        dc.job_elements_request(
            names.DSC, args.token, ["JobStatus", "JobDescription", "Documents"]
        ),
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
    if args.json:
        print(json.dumps({**view.as_dict(), "documents": docs}, indent=2))
    else:
        _print_job(view)
        for d in docs:
            print(f"  document {d['id']}: {d['format']}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    Client(args).call(
        A.DSC_CANCEL, dc.token_request(names.DSC, "CancelPostScanJobRequest", args.token)
    )
    if args.json:
        print(json.dumps({"token": args.token, "canceled": True}))
    else:
        print(f"job {args.token} canceled")
    return EXIT_OK


def _dialect(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def _print_job(view: dc.JobView) -> None:
    rows = [
        ["Job", view.token],
        ["State", view.state],
        ["Reasons", ", ".join(view.reasons)],
        ["Images", str(view.images_received)],
    ]
    if view.user_name:
        rows += [["User", view.user_name], ["Process", view.psp_display_name]]
    if view.created:
        rows.append(["Created", view.created])
    if view.completed:
        rows.append(["Completed", view.completed])
    for f in view.filters:
        reasons = f" ({', '.join(f.reasons)})" if f.reasons else ""
        rows.append([f"Filter {_dialect(f.dialect)}", f"{f.state}{reasons}"])
    print(table(rows, header=False))


# --- dsc serve --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run_server
    from .settings import ConfigError, Settings, load_settings

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
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc
    return run_server(settings, log_level=args.log_level, reload=load if args.config else None)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsc",
        description="Open Distributed Scan Server: WS-DSP (scanners) and "
        "MS-BDSRR (management) on one port.",
        epilog="Start with `dsc serve`, then `dsc scan FILE` and `dsc jobs`.",
    )
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
    p.add_argument("--config", type=Path, help="TOML configuration file (see README)")
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
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--user", default="S-1-5-21-0-0-0-1000", help="UserIdentifier (a SID) of the scanning user"
    )
    p.add_argument(
        "--process-id",
        default=str(uuid.uuid4()).upper(),
        help="PSP_Identifier of the scan process (default: a new GUID)",
    )
    p.add_argument("--process-name", help="display name of the scan process")
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
    p.add_argument("--format", help="document format (default: from the file extension)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the end state")
    p.add_argument("--poll", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group(
        "as a DSM device (--process NAME)",
        "Read the scan process NAME from the directory of --config, binding as --as USER, "
        "and send its instructions and format as that user. Without --server the job goes "
        "to the process's scan server.",
    )
    g.add_argument("--process", metavar="NAME", help="scan with this directory scan process")
    from .process_cli import directory_options

    directory_options(g, as_help="the scanning user (UPN; default: the configured account)")  # type: ignore[arg-type]
    p.set_defaults(func=cmd_scan, server=None)

    for name, func, text in (
        ("repo", cmd_repo, "repository state and filters"),
        ("jobs", cmd_jobs, "active jobs"),
        ("history", cmd_history, "completed jobs, newest first"),
    ):
        p = sub.add_parser(name, help=text, description=f"Show {text}.")
        _client_options(p)
        p.set_defaults(func=func)
    from . import process_cli

    process_cli.add_parser(sub)
    p = sub.add_parser("job", help="one job in detail", description="Show one job in detail.")
    _client_options(p)
    p.add_argument("token", metavar="TOKEN")
    p.set_defaults(func=cmd_job)
    p = sub.add_parser(
        "cancel",
        help="cancel an active job",
        description="Cancel an active job (MS-BDSRR CancelPostScanJob).",
    )
    _client_options(p)
    p.add_argument("token", metavar="TOKEN")
    p.set_defaults(func=cmd_cancel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
