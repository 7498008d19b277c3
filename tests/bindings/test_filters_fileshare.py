"""File share filter (R9): mapping, sub-folder per user, names, no overwrite, cancel."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dsc_bindings.filters import (
    FilterOutcome,
    FilterSettings,
    document_file_name,
    fileshare,
    parse_unc,
    sanitize_name,
    sharefolder,
)
from dsc_bindings.filters.interruption import Interrupted
from dsc_bindings.filters.sharejournal import ResumeJournal
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interruption import interrupting
from dsc_core.model import Document, FileShareInstructions, FilterState, FilterStateReason, Job
from test_filters_support import make_documents, make_job, random_bytes, second_away
from waiting import wait_for


def run(
    job: Job,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event | None = None,
) -> FilterOutcome:
    return fileshare.run(job, 0, documents, settings, cancelled or threading.Event())


def test_default_mapping_writes_under_user_folder(tmp_path: Path) -> None:
    settings = FilterSettings.embedded_default(tmp_path / "data")
    big = random_bytes(700_000)
    docs = make_documents(tmp_path / "spool", ("pdf-a", big), ("tiff-single-g4", b"II*\0tiny"))
    job = make_job(FileShareInstructions((r"\\FileSrv\Scans\Finance",)))

    outcome = run(job, docs, settings)

    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY and outcome.reasons == ()
    folder = tmp_path / "data/shares/filesrv/scans/Finance/alice@corp.example"
    assert sorted(p.name for p in folder.iterdir()) == ["Scan_0001.pdf", "Scan_0002.tif"]
    assert (folder / "Scan_0001.pdf").read_bytes() == big
    assert (folder / "Scan_0002.tif").read_bytes() == b"II*\0tiny"
    # The outcome names each file written (issue 19), for the job record.
    assert outcome.delivered == (str(folder / "Scan_0001.pdf"), str(folder / "Scan_0002.tif"))


def test_configured_root_and_several_shares(tmp_path: Path) -> None:
    settings = FilterSettings(
        share_roots=((r"\\srv\scans", tmp_path / "a"), (r"\\SRV\Archive", tmp_path / "b"))
    )
    docs = make_documents(tmp_path / "spool", ("png", b"\x89PNG1"))
    job = make_job(
        FileShareInstructions((r"\\Srv\Scans", r"\\srv\archive\2024\\")),
        document_root_name="Invoice",
    )

    outcome = run(job, docs, settings)
    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY
    assert (tmp_path / "a/alice@corp.example/Invoice_0001.png").read_bytes() == b"\x89PNG1"
    assert (tmp_path / "b/2024/alice@corp.example/Invoice_0001.png").read_bytes() == b"\x89PNG1"
    assert outcome.delivered == (
        str(tmp_path / "a/alice@corp.example/Invoice_0001.png"),
        str(tmp_path / "b/2024/alice@corp.example/Invoice_0001.png"),
    )


@pytest.mark.parametrize(
    "unc",
    [
        r"\\other\scans\x",  # under no root
        r"\\srv\scans\..\..\etc",  # climbing out
        r"\\srv\scans\\x",  # empty component
        r"C:\scans",  # drive letter
        r"\\srv\scans\C:\x",
        r"\\?\C:\scans",  # device namespace
        r"\\srv",  # no share
        "/etc/passwd",
    ],
)
def test_path_outside_roots_is_refused(tmp_path: Path, unc: str) -> None:
    settings = FilterSettings(share_roots=((r"\\srv\scans", tmp_path / "root"),))
    docs = make_documents(tmp_path / "spool", ("png", b"x"))
    # The refused path comes second: nothing may be written to the good first one either.
    job = make_job(FileShareInstructions((r"\\srv\scans\ok", unc)))

    outcome = run(job, docs, settings)

    assert outcome.state is FilterState.CANCELED
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)
    assert not (tmp_path / "root").exists()


def test_parse_unc() -> None:
    assert parse_unc(r"\\h\s\p") == ("h", "s", "p")
    assert parse_unc("//h/s/") == ("h", "s")
    assert parse_unc("\\\\") == ()
    assert parse_unc(r"\\h\s\...") is None
    assert parse_unc("\\\\h\\s\\a\x01b") is None


@pytest.mark.parametrize(
    "root, expected",
    [
        ("..\\..\\etc", "_._etc_0001.pdf"),
        ("CON", "_CON_0001.pdf"),
        ("con.backup", "_con.backup_0001.pdf"),
        ("a/b", "a_b_0001.pdf"),
        (" .hidden. ", "hidden_0001.pdf"),
        ("", "Scan_0001.pdf"),
        ("tab\there", "tab_here_0001.pdf"),
    ],
)
def test_names_are_sanitized(tmp_path: Path, root: str, expected: str) -> None:
    settings = FilterSettings.embedded_default(tmp_path)
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"%PDF"))
    job = make_job(
        FileShareInstructions((r"\\h\s",)), document_root_name=root, user_name="..\\..\\evil/user"
    )

    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    share = tmp_path / "shares/h/s"
    [user_dir] = list(share.iterdir())
    assert user_dir.name == "_._evil_user"
    assert [p.name for p in user_dir.iterdir()] == [expected]


def test_sanitize_caps_length_and_device_names() -> None:
    assert len(sanitize_name("é" * 500).encode()) <= 200
    for device in ("NUL", "aux", "COM1", "lpt9.txt", "PRN "):
        assert sanitize_name(device).startswith("_")
    assert sanitize_name("COM10") == "COM10"
    assert document_file_name("Scan", 12, "jfif") == "Scan_0012.jpg"


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    settings = FilterSettings.embedded_default(tmp_path)
    folder = tmp_path / "shares/h/s/alice@corp.example"
    folder.mkdir(parents=True)
    (folder / "Scan_0001.pdf").write_bytes(b"old one")
    (folder / "Scan_0003.pdf").write_bytes(b"old three")
    docs = make_documents(tmp_path / "spool", ("pdf-a", b"new A"), ("pdf-a", b"new B"))

    assert (
        run(make_job(FileShareInstructions((r"\\h\s",))), docs, settings).state
        is FilterState.COMPLETED_SUCCESSFULLY
    )

    assert (folder / "Scan_0001.pdf").read_bytes() == b"old one"
    assert (folder / "Scan_0002.pdf").read_bytes() == b"new A"
    assert (folder / "Scan_0003.pdf").read_bytes() == b"old three"
    assert (folder / "Scan_0004.pdf").read_bytes() == b"new B"


def test_symlink_in_the_way_is_skipped_not_followed(tmp_path: Path) -> None:
    settings = FilterSettings.embedded_default(tmp_path)
    folder = tmp_path / "shares/h/s/alice@corp.example"
    folder.mkdir(parents=True)
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    (folder / "Scan_0001.png").symlink_to(target)
    docs = make_documents(tmp_path / "spool", ("png", b"scan"))

    assert (
        run(make_job(FileShareInstructions((r"\\h\s",))), docs, settings).state
        is FilterState.COMPLETED_SUCCESSFULLY
    )
    assert target.read_bytes() == b"precious"
    assert (folder / "Scan_0002.png").read_bytes() == b"scan"


def test_unwritable_share_is_access_denied(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root ignores directory permissions; sysfs refuses everyone (EPERM) instead.
        root = Path("/sys/dsc-test-share")
    else:
        root = tmp_path / "ro"
        root.mkdir(mode=0o555)
    settings = FilterSettings(share_roots=((r"\\h\s", root),))
    docs = make_documents(tmp_path / "spool", ("png", b"x"))
    outcome = run(make_job(FileShareInstructions((r"\\h\s",))), docs, settings)
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)


def test_errno_mapping() -> None:
    reason = fileshare._reason_for
    assert reason(OSError(errno.ENOSPC, "full")) is FilterStateReason.FILE_SHARE_OUT_OF_DISK_SPACE
    assert reason(OSError(errno.EDQUOT, "quota")) is FilterStateReason.FILE_SHARE_OUT_OF_DISK_SPACE
    assert reason(OSError(errno.EACCES, "no")) is FilterStateReason.FILE_SHARE_ACCESS_DENIED
    assert reason(OSError(errno.EPERM, "no")) is FilterStateReason.FILE_SHARE_ACCESS_DENIED
    assert reason(OSError(errno.EIO, "io")) is FilterStateReason.UNKNOWN_ERROR


def test_share_directory_blocked_by_a_file_is_an_error(tmp_path: Path) -> None:
    settings = FilterSettings.embedded_default(tmp_path)
    (tmp_path / "shares/h").mkdir(parents=True)
    (tmp_path / "shares/h/s").write_bytes(b"a file, not a directory")
    docs = make_documents(tmp_path / "spool", ("png", b"x"))
    outcome = run(make_job(FileShareInstructions((r"\\h\s",))), docs, settings)
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.UNKNOWN_ERROR,)


def test_missing_stored_document_is_unknown_error(tmp_path: Path) -> None:
    settings = FilterSettings.embedded_default(tmp_path)
    docs = [(Document(1, "png", 3), tmp_path / "missing.bin")]
    outcome = run(make_job(FileShareInstructions((r"\\h\s",))), docs, settings)
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.UNKNOWN_ERROR,)
    assert list((tmp_path / "shares/h/s/alice@corp.example").iterdir()) == []


def test_cancel_mid_copy_removes_the_partial_file(tmp_path: Path) -> None:
    """The second document is a FIFO fed by the test, so the copy is provably in the middle of
    a file when the cancel comes; the finished first document stays (R6)."""
    settings = FilterSettings(share_roots=((r"\\h\s", tmp_path / "out"),), chunk_size=16 * 1024)
    docs = make_documents(tmp_path / "spool", ("png", b"first, complete"))
    fifo = tmp_path / "spool/doc2.bin"
    os.mkfifo(fifo)
    docs.append((Document(2, "png"), fifo))
    cancelled = threading.Event()
    result: list[FilterOutcome] = []
    job = make_job(FileShareInstructions((r"\\h\s",)))
    worker = threading.Thread(target=lambda: result.append(run(job, docs, settings, cancelled)))
    worker.start()
    folder = tmp_path / "out/alice@corp.example"
    # Written under a hidden temporary name until complete (R13: never a partial file that
    # looks like a document).
    partial = folder / f".dsc-{job.token}-2.part"
    with open(fifo, "wb", buffering=0) as feed:
        feed.write(b"A" * 40_000)
        wait_for(
            lambda: partial.exists() and partial.stat().st_size > 0,
            30,
            "the copy to start",
            interval=0.005,
        )
        cancelled.set()
        try:
            feed.write(b"B" * 1000)  # wakes the reader, which then sees the cancel
        except BrokenPipeError:
            pass
        worker.join(30)
    assert not worker.is_alive()
    [outcome] = result
    assert outcome.state is FilterState.CANCELED and outcome.reasons == ()
    assert [p.name for p in folder.iterdir()] == ["Scan_0001.png"]
    assert (folder / "Scan_0001.png").read_bytes() == b"first, complete"


# --- R13: run again after a crash, each document reaches the share once ----------------------


def _crash_setup(tmp_path: Path) -> tuple[FilterSettings, list[tuple[Document, Path]], Any, Path]:
    settings = FilterSettings(share_roots=((r"\\h\s", tmp_path / "out"),), chunk_size=4096)
    docs = make_documents(
        tmp_path / "spool", ("png", b"one" * 5000), ("png", b"two" * 5000), ("pdf-a", b"3" * 9)
    )
    job = make_job(FileShareInstructions((r"\\h\s",)), document_root_name="inv")
    return settings, docs, job, tmp_path / "out" / "alice@corp.example"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_second_run_delivers_nothing_again(tmp_path: Path) -> None:
    settings, docs, job, folder = _crash_setup(tmp_path)
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]
    # Another job with the same root name still gets fresh names (R9: never overwrite).
    other = make_job(FileShareInstructions((r"\\h\s",)), document_root_name="inv")
    assert run(other, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert len(_names(folder)) == 6 and "inv_0005.pdf" in _names(folder)


def test_partial_file_of_the_interrupted_run_is_replaced(tmp_path: Path) -> None:
    """As a kill -9 leaves it: document 1 delivered and journaled, document 2 half written."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    run(job, docs[:1], settings)
    (folder / f".dsc-{job.token}-2.part").write_bytes(b"two" * 100)  # torn
    with open(tmp_path / "spool" / ".fileshare-0.journal", "a") as journal:
        journal.write('{"dir": "torn')  # a journal line cut short by the crash
    again = run(job, docs, settings)
    assert again.state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]
    # The re-run names every file of the job, the one the first run wrote included.
    assert again.delivered == tuple(str(folder / n) for n in _names(folder))
    assert (folder / "inv_0002.png").read_bytes() == b"two" * 5000


