"""The server's state, as operations see it: configuration, identifiers, the job lifecycle and
the subscriptions.  :class:`~dsc_core.server.ScanServer` is this state plus the entry points a
binding calls; operations are typed against this class, so they never import the server."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from .commands import Command, JobInput
from .config import ServerConfig
from .deadlines import DeadlineChanges
from .eventing import Subscriptions
from .events import Notifier
from .jobs import JobTable
from .lifecycle import JobLifecycle
from .model import Job, RepositoryState
from .xmlwrite import AnswerCache, JobXmlCache


class ServerState:
    """Configuration, job table, subscriptions and repository state of one scan server."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        new_id: Callable[[], str],
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        """``leads``: whether this server leads now (``ScanServer.leads``, issue 18 point 4);
        a state on its own always does (it is the only one)."""
        self.config = config or ServerConfig()
        self.new_id = new_id
        #: Bumped by each change that may move ``ScanServer.next_deadline`` (.deadlines).
        self.deadline_changes = DeadlineChanges()
        self.jobs = JobTable(self.config.history_size, self.deadline_changes)
        self.subscriptions = Subscriptions(self.config, new_id, changes=self.deadline_changes)
        self.notifier = Notifier(self.subscriptions, leads)
        self.lifecycle = JobLifecycle(self.jobs, self.notifier)
        #: wsd:AppSequence MessageNumber of the last discovery message sent (R13).
        self.discovery_messages = 0
        #: Job summaries serialized once per job version (large MS-BDSRR listings).
        limits = self.config.limits
        self.job_xml = JobXmlCache(2 * (limits.max_active_jobs + self.config.history_size) + 16)
        #: GetRepositoryElements payloads by (names asked, repository state).
        self.repository_answers = AnswerCache()

    @property
    def stopped(self) -> bool:
        return self.lifecycle.stopped

    @property
    def repository_state(self) -> RepositoryState:
        return self.lifecycle.repository_state

    def message_id(self) -> str:
        return f"urn:uuid:{self.new_id()}"

    def apply(
        self, job: Job, job_input: JobInput, now: datetime, **changes: object
    ) -> tuple[Job, list[Command]]:
        """:meth:`JobLifecycle.apply`: move ``job`` by ``job_input``; raises ``Refused``."""
        return self.lifecycle.apply(job, job_input, now, **changes)
