"""The optional monitoring listener (``[server] monitor_listen``, issue 14): plain HTTP,
no client certificate, only ``GET``/``HEAD /healthz`` and ``/metrics``; anything else 404.

Both endpoints hold no user, token or address (.statuspage), so a monitoring system may read
them without a client certificate, on an address the operator chooses (loopback by default).
The listener is the same binding as the main one, serving this view of the service.
"""

from __future__ import annotations

from dsc_bindings.http.driver import RequestLike, error_reply
from dsc_bindings.runtime.peer import Peer
from dsc_bindings.runtime.service import ScanService, StatusRequest
from dsc_core import Reply

__all__ = ["MONITOR_PATHS", "MonitorService"]

MONITOR_PATHS = frozenset({"/healthz", "/metrics"})
_NOT_HERE = "This listener serves only GET /healthz and /metrics."


class MonitorService:
    """What the HTTP driver needs, for the monitoring listener: no SOAP, two GET paths."""

    #: The driver answers every request that is not a GET of ours with 404.
    serves_soap = False

    def __init__(self, service: ScanService) -> None:
        self._service = service

    @property
    def web_headers(self) -> tuple[tuple[str, str], ...]:
        return self._service.web_headers

    def own_origins(self) -> frozenset[str]:
        return self._service.own_origins()

    def answer_get(self, target: str, identity: str | None) -> Reply | StatusRequest | None:
        if target.split("?", 1)[0] not in MONITOR_PATHS:
            return error_reply(404, _NOT_HERE)
        # No identity: these two answer every client (R10 note in .statuspage).
        return self._service.answer_get(target, None)

    def open_request(
        self, content_type: str | None, identity: str | None, path: str, peer: Peer | None = None
    ) -> RequestLike:
        raise RuntimeError("the monitoring listener opens no SOAP exchange (serves_soap)")
