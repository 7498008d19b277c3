"""The S3 spool (``[spool] kind = "s3"``, issue 17): each document an object
``spool/<token>/<DocumentId>`` in a bucket, received as a multipart upload.

Client: boto3, because it exposes the multipart calls one by one (CreateMultipartUpload,
UploadPart, Complete, Abort), so this module decides the part size and how many part buffers
exist at once; the ``minio`` client's put_object buffers its parts itself, one per upload, out
of our control.  boto3 also takes a CA file for the endpoint, and is typed (mypy-boto3-s3).

Memory stays flat in image size (issue 17 point 3): an upload holds at most one part
(``part_size``, default 8 MiB; S3's minimum is 5 MiB except for the last).  At most
``max_part_buffers`` parts are held in memory across all uploads; an upload that finds no free
buffer stages its part in an unlinked temporary file in the data folder instead (never waits for
another upload, so scanners cannot deadlock each other).

:meth:`S3Spool.finish` uploads the last part and completes the upload: once it returns the object
is complete on the server and may be acknowledged (R4).  SeaweedFS keeps objects in memory-mapped
volumes without fsync unless configured (``fs.configure -fsync``): operating.md says so.

Faults: no answer (refused, reset, timeout) and HTTP 5xx (SeaweedFS answers 500 InternalError when
it is out of volumes) or 503 SlowDown are temporary (``ServerErrorTemporaryError``); 4xx (bad
credentials, no such bucket) are not.  Every fault is counted (``errors``, for /metrics).

The processing engine reads documents as local files: :meth:`S3Spool.document_path` downloads
the object once into ``DATA/spool-cache/<token>/<id>``; discarding the job deletes that copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interface import check_document_id, check_token

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("dsc.store")

_T = TypeVar("_T")

__all__ = ["CACHE_NAME", "DEFAULT_PART_SIZE", "MIN_PART_SIZE", "S3Settings", "S3Spool"]

MIN_PART_SIZE = 5 << 20
DEFAULT_PART_SIZE = 8 << 20
DEFAULT_MAX_PART_BUFFERS = 16
CACHE_NAME = "spool-cache"
PREFIX = "spool/"


@dataclass(frozen=True, slots=True)
class S3Settings:
    """``[spool]`` with ``kind = "s3"`` (settings.py reads it)."""

    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"
    ca_file: Path | None = None
    part_size: int = DEFAULT_PART_SIZE
    max_part_buffers: int = DEFAULT_MAX_PART_BUFFERS


def is_temporary_s3(exc: BaseException) -> bool:
    """Whether a retry of what raised ``exc`` may succeed (R4 step 9)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        # EndpointConnectionError, ConnectionClosedError, ReadTimeoutError...: no answer.
        return isinstance(
            exc, botocore.exceptions.HTTPClientError | botocore.exceptions.ConnectionError
        )
    return isinstance(exc, MemoryError) or (
        isinstance(exc, OSError) and exc.errno is not None and exc.errno in _TEMPORARY_ERRNOS
    )


_TEMPORARY_ERRNOS = frozenset({28, 122, 12})  # ENOSPC, EDQUOT, ENOMEM (the part staging file)


def _client(settings: S3Settings, *, attempts: int, timeout: float) -> S3Client:
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        verify=str(settings.ca_file) if settings.ca_file is not None else True,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=min(5.0, timeout),
            read_timeout=timeout,
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    return client


@dataclass(slots=True)
class _Upload:
    key: str
    upload_id: str
    parts: list[CompletedPartTypeDef] = field(default_factory=list)
    buffer: bytearray | None = None  # a part held in memory (one of max_part_buffers)
    staged: IO[bytes] | None = None  # or in a temporary file
    pending: int = 0  # bytes of the current part
    written: int = 0  # bytes of the document so far


