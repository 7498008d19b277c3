"""The lease-lapse document race (issue 18 point 2), end to end: two real ``dsc serve`` instances
on one PostgreSQL + S3 store and a real SMTP relay that holds each message until told.

Instance a runs a job's mail filter and is frozen (SIGSTOP) past its lease; b rescues the job
and runs the filter again (held at the relay).  a is thawed while its heartbeat cannot run (the
test holds a's ``instances`` row), so a still believes it holds the lease when its own run
ends: its job-end write (Completed, and the discard of the documents with it) is refused by
the lease fence.  The documents b's run works on must survive that, and the job ends once, by
b (the writer's rule: tests/bindings/test_writer.py::
test_a_job_changed_elsewhere_keeps_its_documents).  Short leases keep it to seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from aiosmtpd.controller import Controller

from dsc_core.model import EmailInstructions
from e2e_support import Relay, ServerProcess, Soap, free_port, started_servers
from engines_support import EnginesBackend
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(20_000)


class OneByOneRelay(Relay):
    """An SMTP relay that keeps the n-th message's DATA unanswered until ``releases[n]`` is
    set: each instance's run of the mail filter waits there on its own."""

    def __init__(self, messages: int) -> None:
        super().__init__()
        self.arrived = [threading.Event() for _ in range(messages)]
        self.releases = [threading.Event() for _ in range(messages)]
        self._count = 0
        #: Called with n as the n-th message's DATA arrives, before it is held.
        self.on_arrival: Callable[[int], None] = lambda n: None
        #: Set by the fixture once it listens.
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        n = self._count
        self._count += 1
        self.on_arrival(n)
        self.arrived[n].set()
        while not self.releases[n].is_set():
            await asyncio.sleep(0.02)
        answer: str = await super().handle_DATA(server, session, envelope)
        return answer


@pytest.fixture
def relay() -> Iterator[OneByOneRelay]:
    relay = OneByOneRelay(messages=2)
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    relay.port = smtp.port
    try:
        yield relay
    finally:
        for release in relay.releases:
            release.set()
        smtp.stop()


def test_a_lapsed_instance_s_refused_job_end_leaves_the_rescuer_its_documents(
    tmp_path: Path, pg: PgCluster, s3: S3Server, relay: OneByOneRelay
) -> None:
    backend = EnginesBackend(pg, s3, tmp_path)
    config = tmp_path / "dsc.toml"
    config.write_text(
        "[cluster]\nheartbeat_seconds = 0.3\nlease_seconds = 3\n\n"
        f'[smtp]\nhost = "127.0.0.1"\nport = {relay.port}\nfrom = "scans@corp.example"\n'
        + backend.sections()
    )
    with started_servers() as keep:
        a = keep(ServerProcess(tmp_path / "a", config=config))
        b = keep(ServerProcess(tmp_path / "b", config=config))

        def freeze_a(n: int) -> None:
            # At once as a's run reaches the relay: a lease that lapsed by itself (a heartbeat
            # late on a loaded machine) would tell a before the freeze that it was lost.
            if n == 0:
                os.kill(a.pid, signal.SIGSTOP)

        relay.on_arrival = freeze_a
        try:
            client = Soap(a.url)
            token = client.create([EmailInstructions(False, ("bob@corp.example",))])
            client.send_image(token, 1, PNG)
            client.end(token)
            assert relay.arrived[0].wait(20), "a's mail filter never reached the relay"
            assert f"job {token} claimed" in a.log, a.log  # and a is frozen now
            wait_for(lambda: f"job {token} rescued from instance" in b.log, 30, "b's rescue")
            assert relay.arrived[1].wait(20), "b's run of the mail filter never reached the relay"

            with psycopg.connect(backend.dsn) as held:
                # a's heartbeat, the one thing that would tell it the lease is gone, waits on
                # its instances row until this transaction ends.
                rows = held.execute(
                    "SELECT id FROM instances WHERE pid = %s AND stopped IS NULL FOR UPDATE",
                    (a.pid,),
                ).fetchall()
                assert len(rows) == 1, rows
                relay.releases[0].set()  # a's message is accepted: its run ends once thawed
                os.kill(a.pid, signal.SIGCONT)
                refused = f"job {token}: a write of its filters was refused"
                try:
                    wait_for(lambda: refused in a.log, 20, "a's job-end write to be refused")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\na:\n{a.log}\nb:\n{b.log}") from None
                # The refused write's batch carried the discard (every filter succeeded here),
                # and it left the documents b's run works on.
                kept = f"job {token}: its documents are kept for the instance that changed it"

                def documents() -> bool:
                    return backend.has_documents(tmp_path / "b", token)

                wait_for(lambda: kept in a.log or not documents(), 10, "a's writer's batch")
                assert documents(), "a's refused job end discarded the documents"
                assert kept in a.log
            assert Soap(b.url).dsp_job(token).state == "Processing"

            relay.releases[1].set()
            ended = Soap(b.url).wait_ended(token, 30)
            assert ended.state == "Completed", ended
            assert [f.state for f in ended.filters] == ["CompletedSuccessfully"], ended
            # The job ended once: both instances agree on how, and b's record stands; its end
            # discards the documents (every filter succeeded).
            for server in (a, b):
                view = wait_for(lambda s=server: Soap(s.url).in_history(token), 10, "history")
                assert view.state == "Completed" and view.completed == ended.completed, view
            wait_for(lambda: not documents(), 10, "b's discard of the documents")
        finally:
            if a.alive:
                os.kill(a.pid, signal.SIGCONT)  # a frozen one must hear SIGTERM
