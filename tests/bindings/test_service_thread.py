"""The blocking binding's service thread: calls run there, one at a time; a Wait chain is
waited for in the caller and resumed there; after stop() calls run in their caller."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dsc_bindings.http.service_thread import ServiceThread
from dsc_bindings.http.site import Site
from dsc_bindings.runtime.ticket import Ticket, Wait


def test_calls_run_in_the_service_thread_and_errors_reach_the_caller() -> None:
    calls = ServiceThread(name="svc-test")
    calls.start()
    try:
        assert calls.run(lambda: threading.current_thread().name) == "svc-test"

        def fail() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            calls.run(fail)
        assert calls.run(lambda: 42) == 42  # still serving after a failure
    finally:
        calls.stop()


def test_calls_from_many_threads_never_overlap() -> None:
    calls = ServiceThread()
    calls.start()
    inside = 0
    most = 0
    lock = threading.Lock()

    def call() -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.001)  # gives other threads every chance to overlap
        with lock:
            inside -= 1

    def client() -> None:
        for _ in range(20):
            calls.run(call)

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        calls.stop()
    assert most == 1


def test_settle_waits_in_the_caller_and_resumes_in_the_service_thread() -> None:
    calls = ServiceThread(name="svc-test")
    calls.start()
    ticket = Ticket()
    seen: list[str] = []

    def resume() -> str:
        seen.append(threading.current_thread().name)
        return "reply"

    try:
        threading.Timer(0.05, lambda: ticket._complete(None)).start()
        assert calls.settle(lambda: Wait(ticket, resume)) == "reply"
        assert seen == ["svc-test"]
    finally:
        calls.stop()


def test_after_stop_calls_run_in_the_caller() -> None:
    calls = ServiceThread()
    calls.start()
    calls.stop()
    assert calls.run(lambda: threading.current_thread()) is threading.current_thread()


def test_the_blocking_binding_keeps_its_python_threads_on_one_cpu(tmp_path: Any) -> None:
    """GIL hand-overs across CPUs were the blocking binding's main cost (http_blocking
    _choose_cpu): its service thread and connection threads share one CPU."""
    import os

    from dsc_bindings.http.blocking_server import BlockingServer, _choose_cpu

    allowed = os.sched_getaffinity(0)
    assert _choose_cpu(None) is None
    assert _choose_cpu("auto") == (max(allowed) if len(allowed) > 1 else None)
    assert _choose_cpu(max(allowed) + 1000) is None  # not ours: unpinned, with a warning

    from dsc_core import Reply

    in_connection: list[set[int]] = []

    class Pages:
        headers = ()

        def answer_get(self, target: str, identity: str | None) -> Reply:
            # Called by the HTTP driver in the connection's own thread.
            in_connection.append(os.sched_getaffinity(0))
            return Reply(200, "text/plain", b"ok")

    server = BlockingServer(Site(None, Pages()), "127.0.0.1", 0, cpu="auto")
    port = server.start()
    expected = {server.cpu} if server.cpu is not None else allowed
    try:
        assert server._calls.run(lambda: os.sched_getaffinity(0)) == expected
        import http.client

        client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        client.request("GET", "/healthz")
        assert client.getresponse().read() == b"ok"
        client.close()
        assert in_connection == [expected]
    finally:
        server.shutdown(0.5)
