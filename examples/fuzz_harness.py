"""The one invariant a fuzzer checks at the core's bytes boundary (h11's fuzz/afl-server.py idea).

For any body bytes with any Content-Type (or none):

1. ``ScanServer.handle`` never raises;
2. the reply is a well-formed SOAP 1.2 envelope (``application/soap+xml``; root
   ``soap:Envelope`` with a ``soap:Body``), a ``soap:Fault`` exactly when the status is not 200;
3. the status is one of 200, 400, 413, 500;
4. feeding the body in chunks (of any sizes) through ``open_exchange``/``feed``/``end`` gives the
   same reply bytes and the same commands as feeding it whole (image chunks compared by content,
   since their boundaries follow the feeding).

Each input runs against a fresh server holding one Creating job (so mutated SendImage requests
reach the streaming path), with deterministic identifiers and a fixed ``now``, so the two runs
are comparable byte for byte.  The image limit is lowered to 4 KiB so the 413 path is reachable
with small inputs.

``main()`` runs atheris when it is installed (coverage-guided, forever or until its own limits),
otherwise ``--iterations`` random mutations of valid seed requests.  ``fuzz/fuzz_core.py`` is the
atheris entry point; ``--write-corpus DIR`` writes the seeds in the input format both use::

    python examples/fuzz_harness.py --engine random --iterations 2000
    python examples/fuzz_harness.py --write-corpus fuzz/corpus

Input format of :func:`test_one_input`: byte 0 picks the content type from
:data:`CONTENT_TYPES` (one more value means "the first line of the rest is the content type"),
byte 1 is the chunk size for the chunked run (0 = one byte at a time), the rest is the body.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import itertools
import random
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from lxml import etree

from dsc_core import (
    AbortDocument,
    AppendDocument,
    Command,
    Limits,
    Outcome,
    RequestInfo,
    ScanServer,
    ServerConfig,
    client,
    names,
)
from dsc_core.model import FileShareInstructions

A = names.Action
NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
ALLOWED_STATUSES = frozenset({200, 400, 413, 500})
CONFIG = ServerConfig(limits=Limits(max_image_bytes=4096))
#: The job every fresh server holds: id 1 goes to the reply's MessageID, id 2 to the token.
JOB_TOKEN = str(uuid.UUID(int=2))
BOUNDARY = "fuzz-boundary"
MTOM_TYPE = (
    f'multipart/related; boundary="{BOUNDARY}"; type="application/xop+xml"; '
    'start="<root@dsc-server>"; start-info="application/soap+xml"'
)
CONTENT_TYPES: tuple[str | None, ...] = (
    "application/soap+xml; charset=utf-8",
    MTOM_TYPE,
    None,
    "text/xml",
    "application/soap+xml; charset=iso-8859-1",
    'multipart/related; boundary=""',
    "multipart/related",
    'multipart/related; boundary="x"; type="application/xop+xml"',
    "application/xop+xml",
    "\x00\xff;;;=",
)

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


class InvariantBroken(AssertionError):
    """The core broke its contract for this input (a bug to report with the input)."""


def new_server() -> ScanServer:
    """A fresh server with deterministic ids and one Creating job (token :data:`JOB_TOKEN`)."""
    ids = itertools.count(1)
    server = ScanServer(CONFIG, new_id=lambda: str(uuid.UUID(int=next(ids))))
    body = client.envelope(
        A.DSP_CREATE,
        client.create_post_scan_job(
            user_identifier="S-1-5-21-0-0-0-1000",
            psp_identifier="fuzz",
            instructions=[FileShareInstructions(("\\\\localhost\\scans",))],
        ),
        message_id="urn:uuid:00000000-0000-0000-0000-00000000f022",
    )
    outcome = server.handle(body, RequestInfo(now=NOW, content_type=client.SOAP_XML))
    token = client.parse_response(outcome.reply.body).payload
    assert token is not None and token[0].text == JOB_TOKEN, "seed job not created as expected"
    return server


def normalized(commands: Sequence[Command]) -> list[object]:
    """What the commands do to a store, independent of how the body was fed.

    Chunk boundaries follow the feeding, so consecutive AppendDocument chunks of one document are
    merged.  And a document that ends in AbortDocument is never visible: how many of its bytes
    were appended before the core refused it (say, at the image size limit, R12) depends on when
    the bytes arrived, so its appends are dropped.
    """
    aborted = {(c.token, c.document_id) for c in commands if isinstance(c, AbortDocument)}
    out: list[object] = []
    for command in commands:
        if isinstance(command, AppendDocument):
            key = (command.token, command.document_id)
            if key in aborted:
                continue
            last = out[-1] if out else None
            if isinstance(last, AppendDocument) and (last.token, last.document_id) == key:
                out[-1] = AppendDocument(last.token, last.document_id, last.data + command.data)
                continue
        out.append(command)
    return out


def summary(commands: Sequence[object]) -> str:
    """Command names with repeats folded (``AppendDocument x40``), for readable reports."""
    parts: list[str] = []
    for name, group in itertools.groupby(type(c).__name__ for c in commands):
        n = len(list(group))
        parts.append(name if n == 1 else f"{name} x{n}")
    return ", ".join(parts) or "-"


def check_reply(outcome: Outcome) -> None:
    reply = outcome.reply
    if reply.status not in ALLOWED_STATUSES:
        raise InvariantBroken(f"status {reply.status} not in {sorted(ALLOWED_STATUSES)}")
    if not reply.content_type.startswith("application/soap+xml"):
        raise InvariantBroken(f"content type {reply.content_type!r}")
    try:
        root = etree.fromstring(reply.body, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise InvariantBroken(f"reply is not well-formed XML: {exc}") from None
    if root.tag != f"{{{names.SOAP}}}Envelope":
        raise InvariantBroken(f"reply root is {root.tag}")
    bodies = [c for c in root if c.tag == f"{{{names.SOAP}}}Body"]
    if len(bodies) != 1:
        raise InvariantBroken("reply has no single soap:Body")
    is_fault = any(c.tag == f"{{{names.SOAP}}}Fault" for c in bodies[0])
    if is_fault != (reply.status != 200):
        raise InvariantBroken(f"status {reply.status} with fault={is_fault}")


def check(body: bytes, content_type: str | None, chunk_size: int) -> Outcome:
    """Run the invariant for one input; raise :class:`InvariantBroken` if it does not hold."""
    info = RequestInfo(now=NOW, content_type=content_type)
    server, other = new_server(), new_server()
    try:
        whole = server.handle(body, info)
    except Exception as exc:
        raise InvariantBroken(f"handle() raised {type(exc).__name__}: {exc}") from exc
    check_reply(whole)
    size = max(1, chunk_size)
    try:
        exchange = other.open_exchange(info)
        commands: list[Command] = []
        for i in range(0, len(body), size):
            commands += exchange.feed(body[i : i + size])
        chunked = exchange.end()
    except Exception as exc:
        raise InvariantBroken(f"chunked feeding raised {type(exc).__name__}: {exc}") from exc
    commands += chunked.commands
    if chunked.reply != whole.reply:
        raise InvariantBroken(
            f"chunks of {size} gave another reply:\n"
            f"whole:   {whole.reply!r}\nchunked: {chunked.reply!r}"
        )
    if normalized(commands) != normalized(whole.commands):
        raise InvariantBroken(
            f"chunks of {size} gave other commands:\n"
            f"whole:   {summary(whole.commands)}\n"
            f"chunked: {summary(commands)}"
        )
    return whole


# --- the bytes boundary ----------------------------------------------------------------------


def decode_input(data: bytes) -> tuple[str | None, int, bytes]:
    """(content type, chunk size, body) of one fuzzer input; see the module docstring."""
    if len(data) < 2:
        return CONTENT_TYPES[0], 1, data
    selector = data[0] % (len(CONTENT_TYPES) + 1)
    chunk = data[1] or 1
    body = data[2:]
    if selector < len(CONTENT_TYPES):
        return CONTENT_TYPES[selector], chunk, body
    line, _, body = body.partition(b"\n")
    return line.decode("latin-1"), chunk, body


def encode_input(content_type: str | None, chunk_size: int, body: bytes) -> bytes:
    if content_type in CONTENT_TYPES:
        head = bytes([CONTENT_TYPES.index(content_type)])
    else:
        head = bytes([len(CONTENT_TYPES)])
        body = (content_type or "").encode("latin-1", "replace") + b"\n" + body
    return head + bytes([max(0, min(255, chunk_size))]) + body


def test_one_input(data: bytes) -> None:
    """The atheris entry point: any bytes; raises only when the invariant is broken."""
    content_type, chunk, body = decode_input(data)
    check(body, content_type, chunk)


# --- seeds and random mutation ----------------------------------------------------------------


def seeds() -> list[tuple[str | None, bytes]]:
    """Valid requests of several kinds, including an MTOM SendImage for the seed job."""
    n = itertools.count(1)

    def env(action: str, payload: etree._Element) -> bytes:
        return client.envelope(
            action, payload, message_id=f"urn:uuid:{uuid.UUID(int=2**64 + next(n))}"
        )

    soap = client.SOAP_XML
    image = client.mtom(
        env(A.DSP_SEND_IMAGE, client.send_image_request(JOB_TOKEN, 1, "png", "img@fuzz")),
        "img@fuzz",
        [b"\x89PNG\r\n" + bytes(range(256)) * 4],
        boundary=BOUNDARY,
    )
    big = client.mtom(
        env(A.DSP_SEND_IMAGE, client.send_image_request(JOB_TOKEN, 2, "jfif", "big@fuzz")),
        "big@fuzz",
        [b"\xff\xd8" + bytes(4095)],
        boundary=BOUNDARY,
    )
    return [
        (
            soap,
            env(
                A.DSC_GET_REPOSITORY_ELEMENTS,
                client.repository_elements_request(
                    ["RepositoryConfiguration", "RepositoryStatusSummary"]
                ),
            ),
        ),
        (soap, env(A.DSC_GET_ACTIVE_JOBS, client.empty_request("GetActiveJobsRequest"))),
        (
            soap,
            env(
                A.DSP_CREATE,
                client.create_post_scan_job(
                    user_identifier="S-1-5-21-1",
                    psp_identifier="p",
                    continue_on_error=True,
                    instructions=[FileShareInstructions(("\\\\h\\s",))],
                ),
            ),
        ),
        (soap, env(A.DSP_END, client.token_request(names.DSP, "EndPostScanJobRequest", JOB_TOKEN))),
        (
            soap,
            env(
                A.DSP_GET_JOB_ELEMENTS,
                client.job_elements_request(names.DSP, JOB_TOKEN, ["JobStatus", "Documents"]),
            ),
        ),
        (image.content_type, b"".join(image.chunks())),
        (big.content_type, b"".join(big.chunks())),  # just over the 4 KiB limit: 413
        (soap, b""),
        (None, b"<not xml"),
    ]


def mutate(rng: random.Random, body: bytes, pool: Sequence[bytes]) -> bytes:
    """A few byte-level edits, like a dumb fuzzer: flips, deletions, duplications, inserts,
    truncation and splicing with another seed."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(data))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[pos : pos + rng.randint(1, 64)]
        elif op == 2:
            data[pos:pos] = data[pos : pos + rng.randint(1, 64)] * rng.randint(1, 8)
        elif op == 3:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4:
            del data[pos:]
        elif op == 5:
            other = rng.choice(pool)
            start = rng.randint(0, len(other))
            data[pos:] = other[start:]
        else:
            data[pos:pos] = rng.choice(
                [
                    b"<",
                    b">",
                    b"&",
                    b"\r\n--" + BOUNDARY.encode(),
                    b"<!DOCTYPE x [<!ENTITY a 'b'>]>",
                    b"\x00",
                    b"\xff\xfe",
                    b"]]>",
                    b"xmlns:soap='urn:x'",
                ]
            )
    return bytes(data)


