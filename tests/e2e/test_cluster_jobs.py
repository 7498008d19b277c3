"""Three real ``dsc serve`` instances on one PostgreSQL + S3 store answer for every job (issue 18
point 1): each instance has its own data folder and the same [store] and [spool]; a scanner
whose requests land on different instances gets the answers one server would give.

The instances share one configuration: a short R6 timeout (the idle-timeout test), a quota of
three Creating jobs per client (the quota test) and ten job slots, two kept for new clients
(the job slot tests), so every test ends the jobs it creates."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest

from cluster_support import upload_rows
from dsc_core import client as dc
from dsc_core.model import FileShareInstructions
from e2e_support import DEFAULT_SID, ServerProcess, Soap, on_threads, started_servers
from engines_support import SMALLEST_PART, shared_engine_config
from test_e2e_serve import LOCAL_SHARE, files_under, user_folder
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server

#: The R6 timeout of the instances: short, so the idle-timeout test waits past it quickly.
TIMEOUT_SECONDS = 3
#: [limits] max_creating_jobs_per_user of the instances (the quota test fills it).
PER_USER = 3
#: [limits] max_active_jobs and new_client_share of the instances: two of the ten job slots
#: are kept for clients with no job in Creating (dsc_core.config.reserved_slots).
SLOTS, KEPT = 10, 2


class Cluster:
    def __init__(self, servers: list[ServerProcess], dsn: str) -> None:
        self.servers = servers
        self.dsn = dsn
        self.clients = [Soap(s.url) for s in servers]

    def uploads(self, token: str, document_id: int) -> int:
        return upload_rows(self.dsn, token, document_id)

    def delivered(self) -> dict[str, list[str]]:
        """File name -> the instances' data folders it was delivered to (the file share of
        ``\\\\localhost\\scans`` is each instance's own folder)."""
        found: dict[str, list[str]] = {}
        for server in self.servers:
            folder = user_folder(server.data)
            if folder.is_dir():
                for name in files_under(folder):
                    found.setdefault(name, []).append(server.data.name)
        return found


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pg: PgCluster, s3: S3Server
) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    dsn, bucket = pg.new_database(), s3.new_bucket()
    config = folder / "dsc.toml"
    config.write_text(
        f"[jobs]\ntimeout_seconds = {TIMEOUT_SECONDS}\n\n"
        f"[limits]\nmax_creating_jobs_per_user = {PER_USER}\nmax_active_jobs = {SLOTS}\n"
        f"new_client_share = {KEPT / SLOTS}\n\n"
        # Beats (and the outbox's poll, at most one beat) short: each instance stops within
        # one, not the default's 2 s; the leases keep their default length.
        "[cluster]\nheartbeat_seconds = 0.5\n\n"
        + shared_engine_config(dsn, s3, bucket, folder, part_size=SMALLEST_PART)
    )
    with started_servers() as keep:
        servers = [
            keep(ServerProcess(folder / f"instance{n}", binding=binding, config=config))
            for n, binding in enumerate(("async", "blocking", "async"), start=1)
        ]
        yield Cluster(servers, dsn)


class HeldUpload:
    """A SendImage whose last bytes are held back: the instance has begun the document (its
    ``uploads`` row exists) and finishes it only after :meth:`release`.  The image is larger
    than [limits] max_envelope_bytes: a binding hands a smaller body to the core only whole."""

    def __init__(self, cluster: Cluster, client: Soap, token: str, document_id: int) -> None:
        body = client.image_body(token, document_id, "png", [os.urandom(200_000)])
        payload = b"".join(body.chunks())
        self.conn = client.connection()
        self.conn.putrequest("POST", client.path)
        self.conn.putheader("Content-Type", body.content_type)
        self.conn.putheader("Content-Length", str(len(payload)))
        self.conn.endheaders()
        held = len(body.tail) + 1000  # some image bytes too
        self.conn.send(payload[:-held])
        self.rest = payload[-held:]
        wait_for(
            lambda: cluster.uploads(token, document_id) == 1,
            10,
            f"the uploads row of document {document_id}",
        )

    def release(self) -> dc.Response:
        try:
            self.conn.send(self.rest)
            answer = self.conn.getresponse()
            return dc.parse_response(answer.read(), answer.status)
        finally:
            self.conn.close()


def fault_of(call: object) -> dc.ClientFault:
    with pytest.raises(dc.ClientFault) as caught:
        assert callable(call)
        call()
    return caught.value


SHARE = [FileShareInstructions((LOCAL_SHARE,))]


