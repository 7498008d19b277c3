"""The throwaway PostgreSQL and SeaweedFS of tests/engines_support.py under load: their ports are
chosen when they start, not before (initdb takes seconds), and chosen again if another server binds
one meanwhile."""

from __future__ import annotations

import socket

import psycopg
import pytest

import engines_support
from engines_support import PgCluster, S3Server, free_port, weed_binary


def test_a_port_taken_meanwhile_is_chosen_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another server holds the first port chosen (what another test's server may do while
    initdb runs): PostgreSQL starts on the next one, answers there, and keeps it on restart."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        chosen: list[int] = []

        def taken_first(port: int = taken.getsockname()[1]) -> int:
            chosen.append(free_port() if chosen else port)
            return chosen[-1]

        monkeypatch.setattr(engines_support, "free_port", taken_first)
        cluster = PgCluster()
        try:
            cluster.init()
            cluster.start()
            assert cluster.port == chosen[1] and len(chosen) == 2, chosen
            assert "Address already in use" in (cluster.folder / "log").read_text()
            with psycopg.connect(cluster.dsn()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            cluster.restart()
            assert cluster.port == chosen[1] and len(chosen) == 2, chosen
        finally:
            cluster.close()


@pytest.mark.skipif(weed_binary() is None, reason="no SeaweedFS `weed`; .ci/run installs it")
def test_a_seaweedfs_port_taken_meanwhile_means_another_try(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another server holds the filer's port (weed binds its seven one after another, and a
    loaded run saw the filer's taken by then: weed exits, "address already in use"): the start
    tries again with other ports, its S3 port too (a first start: nothing names it yet), and S3
    answers there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        chosen: list[int] = []

        def filer_taken(port: int = taken.getsockname()[1]) -> int:
            # The S3 port, then master, master gRPC, volume, volume gRPC, filer: the sixth.
            chosen.append(port if len(chosen) == 5 else free_port())
            return chosen[-1]

        monkeypatch.setattr(engines_support, "free_port", filer_taken)
        server = S3Server()
        try:
            server.start()
            assert len(chosen) == 2 * 8 and server.port == chosen[8], chosen
            assert "address already in use" in (server.folder / "log").read_text()
            server.client().list_buckets()
        finally:
            server.close()
