"""The device book's bounds (issue 14 section 4): the cap evicts the oldest last contact first,
the retention removes devices not seen for ``retention_days``, both in one indexed statement,
durable, logged, and applied to a book kept from before (at start, and to an old schema).

The contract runs on both implementations (issue 17): SQLite in the data folder and PostgreSQL
(a database of the session's cluster per test), through the ``books`` fixture."""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.observe import devices as devices_mod
from dsc_bindings.observe.devices import DeviceBook, DeviceLimits, SqliteDeviceBook
from dsc_bindings.serve import compose
from dsc_bindings.store.sqlite import DB_NAME
from dsc_core import ServerConfig
from engines_support import PgCluster
from waiting import wait_for

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=1)))


def addresses(book: DeviceBook) -> set[str]:
    return {d.address for d in book.all()}


def stored(data: Path) -> set[str]:
    with sqlite3.connect(data / DB_NAME) as conn:
        return {str(row[0]) for row in conn.execute("SELECT address FROM devices")}


class Books:
    """Opens the device book of one place (a data folder, or a PostgreSQL database) as often as
    a test asks: a second book is the server after a restart, or (PostgreSQL) another instance."""

    def __init__(self, data: Path, dsn: str | None) -> None:
        self.data, self.dsn = data, dsn

    def open(self, limits: DeviceLimits | None = None) -> DeviceBook:
        if self.dsn is None:
            return SqliteDeviceBook(self.data, limits)
        from dsc_bindings.observe.pgdevices import PostgresDeviceBook

        return PostgresDeviceBook.open(self.dsn, limits or DeviceLimits())

    def stored(self) -> set[str]:
        """The addresses the engine holds (read past the book)."""
        if self.dsn is None:
            return stored(self.data)
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            return {str(row[0]) for row in conn.execute("SELECT address FROM devices")}


@pytest.fixture(params=["sqlite", "postgresql"])
def books(request: pytest.FixtureRequest, tmp_path: Path) -> Books:
    if request.param == "sqlite":
        return Books(tmp_path, None)
    return Books(tmp_path, request.getfixturevalue("pg").new_database())


def test_over_the_cap_the_oldest_last_contact_goes(
    books: Books, caplog: pytest.LogCaptureFixture
) -> None:
    book = books.open(DeviceLimits(max_devices=3))
    for n in range(1, 4):
        book.job_created(f"t{n}", f"127.0.0.{n}", "", T0 + timedelta(minutes=n))
    # The first device comes back: now the second has the oldest last contact.
    book.job_created("t4", "127.0.0.1", "", T0 + timedelta(minutes=4))
    assert addresses(book) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    with caplog.at_level(logging.INFO, logger="dsc.devices"):
        book.job_created("t5", "127.0.0.5", "", T0 + timedelta(minutes=5))
    assert addresses(book) == {"127.0.0.1", "127.0.0.3", "127.0.0.5"}
    assert books.stored() == {"127.0.0.1", "127.0.0.3", "127.0.0.5"}
    [line] = [r for r in caplog.records if r.name == "dsc.devices"]
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith("device book: 1 device(s) evicted")
    assert "3 devices ([devices] max_devices)" in line.getMessage()
    book.close()
    again = books.open(DeviceLimits(max_devices=3))
    assert addresses(again) == {"127.0.0.1", "127.0.0.3", "127.0.0.5"}
    assert {d.address: d.jobs for d in again.all()}["127.0.0.1"] == 2
    again.close()


def test_a_later_image_counts_as_contact(books: Books) -> None:
    book = books.open(DeviceLimits(max_devices=2))
    book.job_created("a", "10.0.0.1", "", T0)
    book.job_created("b", "10.0.0.2", "", T0 + timedelta(minutes=1))
    book.contact("10.0.0.1", "", T0 + timedelta(minutes=2))
    book.job_created("c", "10.0.0.3", "", T0 + timedelta(minutes=3))
    assert addresses(book) == {"10.0.0.1", "10.0.0.3"}
    book.close()


def test_the_cap_goes_by_time_not_by_the_text_of_the_offset(books: Books) -> None:
    """The night daylight saving time ends: 02:10+01:00 is later than 02:30+02:00, though
    it sorts first as text."""
    summer, winter = timezone(timedelta(hours=2)), timezone(timedelta(hours=1))
    book = books.open(DeviceLimits(max_devices=1))
    book.job_created("a", "10.0.0.1", "", datetime(2024, 10, 27, 2, 30, tzinfo=summer))
    book.job_created("b", "10.0.0.2", "", datetime(2024, 10, 27, 2, 10, tzinfo=winter))
    assert addresses(book) == {"10.0.0.2"}
    book.close()


