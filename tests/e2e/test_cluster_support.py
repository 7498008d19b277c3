"""The HAProxy helpers of tests/cluster_support.py wait for HAProxy as it starts: its stats
socket's file exists before the socket accepts (``stats_while_starting``)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from cluster_support import HAPROXY, stats_while_starting
from e2e_support import free_port
from waiting import wait_for


def test_a_stats_socket_not_listening_yet_is_haproxy_starting(tmp_path: Path) -> None:
    """The file, bound but not listening (HAProxy between its rename() and its listen()):
    "starting" (None), not a refused connection raised out of the wait."""
    path = tmp_path / "haproxy.sock"
    assert stats_while_starting(path) is None  # no file yet
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))
        assert path.exists()
        assert stats_while_starting(path) is None


def test_the_stats_of_a_real_haproxy_once_it_listens(tmp_path: Path) -> None:
    """A real HAProxy: the wait ends with its ``show stat`` table."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip(f"no HAProxy at {HAPROXY}; .ci/run installs Debian's haproxy")
    path = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    stats socket {path} mode 600 level admin\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10s\n"
        "    timeout server 10s\n"
        f"frontend dsc\n    bind 127.0.0.1:{free_port()}\n    default_backend dsc_instances\n"
        "backend dsc_instances\n    server dsc-a 127.0.0.1:9\n"
    )
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        stats = wait_for(lambda: stats_while_starting(path), 20, "HAProxy's stats socket")
        assert stats.startswith("# pxname,svname,"), stats
        assert "\ndsc_instances,dsc-a," in stats, stats
    finally:
        process.terminate()
        process.wait(10)
