"""The file share filter over SMB 2/3 (issue 21) against a real Samba ``smbd`` (SMB 3,
encryption and signing required): the local filter's guarantees hold on a remote share."""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import tracemalloc
from pathlib import Path

import pytest

from dsc_bindings.filters import FilterOutcome, FilterSettings, fileshare
from dsc_bindings.filters.interruption import Interrupted
from dsc_bindings.filters.smbfolder import share_problem
from dsc_bindings.filters.smbsettings import SmbSettings
from dsc_core.model import Document, FileShareInstructions, FilterState, FilterStateReason, Job
from smb_support import PASSWORD, USER, SmbServer, need_smbclient
from test_filters_support import make_documents, make_job, random_bytes, second_away
from waiting import wait_for


def smb_settings(server: SmbServer, **overrides: object) -> FilterSettings:
    smb = SmbSettings(
        username=USER, password=PASSWORD, servers=(server.address,), port=server.port, timeout=5
    )
    return FilterSettings(smb=smb, **overrides)  # type: ignore[arg-type]


def run(
    job: Job, documents: list[tuple[Document, Path]], settings: FilterSettings
) -> FilterOutcome:
    return fileshare.run(job, 0, documents, settings, threading.Event())


def test_delivers_to_the_share_in_the_user_folder(smbd: SmbServer, tmp_path: Path) -> None:
    big = random_bytes(700_000)
    docs = make_documents(tmp_path / "spool", ("pdf-a", big), ("png", b"\x89PNG small"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\Finance",)))

    outcome = run(job, docs, smb_settings(smbd))

    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
    folder = smbd.scans / "Finance" / "alice@corp.example"
    assert sorted(p.name for p in folder.iterdir()) == ["Scan_0001.pdf", "Scan_0002.png"]
    assert (folder / "Scan_0001.pdf").read_bytes() == big
    # The server wrote as the account, with the share's create mask: not root, not world.
    assert folder.joinpath("Scan_0001.pdf").stat().st_uid != 0


def test_read_back_with_smbclient(smbd: SmbServer, tmp_path: Path) -> None:
    need_smbclient()
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF read back"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\readback",)))
    assert run(job, docs, smb_settings(smbd)).state is FilterState.COMPLETED_SUCCESSFULLY
    remote = "readback/alice@corp.example/Scan_0001.pdf"
    assert smbd.read_back(remote, tmp_path / "got.pdf") == b"%PDF read back"


def test_an_existing_name_is_never_overwritten(smbd: SmbServer, tmp_path: Path) -> None:
    folder = smbd.scans / "taken" / "alice@corp.example"
    folder.mkdir(parents=True)
    (folder / "Scan_0001.pdf").write_bytes(b"someone else's file")
    smbd.give(folder.parent, folder)
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF new"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\taken",)))

    assert run(job, docs, smb_settings(smbd)).state is FilterState.COMPLETED_SUCCESSFULLY

    assert (folder / "Scan_0001.pdf").read_bytes() == b"someone else's file"
    assert (folder / "Scan_0002.pdf").read_bytes() == b"%PDF new"
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]


def test_a_read_only_share_is_access_denied(smbd: SmbServer, tmp_path: Path) -> None:
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\denied",)))
    outcome = run(job, docs, smb_settings(smbd))
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)


def test_wrong_password_is_access_denied(smbd: SmbServer, tmp_path: Path) -> None:
    smb = SmbSettings(
        username=USER, password="wrong", servers=(smbd.address,), port=smbd.port, timeout=5
    )
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans",)))
    outcome = run(job, docs, FilterSettings(smb=smb))
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)


def test_a_host_outside_servers_is_never_contacted(smbd: SmbServer, tmp_path: Path) -> None:
    # A listener on the SMB port of another loopback address: the UNC path names it, [smb]
    # does not list it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    host, port = listener.getsockname()
    smb = SmbSettings(username=USER, password=PASSWORD, servers=(smbd.address,), port=port)
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(FileShareInstructions((rf"\\{host}\scans",)))
    try:
        outcome = run(job, docs, FilterSettings(smb=smb))
        accepted = 0
        try:
            while True:
                listener.accept()[0].close()
                accepted += 1
        except TimeoutError:
            pass
    finally:
        listener.close()
    assert outcome.state is FilterState.CANCELED
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)
    assert accepted == 0


