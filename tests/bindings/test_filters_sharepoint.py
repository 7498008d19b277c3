"""SharePoint filter (R9) against a real ThreadingHTTPServer taking PUT uploads."""

from __future__ import annotations

import base64
import dataclasses
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from dsc_bindings.filters import FilterSettings, sharepoint
from dsc_bindings.filters.interruption import Interrupted
from dsc_bindings.filters.sites import SitePrefix
from dsc_core.model import FilterState, FilterStateReason, SharePointInstructions
from test_filters_support import (
    UploadServer,
    make_documents,
    make_job,
    random_bytes,
    refused_port,
    second_away,
)


def _run(
    job: Any,
    docs: Any,
    settings: FilterSettings | None = None,
    cancelled: threading.Event | None = None,
) -> Any:
    settings = settings or FilterSettings(sharepoint_timeout=5)
    if not settings.sharepoint_sites:
        # These tests are about uploading: allow the local test servers the job names (R13).
        settings = dataclasses.replace(settings, sharepoint_sites=_local_prefixes(job))
    return sharepoint.run(job, 0, docs, settings, cancelled or threading.Event())


def _local_prefixes(job: Any) -> tuple[SitePrefix, ...]:
    prefixes = []
    for url in job.filters[0].instructions.site_urls:
        parts = urlsplit(url)
        if parts.hostname == "127.0.0.1" and parts.port:
            prefixes.append(SitePrefix(f"{parts.scheme}://127.0.0.1:{parts.port}/", True))
    return tuple(prefixes)


def test_documents_are_put_byte_identical(tmp_path: Path) -> None:
    pdf, tif = random_bytes(1_500_000), random_bytes(10)
    docs = make_documents(tmp_path, ("pdf-a", pdf), ("tiff-multi-g4", tif))
    settings = FilterSettings(
        sharepoint_timeout=5,
        sharepoint_username="scan",
        sharepoint_password="pw",
        chunk_size=64 * 1024,
    )
    with UploadServer() as server:
        job = make_job(
            SharePointInstructions(False, (server.url("/sites/Scans/Shared Docs/"),)),
            document_root_name="Q1 report",
        )
        outcome = _run(job, docs, settings)

    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
    assert server.stored == {
        "/sites/Scans/Shared%20Docs/Q1%20report_0001.pdf": pdf,
        "/sites/Scans/Shared%20Docs/Q1%20report_0002.tif": tif,
    }
    # The outcome names each document's URL (issue 19), for the job record.
    assert outcome.delivered == tuple(server.url(p) for p in server.stored)
    headers = server.headers["/sites/Scans/Shared%20Docs/Q1%20report_0001.pdf"]
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Length"] == str(len(pdf))
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"scan:pw").decode()


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/denied/site", FilterStateReason.SHAREPOINT_ACCESS_DENIED),
        ("/full/site", FilterStateReason.SHAREPOINT_OUT_OF_DISK_SPACE),
    ],
)
def test_refusals_map_to_reasons(tmp_path: Path, path: str, reason: FilterStateReason) -> None:
    docs = make_documents(tmp_path, ("png", b"png bytes"), ("png", b"more"))
    with UploadServer() as server:
        # The good site after the refusing one still gets its documents.
        job = make_job(SharePointInstructions(False, (server.url(path), server.url("/ok"))))
        outcome = _run(job, docs)
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (reason,)
    assert server.stored == {"/ok/Scan_0001.png": b"png bytes", "/ok/Scan_0002.png": b"more"}


def test_connection_refused_is_unknown_error(tmp_path: Path) -> None:
    docs = make_documents(tmp_path, ("png", b"x"))
    job = make_job(SharePointInstructions(False, (f"http://127.0.0.1:{refused_port()}/s",)))
    outcome = _run(job, docs)
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.UNKNOWN_ERROR,)


