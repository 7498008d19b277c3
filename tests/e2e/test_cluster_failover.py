"""Failures of a three-instance cluster behind HAProxy, over real parts (issue 18 point 7): a real
HAProxy (Debian's) with docs/operating.md's configuration in front of three ``dsc serve``
instances (both bindings) on one PostgreSQL and one SeaweedFS; instances killed with SIGKILL,
stopped cleanly one by one, PostgreSQL restarted as after a crash.

The scanners talk only to HAProxy.  They are :class:`cluster_support.RetryingSoap`: a request
that met a connection reset (or refused, or closed unanswered) or a 503 is sent once more, as a
real scanner does, and nothing else is retried.

Kill -9 mid-filter with rescue by another instance and SIGSTOP past the lease are in
tests/e2e/test_cluster_leases.py (two instances, no balancer needed).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cluster_support import (
    CONNECTION_LOST,
    LEASE_SECONDS,
    NAMES,
    HAProxyCluster,
    RetryingSoap,
    haproxy_cluster,
)
from dsc_core import client as dc
from dsc_core.model import FileShareInstructions, Instructions, SharePointInstructions
from e2e_support import DEFAULT_SID, SharePointSite, Soap
from engines_support import PgCluster, S3Server, pg_cluster
from test_cluster_jobs import HeldUpload
from test_e2e_serve import LOCAL_SHARE
from waiting import wait_for

LONG = os.environ.get("DSC_LONG_TESTS") == "1"
SOAK_ROUNDS = 20 if LONG else 3  # a few seconds per round
#: The R6 timeout: a job whose scanner gave up ends by itself within seconds.
TIMEOUT_SECONDS = 3
SHARE = [FileShareInstructions((LOCAL_SHARE,))]
TEMPORARY = "dsp:ServerErrorTemporaryError"


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgCluster]:
    """A PostgreSQL of this module's own: one test restarts it."""
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def site() -> Iterator[SharePointSite]:
    """A SharePoint site that reads slowly, so that a job's filters run long enough to be
    killed mid-filter (as in tests/e2e/test_crash_soak.py)."""
    slow = SharePointSite(read_size=16 * 1024, delay=0.01)
    try:
        yield slow
    finally:
        slow.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, own_pg: PgCluster, s3: S3Server, site: SharePointSite
) -> Iterator[HAProxyCluster]:
    folder = tmp_path_factory.mktemp("haproxy-cluster")
    (folder / "share").mkdir()
    config = (
        # Every job of a long soak (DSC_LONG_TESTS=1: some 2,000) in the history, and the whole
        # history in one GetJobHistory (R15 caps a reply at 32,767 octets by default).
        f"[jobs]\ntimeout_seconds = {TIMEOUT_SECONDS}\nhistory_size = 10000\n"
        "[limits]\nmax_reply_bytes = 16777216\n"
        # One share for every instance, as a file server is: a job rescued by another instance
        # finds what the first one delivered there.
        f"[shares]\n'{LOCAL_SHARE}' = \"{folder / 'share'}\"\n"
        f"[sharepoint]\nsites = [{site.config()}]\n"
    )
    with haproxy_cluster(folder, own_pg, s3, config) as started:
        yield started


@pytest.fixture(autouse=True)
def every_instance_up(cluster: HAProxyCluster) -> Iterator[None]:
    """Each test starts (and must end) with the three instances up in HAProxy."""
    for index, instance in enumerate(cluster.instances):
        if not instance.alive:
            cluster.restart(index)
    cluster.wait_up(*NAMES)
    yield


# --- what the scanners did, and what reached the share ----------------------------------------


@dataclass
class Scan:
    token: str
    root: str
    images: dict[int, bytes] = field(default_factory=dict)  # acknowledged
    ended: bool = False  # EndPostScanJob acknowledged
    failure: str | None = None  # what made the scanner give up


def delivered(cluster: HAProxyCluster) -> dict[str, bytes]:
    """File name -> contents, on the share every instance delivers to."""
    folder = cluster.folder / "share" / DEFAULT_SID
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return {path.name: path.read_bytes() for path in files}