def test_a_planted_symlink_is_not_followed_out_of_the_share(
    smbd: SmbServer, tmp_path: Path
) -> None:
    outside = smbd.folder / "outside"  # beside the share, reachable by its account
    outside.mkdir()
    os.chmod(outside, 0o777)
    planted = smbd.scans / "planted"
    planted.mkdir()
    smbd.give(planted)
    (planted / "alice@corp.example").symlink_to(outside)  # another user of the share
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF secret"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\planted",)))

    outcome = run(job, docs, smb_settings(smbd))

    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)
    assert list(outside.iterdir()) == []


def test_a_rerun_delivers_nothing_twice(smbd: SmbServer, tmp_path: Path) -> None:
    """R13: the interrupted filter runs again idempotently; the journal says what is done,
    and a temporary file already linked to its final name counts as delivered."""
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF one"), ("pdf-a", b"%PDF two"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\rerun",)))
    settings = smb_settings(smbd)
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    folder = smbd.scans / "rerun" / "alice@corp.example"
    # A crash after the link of document 2 and before its journal line: lose the line and
    # put the temporary hard link back.
    journal = docs[0][1].parent / ".fileshare-0.journal"
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0] + "\n")
    tmp = folder / f".dsc-{job.token}-{docs[1][0].document_id}.part"
    os.link(folder / "Scan_0002.pdf", tmp)

    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY

    assert sorted(p.name for p in folder.iterdir()) == ["Scan_0001.pdf", "Scan_0002.pdf"]


def test_a_document_the_store_cannot_give_interrupts_the_run_on_the_share(
    smbd: SmbServer, tmp_path: Path
) -> None:
    """The store stops answering as the filter reads document 2, with the share's folder open
    over SMB and document 1 on it: the run ends in Interrupted, no outcome (filters/
    interruption.py; the SMB call wrappers catch only SMB and OS errors), nothing partial on
    the share, and the connection stays usable: the resumed run (R13) over the same pool
    delivers the rest, document 1 once."""
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF one"), ("png", b"two"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\away",)))
    settings = smb_settings(smbd)
    folder = smbd.scans / "away" / "alice@corp.example"
    with pytest.raises(Interrupted):
        run(job, second_away(docs), settings)
    assert sorted(p.name for p in folder.iterdir()) == ["Scan_0001.pdf"]
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert sorted(p.name for p in folder.iterdir()) == ["Scan_0001.pdf", "Scan_0002.png"]
    assert settings.smb is not None and len(settings.smb.pool.connections) == 1


def test_the_pool_reuses_one_connection_across_jobs(smbd: SmbServer, tmp_path: Path) -> None:
    settings = smb_settings(smbd)
    assert settings.smb is not None
    for i in range(3):
        docs = make_documents(tmp_path / f"spool{i}", ("pdf-a", b"%PDF"))
        job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\pool",)))
        assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
        assert len(settings.smb.pool.connections) == 1
    first = next(iter(settings.smb.pool.connections.values()))
    assert next(iter(settings.smb.pool.connections.values())) is first


