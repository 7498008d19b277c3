"""Job records in PostgreSQL (``[store] kind = "postgresql"``, issue 17), psycopg 3 + psycopg_pool.

The tables keep what SQLite keeps (sqlite.record_columns), one row per job and one per
document of a job (``job_documents``, store/jobdocuments.py: a SendImage writes its own row, not
the job's whole list).  Each write is one autocommit statement (the record and its document rows
in data-modifying CTEs): when it returns, PostgreSQL has committed both (with the server's
``synchronous_commit``), so R4's "reply after the record is durable" holds as on SQLite.

The schema is versioned (``dsc_schema``) and created or upgraded at start under an advisory lock,
so two servers starting at once do not race (also ``dsc db upgrade``).  A newer schema than this
server knows is refused.

Several instances share these records (issue 18, docs/architecture.md "Several instances").
Each row has a ``version`` (bumped by every write) and ``xid``, the id of the transaction that
wrote it last (``pg_current_xact_id()``, xid8).  Writes from the runtime are compare-and-set
(:meth:`PostgresRecords.write`): ``UPDATE ... WHERE token = %s AND version = %s``; no row means
another instance changed the job first, a temporary StoreError (R4 step 9:
ServerErrorTemporaryError and the core's undo).  A new job is an INSERT (the token is unique).

The change feed (:meth:`PostgresRecords.changes`) must not miss a late commit: a sequence
cursor would skip a row whose transaction took a lower number but committed after the reader
had read past it.  So each read takes, in the same statement (one snapshot), the snapshot's
``xmin`` (``pg_snapshot_xmin(pg_current_snapshot())``: every transaction below it had ended
when the snapshot was taken), and the next read returns every row whose ``xid >= `` that xmin.
Any transaction the earlier snapshot did not see (still running, or not yet begun) has an xid
at or above its xmin, so its rows are read next time, however late it commits; rows seen twice
are told apart by their version.  Of a job this store knows at a row version (it wrote or
read it), the feed reads only the document rows written after it (store/jobdocuments.py,
:meth:`PostgresRecords.changes`).  A deleted row leaves a tombstone (``job_tombstones``, with
its xid) that the feed reports the same way; tombstones are pruned after
:data:`TOMBSTONE_SECONDS`.  Uploads in flight are rows of ``uploads`` (one per image, never per
chunk), named by the instance receiving them (its id in ``instances``) and its home (host and
data folder).  A row blocks nothing once its instance is known gone (``instances``: stopped,
replaced by a new run from its home, or no heartbeat within its lease: instances.py ``GONE``), once it is older than :data:`UPLOAD_ROW_SECONDS` (an
instance without an ``instances`` row), or at once when a new run starts from the same home
(the data folder's lock says the earlier run is dead; its unfinished documents are debris).

Faults of the engine are answered, not suffered (issue 17 point 4): a lost connection, a server
restarting or shutting down, a full disk, too many connections, a serialization failure, or no
pooled connection within ``pool_timeout`` are temporary (``ServerErrorTemporaryError``); the pool
checks each connection before handing it out and replaces broken ones, so the server reconnects
by itself once PostgreSQL is back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
import psycopg_pool
from psycopg import conninfo

from dsc_bindings.store.errors import (
    CreationRefused,
    JobChanged,
    StoreError,
    TermRowBusy,
    as_store_error,
)
from dsc_bindings.store.instances import GONE, HOLDS_LEADER_LOCK
from dsc_bindings.store.interface import (
    Announcement,
    EventsWrite,
    JobChanges,
    PoolStats,
    Rang,
    StoredDocuments,
    StoredRecord,
    VersionedWrite,
)
from dsc_bindings.store.jobcodec import decode_document_rows, document_row
from dsc_bindings.store.jobdocuments import DocumentsWrite, Known, KnownDocuments
from dsc_bindings.store.pgdoorbell import PgDoorbell
from dsc_bindings.store.pgoutbox import OutboxRows
from dsc_bindings.store.sqlite import record_columns
from dsc_core.commands import CreateJob, Deliver, DropJob, UpdateJob
from dsc_core.config import Limits
from dsc_core.dsp import creation_refused
from dsc_core.faults import SoapFault
from dsc_core.model import Job

log = logging.getLogger("dsc.store")

T = TypeVar("T")

__all__ = [
    "SCHEMA_VERSION",
    "TOMBSTONE_SECONDS",
    "UPLOAD_ROW_SECONDS",
    "PgDatabase",
    "PostgresRecords",
    "connection_kwargs",
    "is_temporary_pg",
    "redacted",
    "upgrade",
]

#: Version of the schema below; each entry of _MIGRATIONS brings the one before it up by one.
SCHEMA_VERSION = 19

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            token     text PRIMARY KEY,
            seq       bigserial NOT NULL UNIQUE,   -- creation order: rows() is oldest first
            state     text NOT NULL,               -- JobState value, for queries by hand
            active    boolean NOT NULL,
            created   text NOT NULL,               -- ISO 8601 with UTC offset (R6)
            completed text,
            job       text NOT NULL                -- the whole record, jobcodec.encode_job
        )""",
        "CREATE INDEX jobs_by_activity ON jobs (active, seq)",
    ),
    (
        # The installation identity (R13 on R1/R11; runtime/pgidentity.py): one row, so every
        # instance on this database is the same device and the start counter grows across them.
        """CREATE TABLE installation (
            id               integer PRIMARY KEY CHECK (id = 1),
            device_uuid      text NOT NULL,
            dsp_service_uuid text NOT NULL,
            dsc_service_uuid text NOT NULL,
            starts           bigint NOT NULL CHECK (starts >= 0)  -- wsd:AppSequence InstanceId
        )""",
    ),
    (
        # The instances of the cluster (issue 18 point 4; store/instances.py, runtime/cluster.py):
        # one row per incarnation, its heartbeat in database time.
        """CREATE TABLE instances (
            id            uuid PRIMARY KEY,            -- one per start, never reused
            name          text NOT NULL,               -- [cluster] instance_name
            address       text NOT NULL,               -- the advertised base URL
            host          text NOT NULL,
            pid           integer NOT NULL,
            started       timestamptz NOT NULL DEFAULT now(),
            heartbeat     timestamptz NOT NULL DEFAULT now(),
            lease_seconds double precision NOT NULL, -- down after this long without a heartbeat
            stopped       timestamptz,                 -- a clean stop
            lock_backend  integer                      -- pg_backend_pid() of its lock connection
        )""",
    ),
    (
        # The device book (observe/pgdevices.py; the same columns as observe/devices.py's
        # SQLite tables) and the status page's totals (store/pgtally.py), shared by every
        # instance on this database: counters are incremented in SQL, never written back.
        """CREATE TABLE devices (
            address         text NOT NULL,
            identity        text NOT NULL,              -- '' without a client certificate
            first_contact   text NOT NULL,              -- ISO 8601 with offset
            last_contact    text NOT NULL,
            last_contact_at double precision NOT NULL,  -- last_contact in Unix seconds
            jobs            bigint NOT NULL DEFAULT 0,
            completed       bigint NOT NULL DEFAULT 0,
            failed          bigint NOT NULL DEFAULT 0,
            canceled        bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (address, identity)
        )""",
        "CREATE INDEX devices_by_last_contact ON devices (last_contact_at)",
        """CREATE TABLE device_jobs (
            token    text PRIMARY KEY,
            address  text NOT NULL,
            identity text NOT NULL
        )""",
        """CREATE TABLE counters (
            name  text PRIMARY KEY,
            value bigint NOT NULL
        )""",
    ),
    (
        # Several instances on one store (issue 18): versioned rows and a change feed by the
        # writing transaction's id (module doc), tombstones of deleted rows, uploads in flight.
        """ALTER TABLE jobs
            ADD COLUMN version bigint NOT NULL DEFAULT 1,
            ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id()""",
        "CREATE INDEX jobs_by_xid ON jobs (xid)",
        """CREATE TABLE job_tombstones (
            token   text PRIMARY KEY,
            xid     xid8 NOT NULL DEFAULT pg_current_xact_id(),
            dropped timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX job_tombstones_by_xid ON job_tombstones (xid)",
        """CREATE TABLE uploads (
            token       text NOT NULL,
            document_id bigint NOT NULL,
            instance    text NOT NULL,                  -- PostgresRecords.instance
            home        text NOT NULL,                  -- host and data folder (at start)
            started     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (token, document_id)
        )""",
    ),
    (
        # Events across instances (issue 18 point 3; store/pgoutbox.py): the subscriptions, read
        # by every instance through the job feed, and the notifications waiting to be sent,
        # each subscription's sent by one instance at a time (its delivery lease).
        """CREATE TABLE subscriptions (
            id             text PRIMARY KEY,          -- the wse:Identifier
            version        bigint NOT NULL DEFAULT 1,
            xid            xid8 NOT NULL DEFAULT pg_current_xact_id(),  -- the job feed's
            record         text NOT NULL,             -- store/subcodec.py
            expires        timestamptz NOT NULL,
            ended          boolean NOT NULL DEFAULT false,
            changed        timestamptz NOT NULL DEFAULT now(),
            delivery_owner text,                      -- the instance sending its outbox rows
            delivery_until timestamptz                -- its lease, in database time
        )""",
        "CREATE INDEX subscriptions_by_xid ON subscriptions (xid)",
        """CREATE TABLE outbox (
            id              bigserial PRIMARY KEY,     -- the order of sending
            subscription_id text NOT NULL,
            address         text NOT NULL,
            content_type    text NOT NULL,
            message         bytea NOT NULL,            -- the whole SOAP message (its MessageID)
            created         timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX outbox_by_subscription ON outbox (subscription_id, id)",
    ),
    (
        # Filters run once, wherever (issue 18 point 2; store/leases.py): the lease of the
        # instance running a job's filters, checked by every write of its engine (fencing),
        # and the filters' idempotency records (filters/sharejournal.py, PgDeliveries).
        # Lease columns are not versioned: renewing a lease is not a change of the job.
        """ALTER TABLE jobs
            ADD COLUMN lease_owner text,            -- instances.id of the holder
            ADD COLUMN lease_home text,             -- its host and data folder
            ADD COLUMN lease_epoch bigint NOT NULL DEFAULT 0,  -- +1 by every claim
            ADD COLUMN lease_until timestamptz      -- database time""",
        "CREATE INDEX jobs_by_lease ON jobs (lease_until) WHERE active",
        """CREATE TABLE filter_deliveries (
            token        text NOT NULL,
            filter_index integer NOT NULL,
            folder       text NOT NULL,              -- where it went (a share folder)
            document_id  bigint NOT NULL,
            counter      integer NOT NULL,
            name         text NOT NULL,
            PRIMARY KEY (token, filter_index, folder, document_id)
        )""",
    ),
    (
        # The job feed's doorbell (issue 18, store/pgdoorbell.py): every change of a job row, a
        # tombstone or an uploads row sends NOTIFY dsc_jobs from the statement that made it, so
        # from its transaction (delivered at its commit, never if it rolls back).  A trigger,
        # not the runtime's statements: every writer rings, tools (dsc db migrate) included.
        # The payload is tiny (NOTIFY refuses 8,000 bytes): "<token>:<version>",
        # "<token>:dropped", "<token>:upload.<instance>".  A job row rings only when its version
        # changes (a lease renewal is no change of the job, schema 7).
        """CREATE FUNCTION dsc_jobs_doorbell() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_TABLE_NAME = 'jobs' THEN
                PERFORM pg_notify('dsc_jobs', NEW.token || ':' || NEW.version);
            ELSIF TG_TABLE_NAME = 'job_tombstones' THEN
                PERFORM pg_notify('dsc_jobs', NEW.token || ':dropped');
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('dsc_jobs', OLD.token || ':upload.' || OLD.instance);
            ELSE
                PERFORM pg_notify('dsc_jobs', NEW.token || ':upload.' || NEW.instance);
            END IF;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER jobs_doorbell AFTER INSERT OR UPDATE OF version ON jobs
            FOR EACH ROW EXECUTE FUNCTION dsc_jobs_doorbell()""",
        """CREATE TRIGGER job_tombstones_doorbell AFTER INSERT OR UPDATE ON job_tombstones
            FOR EACH ROW EXECUTE FUNCTION dsc_jobs_doorbell()""",
        """CREATE TRIGGER uploads_doorbell AFTER INSERT OR UPDATE OR DELETE ON uploads
            FOR EACH ROW EXECUTE FUNCTION dsc_jobs_doorbell()""",
    ),
    (
        # Quotas strict across instances (issue 18 point 1): the job's origin (R13 quota: the
        # user, else the client address) as a column, so the creating write counts the
        # origin's Creating jobs in SQL under a lock per origin (write(), _CREATING_HELD).
        # Rows of earlier versions get theirs from the record (only active ones can count; a
        # record that is no JSON, written by hand, counts against no quota, as in jobcodec).
        "ALTER TABLE jobs ADD COLUMN origin text",
        """DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT token, job FROM jobs WHERE active LOOP
                BEGIN
                    UPDATE jobs SET origin = r.job::jsonb ->> 'origin' WHERE token = r.token;
                EXCEPTION WHEN invalid_text_representation THEN
                    NULL;
                END;
            END LOOP;
        END $$""",
        "CREATE INDEX jobs_creating_by_origin ON jobs (origin) WHERE active AND state = 'Creating'",
    ),
    (
        # A job's documents beside its record (store/jobdocuments.py, jobcodec version 3): a
        # SendImage writes its own row, not the whole list again.  Rows written before keep
        # their documents in the record until their next write.
        """CREATE TABLE job_documents (
            token       text NOT NULL,
            ordinal     integer NOT NULL,          -- its place in the job's documents
            document_id bigint NOT NULL,
            format      text NOT NULL,
            size        bigint NOT NULL,
            PRIMARY KEY (token, ordinal)
        )""",
    ),
    (
        # The leader's duties (issue 18 point 4): the repository state announced last, and the
        # term of the leader announcing it (a new one at each takeover): an announcement is
        # written only while the row names its term and says what it replaces, so each change
        # is announced once, whoever leads (PostgresRecords.take_lead, _ANNOUNCE).  And each
        # subscription's deliveries failed in a row, so a new delivery owner counts on (R7).
        """CREATE TABLE repository_announced (
            id      integer PRIMARY KEY CHECK (id = 1),
            state   text NOT NULL,                 -- RepositoryState, as subscribers heard it
            leader  text NOT NULL,                 -- instances.id of the leader of the term
            term    bigint NOT NULL,               -- +1 at each takeover
            changed timestamptz NOT NULL DEFAULT now()
        )""",
        "ALTER TABLE subscriptions ADD COLUMN failures integer NOT NULL DEFAULT 0",
    ),
    (
        # Pending work spread over the instances (issue 18, store/leases.py): a job waiting for
        # an engine that nobody holds (passed on by a busy instance, handed back by a clean
        # stop) rings "<token>:claimable" on the
        # job feed's channel, from the statement that let it go: the instances with a free
        # engine place claim it at once (runtime/leasing.py), not at their next heartbeat.
        """CREATE FUNCTION dsc_jobs_claimable() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('dsc_jobs', NEW.token || ':claimable');
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER jobs_claimable AFTER INSERT OR UPDATE OF lease_until, state ON jobs
            FOR EACH ROW WHEN (NEW.active AND NEW.lease_until IS NULL
                               AND NEW.state IN ('Pending', 'Started', 'Processing'))
            EXECUTE FUNCTION dsc_jobs_claimable()""",
    ),
    (
        # A restarted instance leaves no ghost (issue 18; store/instances.py, runtime/cluster.py):
        # each incarnation's home (host and data folder, a worker's own folder: SplitStore.home,
        # as jobs.lease_home), so that a new run from the same home marks the earlier ones down
        # at once (it holds the folder's lock: they are dead), naming itself in replaced_by,
        # instead of their showing up for lease_seconds.  Rows of earlier versions have none.
        """ALTER TABLE instances
            ADD COLUMN home text,
            ADD COLUMN replaced_by uuid""",
    ),
    (
        # A catch-up reads only the document rows written since the version it knows
        # (store/jobdocuments.py): each row carries the job's row version that wrote it last.
        # NULL: not known (rows from before, or written by a server of an earlier version,
        # which does not set it: the trigger makes such an update NULL too), so read.
        "ALTER TABLE job_documents ADD COLUMN version bigint",
        """CREATE FUNCTION dsc_job_documents_version() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.version IS NOT DISTINCT FROM OLD.version THEN
                NEW.version := NULL;
            END IF;
            RETURN NEW;
        END $$""",
        """CREATE TRIGGER job_documents_version BEFORE UPDATE ON job_documents
            FOR EACH ROW EXECUTE FUNCTION dsc_job_documents_version()""",
    ),
    (
        # Whether the instance's core leads (issue 18 point 4; store/instances.py): the holder
        # of the leader's lock leads only once it took a term (runtime/announcing.py), so
        # ``dsc cluster status`` shows a holder that cannot take one as such, not as the
        # leader.  Written by the instance itself; NULL: a server of an earlier version, which
        # does not say (its lock alone is shown).
        "ALTER TABLE instances ADD COLUMN leads boolean",
    ),
    (
        # A catch-up reads a job's document rows written after the version it knows, and
        # those without one (_FED_DOCUMENTS): without this index the database fetched every
        # row of the job through the primary key and filtered them (EXPLAIN in
        # tests/bindings/test_job_documents.py), O(documents) for an append's one row.  The
        # instances still running write meanwhile: the lock waits for their writes in flight
        # and holds the next ones until the upgrade commits.  It comes first, on jobs before
        # job_documents (the order their writes take them in), so that the upgrade never
        # holds one table while waiting for a write that waits for it (a deadlock).
        "LOCK TABLE jobs, job_documents IN EXCLUSIVE MODE",
        "CREATE INDEX job_documents_by_version ON job_documents (token, version)",
    ),
    (
        # The document rows of active jobs without a version (written before schema 14, or
        # since by a server of an earlier version) were read by every catch-up until the
        # job's list was written whole: each gets its job's row version, once.  Safe with
        # such a server still running (docs/architecture.md, "Several instances"): every
        # write of a job's document rows bumps the job's row version in the same statement,
        # so while no write is in flight, an instance that knows the job at that version knows
        # each such row as it is, and one that knows an older version reads it.  The lock (on
        # jobs first, as their writes take them) waits for the writes in flight, holds the
        # next ones until the upgrade commits, and the statement after it sees them all (a
        # new snapshot: READ COMMITTED).  What such a server writes later still has no
        # version (the trigger of schema 14), and every catch-up reads it.  Ended jobs' rows
        # are left: no catch-up asks for less of them (KnownDocuments keeps active ones).
        "LOCK TABLE jobs, job_documents IN EXCLUSIVE MODE",
        """UPDATE job_documents d SET version = j.version FROM jobs j
            WHERE d.token = j.token AND j.active AND d.version IS NULL""",
    ),
    (
        # Whether the instance's last attempt to take a term failed (runtime/announcing.py;
        # store/instances.py): a holder of the leader's lock that does not lead is either
        # taking the lead (it took the lock, its term comes at its next tick: nothing failed)
        # or cannot take a term (the database refused the statement).  Only the instance
        # knows which; ``dsc cluster status`` shows the failure only for the second.  An
        # earlier version's row says false: its holder is shown taking the lead.
        "ALTER TABLE instances ADD COLUMN term_failing boolean NOT NULL DEFAULT false",
    ),
    (
        # An earlier version's row does not say whether its holder failed to take a term
        # (schema 18 made it say false, so a holder of schema 17 stuck without a term was
        # shown taking the lead for good during a rolling upgrade): NULL says "not said", and
        # such a holder is shown as its own version shows it (store/instances.py
        # ``leadership_label``).  Every false so far may be such a row; an instance of this
        # version writes its own again at its next heartbeat.
        """ALTER TABLE instances
            ALTER COLUMN term_failing DROP NOT NULL,
            ALTER COLUMN term_failing DROP DEFAULT""",
        "UPDATE instances SET term_failing = NULL WHERE NOT term_failing",
    ),
)

