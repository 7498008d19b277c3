"""Every example runs (design.md: examples are runnable and run by the tests, so they cannot
drift from the core).  Each is run as a subprocess with a timeout, or imported and its ``main``
called with arguments; together they stay well under a few seconds."""

from __future__ import annotations

import http.client
import importlib.util
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from conftest import ROOT
from dsc_core import client, names
from dsc_core.model import FileShareInstructions

EXAMPLES = ROOT / "examples"
TIMEOUT = 30


def load(name: str) -> ModuleType:
    """Import an example by path (examples/ is not a package, on purpose: it is what a user
    copies)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def run_example(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_every_example_has_a_docstring_and_a_test() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    for path in sorted(EXAMPLES.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert text.startswith('"""'), f"{path.name} lacks a module docstring saying what it shows"
        assert f"{path.stem}.py" in source or f'load("{path.stem}")' in source, (
            f"{path.name} is not run by {Path(__file__).name}"
        )


# --- asyncio_server ----------------------------------------------------------------------------


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/ScanServer", body=body, headers={"Content-Type": client.SOAP_XML})
    response = conn.getresponse()
    return response.status, response.read()


def test_asyncio_server_answers_over_http() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "asyncio_server.py"), "--port", "0", "--requests", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"port (\d+)", first)
        assert match, f"first line does not name the port: {first!r}"
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)

        # Two requests on one keep-alive connection.
        status, body = _post(
            conn,
            client.envelope(
                names.Action.DSC_GET_REPOSITORY_ELEMENTS,
                client.repository_elements_request(["RepositoryConfiguration"]),
                message_id=f"urn:uuid:{uuid.uuid4()}",
            ),
        )
        assert status == 200
        response = client.parse_response(body, status)
        assert response.action == names.Action.DSC_GET_REPOSITORY_ELEMENTS + "Response"
        assert b"ftr:fileshare" in body

        status, body = _post(
            conn,
            client.envelope(
                names.Action.DSP_CREATE,
                client.create_post_scan_job(
                    user_identifier="S-1-5-21-0-0-0-1000",
                    psp_identifier="scan-to-folder",
                    instructions=[FileShareInstructions(("\\\\localhost\\scans",))],
                ),
                message_id=f"urn:uuid:{uuid.uuid4()}",
            ),
        )
        assert status == 200
        token = client.text_of(client.parse_response(body, status).payload, names.DSP, "JobToken")
        uuid.UUID(token)
        conn.close()

        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert f"{token[:8]} Creating" in out  # the dict store holds the job the core created
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- blocking_loop ---------------------------------------------------------------------------


def test_blocking_loop_demo_shares_state_and_ticks() -> None:
    result = run_example(str(EXAMPLES / "blocking_loop.py"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        "01-create.xml" in line and " 200 CreatePostScanJobResponse" in line for line in lines
    )
    # The SendImages found the job the first request created ($JOB_TOKEN) in the same server.
    assert sum(" 200 SendImageResponse" in line for line in lines) == 2
    assert any("05-status.xml" in line and "Completed images=2" in line for line in lines)
    assert any("ClientErrorJobTokenNotFound" in line for line in lines)
    # tick() after the clock passed next_deadline(): the abandoned job timed out (R6).
    assert any(" tick " in line and "DiscardDocuments" in line for line in lines)
    assert any("PostScanJobTimedOut" in line for line in lines)
    assert lines[-1].endswith("next deadline: none")


def test_blocking_loop_reads_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load("blocking_loop")
    assert example.main(["--write-demo", str(tmp_path)]) == 0
    capsys.readouterr()
    assert example.main([str(tmp_path), "--step", "5"]) == 0
    out = capsys.readouterr().out
    assert "09:00:05 02-send-image-1.mime" in out  # the virtual clock advanced by --step
    assert "Aborted" not in out  # no --advance: nothing timed out
    assert "next deadline: 2026-11-21T09:10:25+00:00" in out  # job 2 created at 09:00:25


# --- fuzz_harness ------------------------------------------------------------------------------


def test_fuzz_harness_random_run() -> None:
    # A fixed seed makes the inputs reproducible (only the core decides whether they pass);
    # 1000 of them reach every allowed status (200, 400, 413, 500) in well under a second.
    example = load("fuzz_harness")
    assert example.main(["--engine", "random", "--iterations", "1000", "--seed", "1"]) == 0


def test_fuzz_harness_as_a_program_and_its_corpus(tmp_path: Path) -> None:
    result = run_example(
        str(EXAMPLES / "fuzz_harness.py"), "--engine", "random", "--iterations", "50", "--seed", "7"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "invariant held" in result.stdout
    example = load("fuzz_harness")
    paths = example.write_corpus(tmp_path)
    assert len(paths) >= 5
    for path in paths:  # every seed passes the invariant through the atheris entry point
        example.test_one_input(path.read_bytes())
    ctype, chunk, body = example.decode_input(example.encode_input("text/odd", 9, b"<x/>"))
    assert (ctype, chunk, body) == ("text/odd", 9, b"<x/>")


def test_fuzz_harness_catches_a_broken_invariant() -> None:
    """The harness is not vacuous: a reply that is no SOAP envelope is reported."""
    example = load("fuzz_harness")
    from dsc_core import Outcome, Reply

    with pytest.raises(example.InvariantBroken):
        example.check_reply(Outcome(Reply(200, "application/soap+xml", b"<html/>")))
    with pytest.raises(example.InvariantBroken):
        example.check_reply(Outcome(Reply(302, "application/soap+xml", b"")))


def test_fuzz_regression_mime_error_after_root_part() -> None:
    """Found by this harness: a MIME error in the same chunk as the end of the root part used to
    drop that part's events, so whether the envelope was read (its XML fault, RelatesTo, the
    BeginDocument) depended on the chunk sizes."""
    example = load("fuzz_harness")
    content_type = 'multipart/related; boundary="b"; type="application/xop+xml"'
    body = (
        b"--b\r\nContent-Type: application/xop+xml\r\n\r\n<not-xml\r\n"
        b"--b\r\nthis is no header line\r\n\r\nx\r\n--b--\r\n"
    )
    for chunk in (1, 2, 7, len(body)):
        example.check(body, content_type, chunk)


def test_fuzz_entry_point_without_atheris() -> None:
    if importlib.util.find_spec("atheris") is not None:
        pytest.skip("atheris is installed; fuzz/fuzz_core.py would fuzz forever")
    result = run_example(str(ROOT / "fuzz" / "fuzz_core.py"))
    assert result.returncode != 0
    assert "pip install atheris" in result.stderr


# --- custom_store ------------------------------------------------------------------------------


def test_custom_store_drives_a_whole_job(tmp_path: Path) -> None:
    result = run_example(str(EXAMPLES / "custom_store.py"), "--dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ServerErrorTemporaryError" in result.stdout  # the injected disk-full, R4 step 9
    assert "final state: Completed PostScanJobCompletedSuccessfully, images 2" in result.stdout
    (job,) = [p for p in (tmp_path / "jobs").iterdir()]
    # Every filter succeeded, so the core discarded the documents (issue 8); the record stays.
    assert sorted(p.name for p in job.iterdir()) == ["manifest.json"]
    assert (tmp_path / "delivered" / job.name / "2.png").stat().st_size == 100_000
