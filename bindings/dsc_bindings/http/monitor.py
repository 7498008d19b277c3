"""The optional monitoring listener (``[server] monitor_listen``, issue 14): plain HTTP,
no client certificate, only ``GET``/``HEAD /healthz`` and ``/metrics``; anything else 404.

Both endpoints hold no user, token or address (.statuspage), so a monitoring system may read
them without a client certificate, on an address the operator chooses (loopback by default).
The listener is the same binding as the main one, serving :func:`monitor_site` of its site;
which paths those are is the status pages' rule (``observe.statuspage.OPEN_PATHS``), given
by the composition root.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsc_bindings.http.driver import error_reply
from dsc_bindings.http.site import RequestLike, Site, WebPages, split_target
from dsc_core import Reply

__all__ = ["monitor_site"]


@dataclass(frozen=True, slots=True)
class _MonitorPages:
    pages: WebPages
    paths: frozenset[str]

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.pages.headers

    def answer_get(self, target: str, identity: str | None) -> Reply | RequestLike | None:
        path, _ = split_target(target)
        if path not in self.paths:
            served = " and ".join(sorted(self.paths))
            return error_reply(404, f"This listener serves only GET {served}.")
        # No identity: these answer every client (R10 note in .statuspage).
        return self.pages.answer_get(target, None)


def monitor_site(site: Site, paths: frozenset[str]) -> Site:
    """``site`` as the monitoring listener serves it: no SOAP (every other request 404), only
    ``paths`` of its pages, and no owner (the main listener's binding attaches it)."""
    assert site.pages is not None, "the monitoring listener needs the site's web pages"
    return Site(
        requests=None,
        pages=_MonitorPages(site.pages, paths),
        observer=site.observer,
        own_origins=site.own_origins,
    )
