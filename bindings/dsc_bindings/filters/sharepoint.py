"""The SharePoint filter (R9): each document is uploaded with HTTP PUT to
``<SaveToSharePointSiteURL>/<file name>``, the body streamed from disk."""

from __future__ import annotations

import base64
import http.client
import logging
import os
import ssl
import threading
from pathlib import Path
from urllib.parse import quote

from dsc_bindings.filters.common import (
    BinaryReader,
    Deliveries,
    FilterFailure,
    FilterOutcome,
    SourceError,
    check_cancel,
    content_type_for,
    document_file_name,
    never_raises,
    read_full,
)
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.filters.sites import SiteError, SiteUrl, parse_site_url
from dsc_core.model import Document, FilterStateReason, Job, SharePointInstructions

log = logging.getLogger(__name__)

#: How much of an error response body we read (only to log it), never the whole of it.
_MAX_RESPONSE_BODY = 64 * 1024


@never_raises
def run(
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
    delivered: Deliveries,
) -> FilterOutcome:
    instructions = job.filters[filter_index].instructions
    if not isinstance(instructions, SharePointInstructions):
        return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)
    if instructions.save_to_my_site:
        # "My Site" needs the user's SharePoint profile, which this server does not know.
        if not instructions.site_urls:
            log.warning("job %s: SaveToMySite is not supported", job.token)
            return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)
        log.info("job %s: SaveToMySite ignored, uploading to the site URLs", job.token)
    if not instructions.site_urls:
        return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)

    # R13: check every URL before sending anything.  Unusable URLs are the scanner's mistake
    # (InvalidArgs, as before); a usable URL outside the configured prefixes is refused and
    # ends the filter with nothing sent, credentials or documents (as R9 does for a share).
    sites: list[SiteUrl] = []
    reasons: list[FilterStateReason] = []
    for url in instructions.site_urls:
        try:
            site = parse_site_url(url)
        except SiteError as exc:
            log.warning("job %s: unusable SharePoint site URL %r: %s", job.token, url, exc)
            reasons.append(FilterStateReason.INVALID_ARGS)
            continue
        if not settings.sharepoint_allows(site):
            log.warning(
                "job %s: SharePoint site %s refused: not under a configured [sharepoint] site "
                "prefix%s; nothing sent",
                job.token,
                site,
                "" if site.https else " that allows http",
            )
            return FilterOutcome.canceled(FilterStateReason.SHAREPOINT_ACCESS_DENIED)
        sites.append(site)

    for site in sites:
        try:
            for number, (document, source) in enumerate(documents, start=1):
                check_cancel(cancelled)
                name = document_file_name(job.document_root_name, number, document.format)
                _put(site, name, source, document.format, settings, cancelled)
                delivered.add("sharepoint", f"{site}/{quote(name, safe='')}")
        except FilterFailure as exc:
            # The rest of this site would most likely fail the same way; try the next site.
            log.warning(
                "job %s: upload to %s failed (%s): %s", job.token, site, exc.reason.value, exc
            )
            reasons.append(exc.reason)
        except SourceError as exc:
            log.error("job %s: cannot read a stored document: %s", job.token, exc)
            return FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
    return FilterOutcome.errors(*reasons) if reasons else FilterOutcome.success()


def _status_reason(status: int) -> FilterStateReason | None:
    if 200 <= status < 300:
        return None
    if status in (401, 403):
        return FilterStateReason.SHAREPOINT_ACCESS_DENIED
    if status in (413, 507):  # too large / insufficient storage
        return FilterStateReason.SHAREPOINT_OUT_OF_DISK_SPACE
    return FilterStateReason.UNKNOWN_ERROR


def _connect(site: SiteUrl, settings: FilterSettings) -> http.client.HTTPConnection:
    if site.https:
        context = settings.sharepoint_ssl_context or ssl.create_default_context()
        return http.client.HTTPSConnection(
            site.host, site.port, timeout=settings.sharepoint_timeout, context=context
        )
    # Only reached for a prefix that allows http explicitly (R13).
    return http.client.HTTPConnection(site.host, site.port, timeout=settings.sharepoint_timeout)


def _put(
    site: SiteUrl,
    name: str,
    source: Path,
    fmt: str,
    settings: FilterSettings,
    cancelled: threading.Event,
) -> None:
    try:
        f = open(source, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc
    conn = _connect(site, settings)
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                conn.putrequest(
                    "PUT", f"{site.path}/{quote(name, safe='')}", skip_accept_encoding=True
                )
                conn.putheader("Content-Type", content_type_for(fmt))
                conn.putheader("Content-Length", str(size))
                if settings.sharepoint_username is not None:
                    token = f"{settings.sharepoint_username}:{settings.sharepoint_password or ''}"
                    conn.putheader(
                        "Authorization", "Basic " + base64.b64encode(token.encode()).decode("ascii")
                    )
                conn.endheaders()
            except (OSError, http.client.HTTPException) as exc:
                raise FilterFailure(FilterStateReason.UNKNOWN_ERROR, repr(exc)) from exc
            try:
                _send_body(conn, f, size, settings.chunk_size, cancelled)
            except (OSError, http.client.HTTPException) as exc:
                # The server may have answered early (a 403 or 413 before reading the body)
                # and closed: its status says more than the broken pipe.
                status = _early_status(conn)
                reason = _status_reason(status) if status else None
                raise FilterFailure(reason or FilterStateReason.UNKNOWN_ERROR, repr(exc)) from exc
            try:
                response = conn.getresponse()
                detail = response.read(_MAX_RESPONSE_BODY)
            except (OSError, http.client.HTTPException) as exc:
                raise FilterFailure(FilterStateReason.UNKNOWN_ERROR, repr(exc)) from exc
            reason = _status_reason(response.status)
            if reason is not None:
                raise FilterFailure(
                    reason, f"HTTP {response.status} {response.reason}: {detail[:200]!r}"
                )
    finally:
        # On cancel this drops the connection before Content-Length bytes were sent, so the
        # server sees an incomplete upload and keeps nothing.
        conn.close()


def _send_body(
    conn: http.client.HTTPConnection,
    f: BinaryReader,
    size: int,
    chunk_size: int,
    cancelled: threading.Event,
) -> None:
    remaining = size
    while remaining > 0:
        check_cancel(cancelled)
        data = read_full(f, min(chunk_size, remaining))
        if not data:
            raise SourceError("document shrank while being uploaded")
        conn.send(data)
        remaining -= len(data)


def _early_status(conn: http.client.HTTPConnection) -> int | None:
    try:
        return conn.getresponse().status
    except Exception:
        return None


__all__ = ["run"]
