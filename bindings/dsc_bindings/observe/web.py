"""The web endpoints of a running scan service: the status page, its JSON, ``/metrics`` and
``/healthz`` (:mod:`.statuspage` makes the answers; this module gathers what they show).

:class:`StatusPages` is the :class:`~dsc_bindings.http.site.WebPages` the composition root
(``dsc_bindings.serve``) gives the HTTP driver.  It reads the core through its owner only
(``service.owner.call``), and memory only: where the administrator check needs the directory
(R14: a member of ``admin_group``), a :class:`StatusRequest` asks it off the loop, like a SOAP
request's lookups.
"""

from __future__ import annotations

from dsc_bindings.http.cross_site import origin_of
from dsc_bindings.http.site import split_target
from dsc_bindings.observe.health import HealthMonitor
from dsc_bindings.observe.observer import Observer
from dsc_bindings.observe.statuspage import (
    ADMIN_PATHS,
    PATHS,
    SECURITY_HEADERS,
    View,
    answer,
    package_version,
)
from dsc_bindings.runtime.request import directory_answers
from dsc_bindings.runtime.service import ScanService
from dsc_bindings.runtime.ticket import Ticket, Wait
from dsc_core import DirectoryAnswers, Lookups, Reply, RequestInfo
from dsc_core.faults import SoapFault
from dsc_core.users import is_scan_admin

__all__ = ["StatusPages", "StatusRequest", "own_origins"]


def own_origins(service: ScanService) -> frozenset[str]:
    """The origin whose pages may send requests here (``dsc_bindings.http.cross_site``): that
    of the URL the server advertises (read at each request: a reload may change it)."""
    own = origin_of(service.config.base_url)
    return frozenset({own}) if own is not None else frozenset()


class StatusPages:
    """The GET endpoints of one service (module doc)."""

    #: Headers of every answer (:data:`.statuspage.SECURITY_HEADERS`).
    headers = SECURITY_HEADERS

    def __init__(self, service: ScanService, observer: Observer, health: HealthMonitor) -> None:
        self._service = service
        self._observer = observer
        self._health = health

    def answer_get(self, target: str, identity: str | None) -> Reply | StatusRequest | None:
        """The answer to a GET of one of :data:`.statuspage.PATHS`, or None for any other
        path (the binding answers 405).  Called in the core's owner context."""
        path, _ = split_target(target)
        if path not in PATHS:
            return None
        service = self._service
        if path in ADMIN_PATHS and service.directory is not None:
            info = RequestInfo(now=service.clock(), identity=identity)
            if not is_scan_admin(service.config, info) and identity:
                return StatusRequest(self, target, identity)
        return self.status_reply(target, identity, None)

    def status_reply(
        self, target: str, identity: str | None, answers: DirectoryAnswers | None
    ) -> Reply | None:
        """The GET's answer; the administrator check is the core's (``is_scan_admin``), with
        the directory's ``answers`` when it was asked."""
        current = self.status_view(identity, answers)
        metrics = self._observer.metrics
        metrics.subscriptions.set(len(current.subscriptions))
        store = self._service.store
        if store is not None:
            metrics.storage.update(store.figures())
        metrics.cluster.update(self._service.cluster)
        return answer("GET", target, identity, current, self._observer)

    def status_view(self, identity: str | None, answers: DirectoryAnswers | None) -> View:
        """What the web endpoints show of the core and the service (:class:`.statuspage.View`),
        read as the core's owner."""
        service = self._service

        def view() -> View:
            subscriptions = tuple(
                {
                    "id": sub.identifier,
                    "notify_to": sub.notify_to.address,
                    "expires": sub.expires.isoformat(timespec="seconds"),
                    "events": sorted(a.rsplit("/", 1)[-1] for a in sub.actions),
                }
                for sub in service.server.subscriptions.by_id.values()
            )
            info = RequestInfo(now=service.clock(), identity=identity, directory=answers)
            try:
                admin = is_scan_admin(service.config, info)
            except SoapFault:  # the directory could not be asked: not shown (logged there)
                admin = False
            return View(
                repository_state=service.server.repository_state.value,
                subscriptions=subscriptions,
                admin=admin,
                data_dir=service.data_dir,
                store_open=service.store_open,
                health=self._health.current(),
                version=package_version(),
                stalled_after_seconds=service.config.stalled_after_seconds,
                cluster=service.cluster.as_json() if service.cluster is not None else None,
            )

        return service.owner.call(view)

    def ask_directory(self, identity: str) -> Ticket:
        """Whether ``identity`` is an administrator, asked of the directory off the loop."""
        directory = self._service.directory
        assert directory is not None
        return self._service.offload(lambda: directory.answer(Lookups(admin=identity)))


class StatusRequest:
    """A GET of an administrators' page whose check needs the directory (R14): the lookup runs
    on the service's pool, then the answer is made in the core's context.  Has no body."""

    def __init__(self, pages: StatusPages, target: str, identity: str) -> None:
        self._pages = pages
        self._target = target
        self._identity = identity

    def feed(self, data: bytes) -> Wait | None:
        return None

    def finish(self) -> Reply | Wait:
        asked = self._pages.ask_directory(self._identity)
        return Wait(asked, lambda: self._reply(directory_answers(asked)))

    def _reply(self, answers: DirectoryAnswers) -> Reply:
        reply = self._pages.status_reply(self._target, self._identity, answers)
        assert reply is not None  # an administrators' path is always ours
        return reply

    def abort(self) -> Wait | None:
        return None
