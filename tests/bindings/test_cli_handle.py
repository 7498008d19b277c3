"""`dsc handle`: one request through a fresh core, printed as status line, type and body."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lxml import etree

from dsc_bindings.console.handle import split_mime_head
from dsc_bindings.console.main import main
from helpers import hardware_examples, payload, text, xp


def run(args: list[str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "dsc_bindings.console.main", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


def split_reply(out: bytes) -> tuple[str, str, bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    status, ctype = head.decode().split("\r\n")
    return status, ctype, body


def test_handle_published_example_file(spec: Path) -> None:
    code, out, err = run(["handle", str(spec / "examples/01-GetRepositoryElements-request.xml")])
    assert code == 0, err
    status, ctype, body = split_reply(out)
    assert status == "HTTP/1.1 200 OK"
    assert ctype == "Content-Type: application/soap+xml; charset=utf-8"
    data = payload(body)
    assert etree.QName(data).localname == "GetRepositoryElementsResponse"
    assert (
        text(etree.fromstring(body), "//wsa:RelatesTo")
        == "urn:uuid:5e00a5c1-29e7-4361-a42e-1f00013e973c"
    )


def test_handle_reads_stdin_and_reports_faults_with_exit_status(spec: Path) -> None:
    body = (spec / "examples/03-GetActiveJobs-request.xml").read_bytes()  # not well-formed
    code, out, _ = run(["handle"], stdin=body)
    assert code == 1
    status, _, reply = split_reply(out)
    assert status == "HTTP/1.1 400 Bad Request"
    fault = etree.fromstring(reply)
    assert text(fault, "//soap:Code/soap:Value") == "soap:Sender"
    assert not xp(fault, "//soap:Subcode")


def test_handle_takes_content_type_from_the_files_own_mime_head(spec: Path, tmp_path: Path) -> None:
    example = tmp_path / "send-image.txt"
    example.write_text(hardware_examples(spec)["SendImageRequest"], encoding="utf-8")
    code, out, _err = run(["handle", str(example), "--commands"])
    status, _, reply = split_reply(out)
    # A fresh core has no job 264a19bf-...: the MTOM body was parsed and the token looked up.
    assert status == "HTTP/1.1 400 Bad Request", reply
    fault = etree.fromstring(reply)
    assert text(fault, "//soap:Subcode/soap:Value") == "dsp:ClientErrorJobTokenNotFound"
    assert text(fault, "//soap:Detail/dsp:JobToken") == "264a19bf-3604-4603-b59d-b47e0f669a1e"
    assert code == 1


def test_handle_explicit_content_type_and_commands(spec: Path, tmp_path: Path) -> None:
    create = tmp_path / "create.xml"
    create.write_text(hardware_examples(spec)["CreatePostScanJobRequest"], encoding="utf-8")
    code, out, err = run(
        [
            "handle",
            str(create),
            "--content-type",
            "application/soap+xml; charset=utf-8",
            "--commands",
            "--pretty",
        ]
    )
    assert code == 0
    status, _, reply = split_reply(out)
    assert status == "HTTP/1.1 200 OK"
    assert text(etree.fromstring(reply), "//dsp:JobToken")
    assert b"command: CreateJob(" in err
    assert b"\n  <soap:Header>" in reply  # --pretty indents


def test_split_mime_head_variants() -> None:
    assert split_mime_head(b"<soap:Envelope/>") == (None, b"<soap:Envelope/>")
    ctype, body = split_mime_head(b"Content-Type: Multipart/Related;\n  boundary=b1\n\n--b1")
    assert ctype == "Multipart/Related; boundary=b1"
    assert body == b"--b1"


def test_missing_file_is_one_clear_line(tmp_path: Path, capsys: object) -> None:
    code = main(["handle", str(tmp_path / "nope.xml")])
    assert code == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("dsc: cannot read") and "Traceback" not in err


def test_help_lists_every_command() -> None:
    code, out, _ = run(["--help"])
    assert code == 0
    for command in ("serve", "handle", "scan", "repo", "jobs", "history", "job", "cancel"):
        assert command.encode() in out