def scan(
    client: Soap,
    root: str,
    images: int,
    scans: list[Scan],
    lock: threading.Lock,
    instructions: list[Instructions],
) -> None:
    """One scanner's job: create, ``images`` images, end; a failure is recorded, not raised."""
    scan_record: Scan | None = None
    try:
        token = client.create(instructions, root_name=root, user=DEFAULT_SID)
        scan_record = Scan(token, root)
        with lock:
            scans.append(scan_record)
        for document in range(1, images + 1):
            data = os.urandom(random.randint(20_000, 120_000))
            client.send_image(token, document, data)
            scan_record.images[document] = data
        client.end(token)
        scan_record.ended = True
    except (dc.ClientFault, *CONNECTION_LOST) as exc:
        what = exc.subcode if isinstance(exc, dc.ClientFault) else type(exc).__name__
        if scan_record is None:
            scan_record = Scan("", root)
            with lock:
                scans.append(scan_record)
        scan_record.failure = str(what)


class Scanners:
    """``parallel`` scanner threads through HAProxy, each scanning job after job until
    :meth:`stop` (or ``jobs`` in all)."""

    def __init__(
        self,
        url: str,
        parallel: int,
        jobs: int | None = None,
        prefix: str = "s",
        instructions: list[Instructions] = SHARE,
    ) -> None:
        self.url = url
        self.instructions = instructions
        self.jobs = jobs
        self.prefix = prefix
        self.scans: list[Scan] = []
        self.clients: list[RetryingSoap] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.count = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(parallel)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        client = RetryingSoap(self.url, timeout=30)
        with self.lock:
            self.clients.append(client)
        while not self.stopping.is_set():
            with self.lock:
                if self.jobs is not None and self.count >= self.jobs:
                    return
                self.count += 1
                root = f"{self.prefix}{self.count}"
            scan(client, root, 2, self.scans, self.lock, self.instructions)

    def stop(self) -> list[Scan]:
        """Stop scanning (after the jobs in hand; with ``jobs``, once they are all done)."""
        if self.jobs is None:
            self.stopping.set()
        for thread in self.threads:
            thread.join(120)
            assert not thread.is_alive(), "a scanner hangs"
        return self.scans

    @property
    def retries(self) -> int:
        return sum(c.retries for c in self.clients)


def check_outcome(cluster: HAProxyCluster, scans: list[Scan]) -> None:
    """Every job ended; each one whose end was acknowledged completed with every image it was
    told was received, each delivered once with its bytes; nothing was delivered twice."""
    client = Soap(cluster.url)
    try:
        wait_for(lambda: client.active() == [], 60, "every job to end (none stuck)")
    except AssertionError as exc:
        stuck = [(v.token, v.state) for v in client.active()]
        raise AssertionError(f"{exc}: still active {stuck}") from None
    tokens = {record.token for record in scans if record.token}

    def whole_history() -> dict[str, dc.JobView] | None:
        # A listing may lag another instance's commit (docs/architecture.md, "Several
        # instances": an instance answers from its table when its catch-up read is slow).
        found = {view.token: view for view in client.history()}
        return found if tokens <= found.keys() else None

    history = wait_for(whole_history, 60, "every job in the history")
    files = delivered(cluster)
    # A document delivered again takes the next free name (R9 never overwrites): same bytes.
    copies = Counter(files.values())
    twice = sorted(name for name, data in files.items() if copies[data] > 1)
    assert twice == [], f"delivered more than once: {twice}"
    for record in scans:
        if not record.token:
            continue
        view = history.get(record.token)
        assert view is not None, f"job {record.token} is in no history"
        if record.ended:
            assert view.state == "Completed", view
            assert view.images_received == len(record.images), (view, record)
            for document, data in record.images.items():
                name = f"{record.root}_{document:04d}.png"
                assert files.get(name) == data, f"{name}: acknowledged, not delivered whole"


# --- the tests ---------------------------------------------------------------------------------


def test_many_scanners_spread_over_the_instances(cluster: HAProxyCluster) -> None:
    """20 jobs, 4 at a time, every request through HAProxy's round robin: all complete, and
    every instance answered some of them."""
    before = {name: _sessions(cluster, name) for name in NAMES}
    scans = Scanners(cluster.url, parallel=4, jobs=20, prefix="many").stop()
    assert [s.failure for s in scans if s.failure] == []
    assert len(scans) == 20 and all(s.ended for s in scans)
    check_outcome(cluster, scans)
    served = {name: _sessions(cluster, name) - before[name] for name in NAMES}
    assert all(count > 0 for count in served.values()), served


