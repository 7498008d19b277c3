"""The ``dsc`` client commands as an administrator uses them, against a real ``dsc serve``:
listings that fit 100 columns (rich tables), --wide, times, history filters, token prefixes,
--version, a closed pipe, format warnings, and ``dsc watch`` during a scan."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

import pytest

from dsc_bindings.console.formats import VALID_FORMATS, format_for, sniff
from dsc_bindings.console.output import fit_widths
from e2e_support import Run, ServerProcess, child_env, dsc_here

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(4000)
PDF = b"%PDF-1.7\n" + os.urandom(3000)
LONG_PROCESS = "Accounting department: incoming invoices, scanned at the front desk"
OTHER_USER = "S-1-5-21-0-0-0-2002"


@dataclass
class Env:
    server: ServerProcess
    files: Path
    tokens: list[str]  # oldest first

    def dsc(self, *args: str, columns: int = 100) -> Run:
        return dsc_columns(columns, *args, "--server", self.server.url)


def dsc_columns(columns: int, *args: str) -> Run:
    """``dsc ARGS`` in this process (the tests are about what it prints, not the process) as
    on a terminal ``columns`` wide: the console sizes its tables from $COLUMNS."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        return dsc_here(*args)
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("cli")
    files = root / "in"
    files.mkdir()
    (files / "page.png").write_bytes(PNG)
    (files / "invoice.pdf").write_bytes(PDF)
    server = ServerProcess(root / "data").start()
    tokens = []
    try:
        for args in (
            ["--process-name", LONG_PROCESS, str(files / "page.png"), str(files / "invoice.pdf")],
            ["--user", OTHER_USER, str(files / "page.png")],
            # A share path the server refuses: the job is aborted.
            ["--share", r"\\host\..\x", str(files / "page.png")],
        ):
            run = dsc_here("scan", "--server", server.url, "--quiet", "--json", *args)
            assert "Traceback" not in run.err, run
            tokens.append(run.json()["token"])
        yield Env(server, files, tokens)
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


class Lines:
    """Lines of a child's pipe, read by a thread, so that a test waits with a timeout instead
    of hanging when the child says nothing."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for line in pipe:
            self._queue.put(line.decode().rstrip("\n"))
        self._queue.put("")  # end of output

    def next(self, timeout: float = 30.0) -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None


class Watch:
    """``dsc watch --server SERVER ARGS`` running, its output read line by line (:class:`Lines`),
    once it said where its events go (``callback``)."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dsc_bindings.console.main",
                "watch",
                "--server",
                server.url,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**child_env(), "COLUMNS": "100"},
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.err = Lines(self.proc.stdout), Lines(self.proc.stderr)
        started = self.err.next()
        found = re.fullmatch(
            r"watching \S+ \(events to (http://\S+)/events\); Ctrl-C to stop", started
        )
        assert found, started
        self.callback = found.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def lines_fit(text: str, width: int = 100) -> list[str]:
    lines = text.rstrip("\n").split("\n")
    for line in lines:
        assert len(line) <= width, f"{len(line)} columns: {line!r}"
    return lines


