"""Support for tests/test_e2e_serve.py: the real ``dsc serve`` as a subprocess, the ``dsc`` client
commands as subprocesses, a small SOAP client over real sockets, and real local peers (a slow
SharePoint-like HTTP server and an SMTP relay) for the filters.

Nothing here is a mock: every request crosses a TCP socket to a separate server process.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc_core import client as dc
from dsc_core import names
from waiting import wait_for

A = names.Action
ROOT = Path(__file__).resolve().parent.parent
#: The default scanning user of ``dsc scan`` (its --user default).
DEFAULT_SID = "S-1-5-21-0-0-0-1000"
#: What the server's log says once it is listening (at INFO).
LISTENING = "dsc-server listening on"
#: The last line of the start-up block (serve._log_start, once the server listens): the whole
#: block is in the log.
READY = "dsc.serve: security: "
#: The same line with ``--log-format json``.
READY_JSON = '"logger": "dsc.serve", "message": "security: '
STOPPED = "scan service stopped"
#: Bindings that run the ASGI app (dsc_bindings.asgi) under an ASGI server instead of
#: ``dsc serve``; the ready line each server logs once the lifespan started the service.
ASGI_SERVERS = {
    "uvicorn": "Application startup complete",
    "hypercorn": "Running on http://",
}
#: uvicorn runs the deployment docs/operating.md recommends: dsc's loop (uvloop taking in every
#: pending connection at each poll) and httptools protocol (one send per answer).  Stock
#: uvicorn is tested in-process (tests/bindings/test_asgi.py) and measured in bench/asgi.py; a
#: test's own ``extra`` ``--loop``/``--http`` come later on the command line and win.
UVICORN_RECOMMENDED = (
    "--loop",
    "dsc_bindings.http.uvicorn_loop:new_event_loop",
    "--http",
    "dsc_bindings.http.uvicorn_protocol:CoalescingHttpToolsProtocol",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DSC_SERVER", None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "bindings"), env.get("PYTHONPATH")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- the server process ------------------------------------------------------------------------


class ServerProcess:
    """One ``python -m dsc_bindings.console.main serve`` child, its log in a file; with
    ``binding`` "uvicorn" (with :data:`UVICORN_RECOMMENDED`) or "hypercorn", that ASGI server
    running ``dsc_bindings.asgi``."""

    def __init__(
        self,
        data: Path,
        *,
        binding: str = "async",
        config: Path | None = None,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
        log_path: Path | None = None,
        extra: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        self.data = data
        #: A port kept across restarts (a load balancer's configuration names it); 0: a free
        #: port at each start.
        self.fixed_port = port
        #: More `dsc serve` options (e.g. ``--log-format json``).
        self.extra = list(extra)
        self.binding = binding
        self.config = config
        self.tls = tls
        self.client_ca = client_ca
        self.log_path = log_path or data.parent / f"serve-{uuid.uuid4().hex[:8]}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # - life cycle -

    def start(self, timeout: float = 60.0) -> ServerProcess:
        for _ in range(5):  # a free port may be taken by someone else in between: retry
            self.port = self.fixed_port or free_port()
            self.before_each_start()
            args = [
                sys.executable,
                "-m",
                "dsc_bindings.console.main",
                "serve",
                "--port",
                str(self.port),
                "--data",
                str(self.data),
            ]
            if self.binding:
                args += ["--binding", self.binding]
            if self.config is not None:
                args += ["--config", str(self.config)]
            if self.tls is not None:
                args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
            if self.client_ca is not None:
                args += ["--client-ca", str(self.client_ca)]
            args += self.extra
            env = child_env()
            if self.binding in ASGI_SERVERS:
                args, env = self._asgi_command(env)
            self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log_file:
                self.proc = subprocess.Popen(
                    args,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=str(self.data.parent),
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._ready():
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            else:
                self.kill9()
                raise AssertionError(f"dsc serve did not listen within {timeout} s:\n{self.log}")
            if "cannot listen" not in self.log and "address already in use" not in self.log:
                raise AssertionError(f"dsc serve exited with {self.proc.returncode}:\n{self.log}")
            if self.fixed_port:
                time.sleep(0.5)  # the same port again: let whoever holds it let go
        raise AssertionError("no free port for dsc serve after 5 tries")

    def before_each_start(self) -> None:
        """Called at each try of :meth:`start`, its port chosen: a subclass writes here what
        else names a port (chosen then too, so that a retry may change it)."""

    def _asgi_command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The ASGI server's command line; the app reads the rest from the environment."""
        env = {**env, "DSC_DATA": str(self.data), "DSC_PORT": str(self.port)}
        if self.config is not None:
            env["DSC_CONFIG"] = str(self.config)
        if self.binding == "uvicorn":
            args = [sys.executable, "-m", "uvicorn", "--factory", "dsc_bindings.asgi:create_app"]
            args += ["--host", "127.0.0.1", "--port", str(self.port), *UVICORN_RECOMMENDED]
            if self.tls is not None:
                args += ["--ssl-certfile", str(self.tls[0]), "--ssl-keyfile", str(self.tls[1])]
        else:
            args = [sys.executable, "-m", "hypercorn", "dsc_bindings.asgi:create_app()"]
            # --workers 0: serve in this process (else a worker child outlives a SIGKILL).
            args += ["--bind", f"127.0.0.1:{self.port}", "--workers", "0"]
            if self.tls is not None:
                args += ["--certfile", str(self.tls[0]), "--keyfile", str(self.tls[1])]
        return args + self.extra, env

    def _ready(self) -> bool:
        """Whether the server started: its ready line logged and its port taking connections
        (tests read the start-up block of the log); under a log level that hides that block,
        its answer to a request."""
        log = self.log
        if self.binding in ASGI_SERVERS:
            return ASGI_SERVERS[self.binding] in log and self._connectable()
        if self.log_level in ("DEBUG", "INFO"):
            return (READY in log or READY_JSON in log) and self._connectable()
        # The start-up block is INFO (serve._log_start), a TLS server's security line too: under
        # WARNING or ERROR the log may never say the server listens, but the server answers.
        return self._answers()

    @property
    def log_level(self) -> str:
        """The ``--log-level`` of ``self.extra``; ``dsc serve``'s default (INFO) without one."""
        for index, arg in enumerate(self.extra):
            if arg.startswith("--log-level="):
                return arg.split("=", 1)[1]
            if arg == "--log-level" and index + 1 < len(self.extra):
                return self.extra[index + 1]
        return "INFO"

    def _answers(self) -> bool:
        """A request to the server gets a response, any status: it accepted, read and answered
        (``/healthz``: what a load balancer asks; holds nothing of any user)."""
        conn: http.client.HTTPConnection
        if self.tls is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        else:
            # Whether it answers, not whom to trust: the tests' own clients verify it.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=1.0, context=context)
        try:
            conn.connect()
            if self.client_ca is not None:
                # It requires a client certificate, which this request has not: its TLS
                # handshake (1.3, complete before the server checks the certificate) answered.
                return True
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def _connectable(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
            return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stacks(self) -> str:
        """Every thread's stack, written to the log on SIGUSR1 (``dsc serve``'s, serve.py);
        '' when the server is not running, is not ``dsc serve`` (an ASGI server) or wrote
        none within 10 s (frozen)."""
        if not self.alive or self.binding in ASGI_SERVERS:
            return ""
        before = len(self.log)
        os.kill(self.pid, signal.SIGUSR1)
        sizes = [-1]

        def written() -> bool:  # begun, and no longer growing
            sizes.append(len(self.log))
            return "most recent call first" in self.log[before:] and sizes[-1] == sizes[-2]

        try:
            wait_for(written, 10, "the stacks", interval=0.1)
        except AssertionError:
            return ""
        return self.log[before:]

    @property
    def log(self) -> str:
        """The log of the current (or last) run of this process."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(getattr(self, "_log_start", 0))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM; returns the exit status (the caller asserts on it)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(
                    f"dsc serve ignored SIGTERM for {timeout} s:\n{self.log}"
                ) from exc
        self.returncode = self.proc.returncode
        return self.returncode

    def stop_cleanly(self) -> None:
        code = self.stop()
        log = self.log
        if self.binding in ASGI_SERVERS:
            # uvicorn re-raises the signal once it shut down gracefully (exit -15); the
            # lifespan's end is what says the service stopped cleanly.
            assert code in (0, -signal.SIGTERM), f"{self.binding} exited with {code}:\n{log}"
            assert "Application shutdown complete" in log or self.binding == "hypercorn", log
        else:
            assert code == 0, f"dsc serve exited with {code}:\n{log}"
            assert "signal SIGTERM: shutting down" in log, log
        assert STOPPED in log, f"the log does not say the server stopped:\n{log}"
        assert "Traceback" not in log, log

    def kill9(self) -> None:
        """SIGKILL: no clean-up of any kind happens in the server."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.returncode = self.proc.returncode

    # - addresses -

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/ScanServer"

    def status(self, field_name: str) -> int:
        """A ``VmHWM``/``VmRSS`` line of /proc/<pid>/status, in bytes."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        for line in text.splitlines():
            if line.startswith(field_name + ":"):
                value, unit = line.split(":", 1)[1].split()
                assert unit == "kB"
                return int(value) * 1024
        raise AssertionError(f"{field_name} not in /proc/{self.pid}/status")


@contextmanager
def serving(server: ServerProcess) -> Iterator[ServerProcess]:
    """``server`` started, for a fixture; afterwards stopped with SIGTERM, which must be clean
    (``stop_cleanly``), and killed if that failed, so that no server outlives its tests."""
    server.start()
    try:
        yield server
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


@contextmanager
def started_servers() -> Iterator[Callable[[ServerProcess], ServerProcess]]:
    """Start servers with the function this yields (it starts one and returns it); at the end
    every one still running is stopped with SIGTERM and must exit 0 saying it stopped."""
    started: list[ServerProcess] = []

    def start(server: ServerProcess) -> ServerProcess:
        started.append(server.start())
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.alive:
                server.stop_cleanly()


@contextmanager
def telling(
    servers: Mapping[str, ServerProcess] | Sequence[ServerProcess], lines: int = 60
) -> Iterator[None]:
    """A failure inside shows the end of each server's log: what the servers said is what
    tells why a test of several instances failed.  ``servers`` by name, or a list (named a, b,
    c... in its order) read when the failure happens, so a test's servers started inside the
    block are told too.  Any exception, not only an assertion: a client's socket timeout is
    as much a failure whose cause is in a server's log.  The tails are a note on the
    exception (PEP 678, shown by pytest), which keeps its type for ``pytest.raises``.  A
    server still running also tells every thread's stack (SIGUSR1, serve.py): where one that
    did not answer was waiting."""
    try:
        yield
    except Exception as exc:
        named = servers.items() if isinstance(servers, Mapping) else _lettered(servers)
        for name, server in named:
            exc.add_note(
                f"--- the last {lines} lines of instance {name}'s log "
                f"({server.log_path.name}, port {server.port}) ---\n"
                + "\n".join(server.log.splitlines()[-lines:])
            )
            if stacks := server.stacks():
                exc.add_note(f"--- instance {name}'s threads ---\n{stacks}")
        raise


def _lettered(servers: Sequence[ServerProcess]) -> list[tuple[str, ServerProcess]]:
    return [(chr(ord("a") + index), server) for index, server in enumerate(servers)]


def on_threads(target: Callable[..., object], calls: Iterable[tuple[object, ...]]) -> None:
    """``target(*args)`` for each ``args`` of ``calls`` at once, each on a thread of its own
    (the scanners of a test at the same time); returns when all ended (60 s each at most)."""
    threads = [threading.Thread(target=target, args=args) for args in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


# --- the dsc client commands -------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def dsc(*args: str, timeout: float = 60.0, cwd: Path | None = None) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "dsc_bindings.console.main", *args],
        capture_output=True,
        timeout=timeout,
        env=child_env(),
        cwd=str(cwd) if cwd else None,
    )
    return Run(
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def dsc_here(*args: str) -> Run:
    """``dsc ARGS`` run by the console's ``main`` in this process, its output captured: for the
    client commands where the test is about what they say and do, not about the process
    (each ``dsc()`` child costs a Python start-up, ~0.3-1 s).  Exit statuses and output are
    those of the command (argparse's own exits included)."""
    import contextlib
    import io

    from dsc_bindings.console.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Run(code, out.getvalue(), err.getvalue())


# --- a SOAP client over real sockets ---------------------------------------------------------


class Soap:
    """Both protocols against one server URL; a fresh connection per request."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        source: str | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        self.timeout = timeout
        #: The address requests come from (another loopback address is another client to
        #: the server's per-client rules); None: the system's choice.
        self.source = None if source is None else (source, 0)
        parts = url.split("/", 3)
        self.host, port = parts[2].rsplit(":", 1)
        self.port = int(port)
        self.path = "/" + parts[3]

    def connection(self) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(
                self.host,
                self.port,
                timeout=self.timeout,
                context=self.ssl_context,
                source_address=self.source,
            )
        return http.client.HTTPConnection(
            self.host, self.port, timeout=self.timeout, source_address=self.source
        )

    def post(
        self,
        body: bytes | Iterable[bytes],
        content_type: str = dc.SOAP_XML,
        length: int | None = None,
    ) -> tuple[int, str, bytes]:
        conn = self.connection()
        try:
            headers = {"Content-Type": content_type}
            if length is not None:
                headers["Content-Length"] = str(length)
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            conn.close()

    def envelope(self, action: str, payload: Any) -> bytes:
        return dc.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}", to=self.url)

    def call(self, action: str, payload: Any) -> dc.Response:
        status, ctype, body = self.post(self.envelope(action, payload))
        assert ctype.startswith("application/soap+xml"), (status, ctype, body[:300])
        return dc.parse_response(body, status)

    # - WS-DSP (scanner) -

    def create(
        self,
        instructions: Sequence[Any],
        *,
        user: str = DEFAULT_SID,
        root_name: str = "scan",
        continue_on_error: bool | None = None,
    ) -> str:
        response = self.call(
            A.DSP_CREATE,
            dc.create_post_scan_job(
                user_identifier=user,
                psp_identifier=str(uuid.uuid4()).upper(),
                instructions=instructions,
                document_root_name=root_name,
                continue_on_error=continue_on_error,
            ),
        )
        token = dc.text_of(response.payload, names.DSP, "JobToken")
        assert token, "CreatePostScanJobResponse without a JobToken"
        return token

    def image_body(
        self, token: str, document_id: int, fmt: str, chunks: Iterable[bytes]
    ) -> dc.Mtom:
        cid = f"image{document_id}-{uuid.uuid4().hex}@e2e"
        root = self.envelope(A.DSP_SEND_IMAGE, dc.send_image_request(token, document_id, fmt, cid))
        return dc.mtom(root, cid, chunks, boundary=f"e2e-{uuid.uuid4().hex}")

    def send_image(
        self,
        token: str,
        document_id: int,
        data: bytes | Iterable[bytes],
        size: int | None = None,
        fmt: str = "png",
    ) -> dc.Response:
        if isinstance(data, bytes):
            size, chunks = len(data), [data]
        else:
            assert size is not None
            chunks = data  # type: ignore[assignment]
        body = self.image_body(token, document_id, fmt, chunks)
        status, _ctype, reply = self.post(body.chunks(), body.content_type, body.length(size))
        return dc.parse_response(reply, status)

    def end(self, token: str) -> None:
        self.call(A.DSP_END, dc.token_request(names.DSP, "EndPostScanJobRequest", token))

    def dsp_cancel(self, token: str) -> None:
        self.call(A.DSP_CANCEL, dc.token_request(names.DSP, "CancelPostScanJobRequest", token))

    def dsp_job(self, token: str) -> dc.JobView:
        return dc.read_job_elements(
            self.call(
                A.DSP_GET_JOB_ELEMENTS,
                dc.job_elements_request(names.DSP, token, ["JobStatus", "JobDescription"]),
            ).payload,
            names.DSP,
        )

    def dsp_documents(self, token: str) -> list[tuple[int, str]]:
        payload = self.call(
            A.DSP_GET_JOB_ELEMENTS, dc.job_elements_request(names.DSP, token, ["Documents"])
        ).payload
        found = []
        for data in dc.all_of(
            dc.find_path(payload, names.DSP, "JobElements"), names.DSP, "ElementData"
        ):
            for d in dc.all_of(dc.find_path(data, names.DSP, "Documents"), names.DSP, "Document"):
                found.append(
                    (
                        int(dc.text_of(d, names.DSP, "DocumentDescription", "DocumentId")),
                        dc.text_of(d, names.DSP, "DocumentDescription", "Format"),
                    )
                )
        return found

    # - MS-BDSRR (management) -

    def dsc_cancel(self, token: str) -> None:
        self.call(A.DSC_CANCEL, dc.token_request(names.DSC, "CancelPostScanJobRequest", token))

    def active(self) -> list[dc.JobView]:
        return dc.read_summaries(
            self.call(A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest")).payload,
            "ActiveJobs",
        )

    def history(self) -> list[dc.JobView]:
        return dc.read_summaries(
            self.call(A.DSC_GET_JOB_HISTORY, dc.empty_request("GetJobHistoryRequest")).payload,
            "JobHistory",
        )

    def in_history(self, token: str) -> dc.JobView | None:
        return next((j for j in self.history() if j.token == token), None)

    def wait_ended(self, token: str, timeout: float = 60.0) -> dc.JobView:
        view = wait_for(lambda: self.in_history(token), timeout, f"job {token} in the history")
        assert isinstance(view, dc.JobView)
        return view

    def wait_state(self, token: str, state: str, timeout: float = 60.0) -> dc.JobView:
        def check() -> dc.JobView | None:
            view = self.dsp_job(token)
            return view if view.state == state else None

        view = wait_for(check, timeout, f"job {token} in state {state}")
        assert isinstance(view, dc.JobView)
        return view


# --- streamed content ----------------------------------------------------------------------


class Stream:
    """Deterministic pseudo-random content of ``size`` bytes, produced chunk by chunk (never
    held whole); the SHA-256 of what was produced is kept while streaming."""

    def __init__(self, size: int, seed: int = 1, chunk: int = 1024 * 1024) -> None:
        self.size = size
        self.chunk = chunk
        self.seed = seed
        self.sent = 0
        self.sha = hashlib.sha256()
        block = hashlib.shake_256(f"seed-{seed}".encode()).digest(chunk)
        self._block = block

    def __iter__(self) -> Iterator[bytes]:
        index = 0
        while self.sent < self.size:
            n = min(self.chunk, self.size - self.sent)
            # Each chunk differs (its index is stamped in), so a dropped or repeated chunk
            # changes the hash.
            data = index.to_bytes(8, "big") + self._block[8:n] if n > 8 else self._block[:n]
            self.sha.update(data)
            self.sent += n
            index += 1
            yield data

    def take(self, nbytes: int) -> Iterator[bytes]:
        """Only the first ``nbytes`` of the stream (then stop)."""
        for data in self:
            yield data
            if self.sent >= nbytes:
                return


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            sha.update(chunk)
    return sha.hexdigest()


def debris(data: Path) -> list[Path]:
    """Every ``.part`` file (an interrupted upload) anywhere under ``data``."""
    return [p for p in data.rglob("*") if p.name.endswith(".part")]


# --- a SharePoint-like HTTP server (PUT) ----------------------------------------------------


@dataclass
class Upload:
    path: str
    length: int
    authorization: str | None
    received: int = 0
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


class SharePointSite:
    """ThreadingHTTPServer on 127.0.0.1 answering PUT.  ``status`` is what it answers after the
    whole body; ``read_size``/``delay`` make it read slowly (one piece, then a pause).  Set
    ``delay`` to 0 to let it drain what the kernel buffered (several MB on loopback) at once."""

    def __init__(self, status: int = 201, read_size: int = 1 << 20, delay: float = 0.0) -> None:
        self.status = status
        self.read_size = read_size
        self.delay = delay
        self.uploads: list[Upload] = []
        self.started = threading.Event()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                upload = Upload(
                    self.path,
                    int(self.headers.get("Content-Length", "0")),
                    self.headers.get("Authorization"),
                )
                site.uploads.append(upload)
                site.started.set()
                try:
                    while upload.received < upload.length:
                        data = self.rfile.read1(
                            min(site.read_size, upload.length - upload.received)
                        )
                        if not data:
                            return  # the client went away before the end of the body
                        upload.body += data
                        upload.received += len(data)
                        if site.delay:
                            time.sleep(site.delay)
                    upload.complete = True
                    self.send_response(site.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    return
                finally:
                    upload.ended.set()
                    self.close_connection = True

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/sites/scans") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def config(self) -> str:
        """The ``[sharepoint] sites`` entry (R13) that lets ``dsc serve`` upload here."""
        return f'{{ url = "{self.url("/")}", allow_http = true }}'

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- an SMTP relay ---------------------------------------------------------------------------


class Relay:
    """aiosmtpd handler: keeps every message; refuses RCPT for addresses starting 'reject'."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower().startswith("reject"):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (
                envelope.mail_from,
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or envelope.content),
            )
        )
        return "250 Message accepted for delivery"

    def attachments(self, index: int = -1) -> list[tuple[str, bytes]]:
        message = email.message_from_bytes(self.messages[index][2], policy=email.policy.default)
        return [
            (part.get_filename() or "", part.get_content()) for part in message.iter_attachments()
        ]


class HeldRelay(Relay):
    """An SMTP relay that keeps each message's DATA unanswered until :attr:`release` is set:
    the mail filter of a job waits there, so its instance holds the job's lease."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived.set()
        while not self.release.is_set():
            await asyncio.sleep(0.05)
        answer: str = await super().handle_DATA(server, session, envelope)
        return answer
