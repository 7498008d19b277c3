"""Job <-> JSON for the job store: lossless, strict, versioned.

The store persists the core's frozen :class:`~dsc_core.model.Job` snapshots as they are (model.py:
"a command can carry a snapshot that the store persists as is") and gives them back at start to
restore the core, so ``decode_job(encode_job(job)) == job`` for every job, field by field:

- enums as their wire values (``JobState.PENDING_HELD`` -> ``"Pending-Held"``);
- datetimes as ISO 8601 with their UTC offset and microseconds (R6 times carry an explicit offset;
  an aware time comes back with the same offset as a fixed ``timezone``, a naive one stays naive;
  offsets with a fraction of a second, which no real zone has, are not kept: Python 3.11's
  ``fromisoformat`` misreads them);
- the parsed filter instructions as a tagged union (``"kind"``) or ``null``;
- since version 2, what each filter delivered (``"delivered"``, ``"delivered_truncated"``);
  a version 1 record, written before issue 19, decodes with nothing delivered;
- since version 3, no documents: the stores keep a job's documents as rows of their own beside
  the record (store/jobdocuments.py), so that each SendImage writes its document, not the whole
  list again (the last review: a job of n images cost O(n^2) in record writes).
  :func:`decode_job` takes those rows; a record of versions 1 and 2 still carries its documents
  and is whole as it is (its next write stores it as version 3 and rows).

Decoding is strict (wrong types, unknown tags, missing fields raise ``ValueError``): a row that
does not decode is corruption to report, not something to guess around.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from dsc_core.model import (
    Document,
    EmailInstructions,
    FileShareInstructions,
    FilterState,
    FilterStateReason,
    FilterStatus,
    Instructions,
    Job,
    JobState,
    JobStateReason,
    SharePointInstructions,
)

__all__ = [
    "CODEC_VERSION",
    "DocumentRow",
    "decode_document_rows",
    "decode_job",
    "document_row",
    "encode_job",
]

#: Stored as ``"v"`` in every record; bump it (and keep reading the old one) on a format change.
CODEC_VERSION = 3
#: Versions :func:`decode_job` reads: 1 has no ``delivered`` in its filters; 1 and 2 carry
#: their documents.
_READABLE = (1, 2, CODEC_VERSION)

#: One document as a store keeps it beside the record: (document_id, format, size).
DocumentRow = tuple[int, str, int]

T = TypeVar("T")


# --- encoding ---------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _instructions(value: Instructions | None) -> dict[str, Any] | None:
    match value:
        case None:
            return None
        case FileShareInstructions(shares=shares):
            return {"kind": "fileshare", "shares": list(shares)}
        case EmailInstructions():
            return {
                "kind": "email",
                "send_to_scan_user": value.send_to_scan_user,
                "addresses": list(value.addresses),
                "can_add_addresses": value.can_add_addresses,
            }
        case SharePointInstructions():
            return {
                "kind": "sharepoint",
                "save_to_my_site": value.save_to_my_site,
                "site_urls": list(value.site_urls),
            }
    raise TypeError(f"not a filter instructions record: {value!r}")


def _filter(value: FilterStatus) -> dict[str, Any]:
    return {
        "dialect": value.dialect,
        "state": value.state.value,
        "reasons": [r.value for r in value.reasons],
        "instructions": _instructions(value.instructions),
        "delivered": list(value.delivered),
        "delivered_truncated": value.delivered_truncated,
    }


def document_row(document: Document) -> DocumentRow:
    return (document.document_id, document.format, document.size)


def encode_job(job: Job) -> str:
    """The job without its documents (:func:`document_row` each) as one compact JSON text (keys
    sorted, so equal jobs give equal texts)."""
    record: dict[str, Any] = {
        "v": CODEC_VERSION,
        "token": job.token,
        "state": job.state.value,
        "reasons": [r.value for r in job.reasons],
        "filters": [_filter(f) for f in job.filters],
        "psp_identifier": job.psp_identifier,
        "psp_display_name": job.psp_display_name,
        "user_name": job.user_name,
        "owner": job.owner,
        "created": _time(job.created),
        "last_activity": _time(job.last_activity),
        "completed": _time(job.completed),
        "continue_on_error": job.continue_on_error,
        "document_root_name": job.document_root_name,
        "origin": job.origin,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- decoding (strict) ------------------------------------------------------------------------


def _get(record: dict[str, Any], key: str, kind: type[T]) -> T:
    if key not in record:
        raise ValueError(f"job record: missing {key!r}")
    value = record[key]
    # bool is an int subclass: an int field must not accept true/false, nor the reverse.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"job record: {key!r} is not {kind.__name__}: {value!r}")
    return value


def _strings(record: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _get(record, key, list)
    if not all(isinstance(i, str) for i in items):
        raise ValueError(f"job record: {key!r} must be a list of strings")
    return tuple(items)


def _enums(record: dict[str, Any], key: str, make: Callable[[str], T]) -> tuple[T, ...]:
    return tuple(make(v) for v in _strings(record, key))


def _decode_time(record: dict[str, Any], key: str, optional: bool = False) -> datetime | None:
    if optional and record.get(key, ...) is None:
        return None
    return datetime.fromisoformat(_get(record, key, str))


def _decode_instructions(record: dict[str, Any]) -> Instructions | None:
    if "instructions" not in record:
        raise ValueError("job record: filter without 'instructions'")
    value = record["instructions"]
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"job record: instructions must be an object or null: {value!r}")
    kind = value.get("kind")
    if kind == "fileshare":
        return FileShareInstructions(shares=_strings(value, "shares"))
    if kind == "email":
        return EmailInstructions(
            send_to_scan_user=_get(value, "send_to_scan_user", bool),
            addresses=_strings(value, "addresses"),
            can_add_addresses=_get(value, "can_add_addresses", bool),
        )
    if kind == "sharepoint":
        return SharePointInstructions(
            save_to_my_site=_get(value, "save_to_my_site", bool),
            site_urls=_strings(value, "site_urls"),
        )
    raise ValueError(f"job record: unknown instructions kind {kind!r}")


def _objects(record: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = _get(record, key, list)
    if not all(isinstance(i, dict) for i in items):
        raise ValueError(f"job record: {key!r} must be a list of objects")
    return items


def _decode_filter(record: dict[str, Any], version: int) -> FilterStatus:
    status = FilterStatus(
        dialect=_get(record, "dialect", str),
        state=FilterState(_get(record, "state", str)),
        reasons=_enums(record, "reasons", FilterStateReason),
        instructions=_decode_instructions(record),
    )
    if version < 2:
        return status  # written before what a filter delivered was kept (issue 19)
    return replace(
        status,
        delivered=_strings(record, "delivered"),
        delivered_truncated=_get(record, "delivered_truncated", bool),
    )


_DOCUMENT_FIELDS = ("document_id", "format", "size")


def _document(fields: dict[str, Any]) -> Document:
    return Document(
        document_id=_get(fields, "document_id", int),
        format=_get(fields, "format", str),
        size=_get(fields, "size", int),
    )


def _decode_documents(
    record: dict[str, Any], version: int, rows: Sequence[Sequence[object]]
) -> tuple[Document, ...]:
    if version < 3:
        # Written whole, before the rows: any rows beside it are older than it (an instance
        # of an earlier version wrote the record last), so the record is the truth.
        return tuple(_document(d) for d in _objects(record, "documents"))
    if "documents" in record:
        raise ValueError("job record: version 3 keeps its documents beside it")
    return decode_document_rows(rows)


def decode_document_rows(rows: Sequence[Sequence[object]]) -> tuple[Document, ...]:
    """The documents of :func:`document_row` rows, in order.  Raises ``ValueError``."""
    found = []
    for row in rows:
        if len(row) != len(_DOCUMENT_FIELDS):
            raise ValueError(f"job record: a document row is not (id, format, size): {row!r}")
        found.append(_document(dict(zip(_DOCUMENT_FIELDS, row, strict=True))))
    return tuple(found)


def decode_job(text: str, documents: Sequence[Sequence[object]] = ()) -> Job:
    """The job that :func:`encode_job` wrote, with its ``documents`` (the rows of
    :func:`document_row`, in the job's order).  Raises ``ValueError`` on anything else."""
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("job record: not a JSON object")
    version = _get(record, "v", int)
    if version not in _READABLE:
        raise ValueError(f"job record: unknown codec version {version}")
    created = _decode_time(record, "created")
    last_activity = _decode_time(record, "last_activity")
    assert created is not None and last_activity is not None
    return Job(
        token=_get(record, "token", str),
        state=JobState(_get(record, "state", str)),
        reasons=_enums(record, "reasons", JobStateReason),
        filters=tuple(_decode_filter(f, version) for f in _objects(record, "filters")),
        psp_identifier=_get(record, "psp_identifier", str),
        psp_display_name=_get(record, "psp_display_name", str),
        user_name=_get(record, "user_name", str),
        owner=_get(record, "owner", str),
        created=created,
        last_activity=last_activity,
        documents=_decode_documents(record, version, documents),
        completed=_decode_time(record, "completed", optional=True),
        continue_on_error=_get(record, "continue_on_error", bool),
        document_root_name=_get(record, "document_root_name", str),
        # Records written before issue 8 have no origin: they count against no quota.
        origin=_get(record, "origin", str) if "origin" in record else "",
    )
