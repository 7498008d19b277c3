"""The notifications the server sends (R7): which changes cause which event, and its body.

A job whose status changed gets a PostScanJobStatusEvent in both namespaces, and one that ended
a PostScanJobEndStateEvent (dsm-and-stack §1.5, bdsrr 3.2.4.7-8); a change of the repository's
state gets a RepositoryStatusSummaryEvent, once per change; a reloaded configuration gets a
RepositoryElementsChangeEvent (bdsrr 3.2.4.6).  ``eventing.Subscriptions`` decides who receives
them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from lxml import etree

from . import names
from .commands import AnnounceRepositoryState, Command
from .config import ServerConfig
from .eventing import Subscriptions
from .model import Job, RepositoryState
from .xmlwrite import end_state, job_status, repository_configuration, repository_status

A = names.Action


def _status_view(job: Job) -> tuple[object, ...]:
    """What a PostScanJobStatusEvent reports: a change elsewhere (last activity) is not news."""
    return (job.state, job.reasons, job.filters, job.images_received)


class Notifier:
    """Turns changes into event deliveries for the current subscribers."""

    def __init__(self, subscriptions: Subscriptions, leads: Callable[[], bool]) -> None:
        self.subscriptions = subscriptions
        #: The repository state subscribers last heard (R7: one summary event per change).
        self._announced_state = RepositoryState.IDLE
        #: Whether this server leads, so announces the repository state (issue 18 point 4):
        #: asked of the server, which keeps the core's one leadership flag (``ScanServer.leads``,
        #: which also gates its sweeps).
        self._leads = leads

    def job_changed(self, old: Job | None, new: Job, now: datetime) -> list[Command]:
        if old is not None and _status_view(old) == _status_view(new):
            return []
        out: list[Command] = []
        for ns, action in (
            (names.DSP, A.DSP_JOB_STATUS_EVENT),
            (names.DSC, A.DSC_JOB_STATUS_EVENT),
        ):
            body = etree.Element(f"{{{ns}}}PostScanJobStatusEvent")
            job_status(body, ns, new)
            out.extend(self.subscriptions.notify(action, body, now, new.owner))
        if not new.is_active and (old is None or old.is_active):
            for ns, action in (
                (names.DSP, A.DSP_JOB_END_STATE_EVENT),
                (names.DSC, A.DSC_JOB_END_STATE_EVENT),
            ):
                body = etree.Element(f"{{{ns}}}PostScanJobEndStateEvent")
                end_state(body, ns, new)
                out.extend(self.subscriptions.notify(action, body, now, new.owner))
        return out

    def repository_state(self, state: RepositoryState, now: datetime) -> list[Command]:
        """An AnnounceRepositoryState carrying a RepositoryStatusSummaryEvent when ``state`` is
        not what subscribers last heard (a shared store records it); nothing while another
        instance leads (``ScanServer.follow``)."""
        if not self._leads() or state is self._announced_state:
            return []
        previous, self._announced_state = self._announced_state, state
        body = etree.Element(f"{{{names.DSC}}}RepositoryStatusSummaryEvent")
        repository_status(body, "StatusSummary", state)
        events = self.subscriptions.notify(A.DSC_STATUS_SUMMARY_EVENT, body, now)
        return [AnnounceRepositoryState(state, previous, tuple(events))]

    def assume_repository_state(self, state: RepositoryState) -> None:
        """An undone change (R4 step 9) was never announced: nothing is sent for it."""
        self._announced_state = state

    def lead(
        self, announced: RepositoryState, state: RepositoryState, now: datetime
    ) -> list[Command]:
        """This instance announces the repository state from now on (issue 18 point 4: the
        cluster's leader; ``ScanServer.lead`` set its flag first); ``announced`` is the state
        subscribers last heard, from whichever instance announced it: a change since is
        announced now (none is skipped), and none is repeated."""
        self._announced_state = announced
        return self.repository_state(state, now)

    def elements_changed(self, config: ServerConfig, now: datetime) -> list[Command]:
        """RepositoryElementsChangeEvent with the repository configuration (bdsrr 3.2.4.6)."""
        body = etree.Element(
            f"{{{names.DSC}}}RepositoryElementsChangeEvent",
            nsmap={"dsc": names.DSC, "ftr": names.FILTER},
        )
        repository_configuration(etree.SubElement(body, f"{{{names.DSC}}}ElementChanges"), config)
        return list(self.subscriptions.notify(A.DSC_ELEMENTS_CHANGE_EVENT, body, now))

    def shutting_down(self) -> list[Command]:
        """SubscriptionEnd SourceShuttingDown to every subscriber that asked for one."""
        return list(self.subscriptions.end_all())