def _sessions(cluster: HAProxyCluster, name: str) -> int:
    """HAProxy's total sessions to one server (``show stat`` field stot)."""
    for line in cluster.command("show stat").splitlines():
        fields = line.split(",")
        if len(fields) > 7 and fields[0] == "dsc_instances" and fields[1] == name:
            return int(fields[7])
    raise AssertionError(f"no server {name} in HAProxy's stats")


def test_kill9_mid_upload_the_retry_is_accepted_elsewhere(cluster: HAProxyCluster) -> None:
    """A SendImage is in flight on one instance (its ``uploads`` row written, its last bytes
    held back); that instance is killed: the scanner sees the connection reset, sends the same
    DocumentId again through HAProxy, another instance accepts it, and the job completes.

    While the dead instance's lease runs its upload still counts: the retry is answered
    ServerErrorTemporaryError, never InvalidArgs (docs/rulings.md, "A duplicate in flight on
    another instance"), and the scanner tries again, as it does after any temporary fault."""
    client = RetryingSoap(cluster.url)
    token = client.create(SHARE, root_name="killed")
    client.send_image(token, 1, os.urandom(40_000))
    held = HeldUpload(cluster, client, token, 2)  # type: ignore[arg-type]
    victim = cluster.instances[NAMES.index(cluster.upload_owner(token, 2))]
    victim.kill9()
    with pytest.raises(CONNECTION_LOST):
        held.release()
    image = os.urandom(60_000)
    answers: list[str] = []

    def resend() -> bool:
        """The scanner's retry: the same DocumentId; a temporary fault is retried."""
        try:
            client.send_image(token, 2, image)
        except dc.ClientFault as exc:
            assert exc.subcode == TEMPORARY, exc.line()
            answers.append(exc.line())
            return False
        return True

    wait_for(resend, 10 * LEASE_SECONDS, "the retried image accepted", interval=0.1)
    print(f"the retry was answered {len(answers)} temporary fault(s) first: {answers[:1]}")
    client.end(token)
    ended = client.wait_ended(token, 30)
    assert ended.state == "Completed" and ended.images_received == 2, ended
    assert delivered(cluster)["killed_0002.png"] == image


def test_postgresql_restarted_during_a_run_of_scans(
    cluster: HAProxyCluster, own_pg: PgCluster
) -> None:
    """PostgreSQL stopped as after a crash while scanners scan: a request that needs it is
    answered ServerErrorTemporaryError (or, once HAProxy took the instances out, its
    connection is closed); started again, the instances reconnect by themselves; no
    acknowledged image is lost and every job ends."""
    scanners = Scanners(cluster.url, parallel=3, prefix="pg")
    wait_for(lambda: len(scanners.scans) >= 3, 30, "scanners at work")
    direct = Soap(cluster.instances[0].url)
    token = direct.create(SHARE, root_name="direct")
    own_pg.stop("immediate")
    try:
        with pytest.raises(dc.ClientFault) as caught:
            direct.send_image(token, 1, os.urandom(10_000))
        assert caught.value.subcode == TEMPORARY, caught.value.line()
    finally:
        own_pg.start()
    cluster.wait_up(*NAMES, timeout=30)  # each instance's /healthz is 200 again by itself
    # Reconnected (the probe's job may have timed out meanwhile: R6, TIMEOUT_SECONDS).
    token = direct.create(SHARE, root_name="direct")
    direct.send_image(token, 1, os.urandom(10_000))
    direct.end(token)
    ended_before = sum(1 for s in scanners.scans if s.ended)
    wait_for(
        lambda: sum(1 for s in scanners.scans if s.ended) >= ended_before + 3,
        60,
        "scans completing again",
    )
    scans = scanners.stop()
    failures = {s.failure for s in scans if s.failure}
    allowed = {TEMPORARY} | {e.__name__ for e in (ConnectionResetError, ConnectionRefusedError)}
    allowed |= {"RemoteDisconnected", "BrokenPipeError", "TimeoutError"}
    # A job whose scanner waited out the outage past R6's timeout (TIMEOUT_SECONDS) ended
    # Aborted; its next request is refused as for any ended job.
    allowed.add("dsp:OperationFailed")
    assert failures <= allowed, failures
    check_outcome(cluster, scans)