def test_a_document_the_store_cannot_give_interrupts_the_run_midway(tmp_path: Path) -> None:
    """The store stops answering as the filter reads document 2, inside the share folder
    with document 1 delivered: the run ends in Interrupted, no outcome (the guard's
    ``except Exception`` does not take it, filters/interruption.py), and leaves no partial
    file; the resumed run (R13) delivers the rest, document 1 once."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    with pytest.raises(Interrupted):
        run(job, second_away(docs), settings)
    assert _names(folder) == ["inv_0001.png"]
    again = run(job, docs, settings)
    assert again.state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]


def test_a_journal_the_store_cannot_answer_leaves_no_temporary_file(tmp_path: Path) -> None:
    """The file share's own store call (its lease check before a file takes its final name,
    store/pgdeliveries.py) meets a store that does not answer at document 2: Interrupted goes
    through the filter's cleanup (``except BaseException: ...; raise``), which takes the
    temporary file away; nothing of document 2 is visible, and the resumed run writes it."""
    settings, docs, job, folder = _crash_setup(tmp_path)

    class StoreAwayAtTheSecond(ResumeJournal):
        def check(self) -> None:
            if self.done:
                with interrupting():
                    raise StoreError("checking the lease: the database does not answer", True)

    journal = StoreAwayAtTheSecond.of(job, docs, 0)
    away = dataclasses.replace(settings, journal_of=lambda job, documents, index: journal)
    with pytest.raises(Interrupted):
        run(job, docs, away)
    assert _names(folder) == ["inv_0001.png"]
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]


def test_linked_but_not_journaled_is_not_delivered_twice(tmp_path: Path) -> None:
    """Killed between the link that made document 2 visible and its journal line."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    run(job, docs[:1], settings)
    tmp = folder / f".dsc-{job.token}-2.part"
    tmp.write_bytes(b"two" * 5000)
    os.link(tmp, folder / "inv_0002.png")
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]


