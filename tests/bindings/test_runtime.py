"""The runtime (issue 7 point 1), over real sockets with both bindings: no lock is held across
I/O, so a request stuck on the job store never delays a request that does not need it, while
the stuck request still gets its reply only after its commands are durable (R4 step 9).

Orderings are asserted, never times: "answered while the other is still stuck" is checked by
the stuck request's store call still being blocked when the free request's reply arrives.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
from pathlib import Path

import pytest

from dsc_core import CreateJob, Limits, ServerConfig, UpdateJob, names
from dsc_core import client as C
from test_http_bindings import (
    Raw,
    call,
    create_job,
    job_state,
    repository_request,
    running,
)

A = names.Action


@pytest.fixture(params=["async", "blocking"])
def binding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_stuck_store_does_not_delay_a_read(
    binding: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(binding, tmp_path) as srv:
        store = srv.service._store
        assert store is not None
        real_apply = store.apply
        entered = threading.Event()
        release = threading.Event()

        def apply(command: object) -> None:
            if isinstance(command, CreateJob):
                entered.set()
                assert release.wait(30), "the test never released the store"
            real_apply(command)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "apply", apply)
        stuck = Raw(srv.port)
        replies: list[str] = []
        creator = threading.Thread(target=lambda: replies.append(create_job(stuck)))
        creator.start()
        try:
            assert entered.wait(10), "CreateJob never reached the store"
            free = Raw(srv.port)
            for _ in range(3):  # keep-alive: several in a row while the store is stuck
                reply = free.post(repository_request())
                assert reply.status == 200
                assert b"GetRepositoryElementsResponse" in reply.body
            assert not release.is_set() and not replies  # the create is still waiting
            free.close()
        finally:
            release.set()
            creator.join(10)
        # Only now, with its record durable, was the create answered.
        assert len(replies) == 1
        assert job_state(stuck, replies[0]) == "Creating"
        stuck.close()


def test_locked_sqlite_does_not_delay_a_read(binding: str, tmp_path: Path) -> None:
    """A real lock: another process's exclusive SQLite transaction (the store waits up to its
    busy timeout).  A read is answered meanwhile; the create succeeds once the lock goes."""
    with running(binding, tmp_path) as srv:
        other = sqlite3.connect(srv.data_dir / "jobs.sqlite3", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        stuck = Raw(srv.port)
        replies: list[str] = []
        creator = threading.Thread(target=lambda: replies.append(create_job(stuck)))
        try:
            creator.start()
            free = Raw(srv.port)
            assert free.post(repository_request()).status == 200
            free.close()
            assert not replies  # the create waits for the lock
        finally:
            other.execute("ROLLBACK")
            other.close()
            creator.join(10)
        assert len(replies) == 1 and job_state(stuck, replies[0]) == "Creating"
        stuck.close()


def test_records_reach_the_store_in_core_order(
    binding: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several jobs' records, written from a slow store: each job's last record in the store
    is the core's last word (a later UpdateJob is never overwritten by an earlier one)."""
    with running(binding, tmp_path) as srv:
        store = srv.service._store
        assert store is not None
        real_apply = store.apply
        seen: list[tuple[str, str]] = []

        def apply(command: object) -> None:
            if isinstance(command, (CreateJob, UpdateJob)):
                seen.append((command.job.token, command.job.state.value))
            real_apply(command)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "apply", apply)
        clients = [Raw(srv.port) for _ in range(4)]
        tokens = [create_job(c) for c in clients]
        results: list[str] = []

        def cancel(client: Raw, token: str) -> None:
            request = C.token_request(names.DSC, "CancelPostScanJobRequest", token)
            results.append(call(client, A.DSC_CANCEL, request).action)  # a fault raises

        threads = [
            threading.Thread(target=cancel, args=(c, t))
            for c, t in zip(clients, tokens, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results == [A.DSC_CANCEL + "Response"] * 4
        stored = {job.token: job.state.value for job in store.load_jobs()}
        for token in tokens:
            final = job_state(clients[0], token)
            assert final in ("Canceled", "Aborted")
            states = [state for t, state in seen if t == token]
            assert states[0] == "Creating" and states[-1] == final, states
            assert stored[token] == final
        for c in clients:
            c.close()


# --- admission: reclaiming idle keep-alive connections, the per-address share ---------------


def _raw_from(port: int, source: str) -> Raw:
    """A Raw client whose connection comes from ``source`` (any 127.x address is local)."""
    client = Raw.__new__(Raw)
    client.sock = socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0)
    )
    client.buffer = b""
    return client


def _limits(**changes: object) -> ServerConfig:
    return ServerConfig(limits=Limits(**changes))  # type: ignore[arg-type]


def _idle(client: Raw) -> Raw:
    """Make ``client`` an idle keep-alive connection (one request answered)."""
    assert client.post(repository_request()).status == 200
    return client


def test_the_longest_idle_connection_is_reclaimed_at_the_limit(
    binding: str, tmp_path: Path
) -> None:
    with running(binding, tmp_path, _limits(max_connections=3, max_connection_share=1)) as srv:
        oldest = _idle(Raw(srv.port))
        middle = _idle(Raw(srv.port))
        newest = _idle(Raw(srv.port))
        assert _idle(middle) is middle and _idle(newest) is newest  # oldest idles longest
        fresh = Raw(srv.port)
        assert fresh.post(repository_request()).status == 200  # admitted, not 503
        assert oldest.closed_by_server(30)  # the longest-idle one made room
        for client in (middle, newest, fresh):
            assert client.post(repository_request()).status == 200
            client.close()
        oldest.close()


def test_one_address_holds_at_most_its_share(binding: str, tmp_path: Path) -> None:
    config = _limits(max_connections=4, max_connection_share=0.5)  # 2 per address
    with running(binding, tmp_path, config) as srv:
        first = _idle(_raw_from(srv.port, "127.0.0.1"))
        second = _idle(_raw_from(srv.port, "127.0.0.1"))
        other = _idle(_raw_from(srv.port, "127.0.0.2"))
        # A third from the same address: its own longest-idle connection goes, not another's.
        third = _raw_from(srv.port, "127.0.0.1")
        assert third.post(repository_request()).status == 200
        assert first.closed_by_server(30)
        assert other.post(repository_request()).status == 200
        # At its share with nothing idle to reclaim, the address is refused; others are not.
        body = repository_request()
        for client in (second, third):
            client.expect_continue(len(body))
            assert client.read_response().status == 100  # busy now
        refused = _raw_from(srv.port, "127.0.0.1")
        reply = refused.post(repository_request())
        assert reply.status == 503
        refused.close()
        admitted = _raw_from(srv.port, "127.0.0.3")
        assert admitted.post(repository_request()).status == 200
        for client in (second, third):
            client.send(body)
            assert client.read_response().status == 200
        for client in (first, second, third, other, admitted):
            client.close()