def test_a_scan_across_three_instances_completes(cluster: Cluster) -> None:
    """Create on one instance, SendImage on another, End on the third: the job completes, its
    filter runs once (where End landed) and the file is delivered once."""
    one, two, three = cluster.clients
    token = one.create(SHARE, root_name="across")
    image = os.urandom(30_000)
    two.send_image(token, 1, image)
    three.end(token)
    ended = one.wait_ended(token)
    assert ended.state == "Completed", ended
    assert ended.reasons == ("PostScanJobCompletedSuccessfully",), ended
    assert ended.images_received == 1
    delivered = cluster.delivered()
    assert delivered == {"across_0001.png": [cluster.servers[2].data.name]}, delivered
    folder = user_folder(cluster.servers[2].data)
    assert (folder / "across_0001.png").read_bytes() == image


def test_every_instance_gives_the_same_answers(cluster: Cluster) -> None:
    """GetActiveJobs, GetJobHistory and GetPostScanJobElements are the same on every
    instance, whichever one the jobs were created on."""
    one, two, three = cluster.clients
    done = two.create(SHARE, root_name="listed")
    three.send_image(done, 1, os.urandom(5_000))
    one.end(done)
    one.wait_ended(done)
    active = three.create(SHARE, root_name="open")
    one.send_image(active, 1, os.urandom(5_000))
    try:
        actives = [[(j.token, j.state) for j in c.active()] for c in cluster.clients]
        assert actives == [[(active, "Creating")]] * 3, actives
        histories = [[(j.token, j.state) for j in c.history()] for c in cluster.clients]
        assert histories[0] == histories[1] == histories[2], histories
        assert histories[0][0] == (done, "Completed"), histories
        for token in (done, active):
            views = [c.dsp_job(token) for c in cluster.clients]
            assert views[0] == views[1] == views[2], views
            documents = [c.dsp_documents(token) for c in cluster.clients]
            assert documents == [[(1, "png")]] * 3, documents
    finally:
        two.dsp_cancel(active)


def test_cancel_on_another_instance(cluster: Cluster) -> None:
    one, two, three = cluster.clients
    token = one.create(SHARE)
    one.send_image(token, 1, os.urandom(5_000))
    two.dsp_cancel(token)
    for client in (one, three):
        view = client.in_history(token)
        assert view is not None and view.state == "Canceled", view
        assert view.reasons == ("PostScanJobCanceled",), view
    # The instance that created it refuses what a canceled job no longer takes (R4 step 8).
    refused = fault_of(lambda: one.send_image(token, 2, os.urandom(100)))
    assert str(refused.subcode).endswith(":OperationFailed"), refused
    assert str(fault_of(lambda: three.dsp_cancel(token)).subcode).endswith(
        ":ClientErrorJobTokenNotFound"
    )


def test_two_instances_updating_one_job_at_once(cluster: Cluster) -> None:
    """Both instances read the job, then both record an image: the first write wins, the
    second is refused as changed meanwhile (ServerErrorTemporaryError) and undone; the job
    keeps the winner's image, and the loser's retry succeeds."""
    one, two, _ = cluster.clients
    token = one.create(SHARE, root_name="race")
    first = HeldUpload(cluster, one, token, 1)
    second = HeldUpload(cluster, two, token, 2)
    first.release()  # one records image 1: the row's version moves on
    lost = fault_of(second.release)
    assert str(lost.subcode).endswith(":ServerErrorTemporaryError"), lost
    # The fault is R4 step 9's; the log of the instance that lost says why.
    assert f"job {token} was changed by another instance meanwhile" in cluster.servers[1].log
    assert cluster.uploads(token, 2) == 0, "the refused upload's row stayed"
    for client in cluster.clients:
        assert client.dsp_documents(token) == [(1, "png")]
    two.send_image(token, 2, os.urandom(20_000))  # the retry, on the instance that lost
    assert one.dsp_documents(token) == [(1, "png"), (2, "png")]
    two.end(token)
    ended = one.wait_ended(token)
    assert ended.state == "Completed" and ended.images_received == 2, ended
    assert sorted(n for n in cluster.delivered() if n.startswith("race_")) == [
        "race_0001.png",
        "race_0002.png",
    ]


def test_idle_timeout_spares_an_upload_on_another_instance(cluster: Cluster) -> None:
    """R6: a job receiving an image is not idle, whichever instance receives it: every
    instance ticks, and none times the job out while another one receives its image."""
    one, two, three = cluster.clients
    token = one.create(SHARE, root_name="slow")
    upload = HeldUpload(cluster, two, token, 1)
    began = time.monotonic()
    # Past the timeout with room to spare: an instance that ignored the upload would have
    # ended the job by now.
    while time.monotonic() - began < 2 * TIMEOUT_SECONDS:
        time.sleep(0.2)
    states = [c.dsp_job(token).state for c in (one, three)]
    assert states == ["Creating", "Creating"], states
    upload.release()
    one.end(token)
    ended = three.wait_ended(token)
    assert ended.state == "Completed" and ended.images_received == 1, ended


