"""Shared fixtures.  The specification folder is read through ``../shared/spec`` beside the
project (or ``$DSC_SPEC_DIR``); tests that need it skip with a clear reason where it is absent."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from lxml import etree

if TYPE_CHECKING:
    from dsc_bindings.store.postgresql import PostgresRecords
    from engines_support import Backend, PgCluster, S3Server
    from samba_support import SambaDC
    from smb_support import SmbServer

ROOT = Path(__file__).resolve().parent.parent

# Every child Python the tests start (dsc serve, dsc handle, examples, bench, crash children)
# imports this checkout, not whatever editable install happens to be on the machine, and the
# coverage of those children is attributed to this checkout's files.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), str(ROOT / "bindings"), os.environ.get("PYTHONPATH")) if p
)

# The console sizes its tables from $COLUMNS (console/output.py); the tests expect a pipe's width
# unless they set it.  GNU readline, once initialised in the pytest process, exports COLUMNS and
# LINES of its terminal into the C environment, which processes started from it inherit: pytest-
# xdist's workers then saw COLUMNS=80 and cut the `dsc cluster status` headers.
for _terminal_size in ("COLUMNS", "LINES"):
    os.environ.pop(_terminal_size, None)


def spec_dir() -> Path | None:
    candidates = [os.environ.get("DSC_SPEC_DIR"), str(ROOT.parent / "shared" / "spec")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "RULINGS.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def spec() -> Path:
    found = spec_dir()
    if found is None:
        pytest.skip(
            "specification folder not found: set DSC_SPEC_DIR or place shared/spec "
            "beside the project"
        )
    return found


@pytest.fixture(scope="session")
def bdsrr_schema(spec: Path, tmp_path_factory: pytest.TempPathFactory) -> etree.XMLSchema:
    """bdsrr.xsd with its imports; the test copy corrects the SendImangeFailed typo (R3)."""
    folder = tmp_path_factory.mktemp("xsd")
    for name in ("bdsrr.xsd", "PostScan.xsd", "WDPScan.xsd"):
        shutil.copy(spec / name, folder / name)
    xsd = folder / "bdsrr.xsd"
    xsd.write_text(
        xsd.read_text(encoding="utf-8").replace("SendImangeFailed", "SendImageFailed"),
        encoding="utf-8",
    )
    return etree.XMLSchema(etree.parse(str(xsd)))


#: Response elements of the MS-BDSRR schema (global elements of bdsrr.xsd).
_SCHEMA_RESPONSES = {
    "GetRepositoryElementsResponse",
    "CancelPostScanJobResponse",
    "GetPostScanJobElementsResponse",
    "GetActiveJobsResponse",
    "GetJobHistoryResponse",
}


@pytest.fixture(autouse=True)
def every_response_validates(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 2: every MS-BDSRR response produced in the suite validates against bdsrr.xsd, and
    WS-DSP GetPostScanJobElements responses do once their namespace is mapped to dsc.  Every
    reply that passes through the in-process transport is checked, in every test."""
    if spec_dir() is None:
        return
    schema: etree.XMLSchema = request.getfixturevalue("bdsrr_schema")
    from dsc_bindings.inprocess import InProcessTransport
    from dsc_core import names

    original = InProcessTransport.post
    dsc_ns, dsp_ns = names.DSC.encode(), names.DSP.encode()

    def post(self: InProcessTransport, *args: object, **kwargs: object) -> object:
        reply = original(self, *args, **kwargs)  # type: ignore[arg-type]
        if reply.status == 200 and reply.body.lstrip().startswith(b"<"):
            envelope = etree.fromstring(reply.body)
            body = envelope.find(f"{{{names.SOAP}}}Body")
            payload = body[0] if body is not None and len(body) else None
            if payload is not None:
                qname = etree.QName(payload)
                mapped: etree._Element | None = None
                if qname.namespace == names.DSC and qname.localname in _SCHEMA_RESPONSES:
                    mapped = payload
                elif (
                    qname.namespace == names.DSP
                    and qname.localname == "GetPostScanJobElementsResponse"
                ):
                    mapped = etree.fromstring(etree.tostring(payload).replace(dsp_ns, dsc_ns))
                if mapped is not None:
                    doc = etree.fromstring(etree.tostring(mapped))
                    assert schema.validate(doc), f"{qname.localname}: {schema.error_log}"
        return reply

    monkeypatch.setattr(InProcessTransport, "post", post)


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """One real Samba AD DC for every directory test (provisioned once, ~10 s)."""
    from samba_support import SambaDC, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no Samba AD DC: {reason}")
    dc = SambaDC.provision(tmp_path_factory.mktemp("samba"))
    dc.start()
    try:
        yield dc
    finally:
        dc.stop()


@pytest.fixture(scope="session")
def smbd() -> Iterator[SmbServer]:
    """One real Samba file server (SMB 3, encryption required) for every SMB test."""
    from smb_support import SmbServer, public_folder, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no smbd: {reason}")
    with public_folder() as folder:
        server = SmbServer.create(folder / "smbd")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL for the session (~1-2 s); tests take a database each."""
    from engines_support import pg_cluster

    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def dsn(pg: PgCluster) -> str:
    """A fresh database on the session's PostgreSQL."""
    return pg.new_database()


@pytest.fixture
def two(dsn: str) -> Iterator[tuple[PostgresRecords, PostgresRecords]]:
    """Two instances' job records on one database."""
    from dsc_bindings.store.postgresql import PostgresRecords

    a, b = PostgresRecords.open(dsn), PostgresRecords.open(dsn)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session (~3 s); tests take a bucket each."""
    from engines_support import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Where the test's server keeps its state: the embedded default, unless the test is
    parametrized over ``engines_support.BACKENDS`` (then also PostgreSQL + S3 on the session's
    engines, started only when a test asks for them)."""
    from engines_support import Backend, EnginesBackend

    if getattr(request, "param", "sqlite-local") == "sqlite-local":
        return Backend()
    return EnginesBackend(request.getfixturevalue("pg"), request.getfixturevalue("s3"), tmp_path)


#: The order in which pytest-xdist's workers (``-n 2 --dist loadfile``) take the layers' modules:
#: the end-to-end modules first (each starts real servers and waits on them, some for a minute),
#: the many short ones last, so that the two workers end together instead of one waiting for the
#: other's crash soak.  A plain run keeps the collection order.
_WORKER_ORDER = ("e2e", "project", "bindings", "core")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return

    def layer(item: pytest.Item) -> int:
        folder = item.path.parent.name
        return _WORKER_ORDER.index(folder) if folder in _WORKER_ORDER else len(_WORKER_ORDER)

    items.sort(key=layer)  # stable: each module's tests keep their order