def test_rolling_restart_of_every_instance_fails_no_scan(cluster: HAProxyCluster) -> None:
    """Each instance in turn: drained in HAProxy, stopped cleanly, started, put back and
    health-checked up, while three scanners scan: no scan fails."""
    scanners = Scanners(cluster.url, parallel=3, prefix="roll")
    wait_for(lambda: len(scanners.scans) >= 3, 30, "scanners at work")
    for index in range(len(cluster.instances)):
        cluster.rolling_restart(index)
    count = len(scanners.scans)
    wait_for(lambda: len(scanners.scans) >= count + 3, 30, "scans after the last restart")
    scans = scanners.stop()
    assert [s.failure for s in scans if s.failure] == [], "a scan failed"
    check_outcome(cluster, scans)
    print(f"{len(scans)} scans, {scanners.retries} request(s) sent again")


@pytest.mark.slow
def test_crash_soak_across_instances(cluster: HAProxyCluster, site: SharePointSite) -> None:
    """N rounds while three scanners scan to the share and a slow SharePoint site: kill -9 a
    random instance (every other round the one running a job's filters, mid-filter), start it
    again.  At the end no acknowledged image is lost, none delivered twice, no job stuck
    (tests/e2e/test_crash_soak.py's checks, across instances)."""
    seed = int(os.environ.get("DSC_SOAK_SEED", random.randrange(1 << 30)))
    print(f"soak seed {seed} (DSC_SOAK_SEED={seed} replays it), {SOAK_ROUNDS} rounds")
    rng = random.Random(seed)
    rescued_before = _rescues(cluster)
    taken_before = _rescues(cluster, "taken up from instance")
    waited_before = _rescues(cluster, "taken up again here")
    uploads_before = len(site.uploads)
    to = [FileShareInstructions((LOCAL_SHARE,)), SharePointInstructions(False, (site.url(),))]
    scanners = Scanners(cluster.url, parallel=3, prefix="soak", instructions=to)
    mid_filter = 0
    held_at_kill: list[int] = []
    for round_number in range(SOAK_ROUNDS):
        time.sleep(rng.uniform(0.3, 1.5))  # a random moment of the scanners' work
        if round_number % 2:
            victim = wait_for(cluster.lease_holder, 30, "a job's filters running")
            index = NAMES.index(victim)
            mid_filter += 1
        else:
            index = rng.randrange(len(cluster.instances))
        # What the victim leaves behind: only the jobs its engine runs are leased to it
        # (runtime/leasing.py); the others wait for any instance's free place.
        held_at_kill.append(cluster.leases_held(NAMES[index]))
        cluster.kill9(index)
        cluster.restart(index)
    scans = scanners.stop()
    assert any(s.ended for s in scans), "no job completed: nothing was tested"
    check_outcome(cluster, scans)
    # SharePoint: every image of an ended job PUT whole to its URL (a PUT again replaces it).
    complete = {(u.path, bytes(u.body)) for u in site.uploads[uploads_before:] if u.complete}
    for record in scans:
        if record.ended:
            for document, data in record.images.items():
                assert (f"/sites/scans/{record.root}_{document:04d}.png", data) in complete
    ended = sum(1 for s in scans if s.ended)
    print(
        f"{len(scans)} jobs ({ended} ended by their scanner), {SOAK_ROUNDS} kills "
        f"({mid_filter} of the instance running a job's filters; the killed one held "
        f"{max(held_at_kill)} job lease(s) at most), "
        f"{_rescues(cluster) - rescued_before} job(s) rescued by another instance, "
        f"{_rescues(cluster, 'taken up from instance') - taken_before} taken up from another "
        "one that let them go (no free place, or a clean stop), "
        f"{_rescues(cluster, 'taken up again here') - waited_before} run where they waited "
        "for a free place, "
        f"{scanners.retries} request(s) sent again; 0 acknowledged images lost, "
        "0 delivered twice, 0 stuck"
    )


def _rescues(cluster: HAProxyCluster, said: str = "rescued from instance") -> int:
    """How many jobs the instances' logs say they rescued from another (runtime/leasing.py),
    or took up after another let them go (``said`` "taken up from instance")."""
    return sum(
        i.log_path.read_text(errors="replace").count(said)
        for i in cluster.instances
        if i.log_path.exists()
    )


assert LEASE_SECONDS < TIMEOUT_SECONDS  # a retry after the lease finds the job still open
