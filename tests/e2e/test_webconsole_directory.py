"""Signing in to the web console with the directory (issue 19, section 2), against a real Samba
AD DC over LDAPS, through the real HTTP server: a member of the admin group (nested) gets a
session, a non-member is refused, a wrong password is refused and counted, and repeated
failures are rate-limited."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsc_bindings.directory.ldap import Directory
from samba_support import DOMAIN, USERS, SambaDC
from test_directory import settings
from test_http_bindings import running
from test_webconsole_api import Browser


def test_sign_in_with_the_directory(
    samba_dc: SambaDC, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running("async", tmp_path, directory=Directory(settings(samba_dc))) as srv:
        browser = Browser(srv.port)
        assert browser.call("GET", "/api/session").json == {
            "signed_in": False,
            "sign_in": "password",
        }
        # With a directory, nothing is shown before signing in.
        assert browser.call("GET", "/api/jobs").status == 401
        assert browser.sign_in({"user": "alice", "password": ""}).status == 400
        # bob is not in scanadmins: the right password is not enough.
        bob = browser.sign_in({"user": "bob", "password": USERS["bob"][0]})
        assert bob.status == 403 and "admin group" in bob.json["error"]
        assert browser.call("GET", "/api/jobs").status == 401
        wrong = browser.sign_in({"user": "alice", "password": "not-her-password"})
        assert wrong.status == 401 and wrong.json["error"] == "The user name or password is wrong."
        assert "failed sign-in as 'alice'" in caplog.text
        # alice is a member through itstaff (nested): signed in.
        alice = browser.sign_in({"user": "alice", "password": USERS["alice"][0]})
        assert alice.status == 200, alice.body
        assert alice.json["user"] == "alice" and alice.json["method"] == "password"
        assert browser.call("GET", "/api/jobs").status == 200
        upn = Browser(srv.port).sign_in({"user": f"alice@{DOMAIN}", "password": USERS["alice"][0]})
        assert upn.status == 200
        # Repeated failures (here from one address) are refused without asking the directory.
        other = Browser(srv.port)
        for _ in range(5):
            assert other.sign_in({"user": "carol", "password": "guess"}).status == 401
        limited = other.sign_in({"user": "carol", "password": USERS["carol"][0]})
        assert limited.status == 429 and int(limited.headers["retry-after"]) > 0
