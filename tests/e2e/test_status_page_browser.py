"""The status page in a real headless browser (Debian's chromium, driven by Playwright; the
browser is the system's, never one Playwright downloads): a scan made while the page is open
appears on it without a reload, and the page works offline (nothing but the server is asked)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsc_core.model import FileShareInstructions
from e2e_support import ServerProcess, Soap, dsc, serving

CHROMIUM = os.environ.get("DSC_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    pytest.skip(
        f"no chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
        browser = p.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with serving(ServerProcess(tmp_path / "data")) as server:
        yield server


def test_a_scan_appears_on_the_open_page_without_a_reload(
    browser: Any, server: ServerProcess, tmp_path: Path
) -> None:
    page = browser.new_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    loads: list[str] = []
    page.on("load", lambda _: loads.append("load"))
    base = f"http://127.0.0.1:{server.port}"
    page.goto(base + "/status")
    expect = playwright_api.expect
    expect(page.locator("#status")).to_contain_text("repository Idle", timeout=15_000)
    expect(page.locator("#history tbody")).to_contain_text("no completed jobs")
    expect(page.locator("#devices tbody")).to_contain_text("no devices yet")

    image = tmp_path / "page.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50_000))
    scan = dsc(
        "scan",
        "--server",
        server.url,
        "--quiet",
        "--json",
        "--process-name",
        "Invoices",
        str(image),
    )
    assert scan.code == 0, scan
    token = scan.json()["token"]

    row = page.locator(f"#job-{token}")
    expect(row).to_contain_text("Completed (PostScanJobCompletedSuccessfully)", timeout=15_000)
    expect(row).to_contain_text("fileshare: CompletedSuccessfully")
    expect(row).to_contain_text("\\\\localhost\\scans")  # where it was delivered
    expect(page.locator("#devices tbody")).to_contain_text("127.0.0.1")
    expect(page.locator("#counters")).to_contain_text("Jobs created")
    assert loads == ["load"], "the page was reloaded"
    # Offline: the page asked its own server only (no CDN, no fonts, no scripts elsewhere).
    assert asked and all(url.startswith(base + "/") for url in asked), asked
    assert any(url.endswith("/status.json") for url in asked)
    page.close()


def test_failures_are_red_and_a_vanished_scanner_is_stalled(browser: Any, tmp_path: Path) -> None:
    config = tmp_path / "dsc.toml"
    config.write_text("[jobs]\nstalled_after_seconds = 1\n")
    server = ServerProcess(tmp_path / "data", config=config).start()
    try:
        image = tmp_path / "page.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(5_000))
        failed = dsc(
            "scan", "--server", server.url, "-q", "--json", "--share", r"\\host\..\x", str(image)
        )
        token = failed.json()["token"]
        soap = Soap(server.url)
        stalled = soap.create([FileShareInstructions((r"\\localhost\scans",))])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/status")
        expect = playwright_api.expect
        row = page.locator(f"#job-{token}")
        expect(row).to_contain_text("failed: Aborted (PostScanJobProcessingFailed)", timeout=15_000)
        expect(row).to_have_class("failed")
        # Red, not green: the outcome cell's colour as the browser computed it.
        colour = row.locator("td.failed").evaluate("e => getComputedStyle(e).color")
        assert colour == "rgb(179, 38, 30)", colour
        active = page.locator(f"#job-{stalled}")
        expect(active).to_contain_text("Creating \u2014 stalled", timeout=15_000)
        expect(active).to_have_class("stalled")
        expect(page.locator("#counters")).to_contain_text("Failed")
        page.close()
        soap.dsc_cancel(stalled)
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()
