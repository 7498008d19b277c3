"""R13 (R9 SharePoint, e-mail): where documents and the configured credentials may go.

The SharePoint tests use a real listening socket that counts connections: "nothing is sent"
means not even a TCP connection reaches a refused site."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from dsc_bindings.filters import FilterSettings, mail, sharepoint
from dsc_bindings.filters.sites import SiteError, SitePrefix, parse_site_url
from dsc_core.model import (
    EmailInstructions,
    FilterState,
    FilterStateReason,
    SharePointInstructions,
)
from test_filters_mail import Inbox
from test_filters_support import Listener, UploadServer, make_documents, make_job, refused_port

# --- URL normalization ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, normalized",
    [
        ("https://SP.Contoso.COM/sites/Scans/", "https://sp.contoso.com/sites/Scans"),
        ("https://sp.contoso.com:443/a%20b//c", "https://sp.contoso.com:443/a%20b/c"),
        ("  http://10.0.0.1:8080  ", "http://10.0.0.1:8080"),
    ],
)
def test_site_urls_are_normalized(url: str, normalized: str) -> None:
    assert str(parse_site_url(url)) == normalized


@pytest.mark.parametrize(
    "url",
    [
        "https://sp.contoso.com@evil.example/sites/scans",  # user information
        "https://user:pw@sp.contoso.com/sites/scans",
        "https://sp.contoso.com/sites/scans/../../other",  # dot segments are not resolved
        "https://sp.contoso.com/sites/scans/%2e%2e/other",
        "https://sp.contoso.com/sites/scans%2f..%2fother",  # an encoded slash
        "https://sp.contoso.com/sites/sc%0d%0aans",
        "ftp://sp.contoso.com/x",
        "https:///nohost",
        "https://sp.contoso.com/x?y=1",
    ],
)
def test_unusable_site_urls(url: str) -> None:
    with pytest.raises(SiteError):
        parse_site_url(url)


def test_plain_http_prefix_needs_allow_http() -> None:
    with pytest.raises(ValueError, match="allow_http"):
        SitePrefix("http://intranet/scans")
    assert SitePrefix("http://intranet/scans", allow_http=True).allow_http


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("https://sp.contoso.com/sites/scans", True),
        ("https://sp.contoso.com/sites/scans/Shared Documents", True),
        ("https://SP.contoso.com/Sites/SCANS/x", True),  # host and path case-insensitive
        ("https://sp.contoso.com:443/sites/scans", True),
        ("https://sp.contoso.com/sites/scansevil", False),  # whole segments only
        ("https://sp.contoso.com/sites", False),
        ("https://sp.contoso.com:8443/sites/scans", False),  # another port
        ("http://sp.contoso.com/sites/scans", False),  # https only for this prefix
        ("https://evil.example/sites/scans", False),
        ("https://sp.contoso.com.evil.example/sites/scans", False),
    ],
)
def test_prefix_matching(url: str, allowed: bool) -> None:
    settings = FilterSettings(sharepoint_sites=(SitePrefix("https://sp.contoso.com/sites/scans"),))
    assert settings.sharepoint_allows(parse_site_url(url)) is allowed


def test_allow_http_prefix_also_takes_https() -> None:
    prefix = SitePrefix("http://intranet:8080/scans", allow_http=True)
    assert prefix.covers(parse_site_url("http://intranet:8080/scans/a"))
    assert prefix.covers(parse_site_url("https://intranet:8080/scans/a"))
    assert not prefix.covers(parse_site_url("http://intranet/scans/a"))


# --- the SharePoint filter sends nothing to a refused site ------------------------------------


@pytest.fixture
def listener() -> Iterator[Listener]:
    spy = Listener()
    try:
        yield spy
    finally:
        spy.close()


CREDENTIALS = {"sharepoint_username": "svc-scan", "sharepoint_password": "s3cret"}


def _sharepoint(job: Any, docs: Any, settings: FilterSettings) -> Any:
    return sharepoint.run(job, 0, docs, settings, threading.Event())


@pytest.mark.parametrize(
    "configured",
    [
        (),  # nothing configured: every site is refused
        (SitePrefix("https://sp.contoso.com/sites/scans"),),
    ],
)
def test_site_outside_prefixes_gets_nothing(
    tmp_path: Path, listener: Listener, configured: tuple[SitePrefix, ...]
) -> None:
    docs = make_documents(tmp_path, ("png", b"secret page"))
    settings = FilterSettings(sharepoint_timeout=5, sharepoint_sites=configured, **CREDENTIALS)
    outcome = _sharepoint(
        make_job(SharePointInstructions(False, (listener.url("/sites/scans"),))), docs, settings
    )
    assert outcome.state is FilterState.CANCELED
    assert outcome.reasons == (FilterStateReason.SHAREPOINT_ACCESS_DENIED,)
    assert listener.connections == 0 and listener.received == b""


def test_http_to_an_https_prefix_gets_nothing(tmp_path: Path, listener: Listener) -> None:
    """Same host and port as the configured prefix, but plain http: the password would cross
    the network readable, so nothing is sent."""
    docs = make_documents(tmp_path, ("png", b"secret page"))
    settings = FilterSettings(
        sharepoint_timeout=5,
        sharepoint_sites=(SitePrefix(f"https://127.0.0.1:{listener.port}/sites"),),
        **CREDENTIALS,
    )
    outcome = _sharepoint(
        make_job(SharePointInstructions(False, (listener.url("/sites/scans"),))), docs, settings
    )
    assert outcome.reasons == (FilterStateReason.SHAREPOINT_ACCESS_DENIED,)
    assert listener.connections == 0


def test_one_refused_site_stops_the_allowed_one_too(tmp_path: Path, listener: Listener) -> None:
    docs = make_documents(tmp_path, ("png", b"page"))
    with UploadServer() as good:
        settings = FilterSettings(
            sharepoint_timeout=5,
            sharepoint_sites=(SitePrefix(good.url("/ok"), allow_http=True),),
            **CREDENTIALS,
        )
        job = make_job(SharePointInstructions(False, (good.url("/ok/a"), listener.url("/x"))))
        outcome = _sharepoint(job, docs, settings)
    assert outcome.reasons == (FilterStateReason.SHAREPOINT_ACCESS_DENIED,)
    assert good.stored == {} and listener.connections == 0


def test_allowed_site_gets_documents_and_credentials(tmp_path: Path) -> None:
    docs = make_documents(tmp_path, ("png", b"page"))
    with UploadServer() as good:
        settings = FilterSettings(
            sharepoint_timeout=5,
            sharepoint_sites=(SitePrefix(good.url("/ok"), allow_http=True),),
            **CREDENTIALS,
        )
        outcome = _sharepoint(
            make_job(SharePointInstructions(False, (good.url("/OK/team"),))), docs, settings
        )
    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
    # What was checked is what was sent: the normalized path.
    assert good.stored == {"/OK/team/Scan_0001.png": b"page"}
    assert good.headers["/OK/team/Scan_0001.png"]["Authorization"].startswith("Basic ")


# --- e-mail recipients outside the configured domains ---------------------------------------


@pytest.fixture
def relay() -> Iterator[tuple[Inbox, int]]:
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=refused_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def _mail(job: Any, docs: Any, port: int, domains: tuple[str, ...] | None) -> Any:
    settings = FilterSettings(
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_timeout=5,
        mail_from="scans@corp.example",
        mail_domains=domains,
    )
    return mail.run(job, 0, docs, settings, threading.Event())


def test_recipients_outside_domains_are_refused(tmp_path: Path, relay: tuple[Inbox, int]) -> None:
    inbox, port = relay
    docs = make_documents(tmp_path, ("png", b"page"))
    job = make_job(EmailInstructions(False, ("thief@evil.example", "x@corp.example.evil")))
    outcome = _mail(job, docs, port, ("corp.example",))
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.UNABLE_TO_SEND_EMAIL,)
    assert inbox.messages == []


def test_allowed_recipients_still_get_the_message(tmp_path: Path, relay: tuple[Inbox, int]) -> None:
    inbox, port = relay
    docs = make_documents(tmp_path, ("png", b"page"))
    job = make_job(
        EmailInstructions(
            False,
            ("thief@evil.example", "bob@CORP.example", "ann@eu.corp.example", "c@[127.0.0.1]"),
        )
    )
    outcome = _mail(job, docs, port, ("corp.example", ".corp.example"))
    assert outcome.reasons == (FilterStateReason.UNABLE_TO_SEND_EMAIL,)
    [(_, rcpt, content)] = inbox.messages
    assert rcpt == ["bob@CORP.example", "ann@eu.corp.example"]
    assert b"evil.example" not in content and b"127.0.0.1" not in content


def test_without_a_domain_list_every_domain_is_allowed(
    tmp_path: Path, relay: tuple[Inbox, int]
) -> None:
    inbox, port = relay
    docs = make_documents(tmp_path, ("png", b"page"))
    outcome = _mail(make_job(EmailInstructions(False, ("a@anywhere.example",))), docs, port, None)
    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY
    assert len(inbox.messages) == 1


def test_bad_domain_entries_are_refused() -> None:
    for bad in ("", "a@b", "two words", "."):
        with pytest.raises(ValueError):
            FilterSettings(mail_domains=(bad,))
