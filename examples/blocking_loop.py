"""The core in a blocking loop without HTTP: request files in, status lines out.

What it shows:

- one ``ScanServer`` answering a sequence of requests read from files, so that state carries
  over: a CreatePostScanJob, then SendImage/EndPostScanJob for the job it created, then a
  GetPostScanJobElements that sees it;
- the time contract: the loop owns the clock (here a *virtual* one that advances ``--step``
  seconds per request, so a run is reproducible), and before each request it calls
  ``server.tick(now)`` whenever ``server.next_deadline()`` has passed.  A real blocking server
  would sleep ``next_deadline() - now`` (or until a socket is readable) instead; nothing else
  changes.  ``--advance SECONDS`` jumps the clock at the end, so a job that was never ended
  times out (R6) and you see tick() produce its commands.

Request files: ``.xml`` is a SOAP envelope (``application/soap+xml``); a file that begins with
MIME headers (``Content-Type: multipart/related; ...`` and a blank line, like the hardware-docs
SendImage example) is read with them.  The text ``$JOB_TOKEN`` in a file is replaced by the
token of the most recent CreatePostScanJobResponse, so files can be written before the server
picks the token.  Directories are read in name order.  Without arguments the program writes a
demonstration set into a temporary directory and runs that (``--write-demo DIR`` keeps it)::

    python examples/blocking_loop.py
    python examples/blocking_loop.py --write-demo /tmp/demo && python examples/blocking_loop.py /tmp/demo
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lxml import etree

from dsc_core import (
    Command,
    FilterFinished,
    FilterStarted,
    FilterState,
    ProcessingFinished,
    ProcessingStarted,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    client,
    names,
)
from dsc_core.model import FileShareInstructions

A = names.Action
TOKEN_PLACEHOLDER = b"$JOB_TOKEN"
_MIME_HEAD = re.compile(rb"^(?:mime-version|content-type)\s*:", re.I)


def read_request(path: Path, token: str | None) -> tuple[str, bytes]:
    """(content type, body) of one request file, with ``$JOB_TOKEN`` filled in."""
    data = path.read_bytes()
    if token is not None:
        data = data.replace(TOKEN_PLACEHOLDER, token.encode())
    content_type = client.SOAP_XML
    if _MIME_HEAD.match(data):
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            head, _, body = data.partition(b"\n\n")
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                content_type = value.strip()
        data = body
    return content_type, data


def request_files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            found.append(path)
    return found


class Loop:
    """One server, a virtual clock, a store that only counts bytes, and an engine that reports
    each filter as successful as soon as a job becomes Pending."""

    def __init__(self, start: datetime, step: float) -> None:
        ids = itertools.count(1)
        # Deterministic identifiers (the core takes them from us): the same files give the
        # same output on every run.
        self.server = ScanServer(ServerConfig(), new_id=lambda: str(uuid.UUID(int=next(ids))))
        self.now = start
        self.step = timedelta(seconds=step)
        self.stored_bytes = 0
        self.token: str | None = None

    def run_commands(self, commands: Iterable[Command]) -> list[str]:
        """Carry out commands; return their names for the status line.  Engine inputs cause
        further commands, which are carried out in turn."""
        done: list[str] = []
        pending = list(commands)
        while pending:
            command = pending.pop(0)
            done.append(type(command).__name__)
            data = getattr(command, "data", None)
            if isinstance(data, bytes):
                self.stored_bytes += len(data)
            if isinstance(command, StartProcessing):
                pending += self.play_engine(command)
        return done

    def play_engine(self, command: StartProcessing) -> list[Command]:
        token = command.job.token
        out = self.server.processing(ProcessingStarted(token), self.now)
        for index, status in enumerate(command.job.filters):
            if status.instructions is not None:
                out += self.server.processing(FilterStarted(token, index), self.now)
                out += self.server.processing(
                    FilterFinished(token, index, FilterState.COMPLETED_SUCCESSFULLY), self.now
                )
        out += self.server.processing(ProcessingFinished(token), self.now)
        return out

    def tick_if_due(self) -> None:
        """What a blocking server does when its sleep until next_deadline() ends."""
        deadline = self.server.next_deadline()
        while deadline is not None and deadline <= self.now:
            commands = self.server.tick(self.now)
            names_ = self.run_commands(commands)
            print(
                f"{self.now:%H:%M:%S} tick                         "
                f"commands: {', '.join(names_) or '-'}"
            )
            later = self.server.next_deadline()
            if later == deadline:
                break  # nothing changed: do not spin (would be a core bug)
            deadline = later

    def handle_file(self, path: Path) -> int:
        self.tick_if_due()
        content_type, body = read_request(path, self.token)
        exchange = self.server.open_exchange(RequestInfo(now=self.now, content_type=content_type))
        commands: list[Command] = []
        for i in range(0, len(body), 4096):  # chunks, as a socket would deliver them
            commands += exchange.feed(body[i : i + 4096])
        outcome = exchange.end()
        commands += outcome.commands
        done = self.run_commands(commands)
        reply = outcome.reply
        what = _describe_reply(reply.body, reply.status)
        if what.startswith("CreatePostScanJobResponse "):
            self.token = what.split()[-1]
        print(
            f"{self.now:%H:%M:%S} {path.name:<28} {reply.status} {what}"
            f"  commands: {', '.join(done) or '-'}"
        )
        self.now += self.step
        return reply.status

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        deadline = self.server.next_deadline()
        print(
            f"clock +{seconds:g}s; next deadline "
            f"{'none' if deadline is None else f'{deadline:%H:%M:%S}'}"
        )
        self.tick_if_due()

    def summary(self) -> None:
        for job in self.server.jobs.active() + self.server.jobs.history():
            print(
                f"job {job.token}  {job.state.value:<10} "
                f"{','.join(r.value for r in job.reasons):<34} images {job.images_received}"
            )
        deadline = self.server.next_deadline()
        print(
            f"stored {self.stored_bytes} image bytes; next deadline: "
            f"{'none' if deadline is None else deadline.isoformat()}"
        )


def _describe_reply(body: bytes, status: int) -> str:
    try:
        response = client.parse_response(body, status)
    except client.ClientFault as fault:
        return f"fault {fault.line()}"
    except ValueError as exc:
        return f"unreadable reply: {exc}"
    local = response.action.rsplit("/", 1)[-1]
    if local == "CreatePostScanJobResponse" and response.payload is not None:
        return f"{local} {client.text_of(response.payload, names.DSP, 'JobToken')}"
    if local == "GetPostScanJobElementsResponse":
        try:
            view = client.read_job_elements(response.payload, names.DSP)
            return f"{local} {view.state} images={view.images_received}"
        except ValueError:
            pass
    return local


def write_demo(folder: Path) -> list[Path]:
    """A job with two images, a second job that is never ended, and status queries."""
    folder.mkdir(parents=True, exist_ok=True)
    n = itertools.count(1)

    def env(action: str, payload: etree._Element) -> bytes:
        return client.envelope(
            action, payload, message_id=f"urn:uuid:{uuid.UUID(int=1000 + next(n))}"
        )

    create = env(
        A.DSP_CREATE,
        client.create_post_scan_job(
            user_identifier="S-1-5-21-0-0-0-1000",
            psp_identifier="scan-to-folder",
            instructions=[FileShareInstructions(("\\\\localhost\\scans",))],
        ),
    )
    files = {"01-create.xml": create}
    for doc in (1, 2):
        root = env(
            A.DSP_SEND_IMAGE,
            client.send_image_request("$JOB_TOKEN", doc, "png", f"image{doc}@demo"),
        )
        m = client.mtom(root, f"image{doc}@demo", [bytes([doc]) * 10_000], boundary="demo-b")
        files[f"0{1 + doc}-send-image-{doc}.mime"] = (
            f"Content-Type: {m.content_type}\r\n\r\n".encode() + b"".join(m.chunks())
        )
    files["04-end.xml"] = env(
        A.DSP_END, client.token_request(names.DSP, "EndPostScanJobRequest", "$JOB_TOKEN")
    )
    files["05-status.xml"] = env(
        A.DSP_GET_JOB_ELEMENTS, client.job_elements_request(names.DSP, "$JOB_TOKEN", ["JobStatus"])
    )
    files["06-create-abandoned.xml"] = create.replace(b"urn:uuid:", b"urn:uuid:9", 1)
    files["07-unknown-token.xml"] = env(
        A.DSP_END, client.token_request(names.DSP, "EndPostScanJobRequest", str(uuid.UUID(int=999)))
    )
    written = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        written.append(folder / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run request files through one ScanServer.")
    parser.add_argument("paths", nargs="*", type=Path, help="request files or directories")
    parser.add_argument(
        "--step", type=float, default=1.0, help="virtual seconds between requests (default 1)"
    )
    parser.add_argument(
        "--advance",
        type=float,
        default=None,
        help="at the end, advance the clock this many seconds and tick "
        "(default: past the job timeout when running the demo)",
    )
    parser.add_argument(
        "--write-demo",
        type=Path,
        metavar="DIR",
        help="write the demonstration requests into DIR and exit",
    )
    args = parser.parse_args(argv)
    if args.write_demo:
        for path in write_demo(args.write_demo):
            print(path)
        return 0
    loop = Loop(datetime(2026, 11, 21, 9, 0, tzinfo=UTC), args.step)
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.paths
        advance = args.advance
        if not paths:
            write_demo(Path(tmp))
            paths = [Path(tmp)]
            if advance is None:
                advance = loop.server.config.job_timeout_seconds + 1
        files = request_files(paths)
        if not files:
            print("no request files", file=sys.stderr)
            return 2
        statuses = [loop.handle_file(path) for path in files]
    if advance:
        loop.advance(advance)
    loop.summary()
    return 0 if all(s < 500 for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