def test_retention_at_start_and_with_each_job(
    books: Books, caplog: pytest.LogCaptureFixture
) -> None:
    book = books.open(DeviceLimits(retention_days=365))
    book.job_created("a", "10.0.0.1", "", T0)
    book.job_created("b", "10.0.0.2", "", T0 + timedelta(days=100))
    book.job_created("c", "10.0.0.3", "", T0 + timedelta(days=200))
    book.close()

    reopened = books.open(DeviceLimits(retention_days=365))
    assert len(reopened.all()) == 3  # opening alone removes nothing: apply_limits does
    with caplog.at_level(logging.INFO, logger="dsc.devices"):
        reopened.apply_limits(T0 + timedelta(days=366))
    assert addresses(reopened) == {"10.0.0.2", "10.0.0.3"} == books.stored()
    assert any(
        r.getMessage() == "device book: 1 device(s) removed, last contact more than 365 days ago "
        "([devices] retention_days)"
        for r in caplog.records
    )
    # A new job's record also removes what has passed the retention since.
    reopened.job_created("d", "10.0.0.4", "", T0 + timedelta(days=500))
    assert addresses(reopened) == {"10.0.0.3", "10.0.0.4"} == books.stored()
    reopened.close()


def test_a_smaller_cap_shrinks_a_kept_book_at_start(books: Books) -> None:
    book = books.open()
    for n in range(10):
        book.job_created(f"t{n}", f"10.0.0.{n}", "", T0 + timedelta(minutes=n))
    book.close()
    smaller = books.open(DeviceLimits(max_devices=4))
    smaller.apply_limits(T0 + timedelta(hours=1))
    assert addresses(smaller) == {f"10.0.0.{n}" for n in range(6, 10)} == books.stored()
    smaller.close()


def test_an_evicted_device_with_a_job_in_progress(books: Books) -> None:
    """Its job still ends without an error; the count goes to nobody (module doc)."""
    book = books.open(DeviceLimits(max_devices=1))
    book.job_created("a", "10.0.0.1", "", T0)
    book.job_created("b", "10.0.0.2", "", T0 + timedelta(minutes=1))
    book.job_ended("a", "completed")
    book.contact("10.0.0.1", "", T0 + timedelta(minutes=2))  # not brought back by an image
    [device] = book.all()
    assert (device.address, device.completed) == ("10.0.0.2", 0)
    book.close()


def test_a_book_from_before_the_bounds_gets_its_times(tmp_path: Path) -> None:
    """The old schema had no last_contact_at: it is added and computed from last_contact."""
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute(
            """CREATE TABLE devices (address TEXT NOT NULL, identity TEXT NOT NULL,
               first_contact TEXT NOT NULL, last_contact TEXT NOT NULL,
               jobs INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
               failed INTEGER NOT NULL DEFAULT 0, canceled INTEGER NOT NULL DEFAULT 0,
               PRIMARY KEY (address, identity))"""
        )
        for n, when in enumerate((T0, T0 + timedelta(days=300))):
            conn.execute(
                "INSERT INTO devices (address, identity, first_contact, last_contact, jobs) "
                "VALUES (?, '', ?, ?, 1)",
                (f"10.0.0.{n}", when.isoformat(), when.isoformat()),
            )
    book = SqliteDeviceBook(tmp_path, DeviceLimits(retention_days=365))
    book.apply_limits(T0 + timedelta(days=400))
    assert addresses(book) == {"10.0.0.1"}
    book.close()


