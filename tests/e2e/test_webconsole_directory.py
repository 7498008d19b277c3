"""Signing in to the web console with the directory (issue 19, section 2), against a real Samba
AD DC over LDAPS, through the real HTTP server: a member of the admin group (nested) gets a
session, a non-member is refused, a wrong password is refused and counted, and repeated
failures are rate-limited."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from dsc_bindings.directory.ldap import Directory
from dsc_bindings.directory.scan_processes import ProcessStore
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


def test_scan_processes_created_edited_and_deleted_through_the_api(
    samba_dc: SambaDC, tmp_path: Path
) -> None:
    directory = Directory(settings(samba_dc))
    with running("blocking", tmp_path, directory=directory) as srv:
        browser = Browser(srv.port)
        assert browser.sign_in({"user": "alice", "password": USERS["alice"][0]}).status == 200
        name = "Web console invoices"
        share = r"\\files.samdom.example.com\scans\invoices"
        body = {"name": name, "shares": [share], "allow": ["sales"], "resolution": 200}
        # The server advertises 127.0.0.1: devices cannot reach that, so a name is needed.
        unknown = browser.change("POST", "/api/processes", body)
        assert unknown.status == 409 and "public_url" in unknown.json["error"]
        local = browser.change("POST", "/api/processes", {**body, "scan_repository": "localhost"})
        assert local.status == 400 and "devices can reach" in local.json["error"]
        nowhere = browser.change(
            "POST", "/api/processes", {"name": name, "scan_repository": "scan.samdom.example.com"}
        )
        assert nowhere.status == 400 and "destination" in nowhere.json["error"]
        created = browser.change(
            "POST", "/api/processes", {**body, "scan_repository": "scan.samdom.example.com"}
        )
        assert created.status == 201, created.body
        twice = browser.change(
            "POST", "/api/processes", {**body, "scan_repository": "scan.samdom.example.com"}
        )
        assert twice.status == 409 and "exists already" in twice.json["error"]
        # In the directory, as dsc process would find it: its groups, its destination.
        conn = directory.connect()
        try:
            stored = ProcessStore(directory, conn).get(name)
        finally:
            conn.unbind()
        assert stored is not None and stored.shares == (share,) and stored.allow == ("sales",)
        listed = browser.call("GET", "/api/processes").json["processes"]
        assert name in [p["name"] for p in listed]
        other = r"\\files.samdom.example.com\scans\paid"
        edited = browser.change(
            "PUT",
            f"/api/processes/{quote(name)}",
            {"shares": [other], "allow": ["itstaff", "sales"]},
        )
        assert edited.status == 200, edited.body
        shown = browser.call("GET", f"/api/processes/{quote(name)}").json["process"]
        assert shown["shares"] == [other] and sorted(shown["allow"]) == ["itstaff", "sales"]
        assert shown["resolution"] == 200
        assert browser.change("DELETE", f"/api/processes/{quote(name)}").status == 200
        assert browser.call("GET", f"/api/processes/{quote(name)}").status == 404