def test_without_hard_links_names_are_reserved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, docs, job, folder = _crash_setup(tmp_path)
    folder.mkdir(parents=True)
    (folder / "inv_0001.png").write_bytes(b"someone else's")

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.png", "inv_0004.pdf"]
    assert (folder / "inv_0001.png").read_bytes() == b"someone else's"
    assert (folder / "inv_0002.png").read_bytes() == b"one" * 5000


def test_planted_link_under_the_temporary_name_is_not_written_through(tmp_path: Path) -> None:
    """A share user who plants a hard link to another file under the temporary name: the
    filter replaces the name, the other file is untouched."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    folder.mkdir(parents=True)
    victim = tmp_path / "elsewhere.txt"
    victim.write_bytes(b"precious")
    os.link(victim, folder / f".dsc-{job.token}-1.part")
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert victim.read_bytes() == b"precious"
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]
    assert (folder / "inv_0001.png").read_bytes() == b"one" * 5000


# --- issue 14 §4: a share whose users plant links ---------------------------------------------


@pytest.mark.parametrize(
    "unc, planted",
    [
        (r"\\h\s", "alice@corp.example"),  # the user folder
        (r"\\h\s\sub\deeper", "sub"),  # a sub-folder of the instructions
    ],
)
def test_a_folder_planted_as_a_symlink_is_never_followed(
    tmp_path: Path, unc: str, planted: str
) -> None:
    settings = FilterSettings(share_roots=((r"\\h\s", tmp_path / "share"),))
    (tmp_path / "share").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "share" / planted).symlink_to(outside)
    docs = make_documents(tmp_path / "spool", ("png", b"scan"))

    outcome = run(make_job(FileShareInstructions((unc,))), docs, settings)

    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)
    assert list(outside.rglob("*")) == []  # nothing written, no folder made out there


def test_a_symlinked_host_folder_below_the_embedded_root_is_not_followed(tmp_path: Path) -> None:
    settings = FilterSettings.embedded_default(tmp_path / "data")
    (tmp_path / "data/shares").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data/shares/h").symlink_to(outside)
    docs = make_documents(tmp_path / "spool", ("png", b"scan"))
    outcome = run(make_job(FileShareInstructions((r"\\H\s",))), docs, settings)
    assert outcome.reasons == (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)
    assert list(outside.rglob("*")) == []


def test_the_configured_root_may_be_a_symlink(tmp_path: Path) -> None:
    """The administrator's own root is taken as configured (e.g. /srv/scans -> /mnt/nas)."""
    real = tmp_path / "nas"
    real.mkdir()
    (tmp_path / "scans").symlink_to(real)
    settings = FilterSettings(share_roots=((r"\\h\s", tmp_path / "scans"),))
    docs = make_documents(tmp_path / "spool", ("png", b"scan"))
    assert run(make_job(FileShareInstructions((r"\\h\s",))), docs, settings).state is (
        FilterState.COMPLETED_SUCCESSFULLY
    )
    assert (real / "alice@corp.example/Scan_0001.png").read_bytes() == b"scan"


