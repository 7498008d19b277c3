"""The test harness's ``ServerProcess`` (tests/e2e_support.py) itself: it knows a real ``dsc
serve`` is ready whatever that server's log level hides.

``dsc serve`` logs its start-up block at INFO, and a TLS server's last line of it (``security:
HTTPS ...``) too: under ``--log-level WARNING`` none of it is written, so a readiness that
waited for that line waited its whole timeout and failed.  The server is ready when it answers.

A failure inside ``telling`` shows what each running server's threads were doing (SIGUSR1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_support import READY, ServerProcess, Soap, telling
from test_e2e_serve import Pki


@pytest.mark.parametrize(
    ("binding", "client_certificates"),
    [("async", False), ("blocking", False), ("async", True)],
    ids=["async", "blocking", "async-client-certificates"],
)
def test_a_tls_server_logging_only_warnings_is_ready_and_answers(
    tmp_path: Path, binding: str, client_certificates: bool
) -> None:
    """With client certificates required the harness's own request (it has none) is refused
    in the handshake: that refusal is the server answering too."""
    pki = Pki(tmp_path / "pki")
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "dsc.toml"
    config.write_text('[users]\nscan_admins = ["admin"]\n')
    server = ServerProcess(
        data,
        binding=binding,
        config=config,
        tls=(pki.server_cert, pki.server_key),
        client_ca=pki.ca_pem if client_certificates else None,
        extra=["--log-level", "WARNING"],
    )
    try:
        server.start()
        client = Soap(server.url, pki.context("admin" if client_certificates else None))
        assert client.active() == []
        # What made the old readiness wait in vain: the line is not in this log at all.
        assert READY not in server.log, server.log
        # stop_cleanly reads INFO lines this log does not have: the exit status says it here.
        assert server.stop() == 0, server.log
        assert "Traceback" not in server.log, server.log
    finally:
        if server.alive:
            server.kill9()


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_a_failure_tells_what_each_thread_of_a_running_server_waits_for(
    tmp_path: Path, binding: str
) -> None:
    """A client's socket timeout, say, whose cause is a server waiting somewhere: the
    failure carries every thread's stack, and the server goes on serving."""
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data, binding=binding).start()
    try:
        with pytest.raises(TimeoutError) as info, telling([server]):
            raise TimeoutError("timed out")
        notes = "\n".join(info.value.__notes__)
        assert "--- instance a's threads ---" in notes, notes
        assert "(most recent call first)" in notes and "dsc_bindings/serve.py" in notes, notes
        assert Soap(server.url).active() == []
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()
