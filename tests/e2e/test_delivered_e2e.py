"""The files a filter wrote, kept with the job (issue 19 point 1, issue 14 §3), end to end
against a real ``dsc serve``: a scan of two pages to a local share names both files in
``dsc job`` (text and --json), ``GET /api/jobs/{token}`` and ``/status.json?job=``, and they
are still there after a restart (the job record keeps them, not the log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2e_support import DEFAULT_SID, dsc_here
from engines_support import BACKENDS
from test_observe_e2e import LOCAL_SHARE, StartServer, get, pages, scan, start_server

__all__ = ["pages", "start_server"]  # the fixtures this module borrows


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)  # the job record keeps them
@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_a_two_page_scan_names_both_files_everywhere(
    start_server: StartServer, pages: tuple[Path, Path], tmp_path: Path, binding: str
) -> None:
    data = tmp_path / "data"
    server = start_server(binding, data=data)
    png, pdf = pages
    done = scan(server, "--process-name", "Invoices", str(png), str(pdf))
    token = done["token"]
    folder = data / "shares" / "localhost" / "scans" / DEFAULT_SID
    written = [str(folder / "page_0001.png"), str(folder / "page_0002.pdf")]
    assert (folder / "page_0001.png").read_bytes() == png.read_bytes()
    assert (folder / "page_0002.pdf").read_bytes() == pdf.read_bytes()

    detail = dsc_here("job", token[:8], "--server", server.url, "--json")
    assert detail.code == 0, detail
    [fileshare] = detail.json()["filters"]
    assert fileshare["destinations"] == [LOCAL_SHARE]
    assert fileshare["delivered"] == written and fileshare["delivered_truncated"] is False

    human = dsc_here("job", token, "--server", server.url)
    assert human.code == 0, human
    lines = human.out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("Filter fileshare")))
    assert [line.split(None, 1) for line in lines[at + 1 : at + 3]] == [
        ["delivered", written[0]],
        ["delivered", written[1]],
    ], human.out

    status, _, body, _ = get(server, f"/api/jobs/{token}")
    assert status == 200, body
    assert json.loads(body)["job"]["filters"][0]["delivered"] == written
    # The history is searched by what was delivered: the job that wrote a file.
    status, _, body, _ = get(server, "/api/jobs?q=page_0002.pdf")
    assert status == 200 and [j["token"] for j in json.loads(body)["jobs"]] == [token], body
    status, _, body, _ = get(server, f"/status.json?job={token}")
    assert status == 200, body
    assert json.loads(body)["job"]["filters"][0]["delivered"] == written

    server.stop_cleanly()
    again = start_server(binding, data=data)
    status, _, body, _ = get(again, f"/api/jobs/{token}")
    assert status == 200, body
    assert json.loads(body)["job"]["filters"][0]["delivered"] == written
