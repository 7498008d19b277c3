"""Scan to an SMB share through a real ``dsc serve`` (issue 21): the scanner speaks WS-DSP over a
real socket, the server writes over SMB 3 (encrypted, signed) to a real Samba ``smbd``, and the
test reads the share back with Samba's own ``smbclient`` or straight from the share's folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsc_core.model import FileShareInstructions
from e2e_support import (
    DEFAULT_SID,
    ServerProcess,
    Soap,
    Stream,
    dsc,
    file_sha256,
    started_servers,
)
from smb_support import SmbServer, need_smbclient
from waiting import wait_for

MiB = 1024 * 1024


@pytest.fixture
def serve(smbd: SmbServer, tmp_path: Path) -> Iterator[ServerProcess]:
    """``dsc serve`` with ``[smb]`` naming the test's smbd (and no local share at all)."""
    config = tmp_path / "dsc.toml"
    config.write_text(smbd.config())
    with started_servers() as start:
        yield start(ServerProcess(tmp_path / "data", config=config))


def scan(server: ServerProcess, unc: str, *images: bytes) -> str:
    client = Soap(server.url)
    token = client.create([FileShareInstructions((unc,))], root_name="Invoice")
    for n, data in enumerate(images, 1):
        client.send_image(token, n, data)
    client.end(token)
    return token


def delivered(server: ServerProcess, token: str) -> list[str]:
    """What the job record says its file share filter wrote (issue 19), by ``dsc job``."""
    run = dsc("job", token, "--server", server.url, "--json")
    assert run.code == 0, run
    [fileshare] = run.json()["filters"]
    names: list[str] = fileshare["delivered"]
    return names


def test_a_scan_lands_on_the_share(serve: ServerProcess, smbd: SmbServer, tmp_path: Path) -> None:
    need_smbclient()
    first, second = b"%PDF-1.7 first page" * 1000, b"\x89PNG second" * 5000
    token = scan(serve, rf"\\{smbd.address}\scans\e2e", first, second)

    ended = Soap(serve.url).wait_ended(token, 30)

    assert ended.state == "Completed", ended
    assert [f.state for f in ended.filters] == ["CompletedSuccessfully"]
    folder = f"e2e/{DEFAULT_SID}"
    assert smbd.read_back(f"{folder}/Invoice_0001.png", tmp_path / "1") == first
    assert smbd.read_back(f"{folder}/Invoice_0002.png", tmp_path / "2") == second
    assert sorted(p.name for p in (smbd.scans / "e2e" / DEFAULT_SID).iterdir()) == [
        "Invoice_0001.png",
        "Invoice_0002.png",
    ]
    # The job names each file by its UNC path on the share.
    unc = rf"\\{smbd.address}\scans\e2e\{DEFAULT_SID}"
    assert delivered(serve, token) == [rf"{unc}\Invoice_0001.png", rf"{unc}\Invoice_0002.png"]


def test_an_existing_name_is_not_overwritten(serve: ServerProcess, smbd: SmbServer) -> None:
    folder = smbd.scans / "taken-e2e" / DEFAULT_SID
    folder.mkdir(parents=True)
    (folder / "Invoice_0001.png").write_bytes(b"a colleague's scan")
    smbd.give(folder.parent, folder, folder / "Invoice_0001.png")

    token = scan(serve, rf"\\{smbd.address}\scans\taken-e2e", b"\x89PNG new")
    ended = Soap(serve.url).wait_ended(token, 30)

    assert [f.state for f in ended.filters] == ["CompletedSuccessfully"], ended
    assert (folder / "Invoice_0001.png").read_bytes() == b"a colleague's scan"
    assert (folder / "Invoice_0002.png").read_bytes() == b"\x89PNG new"
    assert sorted(p.name for p in folder.iterdir()) == ["Invoice_0001.png", "Invoice_0002.png"]


def test_a_denied_share_is_file_share_access_denied(serve: ServerProcess, smbd: SmbServer) -> None:
    token = scan(serve, rf"\\{smbd.address}\denied\x", b"\x89PNG")
    ended = Soap(serve.url).wait_ended(token, 30)
    assert [(f.state, f.reasons) for f in ended.filters] == [
        ("CompletedWithErrors", ("FileShareAccessDenied",))
    ], ended


def test_kill9_during_delivery_then_restart_delivers_each_document_once(
    serve: ServerProcess, smbd: SmbServer
) -> None:
    """R13 over SMB: the server dies (SIGKILL) while it writes the second of three documents to
    the share; restarted on the same data, it resumes the job and the share ends with each
    document exactly once, whole, under its own name, and no temporary file."""
    client = Soap(serve.url)
    token = client.create([FileShareInstructions((rf"\\{smbd.address}\scans\crash",))])
    images = [Stream(size, seed=20 + n) for n, size in enumerate((8 * MiB, 96 * MiB, 8 * MiB))]
    for n, image in enumerate(images, 1):
        client.send_image(token, n, image, image.size)
    folder = smbd.scans / "crash" / DEFAULT_SID

    second = folder / f".dsc-{token}-2.part"  # the filter's temporary name for document 2

    def writing_the_second() -> bool:
        return _size(second) > 0

    client.end(token)
    wait_for(writing_the_second, 60, "the server writing document 2 to the share", 0.005)
    serve.kill9()
    assert second.exists() and "scan_0002.png" not in {p.name for p in folder.iterdir()}, (
        "the kill came after the write: nothing was tested"
    )

    serve.start()
    ended = Soap(serve.url).wait_ended(token, 60)

    assert f"job {token} was processing when the server stopped: resumed" in serve.log
    assert ended.state == "Completed", ended
    assert [f.state for f in ended.filters] == ["CompletedSuccessfully"]
    on_share = sorted(p.name for p in folder.iterdir())
    assert on_share == ["scan_0001.png", "scan_0002.png", "scan_0003.png"], on_share
    for n, image in enumerate(images, 1):
        assert file_sha256(folder / f"scan_{n:04d}.png") == image.sha.hexdigest()
    digests = {file_sha256(p) for p in folder.iterdir()}
    assert len(digests) == 3
    # The job record names each file once: the resumed run's report, the first run's lost.
    unc = rf"\\{smbd.address}\scans\crash\{DEFAULT_SID}"
    assert delivered(serve, token) == [rf"{unc}\scan_{n:04d}.png" for n in (1, 2, 3)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_400_mb_image_streams_to_the_share_with_flat_rss(
    serve: ServerProcess, smbd: SmbServer
) -> None:
    """400 MB through ``dsc serve`` to the share: received and delivered in chunks, so the
    server's peak RSS stays far below the image (the bounded 40 MB case runs in
    tests/bindings/test_filters_smb.py)."""
    client = Soap(serve.url)
    token = client.create([FileShareInstructions((rf"\\{smbd.address}\scans\big-e2e",))])
    image = Stream(400 * MiB, seed=40)
    client.send_image(token, 1, image, image.size)
    client.end(token)
    ended = client.wait_ended(token, 120)
    peak = serve.status("VmHWM")

    assert ended.state == "Completed", ended
    delivered = smbd.scans / "big-e2e" / DEFAULT_SID / "scan_0001.png"
    assert delivered.stat().st_size == image.size
    assert file_sha256(delivered) == image.sha.hexdigest()
    assert peak < 100 * MiB, f"peak RSS {peak / MiB:.1f} MiB for a 400 MiB image"
    print(f"dsc serve peak RSS {peak / MiB:.1f} MiB for a 400 MiB image delivered over SMB")
    delivered.unlink()
    shutil.rmtree(serve.data / "spool", ignore_errors=True)