#: A tombstone is kept this long: every running instance reads the feed at least once a
#: second (the ticker), and one that starts reads every row.
TOMBSTONE_SECONDS = 3600
#: A job known with at least this many documents is read by the catch-up from the rows written
#: since (jobdocuments.py); a shorter list is read whole: it is about as small as what each
#: read sends to ask for less (the token and version of every such job known).
INCREMENTAL_DOCUMENTS = 16
#: An ``uploads`` row this old is a dead instance's (an upload that long is one no scanner
#: waits for): it no longer reserves its DocumentId nor keeps its job from the R6 timeout.
UPLOAD_ROW_SECONDS = 600
#: Old tombstones and upload rows are deleted at most this often (by any instance).
_PRUNE_SECONDS = 60.0

#: The document rows of a job record write (jobdocuments.DocumentsWrite), for the statements
#: below whose CTE ``up`` writes the job's row: written only when ``up`` wrote (the
#: compare-and-set held), each with the row's new version (the catch-up reads the rows
#: written after the version it knows, jobdocuments.py).  Rows from ``count`` on go (after a
#: shorter list), the given ones are upserted by ordinal: disjoint rows, so one statement may
#: do both.
_DOCUMENTS = """
    gone AS (
        DELETE FROM job_documents WHERE token = %(token)s AND ordinal >= %(count)s
            AND EXISTS (SELECT 1 FROM up)),
    docs AS (
        INSERT INTO job_documents (token, ordinal, document_id, format, size, version)
        SELECT %(token)s, d.ordinal, d.document_id, d.format, d.size, up.version
            FROM up, unnest(%(ordinals)s::integer[], %(ids)s::bigint[], %(formats)s::text[],
                            %(sizes)s::bigint[]) AS d(ordinal, document_id, format, size)
        ON CONFLICT (token, ordinal) DO UPDATE SET document_id = excluded.document_id,
            format = excluded.format, size = excluded.size, version = excluded.version)
"""
#: An unconditional write (``dsc db migrate``, tools): still bumps the version and the xid, so
#: that running instances see it.
_UPSERT = f"""
    WITH up AS (
        INSERT INTO jobs (token, state, active, created, completed, job, origin)
        VALUES (%(token)s, %(state)s, %(active)s, %(created)s, %(completed)s, %(job)s,
                %(origin)s)
        ON CONFLICT (token) DO UPDATE SET
            state = excluded.state, active = excluded.active, created = excluded.created,
            completed = excluded.completed, job = excluded.job, origin = excluded.origin,
            version = jobs.version + 1, xid = pg_current_xact_id()
        RETURNING version),
    {_DOCUMENTS}
    SELECT version FROM up
"""
_INSERT = f"""
    WITH up AS (
        INSERT INTO jobs (token, state, active, created, completed, job, origin)
        VALUES (%(token)s, %(state)s, %(active)s, %(created)s, %(completed)s, %(job)s,
                %(origin)s)
        ON CONFLICT (token) DO NOTHING
        RETURNING version),
    {_DOCUMENTS}
    SELECT version FROM up
"""
#: The class of the advisory lock a creating write takes (two int4 keys: apart from the
#: leader's one-bigint lock, store/instances.py), "dscq".
CREATING_LOCK_CLASS = 0x64736371
#: Held until the transaction ends: two instances creating jobs at the same moment take
#: turns, so the second counts the first's row (issue 18 point 1).  One lock for every
#: creation, not one per origin: ``max_active_jobs`` and the slots kept for new clients count
#: every origin's jobs.  A creation holds it for one count and one INSERT.
_CREATING_LOCK = "SELECT pg_advisory_xact_lock(%s, 0)"
#: What ``dsc_core.dsp.creation_refused`` decides from, every instance's: the active jobs,
#: and the origin's jobs in Creating (the R13 quota, ``max_creating_jobs_per_user``).
_CREATING_COUNTS = """
    SELECT count(*), count(*) FILTER (WHERE state = 'Creating' AND origin = %(origin)s)
    FROM jobs WHERE active
"""
#: The row's new version and the end of the uploads it now records commit together: an
#: instance never sees an image neither in flight nor in the job (its R6 timeout would fire).
#: The uploads ended are those of the documents the write carries (the others were recorded by
#: earlier writes, which ended theirs).
_UPDATE = f"""
    WITH received AS (
        DELETE FROM uploads WHERE token = %(token)s AND document_id = ANY(%(ids)s)
    ),
    up AS (UPDATE jobs SET state = %(state)s, active = %(active)s, created = %(created)s,
        completed = %(completed)s, job = %(job)s,
        version = version + 1, xid = pg_current_xact_id(),
        -- A job this write makes Pending is this instance's for a moment (it claims it next,
        -- or passes it on without a free engine place, store/leases.py), so that no other
        -- instance's sweep takes it meanwhile.
        lease_owner = CASE WHEN %(state)s = 'Pending'
                            AND (lease_until IS NULL OR lease_until < now())
                           THEN %(me)s ELSE lease_owner END,
        lease_until = CASE WHEN %(state)s = 'Pending'
                            AND (lease_until IS NULL OR lease_until < now())
                           THEN now() + make_interval(secs => %(grace)s) ELSE lease_until END,
        lease_home = CASE WHEN %(state)s = 'Pending'
                           AND (lease_until IS NULL OR lease_until < now())
                          THEN %(home)s ELSE lease_home END
    WHERE token = %(token)s AND version = %(expected)s
      AND (%(lease_owner)s::text IS NULL
           OR (lease_owner = %(lease_owner)s AND lease_epoch = %(lease_epoch)s))
    RETURNING version),
    {_DOCUMENTS}
    SELECT version FROM up
"""
#: A job row deleted with what hangs on it, leaving the tombstone by which the other instances
#: forget the job (the change feed, module doc); ``{which}`` picks the row.
_DELETE_JOB = """
    WITH gone AS (DELETE FROM jobs WHERE {which} RETURNING token),
         done AS (DELETE FROM uploads WHERE token IN (SELECT token FROM gone)),
         docs AS (DELETE FROM job_documents WHERE token IN (SELECT token FROM gone)),
         kept AS (DELETE FROM filter_deliveries WHERE token IN (SELECT token FROM gone))
    INSERT INTO job_tombstones (token) SELECT token FROM gone
    ON CONFLICT (token) DO UPDATE SET xid = pg_current_xact_id(), dropped = now()
"""
_DROP = _DELETE_JOB.format(which="token = %(token)s")
#: A record that does not decode, moved aside on purpose (``dsc db quarantine``,
#: store/undecodable.py; a start never does it on a shared store): gone for every instance, as
#: a dropped job is.
_QUARANTINE = _DELETE_JOB.format(which="seq = %(seq)s")
#: A job row's documents as a JSON array of [document_id, format, size] (NULL: none), in the
#: job's order (jobcodec.decode_job's rows).
_DOCUMENTS_OF_JOB = """
    (SELECT json_agg(json_build_array(d.document_id, d.format, d.size) ORDER BY d.ordinal)
        FROM job_documents d WHERE d.token = jobs.token)
"""
#: A row's document rows for the feed (jobdocuments.py): those written after the version
#: ``known.version`` this instance knows (all of them without one: versions start at 1) and
#: those without a version, each with its ordinal, the job's count of rows, and whether the
#: job is active (then its rows are remembered: KnownDocuments).  Two index ranges of
#: ``job_documents_by_version`` (schema 16), not one OR: the planner reads an OR through the
#: primary key, every row of the job fetched and filtered (bench/job_documents.py, EXPLAIN).
_FED_DOCUMENTS = """
    json_build_object(
        'active', jobs.active,
        'count', (SELECT max(d.ordinal) + 1 FROM job_documents d WHERE d.token = jobs.token),
        'rows', (SELECT json_agg(json_build_array(d.ordinal, d.document_id, d.format, d.size)
                                 ORDER BY d.ordinal)
                 FROM (SELECT * FROM job_documents WHERE token = jobs.token
                           AND version > coalesce(known.version, 0)
                       UNION ALL
                       SELECT * FROM job_documents WHERE token = jobs.token
                           AND version IS NULL) d))
"""
#: Job rows for the feed (kind 1 of _CHANGES), each with its document rows (_FED_DOCUMENTS).
_FED_JOBS = f"""
    SELECT 1, jobs.token, jobs.version, jobs.job, {_FED_DOCUMENTS}
        FROM jobs LEFT JOIN unnest(%(known_tokens)s::text[], %(known_versions)s::bigint[])
            AS known(token, version) ON known.token = jobs.token
"""
#: One statement, so one snapshot: its xmin is the next cursor (module doc).  Kinds: 0 the
#: cursor, 1 a row, 2 a tombstone, 3 another instance's upload, 4 a subscription, 5 one ended.
_CHANGES = f"""
    SELECT 0, NULL::text, pg_snapshot_xmin(pg_current_snapshot())::text::bigint, NULL::text,
        NULL::json
    UNION ALL
    {_FED_JOBS}
        WHERE jobs.xid >= %(since)s::text::xid8 OR jobs.token = ANY(%(tokens)s)
    UNION ALL
    SELECT 2, token, NULL, NULL, NULL FROM job_tombstones
        WHERE xid >= %(since)s::text::xid8 OR token = ANY(%(tokens)s)
    UNION ALL
    SELECT CASE WHEN ended THEN 5 ELSE 4 END, id, version,
           CASE WHEN ended THEN NULL
                ELSE (record::jsonb || jsonb_build_object('failures', failures))::text END,
           NULL
        FROM subscriptions WHERE xid >= %(since)s::text::xid8 OR id = ANY(%(tokens)s)
    UNION ALL
    SELECT 3, token, document_id, NULL, NULL FROM uploads
        WHERE instance <> %(me)s AND started > now() - make_interval(secs => %(age)s)
          AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id::text = uploads.instance
                          AND {GONE})
"""
#: The rows of the jobs ``tokens`` with every document row (none known): a job whose feed
#: read did not fit what this instance knew (:meth:`PostgresRecords.changes`).
_FED_JOBS_WHOLE = f"{_FED_JOBS} WHERE jobs.token = ANY(%(tokens)s)"
#: Take a DocumentId for this instance, unless another live instance holds it.
_UPLOAD_BEGIN = f"""
    INSERT INTO uploads (token, document_id, instance, home)
    VALUES (%(token)s, %(id)s, %(me)s, %(home)s)
    ON CONFLICT (token, document_id) DO UPDATE
        SET instance = excluded.instance, home = excluded.home, started = now()
        WHERE uploads.instance = excluded.instance
           OR uploads.started <= now() - make_interval(secs => %(age)s)
           OR EXISTS (SELECT 1 FROM instances i WHERE i.id::text = uploads.instance AND {GONE})
    RETURNING 1
"""
_PRUNE = """
    WITH t AS (DELETE FROM job_tombstones WHERE dropped < now() - make_interval(secs => %(tomb)s)),
         s AS (DELETE FROM subscriptions WHERE (ended OR expires < now())
                   AND changed < now() - make_interval(secs => %(tomb)s)),
         o AS (DELETE FROM outbox WHERE NOT EXISTS (
                   SELECT 1 FROM subscriptions s WHERE s.id = outbox.subscription_id
                   AND NOT s.ended AND s.expires > now()))
    DELETE FROM uploads WHERE started < now() - make_interval(secs => %(uploads)s)
"""
_STORE_SUBSCRIPTION = """
    INSERT INTO subscriptions (id, record, expires) VALUES (%(id)s, %(record)s, %(expires)s)
    ON CONFLICT (id) DO UPDATE SET record = excluded.record, expires = excluded.expires,
        version = subscriptions.version + 1, xid = pg_current_xact_id(), changed = now()
    WHERE NOT subscriptions.ended
"""
#: Ended, not deleted: the feed tells every instance (the row goes with the tombstones).
_END_SUBSCRIPTION = """
    WITH gone AS (DELETE FROM outbox WHERE subscription_id = %(id)s)
    UPDATE subscriptions SET ended = true, version = version + 1, xid = pg_current_xact_id(),
        changed = now(), delivery_owner = NULL, delivery_until = NULL
    WHERE id = %(id)s AND NOT ended
"""
#: The count is news to every instance (the next delivery owner reads it from the feed).
_RECORD_FAILURES = """
    UPDATE subscriptions SET failures = %(failures)s, version = version + 1,
        xid = pg_current_xact_id(), changed = now()
    WHERE id = %(id)s AND NOT ended AND failures <> %(failures)s
"""
#: A new term for the leader that took the lock (subscribers last heard Idle when nobody
#: announced anything yet: the core starts from it too); the state announced last.  Only
#: while its instance holds the lock, asked in this statement (not before it: the lock may
#: go between the two), so a deposed leader whose heartbeat has not noticed yet takes no term
#: over the new one's; no row then.  ``last``: the last instance stopping takes one whether it
#: holds the lock or not (nobody else is up to lead: runtime/service.py ``shutdown``), unless
#: an instance up (not :data:`GONE`, the rule by which it counted none) holds it: one started
#: since that count, which leads (asked here too: it may take the lock between the two).
_TAKE_LEAD = f"""
    INSERT INTO repository_announced (id, state, leader, term)
    SELECT 1, 'Idle', %(me)s, 1
    WHERE EXISTS (SELECT 1 FROM instances i WHERE i.id::text = %(me)s AND {HOLDS_LEADER_LOCK})
       OR %(last)s AND NOT EXISTS (SELECT 1 FROM instances i
                                   WHERE i.id::text <> %(me)s AND NOT {GONE}
                                     AND {HOLDS_LEADER_LOCK})
    ON CONFLICT (id) DO UPDATE SET leader = excluded.leader,
        term = repository_announced.term + 1, changed = now()
    RETURNING state, term
"""
#: Compare-and-set on the term and on the state it replaces (module doc of the migration).
_ANNOUNCE = """
    UPDATE repository_announced SET state = %(state)s, changed = now()
    WHERE id = 1 AND leader = %(me)s AND term = %(term)s AND state = %(previous)s
    RETURNING 1
"""
_ENQUEUE = """
    INSERT INTO outbox (subscription_id, address, content_type, message)
    VALUES (%s, %s, %s, %s)
"""
#: The doorbell (issue 18: NOTIFY is a hint, never the message; payloads stop at 8000 bytes):
#: in the transaction of the outbox rows, so it rings when they are visible.
_DOORBELL = "SELECT pg_notify('dsc_outbox', '')"