class S3Spool:
    """Documents as objects in one bucket.  Thread-safe; see the module."""

    def __init__(self, settings: S3Settings, client: S3Client, data_dir: Path) -> None:
        self.settings = settings
        self.location = f"s3 {settings.endpoint_url} bucket {settings.bucket}"
        self.cache_dir = data_dir / CACHE_NAME
        self.staging_dir = data_dir
        self.local_dir = data_dir  # the cache and the staged parts
        self._client = client
        self._check_client = client
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], _Upload] = {}
        self._buffers = threading.BoundedSemaphore(settings.max_part_buffers)
        self._closed = False
        #: S3 requests that failed since the start (/metrics: dsc_s3_errors_total).
        self.errors = 0

    @classmethod
    def open(cls, settings: S3Settings, data_dir: Path) -> S3Spool:
        if settings.part_size < MIN_PART_SIZE:
            raise StoreError(
                f"[spool] part_size {settings.part_size} is below S3's minimum {MIN_PART_SIZE}",
                temporary=False,
            )
        client = _client(settings, attempts=3, timeout=60)
        spool = cls(settings, client, data_dir)
        # The health check asks once and briefly: /healthz must say "down" within its own
        # limit (health.CHECK_SECONDS), not after the retries a document is worth.
        spool._check_client = _client(settings, attempts=1, timeout=3)
        spool._call("opening the bucket", lambda: client.head_bucket(Bucket=settings.bucket))
        spool.cache_dir.mkdir(parents=True, exist_ok=True)
        return spool

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            with self._lock:
                self.errors += 1
            raise StoreError(f"{what}: {self.location}: {exc}", is_temporary_s3(exc)) from exc

    def close(self) -> None:
        """Uploads still open are aborted."""
        with self._lock:
            self._closed = True
            uploads = list(self._open.values())
            self._open.clear()
        for upload in uploads:
            self._drop(upload)

    def error_count(self) -> int:
        with self._lock:
            return self.errors

    def check(self) -> str | None:
        try:
            self._call("", lambda: self._check_client.head_bucket(Bucket=self.settings.bucket))
        except StoreError as exc:
            return exc.message.lstrip(": ")
        return None

    # --- documents --------------------------------------------------------------------------

    @staticmethod
    def key(token: str, document_id: int) -> str:
        return f"{PREFIX}{check_token(token)}/{check_document_id(document_id)}"

    def begin(self, token: str, document_id: int) -> None:
        key = self.key(token, document_id)
        with self._lock:
            if self._closed:
                raise StoreError("the job store is closed", temporary=False)
            if (token, document_id) in self._open:
                raise StoreError(f"document {document_id} of {token} is already open", False)
        answer = self._call(
            f"beginning document {document_id} of {token}",
            lambda: self._client.create_multipart_upload(Bucket=self.settings.bucket, Key=key),
        )
        with self._lock:
            self._open[(token, document_id)] = _Upload(key, answer["UploadId"])

    def _take(self, token: str, document_id: int, pop: bool) -> _Upload:
        with self._lock:
            upload = (self._open.pop if pop else self._open.get)((token, document_id), None)
        if upload is None:
            raise StoreError(f"document {document_id} of {token} is not open", False)
        return upload

    def append(self, token: str, document_id: int, data: bytes) -> None:
        upload = self._take(token, document_id, pop=False)
        try:
            view = memoryview(data)
            size = self.settings.part_size
            while view:
                take = min(len(view), size - upload.pending)
                self._hold(upload, view[:take])
                view = view[take:]
                if upload.pending == size:
                    self._send_part(upload)
        except BaseException:
            with self._lock:
                self._open.pop((token, document_id), None)
            self._drop(upload)
            raise

    def _hold(self, upload: _Upload, data: memoryview) -> None:
        if upload.buffer is None and upload.staged is None:
            if self._buffers.acquire(blocking=False):
                upload.buffer = bytearray()
            else:  # every memory buffer is taken: this part waits on disk instead
                upload.staged = tempfile.TemporaryFile(dir=self.staging_dir, prefix=".s3part-")
        if upload.buffer is not None:
            upload.buffer += data
        else:
            assert upload.staged is not None
            upload.staged.write(data)
        upload.pending += len(data)
        upload.written += len(data)

    def _send_part(self, upload: _Upload) -> None:
        number = len(upload.parts) + 1
        body: bytes | IO[bytes]
        if upload.buffer is not None:
            body = upload.buffer  # type: ignore[assignment]  # botocore takes a bytearray as is
        elif upload.staged is not None:
            upload.staged.seek(0)
            body = upload.staged
        else:
            body = b""
        answer = self._call(
            f"storing part {number} of {upload.key}",
            lambda: self._client.upload_part(
                Bucket=self.settings.bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                PartNumber=number,
                Body=body,
            ),
        )
        upload.parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self._release(upload)

    def _release(self, upload: _Upload) -> None:
        if upload.buffer is not None:
            upload.buffer = None
            self._buffers.release()
        if upload.staged is not None:
            upload.staged.close()
            upload.staged = None
        upload.pending = 0

    def _drop(self, upload: _Upload) -> None:
        """Abort an upload; failures only logged (the debris sweep at start finds it)."""
        self._release(upload)
        try:
            self._call(
                f"aborting {upload.key}",
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=upload.key, UploadId=upload.upload_id
                ),
            )
        except StoreError as exc:
            log.warning("%s", exc.message)

    def finish(self, token: str, document_id: int, size: int) -> None:
        upload = self._take(token, document_id, pop=True)
        try:
            if upload.written != size:
                raise StoreError(
                    f"document {document_id} of {token}: {upload.written} bytes stored, "
                    f"{size} expected",
                    temporary=False,
                )
            if upload.pending or not upload.parts:  # the last part may be small (or empty)
                self._send_part(upload)
            self._call(
                f"completing {upload.key}",
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.settings.bucket,
                    Key=upload.key,
                    UploadId=upload.upload_id,
                    MultipartUpload={"Parts": upload.parts},
                ),
            )
        except BaseException:
            self._drop(upload)
            raise

    def abort(self, token: str, document_id: int) -> None:
        key = self.key(token, document_id)
        with self._lock:
            upload = self._open.pop((token, document_id), None)
        if upload is not None:
            self._drop(upload)
        # A document completed but whose job record then failed was never acknowledged (R4
        # step 9); the core never aborts an acknowledged DocumentId.
        self._call(
            f"removing {key}",
            lambda: self._client.delete_object(Bucket=self.settings.bucket, Key=key),
        )
        (self.cache_dir / token / str(document_id)).unlink(missing_ok=True)

    def _keys(self, prefix: str) -> list[str]:
        return [key for key, _ in self._objects(prefix)]

    def _objects(self, prefix: str) -> list[tuple[str, datetime]]:
        """(key, last modified) of the objects under ``prefix``."""
        found: list[tuple[str, datetime]] = []
        paginator = self._client.get_paginator("list_objects_v2")

        def walk() -> None:
            for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                found.extend(
                    (item["Key"], item["LastModified"]) for item in page.get("Contents", [])
                )

        self._call(f"listing {prefix}", walk)
        return found

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = keys[start : start + 1000]
            self._call(
                "removing documents",
                lambda batch=batch: self._client.delete_objects(  # type: ignore[misc]
                    Bucket=self.settings.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                ),
            )

    def discard(self, token: str) -> None:
        check_token(token)
        with self._lock:
            uploads = [self._open.pop(k) for k in [k for k in self._open if k[0] == token]]
        for upload in uploads:
            self._drop(upload)
        self._delete(self._keys(f"{PREFIX}{token}/"))
        shutil.rmtree(self.cache_dir / token, ignore_errors=True)

    def documents(self, token: str) -> list[int]:
        found = []
        for key in self._keys(f"{PREFIX}{check_token(token)}/"):
            name = key.rsplit("/", 1)[-1]
            if name.isdigit() and str(int(name)) == name:
                found.append(int(name))
        return sorted(found)

    def document_path(self, token: str, document_id: int) -> Path:
        """A local copy of the finished document (downloaded once; for the filters)."""
        key = self.key(token, document_id)
        target = self.cache_dir / token / str(document_id)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{document_id}.part")
        try:
            self._call(
                f"reading {key}",
                lambda: self._client.download_file(self.settings.bucket, key, str(part)),
            )
        except StoreError as exc:
            part.unlink(missing_ok=True)
            if isinstance(
                exc.__cause__, botocore.exceptions.ClientError
            ) and exc.__cause__.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return target  # absent, as the local spool's path of a missing document
            raise
        os.replace(part, target)
        return target

    def set_aside(self, token: str, target: Path) -> bool:
        """Copy the job's documents to ``target``; they stay in the bucket until
        :meth:`discard`, which the quarantine calls once the row's delete committed (a
        quarantine cut off before leaves the row with its documents)."""
        ids = self.documents(token)
        if not ids:
            return False
        target.mkdir(parents=True, exist_ok=True)
        for document_id in ids:
            shutil.copyfile(self.document_path(token, document_id), target / str(document_id))
        return True

    def remove_unfinished(self, token: str, document_id: int) -> None:
        key = self.key(token, document_id)

        def abort() -> None:
            listed = self._client.list_multipart_uploads(Bucket=self.settings.bucket, Prefix=key)
            for item in listed.get("Uploads", []):
                if item["Key"] == key:
                    self._client.abort_multipart_upload(
                        Bucket=self.settings.bucket, Key=key, UploadId=item["UploadId"]
                    )

        self._call(f"removing the unfinished upload of {key}", abort)

    def remove_debris(self, tokens: set[str], older_than: datetime | None = None) -> None:
        """Unfinished multipart uploads (never acknowledged) and objects of tokens without a
        job row; with ``older_than`` (shared records, issue 18) only those begun or written
        before it, as another instance may be receiving or have just created younger ones."""
        paginator = self._client.get_paginator("list_multipart_uploads")

        def old(when: datetime) -> bool:
            return older_than is None or when < older_than

        def abort_all() -> None:
            for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=PREFIX):
                for item in page.get("Uploads", []):
                    if old(item["Initiated"]):
                        self._client.abort_multipart_upload(
                            Bucket=self.settings.bucket, Key=item["Key"], UploadId=item["UploadId"]
                        )

        self._call("removing unfinished uploads", abort_all)
        orphans = [
            key
            for key, modified in self._objects(PREFIX)
            if key[len(PREFIX) :].split("/", 1)[0] not in tokens and old(modified)
        ]
        self._delete(orphans)
        if self.cache_dir.is_dir():
            for entry in self.cache_dir.iterdir():
                if entry.name not in tokens:
                    shutil.rmtree(entry, ignore_errors=True)