def test_duplicate_image_on_another_instance_is_retried_later(cluster: Cluster) -> None:
    """A DocumentId being received on one instance is ServerErrorTemporaryError on the others
    (docs/rulings.md, "A duplicate in flight on another instance"); once received, the same
    DocumentId is a duplicate (R6: InvalidArgs) on every instance."""
    one, two, _ = cluster.clients
    token = one.create(SHARE, root_name="dup")
    upload = HeldUpload(cluster, one, token, 1)
    elsewhere = fault_of(lambda: two.send_image(token, 1, os.urandom(1_000)))
    assert str(elsewhere.subcode).endswith(":ServerErrorTemporaryError"), elsewhere
    assert "another instance is receiving document 1" in elsewhere.reason, elsewhere
    upload.release()
    assert two.dsp_documents(token) == [(1, "png")]
    duplicate = fault_of(lambda: two.send_image(token, 1, os.urandom(1_000)))
    assert str(duplicate.subcode).endswith(":InvalidArgs"), duplicate
    two.dsp_cancel(token)


def test_quota_counts_jobs_created_on_other_instances(cluster: Cluster) -> None:
    """max_creating_jobs_per_user counts the client's Creating jobs on every instance."""
    one, two, three = cluster.clients
    held = [one.create(SHARE), three.create(SHARE), two.create(SHARE)]
    try:
        refused = fault_of(lambda: three.create(SHARE))
        assert str(refused.subcode).endswith(":ServerErrorTemporaryError"), refused
        assert "max_creating_jobs_per_user" in refused.reason, refused
        one.dsp_cancel(held.pop())  # made on the second instance, canceled on the first
        held.append(three.create(SHARE))
    finally:
        for token in held:
            two.dsp_cancel(token)


def create_at_once(cluster: Cluster, count: int) -> tuple[list[str], list[dc.ClientFault]]:
    """``count`` CreatePostScanJob of one client, spread over the instances, sent together:
    the tokens given and the faults answered."""
    barrier = threading.Barrier(count)
    tokens: list[str] = []
    refusals: list[dc.ClientFault] = []
    errors: list[BaseException] = []

    def creator(n: int) -> None:
        client = cluster.clients[n % len(cluster.clients)]
        barrier.wait(30)
        try:
            tokens.append(client.create(SHARE, root_name=f"quota{n}"))
        except dc.ClientFault as fault:
            refusals.append(fault)
        except BaseException as exc:
            errors.append(exc)

    on_threads(creator, ((n,) for n in range(count)))
    assert errors == [], errors
    assert len(tokens) + len(refusals) == count
    return tokens, refusals


def test_concurrent_creations_on_every_instance_never_pass_the_quota(cluster: Cluster) -> None:
    """max_creating_jobs_per_user holds for CreatePostScanJob of one client sent to every
    instance at the same moment (issue 18 point 1): each creating write counts the client's
    Creating jobs in SQL under a lock per client, so the last ones are refused with the quota's
    own fault, however the instances' reads of each other's jobs fall."""
    for _round in range(4):
        tokens, refusals = create_at_once(cluster, 4 * len(cluster.clients))
        try:
            # Every refusal is the quota's: the quota is filled, never passed.
            assert len(tokens) == PER_USER, (tokens, refusals)
            for fault in refusals:
                assert str(fault.subcode).endswith(":ServerErrorTemporaryError"), fault
                assert fault.reason.endswith(
                    f"(the limit is {PER_USER}, setting [limits] max_creating_jobs_per_user); "
                    "retry when one of them has ended."
                ), fault
            with psycopg.connect(cluster.dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM jobs WHERE active AND state = 'Creating'"
                ).fetchone()
            assert row is not None and row[0] == PER_USER, row
        finally:
            for token in tokens:
                cluster.clients[0].dsp_cancel(token)


