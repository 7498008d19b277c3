"""``dsc scan`` against a real ``dsc serve``: the server's 413 read and shown (not a broken pipe),
the job it created canceled when an upload fails or on Ctrl-C (a real SIGINT to a real process),
a directory of files sent in order, the TIFF compression read from the header, and ``-q``."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_support import stalling_relay
from dsc_bindings.console.formats import format_for, read_tiff
from e2e_support import ServerProcess, Soap, child_env, dsc, serving

#: The server's image limit in these tests: small, so that the refusals cost little.
IMAGE_LIMIT = 4 * 1024 * 1024
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def tiff(compression: int, *, pages: int = 1, order: str = "<") -> bytes:
    """A classic TIFF: header, then ``pages`` IFDs each with ImageWidth and Compression."""
    mark = b"II*\x00" if order == "<" else b"MM\x00*"
    out = bytearray(mark + struct.pack(order + "I", 8))
    for page in range(pages):
        start = len(out)
        entries = [(256, 3, 1, struct.pack(order + "H", 8) + b"\0\0")]
        entries.append((259, 3, 1, struct.pack(order + "H", compression) + b"\0\0"))
        out += struct.pack(order + "H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack(order + "HHI", tag, kind, count) + value
        following = start + 2 + 12 * len(entries) + 4 if page < pages - 1 else 0
        out += struct.pack(order + "I", following)
    return bytes(out + os.urandom(64))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("scan")
    config = root / "dsc.toml"
    config.write_text(f"[limits]\nmax_image_bytes = {IMAGE_LIMIT}\n")
    with serving(ServerProcess(root / "data", config=config)) as server:
        yield server


def created_token(err: str) -> str:
    found = re.search(r"^job (\S+) created$", err, re.M)
    assert found, err
    return found.group(1)


def png(path: Path, size: int) -> Path:
    path.write_bytes(PNG_HEAD + os.urandom(size - len(PNG_HEAD)))
    return path


@pytest.mark.parametrize(
    ("size", "said"),
    [
        # Declared length beyond the body limit: the binding answers 413 before reading it.
        (IMAGE_LIMIT + 2 * 1024 * 1024, "413 Request Entity Too Large: The request body of"),
        # Within the body limit but the image part beyond max_image_bytes: the core's fault.
        (IMAGE_LIMIT + 1024, f"The image exceeds the limit of {IMAGE_LIMIT} bytes"),
    ],
    ids=["body-limit", "image-limit"],
)
def test_a_refused_upload_shows_the_servers_reason_and_cancels_the_job(
    server: ServerProcess, tmp_path: Path, size: int, said: str
) -> None:
    run = dsc("scan", "--server", server.url, str(png(tmp_path / "big.png", size)))
    assert run.code == 1, run
    token = created_token(run.err)
    last = run.err.strip().splitlines()[-1]
    assert last.startswith("dsc: uploading big.png failed: "), last
    assert said in last and "max_image_bytes" in last, last
    assert "Broken pipe" not in run.err and "Traceback" not in run.err, run.err
    assert last.endswith(f"; job {token} canceled"), last
    ended = Soap(server.url).wait_ended(token)
    assert ended.state == "Canceled" and ended.images_received == 0, ended


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_an_upload_cancels_the_job(server: ServerProcess, tmp_path: Path) -> None:
    big = png(tmp_path / "big.png", 3 * 1024 * 1024)
    with stalling_relay(server.port) as relay:
        scan = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dsc_bindings.console.main",
                "scan",
                "--server",
                relay.url(),
                str(big),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            # As from a terminal: a suite run as a background job (`.ci/run &`) has SIGINT
            # ignored, its children inherit that, and Python then never raises
            # KeyboardInterrupt: Ctrl-C would be a no-op and the test would hang.
            preexec_fn=_default_sigint,
        )
        try:
            # The relay holds the upload after its first megabyte: the client is mid-upload.
            assert relay.stalled.wait(30), "the upload never reached the relay"
            scan.send_signal(signal.SIGINT)
            _, err = scan.communicate(timeout=30)
        finally:
            if scan.poll() is None:
                scan.kill()
                scan.wait(5)
    text = err.decode()
    assert scan.returncode == 130, text
    token = created_token(text)
    assert f"dsc: interrupted; job {token} canceled" in text, text
    assert "Traceback" not in text, text
    ended = Soap(server.url).wait_ended(token)
    assert ended.state == "Canceled", ended


def test_a_directory_is_scanned_file_by_file_in_name_order(
    server: ServerProcess, tmp_path: Path
) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "3.tif").write_bytes(tiff(4))
    (pages / "1.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(500))
    png(pages / "2.png", 600)
    (pages / ".DS_Store").write_bytes(b"junk")  # hidden: never a page
    (pages / "sub").mkdir()
    run = dsc("scan", "--server", server.url, "-q", "--json", str(pages))
    assert run.code == 0, run
    assert run.err == "", run.err  # -q: nothing but the result
    token = run.json()["token"]
    assert run.json()["images_received"] == 3
    job = dsc("job", token, "--json", "--server", server.url).json()
    assert [(d["id"], d["format"]) for d in job["documents"]] == [
        ("1", "pdf-a"),
        ("2", "png"),
        ("3", "tiff-single-g4"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = dsc("scan", "--server", server.url, str(empty))
    assert refused.code == 2 and "no files to scan in the directory" in refused.err, refused
    missing = dsc("scan", "--server", server.url, str(tmp_path / "nowhere"))
    assert missing.code == 2 and "no such file or directory" in missing.err, missing


@pytest.mark.parametrize(
    ("compression", "pages", "order", "expected"),
    [
        (1, 1, "<", "tiff-single-uncompressed"),
        (4, 1, ">", "tiff-single-g4"),
        (2, 1, "<", "tiff-single-g3mh"),
        (3, 2, "<", "tiff-multi-g3mh"),
        (7, 1, ">", "tiff-single-jpeg-tn2"),
        (4, 3, "<", "tiff-multi-g4"),
        (1, 2, ">", "tiff-multi-uncompressed"),
    ],
)
def test_tiff_format_from_the_compression_tag(
    tmp_path: Path, compression: int, pages: int, order: str, expected: str
) -> None:
    path = tmp_path / "scan.tif"
    path.write_bytes(tiff(compression, pages=pages, order=order))
    assert format_for(path, None) == (expected, None)
    # A name without the extension: the content decides, with the same reading.
    bare = tmp_path / "scan"
    bare.write_bytes(path.read_bytes())
    assert format_for(bare, None) == (expected, None)


def test_tiff_without_a_ws_scan_format_or_contradicting_format(tmp_path: Path) -> None:
    lzw = tmp_path / "lzw.tif"
    lzw.write_bytes(tiff(5))
    info = read_tiff(lzw)
    assert info is not None and info.compression == 5 and info.format is None
    fmt, warning = format_for(lzw, None)
    assert fmt == "tiff-single-uncompressed"
    assert warning and "compression (5) has no WS-Scan format" in warning
    g4 = tmp_path / "g4.tif"
    g4.write_bytes(tiff(4))
    fmt, warning = format_for(g4, "tiff-single-uncompressed")
    assert fmt == "tiff-single-uncompressed"
    assert (
        warning
        == "g4.tif: sent as tiff-single-uncompressed, but its TIFF header says tiff-single-g4"
    )
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00\xff\xff\xff\x00")  # the IFD offset points past the end
    fmt, warning = format_for(broken, None)
    assert (
        fmt == "tiff-single-uncompressed" and warning and "cannot read its TIFF header" in warning
    )


def test_scan_help_tells_the_three_process_options_apart() -> None:
    helped = dsc("scan", "--help")
    assert helped.code == 0
    text = " ".join(helped.out.split())
    assert "--process-id GUID only a label" in text, text
    assert "--process-name TEXT only a label" in text, text
    assert "look up the scan process NAME in the directory" in text, text
    assert "-q, --quiet" in text
    assert "or a directory: every file in it, sorted by name" in text
