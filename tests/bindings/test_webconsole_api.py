"""The web console's JSON API (issue 19, section 1) on its own, over real sockets on both
bindings: sessions and CSRF, jobs (paged, searched, one job), cancel, purge with a dry run,
ETags, errors as JSON that say what to do, and openapi.json describing every route."""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dsc_bindings.directory.ldap import Directory, DirectorySettings
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.webconsole.api import ROUTES, openapi_document
from dsc_bindings.webconsole.session import SessionBook, SignInLimiter, cookie_value
from dsc_core import ServerConfig
from test_http_bindings import Raw, create_job, pki, running

__all__ = ["Browser", "pki"]  # pki: the TLS fixture, used here


@pytest.fixture(params=["async", "blocking"])
def binding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Browser:
    """A client that keeps the session cookie, as a browser would."""

    port: int
    cookie: str = ""
    #: The server's address (a non-loopback one in the plain-HTTP password test).
    host: str = "127.0.0.1"
    csrf: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    #: A TLS client context (with its certificate), else plain HTTP.
    context: ssl.SSLContext | None = None

    def call(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> Answer:
        conn = self.connection()
        sent = dict(self.extra)
        if self.cookie:
            sent["Cookie"] = self.cookie
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        conn.request(method, path, body=data, headers=sent)
        reply = conn.getresponse()
        answer = Answer(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
        conn.close()
        cookie = answer.headers.get("set-cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        return answer

    def connection(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=10, context=self.context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

    def sign_in(self, body: dict[str, str] | None = None) -> Answer:
        answer = self.call("POST", "/api/session", body or {})
        if answer.status == 200:
            self.csrf = answer.json["csrf"]
        return answer

    def change(self, method: str, path: str, body: object = None) -> Answer:
        return self.call(method, path, body, {"X-CSRF-Token": self.csrf})


def test_sign_in_cancel_purge_over_real_sockets(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        raw = Raw(srv.port)
        token = create_job(raw)
        browser = Browser(srv.port)
        state = browser.call("GET", "/api/session")
        assert state.status == 200 and state.json == {"signed_in": False, "sign_in": "open"}
        # Reads work in the development mode (R10: everyone is an administrator) ...
        jobs = browser.call("GET", "/api/jobs").json["jobs"]
        assert [j["token"] for j in jobs] == [token] and jobs[0]["active"]
        # ... changes need a session and its CSRF token.
        refused = browser.call("POST", f"/api/jobs/{token}/cancel")
        assert refused.status == 401 and "Sign in" in refused.json["error"]
        signed = browser.sign_in()
        assert signed.status == 200, signed.body
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        forged = browser.call("POST", f"/api/jobs/{token}/cancel")
        assert forged.status == 403 and "X-CSRF-Token" in forged.json["error"]
        assert browser.call("GET", f"/api/jobs/{token}").json["job"]["active"]
        canceled = browser.change("POST", f"/api/jobs/{token}/cancel")
        assert canceled.status == 200 and canceled.json == {"token": token, "canceled": True}
        job = browser.call("GET", f"/api/jobs/{token}").json["job"]
        assert job["state"] == "Canceled" and job["timeline"][-1]["what"] == "ended Canceled"
        again = browser.change("POST", f"/api/jobs/{token}/cancel")
        assert again.status == 409 and "already ended" in again.json["error"]
        retry = browser.change("POST", f"/api/jobs/{token}/retry")
        assert retry.status == 409 and "cannot be retried" in retry.json["error"]
        # Purge: the dry run lists, changes nothing; then the purge removes.
        before = "2999-01-01T00:00:00+00:00"
        dry = browser.change("POST", "/api/history/purge", {"before": before, "dry_run": True})
        assert dry.status == 200 and dry.json["count"] == 1 and dry.json["tokens"] == [token]
        assert browser.call("GET", f"/api/jobs/{token}").status == 200
        done = browser.change("POST", "/api/history/purge", {"before": before})
        assert done.status == 200 and done.json["purged"] == 1
        gone = browser.call("GET", f"/api/jobs/{token}")
        assert gone.status == 404 and token in gone.json["error"]
        # Sign-out ends the session: the next change is refused again.
        assert browser.change("DELETE", "/api/session").status == 200
        assert browser.change("POST", "/api/history/purge", {"before": before}).status == 401


def test_jobs_are_paged_and_searched(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        raw = Raw(srv.port)
        tokens = [create_job(raw) for _ in range(5)]
        browser = Browser(srv.port)
        browser.sign_in()
        for token in tokens[:4]:
            assert browser.change("POST", f"/api/jobs/{token}/cancel").status == 200
        ended = browser.call("GET", "/api/jobs?state=ended&limit=3").json
        assert ended["history_size"] == 4 and len(ended["jobs"]) == 3 and ended["next"]
        rest = browser.call("GET", f"/api/jobs?state=ended&limit=3&cursor={ended['next']}").json
        seen = [j["token"] for j in ended["jobs"] + rest["jobs"]]
        assert seen == tokens[3::-1] and not rest["next"]  # newest first, each once
        active = browser.call("GET", "/api/jobs?state=active").json["jobs"]
        assert [j["token"] for j in active] == [tokens[4]]
        # A filtered page stops at the limit and continues where it stopped.
        first = browser.call("GET", "/api/jobs?state=canceled&q=alice&limit=1").json
        assert [j["token"] for j in first["jobs"]] == [tokens[3]]
        second = browser.call("GET", f"/api/jobs?state=canceled&limit=2&cursor={first['next']}")
        assert [j["token"] for j in second.json["jobs"]] == [tokens[2], tokens[1]]
        found = browser.call("GET", f"/api/jobs?q={tokens[2][-8:]}").json["jobs"]
        assert [j["token"] for j in found] == [tokens[2]]
        assert browser.call("GET", "/api/jobs?q=nobody-like-this").json["jobs"] == []
        bad = browser.call("GET", "/api/jobs?since=yesterday")
        assert bad.status == 400 and "since" in bad.json["error"]
        assert browser.call("GET", "/api/jobs?limit=0").status == 400
        assert browser.call("GET", "/api/jobs?cursor=nonsense").status == 400


def test_unchanged_answers_are_304_with_the_etag(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        browser = Browser(srv.port)
        first = browser.call("GET", "/api/jobs")
        tag = first.headers["etag"]
        same = browser.call("GET", "/api/jobs", headers={"If-None-Match": tag})
        assert same.status == 304 and same.body == b""
        # RFC 9110 8.6: no Content-Length unless it were the 200's.
        assert "content-length" not in same.headers and same.headers["etag"] == tag
        create_job(Raw(srv.port))
        changed = browser.call("GET", "/api/jobs", headers={"If-None-Match": tag})
        assert changed.status == 200 and changed.headers["etag"] != tag


def test_errors_are_json_that_say_what_to_do(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        browser = Browser(srv.port)
        browser.sign_in()
        missing = browser.call("GET", "/api/nothing")
        assert missing.status == 404 and "openapi.json" in missing.json["error"]
        wrong = browser.call("PUT", "/api/jobs")
        assert wrong.status == 405 and wrong.headers["allow"] == "GET"
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request(
            "POST",
            "/api/history/purge",
            body=b"before=1",
            headers={
                "Cookie": browser.cookie,
                "X-CSRF-Token": browser.csrf,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        reply = conn.getresponse()
        assert reply.status == 415 and b"application/json" in reply.read()
        naive = browser.change("POST", "/api/history/purge", {"before": "2020-01-01T00:00:00"})
        assert naive.status == 400 and "UTC offset" in naive.json["error"]
        # A browser that says the request comes from another site is refused before anything.
        browser.extra["Sec-Fetch-Site"] = "cross-site"
        assert browser.change("POST", "/api/history/purge", {"before": "2020"}).status == 403


def test_devices_subscriptions_health_and_settings(binding: str, tmp_path: Path) -> None:
    filters = dataclasses.replace(
        FilterSettings.embedded_default(tmp_path / "data"), smtp_password="hunter2-secret"
    )
    with running(binding, tmp_path, filters=filters) as srv:
        create_job(Raw(srv.port))
        browser = Browser(srv.port)
        devices = browser.call("GET", "/api/devices").json["devices"]
        assert [d["address"] for d in devices] == ["127.0.0.1"]
        assert browser.call("GET", "/api/subscriptions").json == {"subscriptions": []}
        health = browser.call("GET", "/api/health").json
        assert health["status"] in ("ok", "degraded") and health["checks"]
        answer = browser.call("GET", "/api/settings")
        settings = answer.json
        assert settings["server"]["limits"]["max_connections"] > 0
        assert b"hunter2-secret" not in answer.body
        assert settings["filters"]["smtp_password"] == "(set)"
        assert settings["filters"]["sharepoint_password"] == ""


def test_openapi_describes_every_route() -> None:
    document = openapi_document()
    described = {
        (method.upper(), path) for path, ops in document["paths"].items() for method in ops
    }
    assert described == set(ROUTES)


def test_sessions_end_when_idle_and_after_the_absolute_timeout() -> None:
    now = [0.0]
    book = SessionBook(idle_seconds=10, absolute_seconds=25, clock=lambda: now[0])
    session = book.open("alice", "password")
    assert cookie_value(f"x=1; dsc_session={session.token}") == session.token
    now[0] = 9
    assert book.find(session.token) is not None
    now[0] = 18  # 9 s after its last use: still alive
    assert book.find(session.token) is not None
    now[0] = 26  # busy all along, but past the absolute timeout
    assert book.find(session.token) is None
    other = book.open("bob", "password")
    now[0] = 36
    assert book.find(other.token) is None  # idle for 10 s


def test_failed_sign_ins_are_limited_per_address_and_account() -> None:
    now = [0.0]
    limiter = SignInLimiter(max_failures=3, window_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.wait_seconds("10.0.0.1", "alice") == 0
        limiter.failed("10.0.0.1", "alice")
    assert limiter.wait_seconds("10.0.0.1", "bob") > 0  # the address is limited
    assert limiter.wait_seconds("10.0.0.2", "Alice") > 0  # so is the account, from anywhere
    assert limiter.wait_seconds("10.0.0.2", "bob") == 0
    now[0] = 61
    assert limiter.wait_seconds("10.0.0.1", "alice") == 0


def test_client_certificates_over_tls(
    binding: str, tmp_path: Path, pki: dict[str, ssl.SSLContext]
) -> None:
    """With client certificates (R10): an administrator's certificate reads and gets a session
    (its cookie Secure under TLS); another's is refused; a password is not how one signs in."""
    config = ServerConfig(
        require_client_certificates=True,
        scan_admins=frozenset({"admin"}),
        base_url="https://127.0.0.1:5362",
    )
    with running(binding, tmp_path, config, ssl_context=pki["server"]) as srv:
        admin = Browser(srv.port, context=pki["admin"])
        assert admin.call("GET", "/api/session").json == {
            "signed_in": False,
            "sign_in": "certificate",
        }
        assert admin.call("GET", "/api/jobs").status == 200
        signed = admin.sign_in()
        assert signed.status == 200 and signed.json["user"] == "admin"
        assert signed.json["method"] == "certificate"
        assert "Secure" in signed.headers["set-cookie"]
        password = admin.sign_in({"user": "admin", "password": "x"})
        assert password.status == 400 and "client certificate" in password.json["error"]
        bob = Browser(srv.port, context=pki["bob"])
        refused = bob.call("GET", "/api/jobs")
        assert (
            refused.status == 403 and "'bob' is not a scan administrator" in refused.json["error"]
        )
        assert bob.sign_in().status == 403


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if ipaddress.ip_address(address).is_loopback else address


def test_no_password_over_plain_http_beyond_loopback(tmp_path: Path) -> None:
    """Issue 19: a password never travels over plain HTTP from another machine; the refusal
    comes before the directory is asked (this directory does not even exist)."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve on")
    nowhere = Directory(
        DirectorySettings(
            url="ldaps://dc.invalid",
            bind_user="svc@example.com",
            password="x",
            base_dn="DC=example,DC=com",
        )
    )
    with running("async", tmp_path, directory=nowhere, host=address) as srv:
        browser = Browser(srv.port, host=address)
        refused = browser.sign_in({"user": "alice", "password": "secret"})
        assert refused.status == 403, refused.body
        assert "never accepted over plain HTTP" in refused.json["error"]
