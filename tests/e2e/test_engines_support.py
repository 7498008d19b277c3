"""The throwaway PostgreSQL of tests/engines_support.py under load: its port is chosen when it
starts, not before initdb (seconds), and chosen again if another server binds it meanwhile."""

from __future__ import annotations

import socket

import psycopg
import pytest

import engines_support
from engines_support import PgCluster, free_port


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