def test_both_deletes_use_the_index_on_last_contact(tmp_path: Path) -> None:
    SqliteDeviceBook(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        for statement, argument in ((devices_mod._EXPIRE, 0.0), (devices_mod._EVICT_OLDEST, 1)):
            plan = " ".join(
                str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", (argument,))
            )
            assert "devices_by_last_contact" in plan, (statement, plan)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_devices": 0}, "max_devices must be at least 1, got 0"),
        ({"retention_days": -1}, "retention_days must be at least 1, got -1"),
    ],
)
def test_limits_are_checked(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceLimits(**kwargs)


def test_as_dict_has_every_field(books: Books) -> None:
    """The status page's and ``dsc devices --json``'s record: every field, by its name."""
    book = books.open()
    book.job_created("a", "10.0.0.1", "alice", T0)
    [device] = book.all()
    assert device.as_dict() == {f.name: getattr(device, f.name) for f in fields(device)}
    book.close()


def test_the_ticker_applies_the_retention_while_no_job_is_created(tmp_path: Path) -> None:
    """A running server with no new jobs still removes a device past the retention (hourly,
    by the service's clock: this clock jumps 40 days)."""
    data = tmp_path / "data"
    data.mkdir()
    seen = SqliteDeviceBook(data)
    seen.job_created("a", "10.0.0.1", "", T0 - timedelta(days=1))
    seen.close()
    now = [T0]
    service = compose(
        ServerConfig(),
        data,
        FilterSettings.embedded_default(data),
        clock=lambda: now[0],
        device_limits=DeviceLimits(retention_days=30),
    ).service
    with service:
        book = service.observer.devices
        assert book is not None and addresses(book) == {"10.0.0.1"}
        now[0] = T0 + timedelta(days=40)
        # The ticker sleeps by the monotonic clock until the deadline it read: a reload (SIGHUP)
        # nudges it, as any change of the server does, and it reads the service clock again.
        service.reconfigure(service.config)
        wait_for(lambda: not book.all(), what="the ticker removing the device")
    assert stored(data) == set()


def test_recent_lists_the_most_recent_contacts_first_and_survives_a_restart(
    books: Books,
) -> None:
    """/status.json lists the book's most recent devices without sorting the whole book: the
    copy in memory is kept in order of last contact (a job, an image), also after a restart
    (read in last_contact_at order, which sorts across a change of UTC offset)."""
    book = books.open()
    for n in range(1, 6):
        book.job_created(f"t{n}", f"10.0.0.{n}", "", T0 + timedelta(minutes=n))
    book.contact("10.0.0.2", "", T0 + timedelta(minutes=6))
    # The same instant written with another offset (the end of daylight saving time).
    later = (T0 + timedelta(minutes=7)).astimezone(timezone(timedelta(hours=-5)))
    book.job_created("t6", "10.0.0.4", "", later)
    book.job_ended("t1", "completed")  # an end is no contact: 10.0.0.1 stays the oldest
    expected = ["10.0.0.4", "10.0.0.2", "10.0.0.5", "10.0.0.3", "10.0.0.1"]
    assert [d.address for d in book.all()] == expected
    recent, size = book.recent(3)
    assert ([d.address for d in recent], size) == (expected[:3], 5)
    book.close()
    again = books.open()
    assert [d.address for d in again.all()] == expected
    assert [d.address for d in again.recent(2)[0]] == expected[:2]
    again.close()


# --- PostgreSQL: several instances on one database (issue 17, for issue 18) ----------------------


@pytest.fixture
def shared(pg: PgCluster, tmp_path: Path) -> Books:
    return Books(tmp_path, pg.new_database())


def test_two_instances_count_into_one_device_in_sql(shared: Books) -> None:
    """Each count is an increment in SQL, never a write-back of a copy: 2 x 40 jobs created
    on two books at once are 80, and a job created on one and ended on the other counts."""
    first, second = shared.open(), shared.open()

    def create(book: DeviceBook, prefix: str) -> None:
        for n in range(40):
            book.job_created(f"{prefix}{n}", "10.0.0.9", "", T0 + timedelta(seconds=n))

    workers = [
        threading.Thread(target=create, args=(book, prefix))
        for book, prefix in ((first, "a"), (second, "b"))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for n in range(40):
        second.job_ended(f"a{n}", "completed")  # created by the other instance
    first.job_ended("b0", "canceled")
    first.job_ended("b0", "canceled")  # counted once
    again = shared.open()
    [device] = again.all()
    assert (device.jobs, device.completed, device.canceled) == (80, 40, 1)
    assert again.device_of("b1") == ("10.0.0.9", "") and again.device_of("a1") is None
    for book in (first, second, again):
        book.close()


def test_what_another_instance_wrote_shows_after_a_reload(shared: Books) -> None:
    """The copy a reader gets is refreshed in the background (store/refresh.py), so one
    instance's page shows the devices another recorded, without a restart."""
    from dsc_bindings.observe.pgdevices import PostgresDeviceBook
    from dsc_bindings.store.postgresql import PgDatabase

    assert shared.dsn is not None
    reader = PostgresDeviceBook(PgDatabase.open(shared.dsn), DeviceLimits(), max_age=0.0)
    writer = shared.open()
    writer.job_created("a", "10.0.0.1", "", T0)
    writer.job_created("b", "10.0.0.1", "", T0 + timedelta(minutes=1))
    wait_for(
        lambda: [(d.address, d.jobs) for d in reader.all()] == [("10.0.0.1", 2)],
        what="the reader's copy showing the writer's device",
    )
    assert reader.recent(5) == ([writer.all()[0]], 1)
    writer.close()
    reader.close()


def test_a_failing_database_is_a_store_error_the_observer_logs(
    shared: Books, caplog: pytest.LogCaptureFixture
) -> None:
    """A device write that fails never fails the request: the book raises the store's one
    error (PgDatabase), and the observer logs it."""
    from dsc_bindings.observe.observer import Observer
    from dsc_bindings.store.backends import StorageSettings
    from dsc_bindings.store.errors import StoreError

    assert shared.dsn is not None
    observer = Observer(
        shared.data, storage=StorageSettings(store_kind="postgresql", dsn=shared.dsn)
    )
    observer.open([], T0)
    book = observer.devices
    assert book is not None
    book.close()  # as a database that went away
    with pytest.raises(StoreError, match="recording the device of t1"):
        book.job_created("t1", "10.0.0.1", "", T0)
    observer.tally.close()