@pytest.mark.parametrize(
    "url", ["ftp://host/site", "http:///nohost", "http://h/s?x=1", "http://h:99999/s"]
)
def test_unusable_url_is_invalid_args(tmp_path: Path, url: str) -> None:
    docs = make_documents(tmp_path, ("png", b"x"))
    outcome = _run(make_job(SharePointInstructions(False, (url,))), docs)
    assert outcome.reasons == (FilterStateReason.INVALID_ARGS,)


def test_save_to_my_site(tmp_path: Path) -> None:
    docs = make_documents(tmp_path, ("png", b"x"))
    alone = _run(make_job(SharePointInstructions(True, ())), docs)
    assert alone.state is FilterState.COMPLETED_WITH_ERRORS
    assert alone.reasons == (FilterStateReason.INVALID_ARGS,)
    with UploadServer() as server:
        # With site URLs, SaveToMySite is ignored and the upload goes ahead.
        both = _run(make_job(SharePointInstructions(True, (server.url("/s"),))), docs)
    assert both.state is FilterState.COMPLETED_SUCCESSFULLY
    assert server.stored == {"/s/Scan_0001.png": b"x"}


def test_https_upload(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    data = random_bytes(200_000)
    docs = make_documents(tmp_path, ("xps", data))
    with UploadServer(tls=server_ctx) as server:
        job = make_job(SharePointInstructions(False, (server.url("/secure"),)))
        outcome = _run(
            job, docs, FilterSettings(sharepoint_timeout=5, sharepoint_ssl_context=client_ctx)
        )
    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
    assert server.stored == {"/secure/Scan_0001.xps": data}
    assert (
        server.headers["/secure/Scan_0001.xps"]["Content-Type"] == "application/vnd.ms-xpsdocument"
    )


def test_a_document_the_store_cannot_give_interrupts_the_uploads(tmp_path: Path) -> None:
    """The store stops answering as the filter reads document 2, document 1 uploaded: the run
    ends in Interrupted, no outcome (filters/interruption.py), before any request for
    document 2 (no partial upload).  The resumed run (R13) PUTs both, document 1 to the same
    URL."""
    docs = make_documents(tmp_path, ("pdf-a", b"%PDF one"), ("png", b"two"), ("png", b"three"))
    with UploadServer() as server:
        job = make_job(SharePointInstructions(False, (server.url("/sites/Scans"),)))
        with pytest.raises(Interrupted):
            _run(job, second_away(docs))
        assert sorted(server.stored) == ["/sites/Scans/Scan_0001.pdf"]
        assert server.headers.keys() == server.stored.keys()
        assert _run(job, docs).state is FilterState.COMPLETED_SUCCESSFULLY
    assert sorted(server.stored) == [
        "/sites/Scans/Scan_0001.pdf",
        "/sites/Scans/Scan_0002.png",
        "/sites/Scans/Scan_0003.png",
    ]
    assert server.incomplete == []


def test_cancel_mid_upload_leaves_nothing_on_the_server(tmp_path: Path) -> None:
    data = random_bytes(16 * 1024 * 1024)
    docs = make_documents(tmp_path, ("pdf-a", data))
    cancelled = threading.Event()
    settings = FilterSettings(sharepoint_timeout=5, chunk_size=64 * 1024)
    with UploadServer(slow_receive_buffer=True) as server:
        job = make_job(SharePointInstructions(False, (server.url("/slow/site"),)))
        result: list[Any] = []
        worker = threading.Thread(
            target=lambda: result.append(_run(job, docs, settings, cancelled))
        )
        worker.start()
        path = "/slow/site/Scan_0001.pdf"
        assert server.wait(lambda: server.received.get(path, 0) >= 256 * 1024)
        cancelled.set()
        worker.join(30)
        assert not worker.is_alive()
        assert server.wait(lambda: path in server.incomplete)
    [outcome] = result
    assert outcome.state is FilterState.CANCELED and outcome.reasons == ()
    assert server.stored == {}
