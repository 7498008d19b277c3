"""The web console in a real headless browser (Debian's chromium through Playwright, never a
downloaded one) against a real ``dsc serve``, and against a real Samba AD DC for signing in
(issue 19, section 4): cancel an active job, retry a failed one, purge with a dry run first,
scanner-controlled text shown as text, a forged cross-site POST refused, screenshots at 1,366
and 1,920 px with no horizontal scroll (kept under the test's tmp dir), sign-in as a member of
the admin group and as a non-member, and a scan process created, edited and deleted."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from dsc_bindings.directory.ldap import Directory
from dsc_bindings.directory.scan_processes import ProcessStore
from dsc_bindings.store.instances import (
    HEARTBEAT,
    INSERT,
    LEADER_LOCK,
    LOCK_WITHOUT_TERM,
    NO_TERM,
    TAKING_THE_LEAD,
)
from dsc_bindings.store.postgresql import SCHEMA_VERSION
from dsc_core.model import FileShareInstructions
from e2e_support import ServerProcess, Soap, dsc
from engines_support import database_of_schema
from samba_support import USERS, SambaDC
from test_cluster import cluster_config, instances, read, start
from test_cluster_leader import a_holder_without_a_term
from test_directory import settings
from test_status_page_browser import ARGS, CHROMIUM, playwright_api

__all__ = ["instances"]  # the fixture, used by name

if TYPE_CHECKING:
    from engines_support import PgCluster

expect = playwright_api.expect
HOSTILE = '<img src=x onerror="window.pwned=1">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def no_horizontal_scroll(page: Any) -> bool:
    return bool(
        page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )


def confirm(page: Any) -> None:
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Confirm").click()


def test_cancel_retry_purge_from_the_page(browser: Any, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        image = tmp_path / "page.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(20_000))
        blocker = tmp_path / "data" / "shares" / "localhost"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"not a folder")  # the file share filter fails
        failed = dsc("scan", "--server", server.url, "--quiet", "--json", str(image))
        assert failed.code == 1, failed
        failed_token = failed.json()["token"]
        soap = Soap(server.url)
        active = soap.create([FileShareInstructions((r"\\localhost\scans",))], user=HOSTILE)
        asked: list[str] = []
        context = browser.new_context(viewport={"width": 1366, "height": 768})
        page = context.new_page()
        page.on("request", lambda r: asked.append(r.url))
        base = f"http://127.0.0.1:{server.port}"
        page.goto(base + "/")
        row = page.locator(f"#job-{active}")
        # Scanner-controlled text is shown as text: no element made of it, no script run.
        expect(row).to_contain_text(HOSTILE, timeout=15_000)
        assert row.locator("img").count() == 0
        assert page.evaluate("window.pwned") is None
        page.screenshot(path=str(tmp_path / "console-1366.png"), full_page=True)
        assert no_horizontal_scroll(page)
        # Cancel, with a confirmation, from the keyboard alone (labelled controls, Tab order).
        label = f"Cancel job {active}"
        for _ in range(60):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.getAttribute('aria-label')") == label:
                break
        else:
            raise AssertionError(f"no Tab stop reaches the button {label!r}")
        page.keyboard.press("Enter")
        expect(page.locator("#confirm")).to_be_visible()
        assert page.evaluate("document.activeElement.textContent") == "Cancel"  # the safe one
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")
        expect(page.locator("#done")).to_contain_text(f"job {active} canceled")
        expect(page.locator("#active-table")).to_contain_text("no active jobs")
        # Retry the failed job once its share works.
        blocker.unlink()
        page.get_by_role("link", name="History", exact=True).click()
        failed_row = page.locator(f"#job-{failed_token}")
        expect(failed_row).to_contain_text("failed")
        page.set_viewport_size({"width": 1920, "height": 1080})
        page.screenshot(path=str(tmp_path / "console-1920.png"), full_page=True)
        assert no_horizontal_scroll(page)
        page.set_viewport_size({"width": 1366, "height": 768})
        failed_row.get_by_role("button", name=f"Retry job {failed_token}").click()
        confirm(page)
        expect(page.locator("#done")).to_contain_text("1 filter(s) run again")
        expect(page.locator(f"#job-{failed_token}")).to_contain_text("succeeded", timeout=15_000)
        [written] = blocker.rglob("page_0001.png")
        # The history is searched on the server: a part of one token finds that job only.
        search = page.locator("#search")
        search.get_by_label("Search").fill(failed_token[-12:])
        search.get_by_role("button", name="Search").click()
        expect(page.locator("#history-table tbody tr")).to_have_count(1)
        expect(page.locator(f"#job-{failed_token}")).to_be_visible()
        search.get_by_label("Search").fill("")
        search.get_by_role("button", name="Search").click()
        expect(page.locator(f"#job-{active}")).to_be_visible()
        # The job detail view.
        page.locator(f"#job-{failed_token} a").click()
        expect(page.locator("#job-filters")).to_contain_text("fileshare")
        # The file the retry's re-run wrote, by its path (issue 19: file names written).
        expect(page.locator("#job-filters ul.delivered li")).to_have_text([str(written)])
        page.screenshot(path=str(tmp_path / "job-detail-1366.png"), full_page=True)
        assert no_horizontal_scroll(page)  # a long path wraps in its cell
        expect(page.locator("#job-documents")).to_contain_text("1")
        # Purge: the dry run first, then the purge with a confirmation.
        page.get_by_role("link", name="History", exact=True).click()
        page.locator("#purge-box summary").click()
        page.get_by_label("Jobs that ended before").fill("2999-01-01T00:00")
        page.get_by_role("button", name="Preview (dry run)").click()
        expect(page.locator("#purge-preview")).to_contain_text("2 job(s) ended before")
        assert soap.wait_ended(active).state == "Canceled"  # still there after the dry run
        page.get_by_role("button", name="Purge 2 job(s)").click()
        confirm(page)
        expect(page.locator("#done")).to_contain_text("2 job(s) purged")
        expect(page.locator("#history-table")).to_contain_text("no jobs match")
        # Live: a job created while the page is open appears without a reload.
        page.get_by_role("link", name="Active jobs", exact=True).click()
        loads: list[str] = []
        page.on("load", lambda _: loads.append("load"))
        late = soap.create([FileShareInstructions((r"\\localhost\scans",))])
        expect(page.locator(f"#job-{late}")).to_be_visible(timeout=10_000)
        assert loads == []
        soap.dsc_cancel(late)
        # Every request went to this server (no CDN).
        assert asked and all(url.startswith(base + "/") for url in asked), asked
        # SQLite: one instance, no Cluster section, nothing of it in the JSON or /metrics.
        expect(page.locator("#nav-cluster")).to_be_hidden()
        assert "dsc_cluster_" not in read(server, "/metrics")[1]
        assert "cluster" not in json.loads(read(server, "/status.json")[1])
        code, text = read(server, "/api/cluster")
        assert code == 404 and 'need [store] kind = \\"postgresql\\"' in text, text
        # A forged cross-site POST (a page elsewhere, with the session cookie) is refused.
        status = page.evaluate(
            """async () => {
              const r = await fetch('/api/history/purge', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({before: '2999-01-01T00:00:00Z'})});
              return r.status; }"""
        )
        assert status == 403  # same origin, but without the session's CSRF token
        context.close()
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


def test_sign_in_and_scan_processes_with_the_directory(
    browser: Any, samba_dc: SambaDC, tmp_path: Path
) -> None:
    directory = Directory(settings(samba_dc))
    config = tmp_path / "dsc.toml"
    config.write_text(samba_dc.config(config), encoding="utf-8")
    # A real dsc serve: it advertises its bound address, the origin the browser's POSTs carry.
    server = ServerProcess(tmp_path / "data", config=config).start()
    try:
        signed_in_and_processes(browser, directory, server.port, tmp_path)
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


def signed_in_and_processes(browser: Any, directory: Directory, port: int, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    form = page.locator("#sign-in")
    form.get_by_label("User name").fill("bob")
    form.get_by_label("Password").fill(USERS["bob"][0])
    form.get_by_role("button", name="Sign in").click()
    expect(page.locator("#alert")).to_contain_text("not a scan administrator")
    expect(page.locator("#nav")).to_be_hidden()
    form.get_by_label("User name").fill("alice")
    form.get_by_label("Password").fill(USERS["alice"][0])
    form.get_by_role("button", name="Sign in").click()
    expect(page.locator("#user")).to_contain_text("signed in as alice")
    page.get_by_role("link", name="Scan processes", exact=True).click()
    name = "Browser receipts"
    process = page.locator("#process-form")
    process.get_by_label("Name", exact=True).fill(name)
    process.get_by_label("Scan server name").fill("scan.samdom.example.com")
    process.get_by_label("Shared folders, one a line").fill(r"\\files\scans\receipts")
    process.get_by_label("Groups allowed, one a line (empty: everyone)").fill("sales")
    process.get_by_role("button", name="Save").click()
    table = page.locator("#processes-table")
    expect(table).to_contain_text(name)
    expect(table).to_contain_text("sales")
    page.get_by_role("button", name=f"Edit {name}").click()
    process.get_by_label("Shared folders, one a line").fill(r"\\files\scans\paid")
    process.get_by_role("button", name="Save").click()
    expect(table).to_contain_text(r"\\files\scans\paid")
    conn = directory.connect()
    try:
        stored = ProcessStore(directory, conn).get(name)
    finally:
        conn.unbind()
    assert stored is not None and stored.shares == (r"\\files\scans\paid",)
    assert stored.allow == ("sales",)
    page.screenshot(path=str(tmp_path / "console-processes-1366.png"), full_page=True)
    assert no_horizontal_scroll(page)
    page.get_by_role("button", name=f"Delete {name}").click()
    confirm(page)
    expect(table).not_to_contain_text(name)
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#sign-in-section")).to_be_visible()
    context.close()


def test_the_cluster_section_on_a_postgresql_store(
    browser: Any, tmp_path: Path, pg: PgCluster
) -> None:
    """Issue 18 point 6: the Cluster section lists the instances on the PostgreSQL store (two
    here), this one the leader, each up, with its address."""
    config = cluster_config(tmp_path, pg.new_database())
    servers = [ServerProcess(tmp_path / name, config=config) for name in ("a", "b")]
    try:
        for server in servers:
            (tmp_path / server.data.name).mkdir()
            server.start()
        context = browser.new_context(viewport={"width": 1366, "height": 768})
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{servers[0].port}/")
        page.get_by_role("link", name="Cluster", exact=True).click()
        rows = page.locator("#cluster-table tbody tr")
        expect(rows).to_have_count(2, timeout=15_000)
        for server in servers:
            row = rows.filter(has_text=f"127.0.0.1:{server.port}")
            expect(row).to_contain_text("up")
        expect(rows.filter(has_text=f":{servers[0].port}")).to_contain_text("leader")
        expect(rows.filter(has_text=f":{servers[1].port}")).not_to_contain_text("leader")
        expect(page.locator("#cluster-self")).to_contain_text("(the leader)")
        assert no_horizontal_scroll(page)
        context.close()
        for server in servers:
            server.stop_cleanly()
    finally:
        for server in servers:
            if server.alive:
                server.kill9()


def test_the_cluster_section_shows_a_lock_holder_that_cannot_take_a_term_as_failing(
    browser: Any, tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """Holding the leader's lock without a term is not leading (runtime/announcing.py): the
    section says so for this instance and its row, in the failure colour, not "the leader"."""
    holder, _, _ = a_holder_without_a_term(tmp_path, pg, instances)
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{holder.port}/")
    page.get_by_role("link", name="Cluster", exact=True).click()
    own = page.locator("#cluster-self")
    expect(own).to_contain_text(f"({LOCK_WITHOUT_TERM}: {NO_TERM})", timeout=15_000)
    expect(own).not_to_contain_text("(the leader)")
    expect(own).to_have_class("failed")
    cell = page.locator("#cluster-table tbody tr", has_text=f":{holder.port}").locator("td.failed")
    expect(cell).to_have_text(f"{LOCK_WITHOUT_TERM}: {NO_TERM}")
    assert no_horizontal_scroll(page)
    context.close()


def test_the_cluster_section_shows_a_holder_taking_the_lead_as_no_failure(
    browser: Any, tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """A holder of the leader's lock whose term is not taken yet and nothing failed is shown
    ``taking the lead`` in the plain colour; one whose attempt failed, and one of an earlier
    version that does not say (``term_failing`` null), in the failure colour with why.  The
    page shows the server's ``fails_to_lead`` (store/instances.py ``Leadership``), ruling
    nothing again.  The test plays the holder on a connection of its own (its row, the lock,
    a heartbeat as runtime/cluster.py writes it), so the state stays open for as long as it
    looks; the real ``dsc serve`` beside it shows it."""
    dsn = pg.new_database()
    database_of_schema(dsn, SCHEMA_VERSION)
    played = str(uuid.uuid4())
    address = "http://127.0.0.1:1/ScanServer"
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute(INSERT, (played, "dsc-taking", address, "host", 1, 3600, "host:/played"))
        assert holder.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone() == (
            True,
        )
        # Its lock, not yet its term, and nothing failed: runtime/cluster.py's first beat.
        holder.execute(HEARTBEAT, ("dsc-taking", address, False, False, played))
        server = start(instances, tmp_path, cluster_config(tmp_path, dsn))
        context = browser.new_context(viewport={"width": 1366, "height": 768})
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.get_by_role("link", name="Cluster", exact=True).click()
        row = page.locator("#cluster-table tbody tr", has_text="dsc-taking")
        cell = row.locator("td").nth(5)  # Leader
        expect(cell).to_have_text(TAKING_THE_LEAD, timeout=15_000)
        expect(cell).not_to_have_class(re.compile("failed"))
        own = page.locator("#cluster-self")
        expect(own).not_to_contain_text("(the leader)")
        expect(own).not_to_have_class(re.compile("failed"))
        assert no_horizontal_scroll(page)
        stuck = f"{LOCK_WITHOUT_TERM}: {NO_TERM}"
        # Its attempt failed; then a server of an earlier version, which does not say.
        for failing in (True, None):
            holder.execute(
                "UPDATE instances SET term_failing = %s WHERE id = %s", (failing, played)
            )
            page.reload()
            expect(cell).to_have_text(stuck, timeout=15_000)
            expect(cell).to_have_class("failed")
        context.close()
    server.stop_cleanly()
