"""Prometheus metrics of one scan service (``GET /metrics``), through ``prometheus_client``.

Each :class:`Metrics` has its own ``CollectorRegistry`` (not the process-wide default one), so
two services in one process (tests, an embedding program) never mix their numbers, and the
output holds only the server's metrics.  Label values are bounded: operations are the
registry's actions (anything else is ``unknown``), fault subcodes come from the core's fixed
set, job outcomes from ``dsc_core.outcomes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dsc_bindings.observe.health import STATES, Health
from dsc_bindings.store.instances import INSTANCE_STATES
from dsc_bindings.store.interface import StorageFigures

if TYPE_CHECKING:  # the PostgreSQL client is an extra: imported only where it is chosen
    from dsc_bindings.runtime.cluster import ClusterMember

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Upload of one image (SendImage: first byte written to the spool until durable), seconds.
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Processing of one job (its filters: Pending until its end state), seconds.
PROCESSING_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dsc_requests",
            "SOAP requests answered, by operation and outcome (ok or fault)",
            ["operation", "outcome"],
            registry=r,
        )
        self.faults = Counter(
            "dsc_faults", "SOAP faults answered, by subcode", ["subcode"], registry=r
        )
        self.http_refusals = Counter(
            "dsc_http_refusals",
            "Requests refused at the HTTP level (405, 413, 431, 503, ...), by status",
            ["status"],
            registry=r,
        )
        self.jobs_created = Counter("dsc_jobs_created", "PostScan jobs created", registry=r)
        self.jobs_ended = Counter(
            "dsc_jobs_ended",
            "PostScan jobs that reached an end state (R6), by outcome (succeeded, partial, "
            "failed, aborted, canceled)",
            ["outcome"],
            registry=r,
        )
        self.image_bytes = Counter(
            "dsc_image_bytes_received", "Bytes of acknowledged images (durable)", registry=r
        )
        self.images = Counter("dsc_images_received", "Acknowledged images", registry=r)
        self.upload_seconds = Histogram(
            "dsc_upload_seconds",
            "Time to receive one image, first byte to durable",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.processing_seconds = Histogram(
            "dsc_processing_seconds",
            "Time to process one job's filters (end of the scan to the job's end state)",
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self.active_jobs = Gauge("dsc_active_jobs", "Jobs not in an end state", registry=r)
        self.connections = Gauge("dsc_connections", "Open HTTP connections", registry=r)
        self.subscriptions = Gauge(
            "dsc_subscriptions", "Active WS-Eventing subscriptions", registry=r
        )
        self.delivery_failures = Counter(
            "dsc_delivery_failures",
            "Filter runs that could not deliver a job's documents (share, e-mail, SharePoint)",
            registry=r,
        )
        self.event_delivery_failures = Counter(
            "dsc_event_delivery_failures",
            "Event notifications that could not be delivered to a subscriber (R7)",
            registry=r,
        )
        self.probes_dropped = Counter(
            "dsc_discovery_probes_dropped",
            "UDP Probes not answered: over the reply rate of their source address (issue 14)",
            registry=r,
        )
        self.filter_results = Counter(
            "dsc_filter_results",
            "PostScan filter runs that ended, by filter and result",
            ["filter", "state"],
            registry=r,
        )
        self.storage = StorageGauges()
        r.register(self.storage)
        self.cluster = ClusterGauges()
        r.register(self.cluster)

    def render(self, health: Health | None = None) -> bytes:
        """The Prometheus text exposition format (version 0.0.4); with ``health``, also the
        gauges of :class:`HealthGauges`."""
        text = generate_latest(self.registry)
        if health is None:
            return text
        # A registry of this scrape's own: the gauges hold this result and nothing else (a
        # check that is no longer configured leaves no stale series behind).
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(HealthGauges(health))
        return text + generate_latest(scrape)


class StorageGauges(Collector):
    """The job store's engines (issue 17 point 7), as last told by :meth:`update` (the status
    pages tell it before each answer).  Only what the configured engines have:
    ``dsc_store_pool_connections{state}`` (in_use, idle) and ``dsc_store_pool_waiting`` for
    PostgreSQL's pool; ``dsc_s3_errors_total`` for the S3 spool.  Whether the database answers
    is the ``store`` check of ``dsc_health_check_ok``."""

    def __init__(self) -> None:
        self._figures = StorageFigures(None, None)

    def update(self, figures: StorageFigures) -> None:
        self._figures = figures  # one reference swap: read whole by collect()

    def collect(self) -> Iterator[Metric]:
        figures = self._figures
        if figures.pool is not None:
            connections = GaugeMetricFamily(
                "dsc_store_pool_connections",
                "PostgreSQL connections of the job store's pool, by state (in_use, idle)",
                labels=["state"],
            )
            connections.add_metric(["in_use"], figures.pool.in_use)
            connections.add_metric(["idle"], figures.pool.idle)
            yield connections
            yield GaugeMetricFamily(
                "dsc_store_pool_waiting",
                "Requests waiting for a PostgreSQL connection of the job store's pool",
                value=figures.pool.waiting,
            )
        if figures.spool_errors is not None:
            yield CounterMetricFamily(
                "dsc_s3_errors",
                "S3 requests of the spool that failed (no answer, or an error status)",
                value=figures.spool_errors,
            )


class ClusterGauges(Collector):
    """This instance among those on the PostgreSQL store (issue 18 point 6), read from its
    :class:`~dsc_bindings.runtime.cluster.ClusterMember`'s memory (the heartbeat thread's last
    result: no I/O on a scrape).  Nothing with the SQLite store (:meth:`update` with None)."""

    def __init__(self) -> None:
        self._member: ClusterMember | None = None

    def update(self, member: ClusterMember | None) -> None:
        self._member = member

    def collect(self) -> Iterator[Metric]:
        member = self._member
        if member is None:
            return
        counts = dict.fromkeys(INSTANCE_STATES, 0)
        for row in member.instances:
            counts[row.state] += 1
        instances = GaugeMetricFamily(
            "dsc_cluster_instances",
            "Instances in the instances table as of the last heartbeat, by state (up; down: no "
            "heartbeat within its lease; stopped: a clean stop)",
            labels=["state"],
        )
        for state, count in counts.items():
            instances.add_metric([state], count)
        yield instances
        # One moment, one rule (store/instances.py Leadership): the three gauges agree with
        # each other and with leadership in /api/cluster (a failed attempt's flag alone stayed
        # 1 for a tick after the lock was lost).
        standing = member.standing()
        yield GaugeMetricFamily(
            "dsc_cluster_leader",
            "1 while this instance leads: it holds the leader's lock and took a term, so it "
            "runs the job sweeps and announces the repository state; else 0 (also while it "
            "holds the lock without a term: dsc_cluster_leader_lock)",
            value=1.0 if standing.leads else 0.0,
        )
        # A second gauge, not a third value of the first: 1 means leading wherever it is
        # summed or alerted on.  A holder that does not lead is either taking the lead (the
        # lock was just taken: its term comes at its next tick) or failing, which the third
        # gauge alone says (the WARNING in its log says why): the one to alert on.
        yield GaugeMetricFamily(
            "dsc_cluster_leader_lock",
            "1 while this instance holds the leader's lock, leading or not: 1 with "
            "dsc_cluster_leader 0 is the moment between taking the lock and a term (a "
            "second), or a failure to take one (dsc_cluster_term_failing 1)",
            value=1.0 if standing.holds_lock else 0.0,
        )
        yield GaugeMetricFamily(
            "dsc_cluster_term_failing",
            "1 while this instance holds the leader's lock and does not lead because its last "
            "attempt to take a term failed (see the WARNING in its log): no instance runs the "
            "sweeps nor announces the repository state",
            value=1.0 if standing.fails_to_lead else 0.0,
        )
        yield GaugeMetricFamily(
            "dsc_cluster_heartbeat_age_seconds",
            "Seconds since this instance's last successful heartbeat (/healthz fails past "
            "[cluster] lease_seconds)",
            value=member.heartbeat_age,
        )
        yield from _cluster_work(member)


def _cluster_work(member: ClusterMember) -> Iterator[Metric]:
    """The job leases each instance holds and the outbox lag, cluster-wide and per delivery
    owner (issue 18 point 6).  Labelled by instance name (a restarted instance keeps its name
    and is a new incarnation: their figures are summed, the oldest row is the older)."""
    leases: dict[str, int] = {}
    rows: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for row in member.snapshot():
        leases[row.name] = leases.get(row.name, 0) + row.leases_held
        rows[row.name] = rows.get(row.name, 0) + row.outbox_lag.rows
        age = row.outbox_lag.oldest_seconds or 0.0
        oldest[row.name] = max(oldest.get(row.name, 0.0), age)
    yield _per_instance(
        "dsc_cluster_leases_held",
        "Jobs whose filters each instance runs now (its job leases not yet run out)",
        leases,
    )
    lag = member.outbox()
    yield GaugeMetricFamily(
        "dsc_outbox_rows",
        "Event notifications waiting in the outbox, every subscription (a subscriber that "
        "does not answer keeps its rows there)",
        value=lag.rows,
    )
    yield GaugeMetricFamily(
        "dsc_outbox_oldest_seconds",
        "Age of the oldest notification waiting in the outbox (0: none waits)",
        value=lag.oldest_seconds or 0.0,
    )
    yield _per_instance(
        "dsc_outbox_owner_rows",
        "Notifications waiting in the outbox per delivery owner (the instance sending them)",
        rows,
    )
    yield _per_instance(
        "dsc_outbox_owner_oldest_seconds",
        "Age of the oldest notification waiting per delivery owner (0: none waits)",
        oldest,
    )


def _per_instance(name: str, documentation: str, values: Mapping[str, float]) -> Metric:
    """A gauge with one sample per instance name."""
    gauge = GaugeMetricFamily(name, documentation, labels=["name"])
    for instance, value in values.items():
        gauge.add_metric([instance], value)
    return gauge


class HealthGauges(Collector):
    """The /healthz result (.health) as gauges, so that monitoring can alert on it:
    ``dsc_health_state{state}`` is 1 for the current state (ok, degraded or down) and 0 for
    the others; ``dsc_health_check_ok{check}`` is 1 for each check that passed, 0 for each
    that failed.  Labels are the check names: a fixed set plus one per configured share root."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "dsc_health_state",
            "The /healthz state: 1 for the current one (ok, degraded or down), else 0",
            labels=["state"],
        )
        for name in STATES:
            state.add_metric([name], 1.0 if self._health.state == name else 0.0)
        yield state
        checks = GaugeMetricFamily(
            "dsc_health_check_ok",
            "Each /healthz check: 1 passed, 0 failed (its reason is in /healthz)",
            labels=["check"],
        )
        for check in self._health.checks:
            checks.add_metric([check.name], 0.0 if check.problem else 1.0)
        yield checks