def test_planted_hard_link_to_a_file_of_the_right_name_is_not_taken_for_the_document(
    tmp_path: Path,
) -> None:
    """The temporary name hard-linked to another job's delivered ``inv_0005.png``: the same
    inode under a name of the right form, owned by the server, but other bytes.  Taken for
    document 1, the document would never be delivered."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    folder.mkdir(parents=True)
    (folder / "inv_0005.png").write_bytes(b"six" * 5000)  # same size, other bytes
    os.link(folder / "inv_0005.png", folder / f".dsc-{job.token}-1.part")

    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY

    assert (folder / "inv_0001.png").read_bytes() == b"one" * 5000
    assert (folder / "inv_0005.png").read_bytes() == b"six" * 5000
    assert _names(folder) == [
        "inv_0001.png",
        "inv_0002.png",
        "inv_0003.pdf",
        "inv_0005.png",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_planted_hard_link_to_another_users_copy_is_not_taken_for_the_document(
    tmp_path: Path,
) -> None:
    """The same name form and the very bytes, but a file of another user of the share."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    folder.mkdir(parents=True)
    forged = folder / "inv_0001.png"
    forged.write_bytes(b"one" * 5000)
    os.chown(forged, 65534, 65534)
    os.link(forged, folder / f".dsc-{job.token}-1.part")

    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY

    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.png", "inv_0004.pdf"]
    assert (folder / "inv_0002.png").read_bytes() == b"one" * 5000
    assert (folder / "inv_0002.png").stat().st_uid == os.geteuid()


