"""Support for the ``dsc`` client tests: a real TCP relay in front of a real ``dsc serve`` that
stops reading an upload after its first megabyte, so that a ``dsc scan`` child is provably in the
middle of an upload (blocked in send) when the test interrupts it."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: A connection that has relayed this many bytes towards the server is held (not read further).
STALL_AFTER = 1024 * 1024


class StallingRelay:
    """Relays every connection to ``port`` on 127.0.0.1; a request body beyond
    :data:`STALL_AFTER` bytes is no longer read, and :attr:`stalled` is set."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.stalled = threading.Event()
        self._release = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/ScanServer") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        relayed = 0
        try:
            while data := source.recv(64 * 1024):
                sink.sendall(data)
                relayed += len(data)
                if upstream and relayed > STALL_AFTER:
                    self.stalled.set()
                    self._release.wait()
                    return
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._release.set()
        for s in self._sockets:
            # shutdown first: close() alone does not end a connection that another thread is
            # blocked in recv() on, and the server would then wait out its stop grace (10 s)
            # for that half-sent request when the test's server stops.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextmanager
def stalling_relay(port: int) -> Iterator[StallingRelay]:
    relay = StallingRelay(port)
    try:
        yield relay
    finally:
        relay.close()


def on_terminal(
    args: list[str], answer: str | None, env: dict[str, str], timeout: float = 30.0
) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as its standard input, output and error; when it asks
    (a line ending in ``[y/N] ``) type ``answer``.  Returns the exit status and all it wrote."""
    master, slave = os.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    output = b""
    answered = answer is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
            if not answered and output.rstrip(b" ").endswith(b"[y/N]"):
                os.write(master, answer.encode() + b"\n")  # type: ignore[union-attr]
                answered = True
        else:
            raise AssertionError(f"{args} did not finish on its terminal: {output!r}")
        return proc.wait(timeout), output.decode("utf-8", "replace").replace("\r\n", "\n")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