def test_a_restarted_server_is_reconnected(smbd: SmbServer, tmp_path: Path) -> None:
    settings = smb_settings(smbd)
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\restart",)))
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    smbd.stop()
    smbd.start()
    docs2 = make_documents(tmp_path / "spool2", ("pdf-a", b"%PDF 2"))
    job2 = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\restart2",)))
    assert run(job2, docs2, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert (smbd.scans / "restart2" / "alice@corp.example" / "Scan_0001.pdf").exists()


def test_memory_stays_flat_in_file_size(smbd: SmbServer, tmp_path: Path) -> None:
    """40 MB streamed in chunks: Python's allocations peak at a few chunks, not the file."""
    size = 40 * 1024 * 1024
    source = tmp_path / "spool" / "big.bin"
    source.parent.mkdir()
    with open(source, "wb") as f:
        block = random_bytes(1024 * 1024)
        for _ in range(size // len(block)):
            f.write(block)
    docs = [(make_documents(tmp_path / "spool0", ("pdf-a", b"x"))[0][0], source)]
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\big",)))
    settings = smb_settings(smbd)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        outcome = run(job, docs, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY
    assert (smbd.scans / "big" / "alice@corp.example" / "Scan_0001.pdf").stat().st_size == size
    assert peak < 8 * 1024 * 1024, peak
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 32 * 1024, grown_kib


def test_health_probe_of_a_share(smbd: SmbServer) -> None:
    settings = smb_settings(smbd)
    assert settings.smb is not None
    assert share_problem(settings.smb, rf"\\{smbd.address}\scans") is None
    problem = share_problem(settings.smb, rf"\\{smbd.address}\nosuchshare")
    assert problem is not None and "nosuchshare" in problem


def _big_document(tmp_path: Path, size: int) -> list[tuple[Document, Path]]:
    source = tmp_path / "spool" / "big.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    block = random_bytes(1024 * 1024)
    with open(source, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    return [(make_documents(tmp_path / "spool0", ("pdf-a", b"x"))[0][0], source)]


def _run_in_thread(
    job: Job, docs: list[tuple[Document, Path]], settings: FilterSettings
) -> tuple[threading.Thread, list[FilterOutcome]]:
    outcomes: list[FilterOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(run(job, docs, settings)))
    thread.start()
    return thread, outcomes


def test_a_server_that_stops_answering_mid_write_is_a_failure_not_a_hang(
    smbd: SmbServer, tmp_path: Path
) -> None:
    """smbd frozen (SIGSTOP) while a document is written: the connection stays open and silent.
    Every call has a deadline ([smb] timeout), so the filter ends (UnknownError, R9: `dsc retry`
    runs it again) with nothing under the final name; thawed, a re-run delivers it once."""
    assert smbd.proc is not None
    settings = FilterSettings(
        smb=SmbSettings(
            username=USER, password=PASSWORD, servers=(smbd.address,), port=smbd.port, timeout=2
        ),
        chunk_size=1024 * 1024,
    )
    docs = _big_document(tmp_path, 256 * 1024 * 1024)
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\scans\frozen",)))
    folder = smbd.scans / "frozen" / "alice@corp.example"
    tmp = folder / f".dsc-{job.token}-{docs[0][0].document_id}.part"

    thread, outcomes = _run_in_thread(job, docs, settings)
    try:
        wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, 30, "the write to start", 0.005)
        os.killpg(smbd.proc.pid, signal.SIGSTOP)
        thread.join(60)
        assert not thread.is_alive(), "the filter hangs on a silent server"
    finally:
        os.killpg(smbd.proc.pid, signal.SIGCONT)
        thread.join(60)

    assert outcomes[0].state is FilterState.COMPLETED_WITH_ERRORS, outcomes
    assert outcomes[0].reasons == (FilterStateReason.UNKNOWN_ERROR,)
    assert not (folder / "Scan_0001.pdf").exists()

    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert sorted(p.name for p in folder.iterdir()) == ["Scan_0001.pdf"]
    assert (folder / "Scan_0001.pdf").stat().st_size == docs[0][1].stat().st_size


def test_a_listener_that_never_answers_is_a_failure_not_a_hang(tmp_path: Path) -> None:
    """A host of ``servers`` that accepts the connection and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    host, port = listener.getsockname()
    smb = SmbSettings(username=USER, password=PASSWORD, servers=(host,), port=port, timeout=1)
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(FileShareInstructions((rf"\\{host}\scans",)))
    try:
        thread, outcomes = _run_in_thread(job, docs, FilterSettings(smb=smb))
        thread.join(60)
        assert not thread.is_alive(), "the filter hangs on a silent server"
    finally:
        listener.close()
    assert outcomes[0].reasons == (FilterStateReason.UNKNOWN_ERROR,), outcomes


def _counting_listener(port: int) -> socket.socket:
    """A listener on another loopback address, on the SMB port of the test's smbd."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.77", port))
    listener.listen(8)
    listener.settimeout(0.2)
    return listener


def _accepted(listener: socket.socket) -> int:
    accepted = 0
    try:
        while True:
            listener.accept()[0].close()
            accepted += 1
    except TimeoutError:
        return accepted


def test_a_dfs_referral_to_a_host_outside_servers_is_refused(
    smbd: SmbServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The share is a DFS root (msdfs) whose link refers to another host: smbclient would follow
    it with the service account's credentials; the host is not one of ``servers``, so the
    filter is denied before a connection to it opens (a listener there counts zero)."""
    listener = _counting_listener(smbd.port)
    smbd.refer("elsewhere", "127.0.0.77", "scans")
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(FileShareInstructions((rf"\\{smbd.address}\dfs\elsewhere\x",)))
    try:
        outcome = run(job, docs, smb_settings(smbd))
        accepted = _accepted(listener)
    finally:
        listener.close()
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,), outcome
    assert "refused a DFS referral to 127.0.0.77: not one of [smb] servers" in caplog.text
    assert accepted == 0
