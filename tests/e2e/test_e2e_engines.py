"""A real ``dsc serve --config`` whose [store] is PostgreSQL and whose [spool] is S3 (issue 17):
a scan through the CLI is delivered, its record is a PostgreSQL row, its images S3 objects
(one larger than a part, so a true multipart upload), kill -9 loses nothing acknowledged, and
the restarted server takes back every job of the killed one at once (R13, as on SQLite)."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from aiosmtpd.controller import Controller

from dsc_core.model import EmailInstructions, FileShareInstructions
from e2e_support import HeldRelay, Soap, dsc, free_port
from engines_support import SMALLEST_PART, Backend, shared_engine_config
from test_e2e_serve import (
    LOCAL_SHARE,
    UUID_RE,
    StartServer,
    files_under,
    start_server,
    user_folder,
    write,
)
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server

__all__ = ["start_server"]  # the fixture, used by name below


@pytest.fixture
def backend() -> Backend:
    """These tests write their own [store] and [spool]: the server adds none."""
    return Backend()


def engines_config(tmp_path: Path, pg: PgCluster, s3: S3Server) -> tuple[Path, str, str]:
    dsn, bucket = pg.new_database(), s3.new_bucket()
    config = tmp_path / "dsc.toml"
    config.write_text(shared_engine_config(dsn, s3, bucket, tmp_path, part_size=SMALLEST_PART))
    return config, dsn, bucket


def test_scan_on_postgresql_and_s3_survives_kill_9(
    start_server: StartServer, tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    config, dsn, bucket = engines_config(tmp_path, pg, s3)
    server = start_server(config=config)
    assert re.search(r"job store: PostgreSQL .* \+ S3 ", server.log), server.log
    big = write(tmp_path / "in" / "a.png", os.urandom(12 << 20))  # three parts of 5 MiB
    small = write(tmp_path / "in" / "b.pdf", os.urandom(70_000))

    scan = dsc("scan", "--server", server.url, str(big), str(small))
    assert scan.code == 0, scan
    created = re.search(rf"job ({UUID_RE}) created", scan.err)
    assert created, scan.err
    token = created.group(1)
    assert re.search(r"State\s+Completed", scan.out), scan.out
    folder = user_folder(server.data)
    assert files_under(folder) == {"a_0001.png", "a_0002.pdf"}
    assert (folder / "a_0001.png").read_bytes() == big.read_bytes()

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT token, state FROM jobs").fetchall()
    assert rows == [(token, "Completed")]
    # The filter read the image back from S3 (above, byte for byte); the spool retention then
    # discarded the objects, and no multipart upload was left behind.
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"spool/{token}/")
    assert listed.get("Contents", []) == []
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    server.kill9()
    again = start_server(config=config, data=server.data)
    history = dsc("history", "--server", again.url, "--json")
    assert history.code == 0, history
    assert [(e["token"], e["state"], e["images_received"]) for e in history.json()] == [
        (token, "Completed", 2)
    ]


def test_unknown_store_kind_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "dsc.toml"
    config.write_text('[store]\nkind = "mysql"\n')
    run = dsc("serve", "--config", str(config), "--data", str(tmp_path / "data"))
    assert run.code != 0
    assert '[store] kind must be "sqlite" or "postgresql", got' in run.err, run
    assert "Traceback" not in run.err


def test_metrics_and_healthz_cover_the_engines(
    start_server: StartServer, tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    """Issue 17 point 7: the pool (in use, idle, waiting) and the S3 errors in /metrics; the
    database and the bucket reachable in /healthz's store check."""
    config, _, _ = engines_config(tmp_path, pg, s3)
    server = start_server(config=config)
    page = write(tmp_path / "in" / "a.png", os.urandom(20_000))
    assert dsc("scan", "--server", server.url, "--quiet", str(page)).code == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as answer:
        assert answer.status == 200 and answer.read().decode().strip() == "ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    figures = dict(re.findall(r"^(dsc_(?:store_pool|s3)_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    assert set(figures) == {
        'dsc_store_pool_connections{state="in_use"}',
        'dsc_store_pool_connections{state="idle"}',
        "dsc_store_pool_waiting",
        "dsc_s3_errors_total",
    }, text
    assert float(figures['dsc_store_pool_connections{state="idle"}']) >= 1
    assert float(figures["dsc_store_pool_waiting"]) == 0
    assert float(figures["dsc_s3_errors_total"]) == 0
    assert 'dsc_health_check_ok{check="store"} 1.0' in text


#: The lease rows of jobs: token -> (owner, epoch, whether the lease runs now).
_LEASES = """
    SELECT token, lease_owner, lease_epoch, COALESCE(lease_until > now(), false) FROM jobs
"""


def test_a_restarted_server_takes_back_its_running_jobs_at_once(
    start_server: StartServer, tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    """kill -9 of the only instance while its engine runs two jobs (its two places; the mail
    relay holds their messages) and three more wait: the run leased only the two it runs (the
    three wait unleased, for any instance's free place: runtime/leasing.py).  The restarted run
    takes back the two at once, each with a new epoch, while its engine is still full, instead
    of after the lease (600 s here); the three still wait for a place, held by nobody; then
    each job's file is placed once (mail may be sent again after a kill, as plain SMTP
    delivery may repeat, so it is not counted).  Counted by the jobs' rows, not by time."""
    config, dsn, _ = engines_config(tmp_path, pg, s3)
    relay = HeldRelay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with config.open("a") as f:
            f.write(
                "\n[cluster]\nheartbeat_seconds = 0.3\nlease_seconds = 600\n"
                f'\n[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "scans@corp.example"\n'
            )
        server = start_server(config=config)
        client = Soap(server.url)
        tokens = []
        for n in range(5):
            token = client.create(
                [
                    FileShareInstructions((LOCAL_SHARE,)),
                    EmailInstructions(False, ("a@corp.example",)),
                ],
                root_name=f"job{n}",
            )
            client.send_image(token, 1, os.urandom(20_000))
            client.end(token)
            tokens.append(token)

        def states() -> list[str]:
            return sorted(view.state for view in client.active())

        wait_for(lambda: states() == ["Pending"] * 3 + ["Processing"] * 2, 30, "2 jobs running")
        with psycopg.connect(dsn) as conn:
            before = {str(t): (o, int(e), live) for t, o, e, live in conn.execute(_LEASES)}
        running = sorted(t for t in tokens if before[t][2])
        assert len(running) == 2, before  # leased: only what the engine runs
        assert len({before[t][0] for t in running}) == 1, before

        server.kill9()
        server.start()
        client = Soap(server.url)  # a new port
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT id::text FROM instances WHERE pid = %s AND stopped IS NULL", (server.pid,)
            ).fetchone()
        assert row is not None
        again = row[0]

        def taken_back() -> bool:
            with psycopg.connect(dsn) as conn:
                now = {str(t): (o, int(e), live) for t, o, e, live in conn.execute(_LEASES)}
            return all(now[t] == (again, before[t][1] + 1, True) for t in running) and not any(
                now[t][2] for t in tokens if t not in running
            )

        # The relay still holds every message: the engine's two places stay taken.
        wait_for(taken_back, 30, "the restarted run to hold its two running jobs, a new epoch")
        assert sum(f"job {t} taken back" in server.log for t in tokens) == 2, server.log

        relay.release.set()
        for token in tokens:
            ended = client.wait_ended(token, 30)
            assert ended.state == "Completed", ended
            assert [f.state for f in ended.filters] == ["CompletedSuccessfully"] * 2, ended
        # The file share ran once per job (R13: a finished filter is not run again).
        assert files_under(user_folder(server.data)) == {f"job{n}_0001.png" for n in range(5)}
    finally:
        relay.release.set()
        smtp.stop()
