"""Move an embedded installation's jobs and documents onto other engines (issue 17 point 5,
``dsc db migrate``), then verify the copy.

The source is the data folder's SQLite records and local spool, opened as the server opens them
(its lock held: no server may run on it meanwhile; records that do not decode are quarantined as
at a start).  Each job record is written to the destination in the source's order (creation
order, so listings stay in order), each finished document streamed into the destination spool in
parts (memory stays flat), hashing as it goes.  Then the destination is read back: the same
records, byte for byte as encoded, and every document with the same SHA-256.

The source is left as it was: until the server is configured for the destination, the data
folder still serves (a migration can be run again into an empty destination).  The installation
identity, the device book and the status page's totals are copied by ``dsc db migrate`` too
(console/db.py: runtime/pgidentity.py, observe/pgdevices.py and .pgtally, above this layer for the
first two).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interface import JobRecords, Spool, StoredDocuments
from dsc_bindings.store.jobcodec import decode_job
from dsc_bindings.store.split import SplitStore
from dsc_core.model import Job

__all__ = ["CHUNK", "MigrationReport", "migrate"]

#: Bytes read from a source document at a time (the destination spool keeps its own parts).
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What was copied, and what the read-back found (equal when the copy is sound)."""

    jobs: int
    active: int
    documents: int
    image_bytes: int
    verified_jobs: int
    verified_documents: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_document(source: Path, spool: Spool, token: str, document_id: int) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    spool.begin(token, document_id)
    try:
        with source.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                spool.append(token, document_id, chunk)
        spool.finish(token, document_id, size)
    except BaseException:
        spool.abort(token, document_id)
        raise
    return size, digest.hexdigest()


def _decoded(text: str, documents: StoredDocuments) -> Job | None:
    try:
        return decode_job(text, documents)
    except (ValueError, TypeError):
        return None  # differs from every job


def migrate(
    source: SplitStore,
    records: JobRecords,
    spool: Spool | None,
    progress: Callable[[str], None] = lambda line: None,
) -> MigrationReport:
    """Copy ``source`` into ``records`` and ``spool`` (None: the documents stay in the data
    folder's spool, which the server goes on using), then verify.  Raises StoreError: the
    destination is not empty, an engine fails, or the read-back differs (naming what)."""
    present = records.rows()
    if present:
        raise StoreError(
            f"the destination {records.location} already holds {len(present)} job(s): "
            "migrate into an empty database",
            temporary=False,
        )
    jobs = source.load_jobs()
    expected: dict[str, Job] = {}
    hashes: dict[tuple[str, int], str] = {}
    image_bytes = 0
    for number, job in enumerate(jobs, start=1):
        records.put(job)
        expected[job.token] = job
        if spool is not None:
            for document_id in source.spool.documents(job.token):
                path = source.spool.document_path(job.token, document_id)
                size, digest = _copy_document(path, spool, job.token, document_id)
                hashes[(job.token, document_id)] = digest
                image_bytes += size
        else:
            for document_id in source.spool.documents(job.token):
                path = source.spool.document_path(job.token, document_id)
                hashes[(job.token, document_id)] = ""
                image_bytes += path.stat().st_size
        progress(f"copied job {number}/{len(jobs)}: {job.token}")

    # Read back.  Records: the same tokens in the same order, each the job copied.
    stored = records.rows()
    if [row[1] for row in stored] != list(expected):
        raise StoreError(
            f"verification: {records.location} holds {len(stored)} job(s) in another order or "
            f"set than the {len(expected)} copied",
            temporary=False,
        )
    different = [
        token
        for _, token, text, documents in stored
        if _decoded(text, documents) != expected[token]
    ]
    if different:
        raise StoreError(
            f"verification: {len(different)} job record(s) differ, first {different[0]}",
            temporary=False,
        )
    verified_documents = 0
    if spool is not None:
        for token in expected:
            found = spool.documents(token)
            wanted = sorted(d for t, d in hashes if t == token)
            if found != wanted:
                raise StoreError(
                    f"verification: job {token} has documents {found} in {spool.location}, "
                    f"{wanted} were copied",
                    temporary=False,
                )
            for document_id in found:
                copy = spool.document_path(token, document_id)
                try:
                    if _sha256(copy) != hashes[(token, document_id)]:
                        raise StoreError(
                            f"verification: document {document_id} of job {token} differs "
                            f"in {spool.location} (SHA-256)",
                            temporary=False,
                        )
                finally:
                    copy.unlink(missing_ok=True)  # a read-back copy, not the document
                verified_documents += 1
    else:
        verified_documents = len(hashes)
    return MigrationReport(
        jobs=len(jobs),
        active=sum(1 for job in jobs if job.is_active),
        documents=len(hashes),
        image_bytes=image_bytes,
        verified_jobs=len(stored),
        verified_documents=verified_documents,
    )
