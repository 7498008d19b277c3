"""The web console's page (issue 19, section 3): three static files, package data, served as
they are (no build step, no CDN): ``GET /`` (HTML), ``/console.js``, ``/console.css``, and
``/dom.js`` (the drawing helpers the read-only status page of issue 9, now at ``/status``, loads
too).
They hold no data (all of it comes from /api/), so anyone who reaches the server may load them;
the page then signs in.  The CSP allows scripts and styles from this server only ('self'):
these files, never inline code (.statuspage.SECURITY_HEADERS)."""

from __future__ import annotations

import functools
from importlib import resources

from dsc_core import Reply

__all__ = ["PATHS", "page_reply"]

#: path -> (package file, content type)
_FILES = {
    "/": ("console.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    # What console.js and the /status page both draw with.
    "/dom.js": ("dom.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
}
PATHS = frozenset(_FILES)


@functools.cache
def page_reply(path: str) -> Reply:
    name, content_type = _FILES[path]
    return Reply(200, content_type, resources.files(__package__).joinpath(name).read_bytes())