#: Any number: the advisory lock that serializes schema upgrades of servers starting together.
_UPGRADE_LOCK = 0x647363  # "dsc"
#: The schema from which job_documents exists (its migration: the 10th).
_JOB_DOCUMENTS_SCHEMA = 10
#: What an upgrade takes before any migration, on a schema where both exist: the tables the
#: running instances write, in the order their writes take them (a job's row, then its
#: document rows: ``_DOCUMENTS``).  A migration that altered job_documents (schema 14) before
#: one that locks jobs (schema 16) held the one while it waited for a write in flight holding
#: the other and waiting for it: PostgreSQL ended one of the two (a deadlock; the upgrade,
#: and the server did not start).  Locked first, the upgrade waits for the writes in flight,
#: holding nothing they wait for, and holds the next ones until it commits.
_WRITTEN_TABLES_FIRST = "LOCK TABLE jobs, job_documents IN EXCLUSIVE MODE"

# SQLSTATE classes a retry may get past: 08 connection, 40 transaction rollback (serialization,
# deadlock), 53 insufficient resources (disk full, out of memory, too many connections),
# 57 operator intervention (admin shutdown, crash shutdown, cannot connect now).
_TEMPORARY_CLASSES = ("08", "40", "53", "57")


def is_temporary_pg(exc: BaseException) -> bool:
    """Whether a retry of what raised ``exc`` may succeed (R4 step 9)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:  # no answer from the server at all: the connection is gone
            return isinstance(exc, psycopg.OperationalError)
        return state[:2] in _TEMPORARY_CLASSES
    return isinstance(exc, MemoryError)


def redacted(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(a DSN that does not parse)"
    parts.pop("password", None)
    return conninfo.make_conninfo("", **{k: v for k, v in parts.items() if v is not None})


def connection_kwargs(password_file: Path | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5}
    if password_file is not None:
        try:
            kwargs["password"] = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(
                f"[store] password_file {password_file}: {exc.strerror}", temporary=False
            ) from exc
    return kwargs


#: How long an upgrade waits for a lock on a table it changes (once it holds _UPGRADE_LOCK: a
#: server starting beside one upgrading waits for that whole).  The running instances' writes
#: of that table wait behind the upgrade's request meanwhile, so a session that holds the table
#: in a transaction left open (an operator's psql) held up the whole cluster, and the start,
#: for as long as it stayed open; after this the upgrade gives up and names it.
UPGRADE_LOCK_WAIT_SECONDS = 10.0
#: How long a start waits for ANOTHER server's schema upgrade (the upgrade lock) before it
#: gives up: generous, since a legitimate migration of a big table takes minutes; meanwhile it
#: says what it waits for every :data:`UPGRADE_REPORT_SECONDS` (:func:`_wait_for_upgrade_lock`).
UPGRADE_WAIT_SECONDS = 1800.0
UPGRADE_REPORT_SECONDS = 5.0
#: How long taking a term (:meth:`PostgresRecords.take_lead`) waits for the first row of the
#: term while another transaction inserts it (a fresh database: the row is locked NOWAIT once
#: it exists, _TERM_ROW_NOWAIT).  One left open (an operator's psql) held the ticker up, and
#: the holder, shown taking the lead, for as long as it stayed open.  After this the take
#: fails like any other (runtime/announcing.py: logged, shown, tried again at the next tick).
TAKE_LEAD_LOCK_WAIT_SECONDS = 5.0
#: The row of the term, locked without waiting before a term is taken: held by another
#: transaction (another instance's take, a leader's announcement, one left open), the take
#: fails at once (:class:`TermRowBusy`: no failure until the row stays held, runtime/
#: announcing.py ``TERM_ROW_BUSY_SECONDS``) and the next tick tries again.  Waiting for it, up to
#: TAKE_LEAD_LOCK_WAIT_SECONDS, held the ticker (runtime/service.py ``_tick_loop``): a leader
#: whose announcement was refused went on being shown leading, sweeping nothing, its row and
#: views not written, for 5 s at each attempt while another transaction held the row
#: (tests/bindings/test_outbox_sql.py counts what the ticker does meanwhile).  Not for the last
#: instance's term at its stop (runtime/service.py ``shutdown``, not the ticker): its writer's
#: announcement in flight may hold the row a moment, and a take that failed then would leave
#: the repository's Stopped unannounced; it waits as long as a first row's insert.
_TERM_ROW_NOWAIT = "SELECT 1 FROM repository_announced WHERE id = 1 FOR UPDATE NOWAIT"

#: The sessions that held a table lock of this database since before the upgrade began to
#: wait (``%(waited)s`` seconds ago), oldest transaction first: those it may have waited for.
_HELD_UP_BY = """
    SELECT a.pid, coalesce(nullif(a.application_name, ''), a.usename::text, 'no name'),
           coalesce(a.state, 'unknown'), EXTRACT(EPOCH FROM now() - a.xact_start)::float8
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
      AND a.xact_start < now() - make_interval(secs => %(waited)s)
      AND EXISTS (SELECT 1 FROM pg_locks l
                  WHERE l.pid = a.pid AND l.granted AND l.locktype = 'relation')
    ORDER BY a.xact_start