def test_planted_fifo_under_a_final_name_does_not_hang_the_resume(tmp_path: Path) -> None:
    """A damaged journal makes the filter look at the files of the folder: a FIFO of the right
    name form is skipped, not opened for a read that waits forever."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    folder.mkdir(parents=True)
    os.mkfifo(folder / "inv_0001.png")
    (tmp_path / "spool" / ".fileshare-0.journal").write_bytes(b"\xff\xfe garbage\n")
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert (folder / "inv_0002.png").read_bytes() == b"one" * 5000


# --- placing a final name never replaces one -----------------------------------------------


def _no_links(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("how", ["link", "renameat2", "reservation"])
def test_placing_a_name_never_replaces_an_existing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how != "link":
        monkeypatch.setattr(os, "link", _no_links)
    if how == "reservation":
        monkeypatch.setattr(sharefolder, "_libc_renameat2", lambda: None)
    elif how == "renameat2" and sharefolder._libc_renameat2() is None:
        pytest.skip("this C library has no renameat2 (glibc 2.28 or later has)")
    (tmp_path / "taken").write_bytes(b"precious")
    (tmp_path / "elsewhere").write_bytes(b"other")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / ".part").write_bytes(b"new")
    with sharefolder.open_share_folder(tmp_path, ()) as folder:
        assert not sharefolder.place_exclusive(folder, ".part", "taken")
        assert not sharefolder.place_exclusive(folder, ".part", "link")
        assert sharefolder.place_exclusive(folder, ".part", "free")
    assert (tmp_path / "taken").read_bytes() == b"precious"
    assert (tmp_path / "elsewhere").read_bytes() == b"other"
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "free").read_bytes() == b"new"


def test_open_share_folder_makes_missing_folders_and_refuses_links(tmp_path: Path) -> None:
    (tmp_path / "root/a").mkdir(parents=True)
    (tmp_path / "root/a/b").symlink_to(tmp_path)
    with sharefolder.open_share_folder(tmp_path / "root", ("x", "y")) as folder:
        assert folder.path == tmp_path / "root/x/y"
        assert os.path.samestat(os.fstat(folder.fd), os.stat(tmp_path / "root/x/y"))
    with (
        pytest.raises(sharefolder.PlantedLink) as planted,
        sharefolder.open_share_folder(tmp_path / "root", ("a", "b", "c")),
    ):
        pass
    assert planted.value.errno == errno.ELOOP
    assert str(tmp_path / "root/a/b") in str(planted.value)
    assert not (tmp_path / "c").exists()


# --- a damaged resume journal: no duplicates, no filter failing on every retry ---------------


@pytest.mark.parametrize(
    "damage",
    [
        b"\xff\xfe\x00not utf-8 at all\n",
        b"\x00" * 64 + b"\n",  # a block of zeros, as a crash can leave it
        b'["a list", 1]\n{"job": 1}\n{"job": null, "doc": 1e999}\n',
        b'{"dir": "torn',
    ],
)
def test_a_damaged_journal_neither_fails_nor_duplicates(
    tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Documents 1 and 2 delivered, then their journal lines lost to damage: the re-run
    recognises them on the share (name, owner, bytes) and delivers only document 3."""
    settings, docs, job, folder = _crash_setup(tmp_path)
    assert run(job, docs[:2], settings).state is FilterState.COMPLETED_SUCCESSFULLY
    journal = tmp_path / "spool" / ".fileshare-0.journal"
    journal.write_bytes(damage)

    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]
    assert "damaged line" in caplog.text and "WARNING" in caplog.text
    # The lines written since are readable: a third run has nothing to do and says so quietly.
    caplog.clear()
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["inv_0001.png", "inv_0002.png", "inv_0003.pdf"]
    if not damage.endswith(b"\n"):
        assert "damaged line" in caplog.text  # the torn line itself stays, counted once
    assert caplog.text.count("damaged line") <= 1