def test_listings_fit_100_columns_with_times(env: Env) -> None:
    run = env.dsc("history")
    assert run.code == 0, run
    lines = lines_fit(run.out)
    header = lines[0].split()
    assert header[:4] == ["TOKEN", "OUTCOME", "COMPLETED", "IMAGES"], lines[0]
    rows = lines[2:]
    assert len(rows) == 3
    # Newest first; tokens shortened to 8 characters; a local time to the second.
    assert [r.split()[0] for r in rows] == [t[:8] for t in reversed(env.tokens)]
    for row in rows:
        assert re.search(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\b", row), row
    long_row = rows[-1]
    assert "…" in long_row  # the long process name gave way
    assert "Accounting" in long_row

    jobs = env.dsc("jobs")
    assert jobs.code == 0 and jobs.out.strip() == "(no jobs)", jobs


def test_wide_shows_everything(env: Env) -> None:
    run = env.dsc("history", "--wide")
    assert run.code == 0, run
    assert all(t in run.out for t in env.tokens)
    assert LONG_PROCESS in run.out
    assert "PostScanJobProcessingFailed" in run.out  # the REASONS column, --wide only
    assert "…" not in run.out
    assert max(len(line) for line in run.out.splitlines()) > 100


def test_json_listings_carry_times(env: Env) -> None:
    run = env.dsc("history", "--json")
    entries = run.json()
    assert [e["token"] for e in entries] == list(reversed(env.tokens))
    for entry in entries:
        created = datetime.fromisoformat(entry["created"])
        completed = datetime.fromisoformat(entry["completed"])
        assert created.tzinfo is not None and created <= completed


def test_history_filters(env: Env) -> None:
    def tokens(*args: str) -> list[str]:
        run = env.dsc("history", "--json", *args)
        assert run.code == 0, run
        return [e["token"] for e in run.json()]

    first, second, third = env.tokens
    assert tokens("--user", OTHER_USER) == [second]
    assert tokens("--user", "0-0-0-1000") == [third, first]
    assert tokens("--limit", "1") == [third]
    assert tokens("--state", "Completed") == [second, first]
    assert tokens("--state", "Aborted") == [third]
    assert tokens("--state", "Aborted", "--state", "Completed") == [third, second, first]
    assert tokens("--state", "Canceled") == []
    assert tokens("--state", "aborted", "--state", "COMPLETED") == [third, second, first]
    assert tokens("--failed") == [third]
    assert tokens("--since", "1h") == [third, second, first]
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    assert tokens("--since", tomorrow) == []
    bad = env.dsc("history", "--since", "yesterday-ish")
    assert bad.code == 2 and "neither a date/time" in bad.err, bad


def test_token_prefix_and_filter_destinations(env: Env) -> None:
    first = env.tokens[0]
    run = env.dsc("job", first[:8])
    assert run.code == 0, run
    assert first in run.out
    assert re.search(r"Created\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", run.out), run.out
    detail = env.dsc("job", first, "--json").json()
    assert detail["filters"][0]["state"] == "CompletedSuccessfully"
    assert detail["created"] and detail["completed"]


def test_version_and_help() -> None:
    run = dsc_here("--version")
    assert run.code == 0 and re.fullmatch(r"dsc \S+\n", run.out), run
    helped = dsc_here("history", "--help")
    for option in ("--since", "--user", "--state", "--limit", "--wide", "--json"):
        assert option in helped.out


def test_closed_pipe_ends_quietly(env: Env) -> None:
    # Enough output that the writer is still writing when `head` has gone.
    shell = f"{sys.executable} -m dsc_bindings.console.main history --wide --server {env.server.url} | head -1"
    for _ in range(3):
        done = subprocess.run(
            ["bash", "-c", shell], capture_output=True, timeout=60, env=child_env()
        )
        assert done.stdout.decode().startswith("TOKEN"), done
        assert done.stderr == b"", done.stderr.decode()


def test_closed_pipe_inside_a_long_listing() -> None:
    """The reader leaves while a command is still writing: no traceback, status 141."""
    script = (
        "import sys\n"
        "from dsc_bindings.console import jobs, main\n"
        "def flood(args):\n"
        "    for i in range(1_000_000):\n"
        "        print('x' * 60)\n"
        "    return 0\n"
        "jobs.cmd_jobs = flood\n"
        "sys.exit(main.main(['jobs']))\n"
    )
    done = subprocess.run(
        ["bash", "-c", f'{sys.executable} -c "$0" | head -1; exit ${{PIPESTATUS[0]}}', script],
        capture_output=True,
        timeout=60,
        env=child_env(),
    )
    assert done.stdout == b"x" * 60 + b"\n"
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode == 141, done


def test_scan_warns_on_format_mismatch(env: Env, tmp_path: Path) -> None:
    disguised = tmp_path / "photo.png"
    disguised.write_bytes(PDF)
    run = dsc_here("scan", "--server", env.server.url, "--quiet", str(disguised))
    assert run.code == 0, run
    assert (
        "dsc: warning: photo.png: sent as png, but its content looks like PDF "
        "(use --format pdf-a)" in run.err
    ), run.err
    clean = dsc_here("scan", "--server", env.server.url, "--quiet", str(env.files / "page.png"))
    assert "warning" not in clean.err, clean.err
    bad = dsc_here("scan", "--server", env.server.url, "--format", "gif", str(disguised))
    assert bad.code == 2, bad
    assert "valid values: " + ", ".join(VALID_FORMATS) in bad.err
    assert "Traceback" not in bad.err


def test_format_for_each_case(tmp_path: Path) -> None:
    def file(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    assert format_for(file("a.png", PNG), None) == ("png", None)
    assert format_for(file("a.PDF", PDF), None) == ("pdf-a", None)
    assert format_for(file("noext", PNG), None) == ("png", None)  # the content decides
    fmt, warning = format_for(file("mystery", b"hello"), None)
    assert fmt == "pdf-a" and warning and "--format" in warning
    assert format_for(file("b.tif", b"II*\x00rest"), "tiff-multi-g4") == ("tiff-multi-g4", None)
    assert format_for(file("c.jbg", b"\x00\x01"), None) == ("jbig", None)  # no signature known
    fmt, warning = format_for(file("d.jpg", PNG), None)
    assert fmt == "jfif" and warning and "looks like PNG" in warning
    assert sniff(b"\xff\xd8\xff\xe0") == ("JPEG", "jfif")


def test_fit_widths_keeps_what_must_stay_whole() -> None:
    widths = fit_widths([8, 9, 19, 60, 40], [True, True, True, False, False], 100)
    assert widths[:3] == [8, 9, 19]
    assert sum(widths) + 2 * 4 <= 100
    assert fit_widths([5, 5], [False, False], 100) == [5, 5]
    # Nothing left to cut: the kept columns stay whole even when the line is too long.
    assert fit_widths([50, 50, 9], [True, True, False], 60)[:2] == [50, 50]


def test_watch_prints_each_event_of_a_scan_then_unsubscribes(env: Env) -> None:
    watch = Watch(env.server, "--listen", "127.0.0.1:0", "--json")
    try:
        assert watch.callback.startswith("http://127.0.0.1:"), watch.callback
        run = dsc_here(
            "scan", "--server", env.server.url, "--quiet", "--json", str(env.files / "page.png")
        )
        token = run.json()["token"]
        events = []
        while True:
            line = watch.out.next()
            assert line, "dsc watch ended early"
            event = json.loads(line)
            events.append(event)
            if event["event"] == "PostScanJobEndStateEvent":
                break
        mine = [e for e in events if e.get("token") == token]
        assert [e["state"] for e in mine if e["event"] == "PostScanJobStatusEvent"][:1] == [
            "Creating"
        ]
        assert mine[-1]["state"] == "Completed"
        assert mine[-1]["reasons"] == ["PostScanJobCompletedSuccessfully"]
        assert "Processing" in [
            e["state"] for e in events if e["event"] == "RepositoryStatusSummaryEvent"
        ]
        for event in events:
            datetime.fromisoformat(event["received"])
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(20) == 0
        assert watch.err.next() == "unsubscribed"
        assert watch.err.next() == ""
    finally:
        watch.close()


def test_watch_human_lines(env: Env) -> None:
    watch = Watch(env.server, "--listen", "127.0.0.1:0")
    try:
        token = dsc_here(
            "scan", "--server", env.server.url, "--quiet", "--json", str(env.files / "page.png")
        ).json()["token"]
        lines = []
        while not lines or "job ended" not in lines[-1]:
            lines.append(watch.out.next())
            assert lines[-1], "dsc watch ended early"
        assert re.fullmatch(
            rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d  job {token[:8]}  Creating  images 0  "
            r"fileshare:Pending",
            lines[0],
        ), lines
        assert lines[-1].endswith(
            "Completed (PostScanJobCompletedSuccessfully)  images 1  fileshare:CompletedSuccessfully"
        ), lines
        watch.proc.send_signal(signal.SIGTERM)
        assert watch.proc.wait(20) == 0
    finally:
        watch.close()


def test_watch_usage_errors() -> None:
    run = dsc_here("watch", "--listen", "nonsense")
    assert run.code == 2 and "ADDR:PORT" in run.err, run
    unknown = f"http://127.0.0.1:9/ScanServer-{uuid.uuid4().hex[:4]}"
    down = dsc_here("watch", "--server", unknown, "--listen", "127.0.0.1:0")
    assert down.code == 1 and "cannot reach the scan server" in down.err, down
    assert "Traceback" not in down.err