def run_random(
    iterations: int, seed: int, crash_dir: Path | None, report: Callable[[str], None] = print
) -> int:
    rng = random.Random(seed)
    corpus = seeds()
    pool = [body for _, body in corpus]
    statuses: dict[int, int] = {}
    for i in range(iterations):
        content_type, body = rng.choice(corpus)
        if rng.random() < 0.85:
            body = mutate(rng, body, pool)
        if rng.random() < 0.1:
            content_type = rng.choice(CONTENT_TYPES)
        chunk = rng.choice([1, 2, 7, 64, 255, rng.randint(1, 255)])
        try:
            outcome = check(body, content_type, chunk)
        except InvariantBroken as exc:
            data = encode_input(content_type, chunk, body)
            where = ""
            if crash_dir is not None:
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
                path.write_bytes(data)
                where = f" (input saved to {path}; replay: python fuzz/fuzz_core.py {path})"
            report(f"iteration {i}: invariant broken{where}\n{exc}")
            return 1
        statuses[outcome.reply.status] = statuses.get(outcome.reply.status, 0) + 1
    shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
    report(f"{iterations} inputs, invariant held; replies by status: {shown}")
    return 0


def write_corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (content_type, body) in enumerate(seeds()):
        path = folder / f"seed-{i:02d}"
        path.write_bytes(encode_input(content_type, 64, body))
        paths.append(path)
    return paths


def run_atheris(argv: Sequence[str]) -> int:  # pragma: no cover - needs atheris
    atheris = importlib.import_module("atheris")  # optional; typed as Any
    atheris.Setup([sys.argv[0], *argv], test_one_input)
    atheris.Fuzz()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the core's bytes boundary.")
    parser.add_argument(
        "--engine",
        choices=("auto", "atheris", "random"),
        default="auto",
        help="auto: atheris when installed, else random (default)",
    )
    parser.add_argument(
        "--iterations", type=int, default=2000, help="random engine: inputs to try (default 2000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random engine: RNG seed")
    parser.add_argument(
        "--crash-dir", type=Path, default=None, help="random engine: save a failing input here"
    )
    parser.add_argument(
        "--write-corpus",
        type=Path,
        metavar="DIR",
        help="write the seed inputs (atheris format) into DIR and exit",
    )
    args, rest = parser.parse_known_args(argv)
    if args.write_corpus:
        for path in write_corpus(args.write_corpus):
            print(path)
        return 0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") is not None else "random"
    if engine == "atheris":
        return run_atheris(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_random(args.iterations, args.seed, args.crash_dir)


if __name__ == "__main__":
    sys.exit(main())