def active_jobs(cluster: Cluster) -> int:
    with psycopg.connect(cluster.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE active").fetchone()
    assert row is not None
    return int(row[0])


def create_from_many_clients(
    cluster: Cluster, sources: list[str]
) -> tuple[dict[str, list[str]], dict[str, dc.ClientFault]]:
    """One CreatePostScanJob from each address of ``sources`` (other loopback addresses: other
    clients to the per-client rules), spread over the instances, sent together: the tokens
    given, and the faults answered, by source."""
    barrier = threading.Barrier(len(sources))
    tokens: dict[str, list[str]] = {}
    refusals: dict[str, dc.ClientFault] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def creator(n: int, source: str) -> None:
        server = cluster.servers[n % len(cluster.servers)]
        client = Soap(server.url, source=source)
        barrier.wait(30)
        try:
            token = client.create(SHARE, root_name=f"slot{n}")
        except dc.ClientFault as fault:
            with lock:
                refusals[source] = fault
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                tokens.setdefault(source, []).append(token)

    on_threads(creator, enumerate(sources))
    assert errors == [], errors
    assert sum(map(len, tokens.values())) + len(refusals) == len(sources)
    return tokens, refusals


def refused_for(fault: dc.ClientFault, setting: str) -> bool:
    return str(fault.subcode).endswith(":ServerErrorTemporaryError") and (
        f"setting [limits] {setting})" in fault.reason
    )


def cancel_all(cluster: Cluster, tokens: dict[str, list[str]]) -> None:
    for held in tokens.values():
        for token in held:
            cluster.clients[0].dsp_cancel(token)


def test_concurrent_creations_never_pass_max_active_jobs(cluster: Cluster) -> None:
    """max_active_jobs holds for creations of many clients sent to every instance at the same
    moment (issue 18 point 1): each creating write counts every instance's active jobs in SQL
    under the creations' lock, so exactly the slots are given, the rest refused with the
    limit's own fault, however the instances' reads of each other's jobs fall."""
    wait_for(lambda: active_jobs(cluster) == 0, 30, "the other tests' jobs to end")
    sources = [f"127.0.0.{10 + n}" for n in range(2 * SLOTS)]
    for _round in range(4):
        tokens, refusals = create_from_many_clients(cluster, sources)
        try:
            assert sum(map(len, tokens.values())) == SLOTS, (tokens, refusals)
            assert all(refused_for(f, "max_active_jobs") for f in refusals.values()), refusals
            assert active_jobs(cluster) == SLOTS
        finally:
            cancel_all(cluster, tokens)


def test_concurrent_creations_never_take_the_slots_kept_for_new_clients(
    cluster: Cluster,
) -> None:
    """The slots kept for clients with no job in Creating (new_client_share, issue 14) hold
    across instances too: with every slot but the kept ones taken, clients that hold a job in
    Creating and new clients create at once on every instance; only new clients get the kept
    slots, and no more than there are."""
    wait_for(lambda: active_jobs(cluster) == 0, 30, "the other tests' jobs to end")
    holders = [f"127.0.1.{10 + n}" for n in range(SLOTS - KEPT)]
    newcomers = [f"127.0.2.{10 + n}" for n in range(2 * KEPT)]
    for round_ in range(3):
        first, _ = create_from_many_clients(cluster, holders)
        try:
            assert sorted(first) == sorted(holders), first
            more, refusals = create_from_many_clients(cluster, holders + newcomers)
            try:
                assert set(more) <= set(newcomers), (round_, more)
                assert sum(map(len, more.values())) == KEPT, (round_, more, refusals)
                # A holder is refused for the kept slots (it has a job in Creating), or for
                # the slots once newcomers took the kept ones; a newcomer only for the slots.
                for source, fault in refusals.items():
                    settings = ("max_active_jobs",) + (
                        ("new_client_share",) if source in holders else ()
                    )
                    assert any(refused_for(fault, s) for s in settings), (source, fault)
                assert active_jobs(cluster) == SLOTS
            finally:
                cancel_all(cluster, more)
        finally:
            cancel_all(cluster, first)


def test_concurrent_scans_on_all_instances(cluster: Cluster) -> None:
    """Scanners whose requests go round the instances, at once: every job completes once."""
    tokens: list[str] = []
    errors: list[BaseException] = []

    def scanner(n: int) -> None:
        try:
            clients = cluster.clients[n:] + cluster.clients[:n]
            token = clients[0].create(SHARE, root_name=f"many{n}", user=f"{DEFAULT_SID}-{n}")
            clients[1].send_image(token, 1, os.urandom(8_000))
            clients[2].send_image(token, 2, os.urandom(8_000))
            clients[0].end(token)
            tokens.append(token)
        except BaseException as exc:
            errors.append(exc)

    on_threads(scanner, ((n,) for n in range(3)))
    assert errors == [], errors
    for token in tokens:
        ended = cluster.clients[1].wait_ended(token)
        assert ended.state == "Completed" and ended.images_received == 2, ended


def test_a_job_made_on_one_instance_is_found_at_once_on_another(cluster: Cluster) -> None:
    """Read-your-writes across instances (cluster-design 3.5, runtime/catchup.py): the
    doorbell spares listings their read, never a job-addressed request.  200 times back to
    back, alternating the two instances: CreatePostScanJob on one, SendImage on the other
    within a millisecond of the reply, CancelPostScanJob on the first again.  Not one
    ClientErrorJobTokenNotFound (the job not yet seen) nor ServerErrorTemporaryError (a
    decision from an outdated record, refused by the compare-and-set)."""
    one, two = cluster.clients[0], cluster.clients[2]
    image = os.urandom(1_000)
    for n in range(200):
        maker, sender = (two, one) if n % 2 == 0 else (one, two)
        token = maker.create(SHARE, root_name=f"ryw{n}")
        sender.send_image(token, 1, image)
        maker.dsp_cancel(token)