"""


def upgrade(
    conn: psycopg.Connection[Any],
    *,
    lock_wait: float = UPGRADE_LOCK_WAIT_SECONDS,
    upgrade_wait: float = UPGRADE_WAIT_SECONDS,
    report_every: float = UPGRADE_REPORT_SECONDS,
) -> tuple[int, int]:
    """Create or upgrade the schema; returns (version before, version now).  StoreError for a
    schema newer than this server, when a lock it needs is held for longer than ``lock_wait``
    seconds (:data:`UPGRADE_LOCK_WAIT_SECONDS`), and when another server's upgrade holds the
    upgrade lock for longer than ``upgrade_wait`` (:data:`UPGRADE_WAIT_SECONDS`; said every
    ``report_every`` seconds meanwhile: :func:`_wait_for_upgrade_lock`)."""
    before: int | None = None
    try:
        with conn.transaction():
            _wait_for_upgrade_lock(conn, upgrade_wait, report_every)
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{round(lock_wait * 1000)}ms",)
            )
            conn.execute("CREATE TABLE IF NOT EXISTS dsc_schema (version integer NOT NULL)")
            row = conn.execute("SELECT version FROM dsc_schema").fetchone()
            before = 0 if row is None else int(row[0])
            if before > SCHEMA_VERSION:
                raise StoreError(
                    f"job store schema {before} is newer than this server ({SCHEMA_VERSION})",
                    temporary=False,
                )
            if before < SCHEMA_VERSION:
                # What a server waiting for this upgrade names (pg_stat_activity): until the
                # transaction ends.
                conn.execute(
                    "SELECT set_config('application_name', %s, true)",
                    (
                        f"dsc schema upgrade {before} -> {SCHEMA_VERSION} "
                        f"(host {socket.gethostname()}, pid {os.getpid()})"[:63],
                    ),
                )
            if _JOB_DOCUMENTS_SCHEMA <= before < SCHEMA_VERSION:
                conn.execute(_WRITTEN_TABLES_FIRST)
            for statements in _MIGRATIONS[before:]:
                for statement in statements:
                    conn.execute(statement)  # our own constant SQL
            if row is None:
                conn.execute("INSERT INTO dsc_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif before != SCHEMA_VERSION:
                conn.execute("UPDATE dsc_schema SET version = %s", (SCHEMA_VERSION,))
    except psycopg.errors.LockNotAvailable as exc:
        which = f"{before} -> {SCHEMA_VERSION}" if before is not None else f"to {SCHEMA_VERSION}"
        raise StoreError(
            f"upgrading the job store schema {which}: {_held_up_by(conn, lock_wait)}",
            temporary=False,
        ) from exc
    assert before is not None  # read in the transaction, which committed
    return before, SCHEMA_VERSION


def _wait_for_upgrade_lock(
    conn: psycopg.Connection[Any], upgrade_wait: float, report_every: float
) -> None:
    """Take the upgrade lock (in ``conn``'s transaction) as soon as another server's upgrade
    lets it go.  A long migration of that server is legitimate: its wait is not
    ``lock_wait``'s, but while it lasts a WARNING says every ``report_every`` seconds which
    session holds the lock and for how long (an operator sees what the start waits for), and
    after ``upgrade_wait`` this start gives up saying so.  The wait is in slices of
    ``report_every`` (``lock_timeout``, each in a savepoint that a timeout rolls back, the
    lock not taken), so the lock is taken the moment it is free, never polled for."""
    slice_ms = f"{max(1, round(report_every * 1000))}ms"
    began = time.monotonic()
    while True:
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (slice_ms,))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
            return  # held until the outer transaction ends
        except psycopg.errors.LockNotAvailable:
            pass
        waited = time.monotonic() - began
        holder, pid = _upgrade_lock_holder(conn)
        if waited >= upgrade_wait:
            raise StoreError(
                f"upgrading the job store schema: waited {waited:.0f} s for another server's "
                f"schema upgrade to end ({holder}), and gave up: if that upgrade still runs, "
                "start this server once it is done; if it is stuck, end that session "
                f"(SELECT pg_terminate_backend({pid or 'PID'})) and start this server again",
                temporary=False,
            )
        log.warning(
            "waiting %.0f s so far for another server's schema upgrade of the job store "
            "(%s): this server starts once it is done (it gives up after %.0f s)",
            waited,
            holder,
            upgrade_wait,
        )


#: The session holding the upgrade lock (a bigint advisory lock: its high and low halves are
#: pg_locks' classid and objid, objsubid 1), with its name and how long it has held it.
_UPGRADE_LOCK_HOLDER = """
    SELECT a.pid, coalesce(nullif(a.application_name, ''), a.usename::text, 'no name'),
           coalesce(host(a.client_addr), 'local'), coalesce(a.state, 'unknown'),
           EXTRACT(EPOCH FROM now() - coalesce(a.xact_start, a.backend_start))::float8
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid::bigint = %(high)s AND l.objid::bigint = %(low)s
"""


def _upgrade_lock_holder(conn: psycopg.Connection[Any]) -> tuple[str, int | None]:
    """Who holds the upgrade lock, for the log ("held by pid N (name, from ADDRESS, state,
    its transaction open for S s)"), and its pid (None: nobody holds it now)."""
    rows = conn.execute(
        _UPGRADE_LOCK_HOLDER, {"high": _UPGRADE_LOCK >> 32, "low": _UPGRADE_LOCK & 0xFFFFFFFF}
    ).fetchall()
    if not rows:
        return "its holder has just let it go", None
    described = ", ".join(
        f"held by pid {pid} ({name}, from {address}, {state}, its transaction open for "
        f"{seconds:.0f} s)"
        for pid, name, address, state, seconds in rows
    )
    return described, int(rows[0][0])


def _held_up_by(conn: psycopg.Connection[Any], waited: float) -> str:
    """What held an upgrade up (its transaction rolled back), and what to do, in one line."""
    rows = conn.execute(_HELD_UP_BY, {"waited": waited}).fetchall()
    if not rows:
        return (
            f"a lock on a table it changes was held by another session for more than "
            f"{waited:g} s (none holds one now); try again"
        )
    held = ", ".join(
        f"pid {pid} ({name}, {state} for {seconds:.0f} s)" for pid, name, state, seconds in rows
    )
    return (
        f"waited {waited:g} s for a lock on a table it changes, held by {held}; the running "
        "instances' writes wait behind the upgrade, so it gave up: end that transaction "
        f"(SELECT pg_terminate_backend({rows[0][0]})) or let it finish, then try again"
    )


class PgDatabase:
    """A small connection pool on one database, and the ONE place where PostgreSQL's faults
    become :class:`StoreError` (temporary or not, :func:`is_temporary_pg`).  The job records,
    the device book and the tally each hold one.  Thread-safe."""

    def __init__(self, dsn: str, pool: psycopg_pool.ConnectionPool[Any]) -> None:
        self.location = redacted(dsn)
        self._pool = pool
        self._closed = threading.Event()

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        password_file: Path | None = None,
        min_size: int = 1,
        max_size: int = 4,
        pool_timeout: float = 5.0,
        name: str = "dsc-store",
    ) -> PgDatabase:
        """Connect (within ``pool_timeout``) and create or upgrade the schema."""
        pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            dsn,
            kwargs=connection_kwargs(password_file),
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout,
            check=psycopg_pool.ConnectionPool.check_connection,
            name=name,
            open=False,
        )
        try:
            pool.open(wait=True, timeout=pool_timeout)
            with pool.connection() as conn:
                before, now = upgrade(conn)
        except BaseException as exc:
            pool.close()
            if isinstance(exc, (psycopg.Error, psycopg_pool.PoolTimeout)):
                raise as_store_error(
                    f"connecting to PostgreSQL at {redacted(dsn)}", exc, is_temporary_pg(exc)
                ) from exc
            raise
        if before != now:
            log.info("PostgreSQL job store schema %d -> %d at %s", before, now, redacted(dsn))
        return cls(dsn, pool)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        self._pool.close()

    def run(
        self, what: str, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> list[tuple[Any, ...]]:
        """One autocommit statement (one round trip: no BEGIN/COMMIT around it); its rows
        ([] when it returns none)."""
        return self._work(what, lambda conn, cur: _execute(cur, sql, params))

    def transaction(self, what: str, work: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``work`` in one transaction (committed when it returns, rolled back when it
        raises); a fault of the engine is a StoreError saying ``what`` failed."""

        def transact(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> T:
            with conn.transaction():
                return work(cur)

        return self._work(what, transact)

    def _work(
        self, what: str, work: Callable[[psycopg.Connection[Any], psycopg.Cursor[Any]], T]
    ) -> T:
        if self._closed.is_set():
            raise StoreError(f"{what}: the database connection is closed", temporary=False)
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                return work(conn, cur)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise as_store_error(what, exc, is_temporary_pg(exc)) from exc

    def stats(self) -> PoolStats:
        """The pool's connections in use and idle, and requests waiting for one (/metrics)."""
        stats = self._pool.get_stats()
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        return PoolStats(size - idle, idle, stats.get("requests_waiting", 0))


def _execute(
    cur: psycopg.Cursor[Any], sql: str, params: tuple[object, ...] | dict[str, object]
) -> list[tuple[Any, ...]]:
    cur.execute(sql, params)  # our own constant SQL
    return cur.fetchall() if cur.description is not None else []


def _record_params(job: Job, documents: DocumentsWrite) -> dict[str, object]:
    """The parameters of a job record write and its document rows (_INSERT, _UPDATE, _UPSERT)."""
    token, state, active, created, completed, text = record_columns(job)
    return {
        "token": token,
        "state": state,
        "active": active,
        "created": created,
        "completed": completed,
        "job": text,
        "origin": job.origin,
        **documents.columns(),
    }


def _insert_events(cur: psycopg.Cursor[Any], events: tuple[Deliver, ...]) -> None:
    """Outbox rows (one per subscriber and event; the message whole, its MessageID fixed), then
    the doorbell, in the caller's transaction."""
    if not events:
        return
    cur.executemany(
        _ENQUEUE, [(e.subscription_id, e.address, e.content_type, e.body) for e in events]
    )
    cur.execute(_DOORBELL)


def _announce(cur: psycopg.Cursor[Any], announcement: Announcement | None) -> bool:
    """The announcement and its events, in the caller's transaction; False when the row of
    the state announced last refused it (another term, or another state: nothing written)."""
    if announcement is None:
        return True
    cur.execute(
        _ANNOUNCE,
        {
            "state": announcement.state,
            "previous": announcement.previous,
            "me": announcement.leader,
            "term": announcement.term,
        },
    )
    if cur.fetchone() is None:
        return False
    _insert_events(cur, announcement.events)
    return True


class PostgresRecords:
    """The job table in PostgreSQL through a small connection pool.  Thread-safe."""

    def __init__(
        self, db: PgDatabase, dsn: str | None = None, password_file: Path | None = None
    ) -> None:
        self.location = db.location
        #: The change feed's own connection (``changes``), made on first use: the catch-up
        #: reads one at a time, and keeps out of the pool's way while the database is away
        #: (a pool hammered by reads backs its reconnects off further).
        self._feed_dsn = dsn
        self._feed_password = password_file
        self._feed: psycopg.Connection[Any] | None = None
        self._feed_lock = threading.Lock()
        self.shared = True
        #: This run's name in ``uploads`` rows: a new one per start, so rows a killed run left
        #: are told apart (they age out, UPLOAD_ROW_SECONDS).
        self.instance = uuid.uuid4().hex
        #: How long a job this instance makes Pending waits for its claim before any
        #: instance's sweep may take it ([cluster] lease_seconds, set by the runtime).
        self.pending_grace = 30.0
        #: This run's host and data folder (store/leases.py ``lease_home``), set by the runtime.
        self.home: str | None = None
        #: ``[limits]`` as configured now (a reload changes them): the limits on new jobs are
        #: checked again by each creating write (issue 18 point 1; set by the runtime); None:
        #: not checked here.
        self.limits: Callable[[], Limits] | None = None
        #: Told when an announcement was not written (SharedJobRecords; set by the runtime).
        self.announcement_refused: Callable[[], None] | None = None
        #: Seconds :meth:`take_lead` waits for the row of the term (TAKE_LEAD_LOCK_WAIT_SECONDS).
        self.take_lead_lock_wait = TAKE_LEAD_LOCK_WAIT_SECONDS
        self._db = db
        self._pruned = time.monotonic()
        #: Uploads rows this run could not delete (an upload ended while the database was
        #: away): the others would count them as in flight for UPLOAD_ROW_SECONDS (the job
        #: never idle, so never timed out; the scanner's retry refused), so each read of the
        #: feed deletes them again first (:meth:`_end_owed_uploads`).  The lock is held
        #: through those deletes, so a new upload of the same image is never deleted by one.
        self._ends_owed: set[tuple[str, int]] = set()
        self._owed_lock = threading.Lock()
        self._documents = KnownDocuments()
        #: Document rows the change feed has read (:meth:`changes`; a measure for
        #: bench/job_documents.py and the tests: an append reads one).
        self.documents_fed = 0

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        password_file: Path | None = None,
        min_size: int = 1,
        max_size: int = 4,
        pool_timeout: float = 5.0,
    ) -> PostgresRecords:
        """Connect (within ``pool_timeout``) and create or upgrade the schema."""
        return cls(
            PgDatabase.open(
                dsn,
                password_file=password_file,
                min_size=min_size,
                max_size=max_size,
                pool_timeout=pool_timeout,
            ),
            dsn,
            password_file,
        )

    def outbox(self) -> OutboxRows:
        """The delivery side of the outbox (pgoutbox.py), on this pool."""
        assert self._feed_dsn is not None, "opened with a DSN"
        return OutboxRows(self._db, self._feed_dsn, self._feed_password)

    def close(self) -> None:
        self._db.close()
        with self._feed_lock:
            if self._feed is not None:
                self._feed.close()
                self._feed = None

    def _run(
        self, what: str, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> list[tuple[Any, ...]]:
        if self._db.closed:
            raise StoreError("the job store is closed", temporary=False)
        return self._db.run(what, sql, params)

    def put(self, job: Job) -> None:
        # Tools only (dsc db migrate): every document row, and the next write starts over.
        self._documents.forget(job.token)
        params = _record_params(job, self._documents.plan(job, whole=True))
        self._run(f"recording job {job.token}", _UPSERT, params)

    def drop(self, token: str) -> None:
        self._run(f"dropping job {token}", _DROP, {"token": token})
        self._documents.forget(token)

    def write(self, write: VersionedWrite) -> None:
        """A record command, compare-and-set on the row's version (module doc)."""
        command = write.command
        if isinstance(command, DropJob):
            if not write.events and write.announcement is None:
                self.drop(command.token)
                return

            def drop(cur: psycopg.Cursor[Any]) -> int:
                cur.execute(_DROP, {"token": command.token})
                return 0

            self._with_events(
                f"dropping job {command.token}", drop, write.events, write.announcement
            )
            self._documents.forget(command.token)
            return
        job = command.job
        token = job.token
        inserting = isinstance(command, CreateJob) or write.expected is None
        documents = self._documents.plan(job, None if inserting else write.expected)
        params = _record_params(job, documents)
        try:
            version = self._write_row(write, job, params, inserting)
        except JobChanged:
            # Refused: nothing was written (the document rows go only with the row,
            # _DOCUMENTS), so what is known of the version before still holds, and the
            # catch-up reads only the winner's rows from it (jobdocuments.py).
            raise
        except BaseException:
            self._documents.forget(token)  # an outcome not known
            raise
        self._documents.committed(job, version)

    def _write_row(
        self, write: VersionedWrite, job: Job, params: dict[str, object], inserting: bool
    ) -> int:
        """The row (and its document rows and events) of a CreateJob or UpdateJob; its new
        version.  JobChanged when the compare-and-set failed."""
        token = job.token
        if isinstance(write.command, CreateJob) and self.limits is not None:
            return self._create_within_limits(write, job, params)
        if inserting:
            sql: str = _INSERT
        else:
            assert isinstance(write.command, UpdateJob)
            sql = _UPDATE
            params |= {
                "expected": write.expected,
                # A write of the engine holding the job's lease: fenced (store/leases.py).
                "lease_owner": None if write.lease is None else write.lease[0],
                "lease_epoch": None if write.lease is None else write.lease[1],
                "me": self.instance,
                "grace": self.pending_grace,
                "home": self.home,
            }
        what = f"recording job {token}"
        if not write.events and write.announcement is None:
            found = self._run(what, sql, params)
            if not found:
                raise JobChanged(token)
            return int(found[0][0])

        def change(cur: psycopg.Cursor[Any]) -> int | None:
            cur.execute(sql, params)  # our own constant SQL
            row = cur.fetchone()
            return None if row is None else int(row[0])

        version = self._with_events(what, change, write.events, write.announcement)
        if version is None:
            raise JobChanged(token)
        return version

    def _with_events(
        self,
        what: str,
        change: Callable[[psycopg.Cursor[Any]], int | None],
        events: tuple[Deliver, ...],
        announcement: Announcement | None,
    ) -> int | None:
        """``change`` and the notifications it causes, committed together (issue 18 points 3
        and 4): an event exists exactly when its change did, and the events of one job are
        numbered in the order its writes commit (they serialize on the row).  What ``change``
        returns; None when it wrote nothing (nothing else is then written).  An announcement
        the row of the state announced last refuses is left out alone: the change stands,
        and the runtime hears of it (``announcement_refused``), as when the transaction
        fails."""
        if self._db.closed:
            raise StoreError("the job store is closed", temporary=False)
        announced = [announcement is None]

        # The events the core emitted before the announcement, its own, then the rest: the
        # outbox rows' ids are the order each subscriber hears them in.
        at = 0 if announcement is None else announcement.after

        def transact(cur: psycopg.Cursor[Any]) -> int | None:
            result = change(cur)
            if result is None:
                return None
            _insert_events(cur, events[:at])
            announced[0] = _announce(cur, announcement)
            _insert_events(cur, events[at:])
            return result

        try:
            return self._db.transaction(what, transact)
        except StoreError:
            announced[0] = announcement is None
            raise
        finally:
            if not announced[0] and self.announcement_refused is not None:
                self.announcement_refused()

    def write_events(self, write: EventsWrite) -> None:
        """Notifications no job record write carried, with their announcement (one
        transaction)."""
        if write.events or write.announcement is not None:
            self._with_events(
                "recording notifications", lambda cur: 0, write.events, write.announcement
            )

    def record_failures(self, identifier: str, failures: int) -> None:
        self._run(
            f"recording the delivery failures of subscription {identifier}",
            _RECORD_FAILURES,
            {"id": identifier, "failures": failures},
        )

    def take_lead(self, leader: str, last: bool = False) -> tuple[str, int] | None:
        if self._db.closed:
            raise StoreError("the job store is closed", temporary=False)
        wait = f"{round(self.take_lead_lock_wait * 1000)}ms"

        def take(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            # A row held by another transaction fails the take at once, not holds the ticker
            # (_TERM_ROW_NOWAIT); a first row being inserted, after a bounded wait
            # (TAKE_LEAD_LOCK_WAIT_SECONDS).
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (wait,))
            if not last:  # the last instance's stop waits: its Stopped is at stake, no tick
                try:
                    cur.execute(_TERM_ROW_NOWAIT)
                except psycopg.errors.LockNotAvailable as exc:
                    # Contention, not yet a failure: the caller tells them apart (TermRowBusy).
                    raise TermRowBusy(f"taking the lead: {type(exc).__name__}: {exc}") from exc
            return _execute(cur, _TAKE_LEAD, {"me": leader, "last": last})

        found = self._db.transaction("taking the lead", take)
        if not found:
            return None
        state, term = found[0]
        return str(state), int(term)

    def _create_within_limits(
        self, write: VersionedWrite, job: Job, params: dict[str, object]
    ) -> int:
        """A new job, inserted only if the core's rules on new jobs
        (``dsc_core.dsp.creation_refused``: ``max_active_jobs``, the per-client quota, the
        slots kept for new clients) allow it on every instance's jobs, counted in SQL under
        the creations' lock (issue 18 point 1): the core counted its table, which another
        instance's creation at the same moment is not yet in.  Refused:
        :class:`CreationRefused`, so the core undoes the creation and answers with the
        limit's own fault."""
        assert self.limits is not None
        limits = self.limits()
        if self._db.closed:
            raise StoreError("the job store is closed", temporary=False)

        def transact(cur: psycopg.Cursor[Any]) -> SoapFault | int | None:
            """The refusal, or the new row's version (None: the token was taken)."""
            cur.execute(_CREATING_LOCK, (CREATING_LOCK_CLASS,))
            cur.execute(_CREATING_COUNTS, {"origin": job.origin})
            row = cur.fetchone()
            active, held = (0, 0) if row is None else (int(row[0]), int(row[1]))
            refused = creation_refused(limits, active, job.origin, held)
            if refused is not None:
                return refused
            cur.execute(_INSERT, params)  # our own constant SQL
            inserted = cur.fetchone()
            return None if inserted is None else int(inserted[0])

        refused: list[SoapFault] = []

        def create(cur: psycopg.Cursor[Any]) -> int | None:
            outcome = transact(cur)
            if isinstance(outcome, SoapFault):
                refused.append(outcome)
                return None
            return outcome

        version = self._with_events(
            f"recording job {job.token}", create, write.events, write.announcement
        )
        if refused:
            raise CreationRefused(refused[0])
        if version is None:
            raise JobChanged(job.token)
        return version

    def store_subscription(self, identifier: str, expires: datetime, record: str) -> None:
        self._run(
            f"recording subscription {identifier}",
            _STORE_SUBSCRIPTION,
            {"id": identifier, "record": record, "expires": expires},
        )

    def end_subscription(self, identifier: str) -> None:
        self._run(f"ending subscription {identifier}", _END_SUBSCRIPTION, {"id": identifier})

    def enqueue(self, events: tuple[Deliver, ...]) -> None:
        if events:
            self._db.transaction("recording notifications", lambda cur: _insert_events(cur, events))

    def changes(self, cursor: int, tokens: frozenset[str]) -> JobChanges:
        """Rows and tombstones since ``cursor`` (module doc), the rows of ``tokens`` (job
        tokens and subscription identifiers), and the other instances' uploads; one statement
        (one small query per request)."""
        self._prune()
        self._end_owed_uploads()
        known = self._documents.known(INCREMENTAL_DOCUMENTS)
        params = {
            "since": cursor,
            "tokens": sorted(tokens),
            "me": self.instance,
            "age": UPLOAD_ROW_SECONDS,
            "known_tokens": list(known),
            "known_versions": [k.version for k in known.values()],
        }
        found = self._read("reading the jobs other instances changed", _CHANGES, params)
        next_cursor = cursor
        rows: list[tuple[str, int, str, StoredDocuments]] = []
        dropped: list[str] = []
        uploads: list[tuple[str, int]] = []
        subscriptions: list[tuple[str, int, str]] = []
        ended: list[str] = []
        #: Jobs whose rows the feed read do not fit what this instance knew: read whole.
        unfit: list[str] = []
        for kind, token, number, text, documents in found:
            if kind == 0:
                next_cursor = int(number)
            elif kind == 1:
                fed = self._fed_documents(str(token), int(number), documents, known.get(token))
                if fed is None:
                    unfit.append(str(token))
                else:
                    rows.append((str(token), int(number), str(text), fed))
            elif kind == 2:
                dropped.append(str(token))
                self._documents.forget(str(token))  # another instance dropped it
            elif kind == 3:
                uploads.append((str(token), int(number)))
            elif kind == 4:
                subscriptions.append((str(token), int(number), str(text)))
            else:
                ended.append(str(token))
        if unfit:
            rows += self._read_whole(unfit)
        return JobChanges(
            next_cursor,
            tuple(rows),
            tuple(dropped),
            tuple(uploads),
            tuple(subscriptions),
            tuple(ended),
        )

    def _read_whole(self, tokens: list[str]) -> list[tuple[str, int, str, StoredDocuments]]:
        """The rows of jobs whose feed read did not fit what this instance knew, with every
        document row, in a statement of their own (its snapshot may be later than the feed's:
        a newer version, absorbed as such; a job deleted meanwhile is not here, and its
        tombstone comes with the next read).  A job that does not fit even so (a document row
        missing: no server writes that) is left out, WARNING, and read again with its next
        write; the other jobs are caught up all the same."""
        found = self._read(
            "reading jobs whole",
            _FED_JOBS_WHOLE,
            {"tokens": tokens, "known_tokens": [], "known_versions": []},
        )
        rows: list[tuple[str, int, str, StoredDocuments]] = []
        for _, token, version, text, documents in found:
            fed = self._fed_documents(str(token), int(version), documents, None)
            if fed is None:
                log.warning(
                    "job %s: the stored document rows at version %d are not a whole list (a "
                    "row is missing, which no server writes): this instance keeps the record "
                    "it has until the job's next write; the other jobs are caught up",
                    token,
                    version,
                )
            else:
                rows.append((str(token), int(version), str(text), fed))
        return rows

    def _fed_documents(
        self, token: str, version: int, fed: dict[str, Any], known: Known | None
    ) -> StoredDocuments | None:
        """The job's whole list of document rows at ``version``: those the feed read, in their
        places among the rows known at ``known.version`` (the others are unchanged since:
        jobdocuments.py).  None when a row is neither read nor known (then the job is
        forgotten: its next read is whole)."""
        count = int(fed["count"] or 0)
        read = fed["rows"] or ()
        before = known.documents if known is not None else ()
        rows: list[Sequence[object] | None] = [*map(document_row, before[:count])]
        rows += [None] * (count - len(rows))
        for ordinal, *row in read:
            if 0 <= ordinal < count:
                rows[ordinal] = row
        if None in rows:
            self._documents.forget(token)
            if known is not None:
                # Not a write this server knows (each writes its rows with its version, and a
                # schema-13 server's have none, so they are read): this one job is read whole
                # (:meth:`_read_whole`), the others are not held up.
                log.warning(
                    "job %s: the document rows at version %d are not what this instance knew "
                    "at version %d (row %d neither read nor known): read again whole",
                    token,
                    version,
                    known.version,
                    rows.index(None),
                )
            return None
        self.documents_fed += len(read)
        whole = cast(list[Sequence[object]], rows)
        try:
            documents = decode_document_rows(whole)
        except ValueError:  # the catch-up says so, and skips the record
            self._documents.forget(token)
        else:
            self._documents.read(token, version, bool(fed["active"]), documents)
        return whole

    def _read(self, what: str, sql: str, params: dict[str, object]) -> list[tuple[Any, ...]]:
        """A read of the change feed, on its own connection when there is a DSN (``_feed``)."""
        if self._feed_dsn is None:
            return self._run(what, sql, params)
        with self._feed_lock:
            if self._db.closed:
                raise StoreError("the job store is closed", temporary=False)
            try:
                if self._feed is None or self._feed.closed:
                    self._feed = psycopg.connect(
                        self._feed_dsn, **connection_kwargs(self._feed_password)
                    )
                return self._feed.execute(sql, params).fetchall()  # our own constant SQL
            except psycopg.Error as exc:
                if self._feed is not None:
                    self._feed.close()
                    self._feed = None
                raise as_store_error(what, exc, is_temporary_pg(exc)) from exc

    def listen(
        self, ring: Callable[[Rang | None], None], heard: Callable[[bool], None]
    ) -> PgDoorbell:
        """Start the feed's doorbell on a connection of its own (store/pgdoorbell.py); without
        a DSN (records opened on a bare pool) it never hears anything: ``heard(False)``."""
        if self._feed_dsn is None:
            heard(False)
            raise StoreError("the job doorbell needs the database's DSN", temporary=False)
        password_file = self._feed_password
        return PgDoorbell(self._feed_dsn, lambda: connection_kwargs(password_file), ring, heard)

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned < _PRUNE_SECONDS:
            return
        self._pruned = now
        self._run(
            "pruning tombstones", _PRUNE, {"tomb": TOMBSTONE_SECONDS, "uploads": UPLOAD_ROW_SECONDS}
        )

    def release_uploads(self, home: str) -> list[tuple[str, int]]:
        found = self._run(
            "releasing the uploads of an earlier run",
            "DELETE FROM uploads WHERE home = %s RETURNING token, document_id",
            (home,),
        )
        return [(str(token), int(document_id)) for token, document_id in found]

    def upload_began(self, token: str, document_id: int, home: str) -> None:
        with self._owed_lock:
            self._ends_owed.discard((token, document_id))  # the new upload takes the row
        found = self._run(
            f"reserving document {document_id} of job {token}",
            _UPLOAD_BEGIN,
            {
                "token": token,
                "id": document_id,
                "me": self.instance,
                "home": home,
                "age": UPLOAD_ROW_SECONDS,
            },
        )
        if not found:
            raise StoreError(
                f"another instance is receiving document {document_id} of job {token}",
                temporary=True,
            )

    def upload_ended(self, token: str, document_id: int) -> None:
        try:
            self._end_upload(token, document_id)
        except StoreError:
            with self._owed_lock:
                self._ends_owed.add((token, document_id))
            raise

    def _end_upload(self, token: str, document_id: int) -> None:
        self._run(
            f"ending the upload of document {document_id} of job {token}",
            "DELETE FROM uploads WHERE token = %s AND document_id = %s AND instance = %s",
            (token, document_id, self.instance),
        )

    def _end_owed_uploads(self) -> None:
        """Delete the uploads rows whose end failed (``_ends_owed``); while the database is
        still away, the next read tries again."""
        if not self._ends_owed:
            return
        with self._owed_lock:
            for token, document_id in sorted(self._ends_owed):
                try:
                    self._end_upload(token, document_id)
                except StoreError:
                    return
                self._ends_owed.discard((token, document_id))
                log.info("the upload of document %d of job %s ended late", document_id, token)

    def rows(self) -> list[StoredRecord]:
        found = self._run(
            "loading jobs", f"SELECT seq, token, job, {_DOCUMENTS_OF_JOB} FROM jobs ORDER BY seq"
        )
        return [
            (int(seq), str(token), str(text), documents or ())
            for seq, token, text, documents in found
        ]

    def row(self, token: str) -> StoredRecord | None:
        found = self.versioned_row(token)
        return None if found is None else found[0]

    def versioned_row(self, token: str) -> tuple[StoredRecord, int] | None:
        """:meth:`row` with the row's version, read together: what :meth:`remove_unchanged`
        compares."""
        found = self._run(
            f"loading job {token}",
            f"SELECT seq, token, job, {_DOCUMENTS_OF_JOB}, version FROM jobs WHERE token = %s",
            (token,),
        )
        for seq, stored, text, documents, version in found:
            return (int(seq), str(stored), str(text), documents or ()), int(version)
        return None

    def remove(self, seq: int) -> None:
        found = self._run(
            "quarantining a job record", f"{_QUARANTINE} RETURNING token", {"seq": seq}
        )
        for (token,) in found:
            self._documents.forget(str(token))

    def remove_unchanged(self, seq: int, version: int, first: Callable[[], T]) -> T | None:
        """:meth:`remove`, compare-and-set as the store's writes are: only while the row at
        ``seq`` is still at ``version``.  ``first`` (moving the record and its documents aside,
        store/undecodable.py) runs before the delete with the row locked (``FOR UPDATE``), so
        that no instance's write lands between the comparison and the delete; such a write
        waits, then finds the row gone.  Returns what ``first`` returned; None when the row
        changed or went since it was read: then nothing ran and nothing was deleted."""

        def work(cur: psycopg.Cursor[Any]) -> tuple[T, str] | None:
            cur.execute("SELECT version, token FROM jobs WHERE seq = %s FOR UPDATE", (seq,))
            found = cur.fetchone()
            if found is None or int(found[0]) != version:
                return None
            done = first()
            cur.execute(_QUARANTINE, {"seq": seq})
            return done, str(found[1])

        outcome = self._db.transaction("quarantining a job record", work)
        if outcome is None:
            return None
        done, token = outcome
        self._documents.forget(token)
        return done

    @property
    def database(self) -> PgDatabase:
        """The pool these records use (the leases and delivery records use it too)."""
        return self._db

    def check(self) -> str | None:
        """None while PostgreSQL answers, else why not (/healthz: database reachable)."""
        try:
            self._run("checking the database", "SELECT 1")
        except StoreError as exc:
            return f"PostgreSQL at {self.location}: {exc.message}"
        return None

    def pool_stats(self) -> PoolStats:
        """The pool's connections in use and idle, and requests waiting for one (/metrics)."""
        return self._db.stats()