def test_a_damaged_journal_still_delivers_identical_pages_once_each(tmp_path: Path) -> None:
    """Two pages with the same bytes: the first delivered copy stands for one page only."""
    settings = FilterSettings(share_roots=((r"\\h\s", tmp_path / "out"),))
    docs = make_documents(tmp_path / "spool", ("png", b"blank"), ("png", b"blank"))
    job = make_job(FileShareInstructions((r"\\h\s",)))
    folder = tmp_path / "out/alice@corp.example"
    assert run(job, docs[:1], settings).state is FilterState.COMPLETED_SUCCESSFULLY
    (tmp_path / "spool" / ".fileshare-0.journal").write_bytes(b"\xc3\x28\n")
    assert run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    assert _names(folder) == ["Scan_0001.png", "Scan_0002.png"]


def test_a_journal_line_after_a_torn_one_is_kept(tmp_path: Path) -> None:
    """A line appended after a torn last line starts on a line of its own."""
    settings, docs, job, _folder = _crash_setup(tmp_path)
    journal = tmp_path / "spool" / ".fileshare-0.journal"
    (tmp_path / "spool").mkdir(exist_ok=True)
    journal.write_bytes(b'{"job": "torn')
    assert run(job, docs[:1], settings).state is FilterState.COMPLETED_SUCCESSFULLY
    lines = journal.read_bytes().split(b"\n")
    assert lines[0] == b'{"job": "torn' and job.token.encode() in lines[1]
