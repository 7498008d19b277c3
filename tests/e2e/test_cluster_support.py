"""The helpers of tests/cluster_support.py under load: HAProxy's stats socket file exists before
the socket accepts (``stats_while_starting``), and a port chosen free may be taken by another
test's server before HAProxy or an instance binds it (chosen at start, another one then)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import cluster_support
from cluster_support import HAPROXY, haproxy_cluster, stats_while_starting
from e2e_support import free_port
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server


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


def test_ports_taken_meanwhile_are_chosen_again(
    tmp_path: Path, pg: PgCluster, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another server binds the port chosen for the instance's monitor, and then the one
    chosen for HAProxy (what another test's server may do while instances start): each is
    chosen again, the cluster answers through HAProxy, and the ports are kept for restarts."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip(f"no HAProxy at {HAPROXY}; .ci/run installs Debian's haproxy")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        chosen: list[int] = []

        def taken_first(port: int = taken.getsockname()[1]) -> int:
            # The 1st choice (the monitor's) and the 3rd (HAProxy's, after the monitor's
            # second) are the port another server holds.
            chosen.append(port if len(chosen) in (0, 2) else free_port())
            return chosen[-1]

        monkeypatch.setattr(cluster_support, "free_port", taken_first)
        with haproxy_cluster(tmp_path, pg, s3, count=1) as cluster:
            (instance,) = cluster.instances
            assert len(chosen) == 4, chosen  # HAProxy's socket answered: no more tries
            assert instance.monitor_port == chosen[1] and cluster.port == chosen[3], chosen
            log = instance.log_path.read_text()
            assert "cannot listen" in log, "the first try did not meet the port taken:\n" + log
            assert cluster_support.RetryingSoap(cluster.url).active() == []
            # A restart keeps both (HAProxy's configuration names them): what a try of
            # start() would choose is the ports of the first start.
            ports = (instance.port, instance.monitor_port)
            instance.before_each_start()
            assert (instance.fixed_port, instance.monitor_port) == ports
