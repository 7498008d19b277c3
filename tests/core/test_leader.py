"""The leader's duties as core inputs (issue 18 point 4): of several instances on a shared store
only the leader announces the repository state (``ScanServer.lead``/``follow``), derived from
every instance's rows, and runs the sweeps that end subscriptions (``tick(sweeps=...)``); the
failure count of a subscription comes with its stored record (``absorb_subscriptions``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from lxml import etree

from core_support import create_job, end_job, send_image, subscribe
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    AnnounceRepositoryState,
    Deliver,
    EndSubscription,
    ProcessingStarted,
    RecordDeliveryFailures,
    RepositoryState,
    names,
)
from dsc_core.model import FileShareInstructions, JobState

SHARE = FileShareInstructions(("\\\\s\\x",))


def summaries(commands: list[object]) -> list[Deliver]:
    return [
        c
        for c in commands
        if isinstance(c, Deliver) and names.Action.DSC_STATUS_SUMMARY_EVENT.encode() in c.body
    ]


def processing_elsewhere(t: InProcessTransport) -> str:
    """A job another instance moved to Processing, absorbed here; its token."""
    token = create_job(t, SHARE)
    send_image(t, token)
    record = t.server.jobs.get(token)
    assert record is not None
    t.server.absorb([record.evolve(state=JobState.PROCESSING)])
    return token


def test_a_follower_announces_no_repository_state_not_even_of_its_own_changes() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    t.server.follow()
    token = create_job(t, SHARE)
    send_image(t, token)
    end_job(t, token)
    t.engine(ProcessingStarted(token))
    assert t.server.repository_state is RepositoryState.PROCESSING
    assert not any(isinstance(c, AnnounceRepositoryState) for c in t.commands)
    assert summaries(t.commands) == []
    assert t.server.tick(t.clock, sweeps=False) == []


def test_the_leader_announces_a_change_made_elsewhere_once_at_its_tick() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    processing_elsewhere(t)
    # Absorbing emits nothing; the leader's next tick announces what the rows make.
    first = t.server.tick(t.clock)
    assert first[0] == AnnounceRepositoryState(RepositoryState.PROCESSING, RepositoryState.IDLE)
    assert len(summaries(first)) == 1
    assert b"<dsc:RepositoryState>Processing</dsc:RepositoryState>" in summaries(first)[0].body
    assert t.server.tick(t.clock) == []  # once


def test_a_new_leader_announces_what_the_old_one_did_not_and_repeats_nothing() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    t.server.follow()
    processing_elsewhere(t)
    # The old leader died before announcing Processing: subscribers last heard Idle.
    commands = t.server.lead(RepositoryState.IDLE, t.clock)
    assert commands[0] == AnnounceRepositoryState(RepositoryState.PROCESSING, RepositoryState.IDLE)
    assert len(summaries(commands)) == 1
    # It had announced it: nothing again.
    t.server.follow()
    assert t.server.lead(RepositoryState.PROCESSING, t.clock) == []
    assert t.server.tick(t.clock) == []


def test_an_announcement_without_subscribers_still_says_what_was_announced() -> None:
    # The shared store records every state announced, heard by anyone or not: a subscriber
    # arriving later must not be skipped the next change (its previous is that state).
    t = InProcessTransport()
    processing_elsewhere(t)
    assert t.server.tick(t.clock) == [
        AnnounceRepositoryState(RepositoryState.PROCESSING, RepositoryState.IDLE)
    ]


def test_only_the_sweeping_tick_ends_an_expired_subscription_without_subscription_end() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10S")
    later = t.clock + timedelta(seconds=11)
    assert t.server.next_deadline(sweeps=False) is None
    assert t.server.tick(later, sweeps=False) == []
    assert ident in t.server.subscriptions.by_id  # a follower waits for the leader's end
    # ... and neither delivers to it nor counts it meanwhile.
    body = etree.Element(f"{{{names.DSC}}}RepositoryStatusSummaryEvent")
    assert t.server.subscriptions.notify(names.Action.DSC_STATUS_SUMMARY_EVENT, body, later) == []
    ended = t.server.tick(later)
    assert ended == [EndSubscription(ident)]  # no SubscriptionEnd message: it expired
    assert ident not in t.server.subscriptions.by_id
    assert t.server.tick(later) == []


def test_a_stored_failure_count_is_counted_on_by_the_next_delivery_owner() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url)
    sub = t.server.subscriptions.by_id[ident]
    # Two failures counted by the owner before (delivery_failures_before_end = 3).
    t.server.absorb_subscriptions([replace(sub, failures=2)], [])
    commands = t.server.delivery_result(ident, False)
    assert commands[0] == EndSubscription(ident)
    assert ident not in t.server.subscriptions.by_id
    # A count reset elsewhere comes along too.
    ident2, _ = subscribe(t, t.server.config.dsc_url)
    sub2 = t.server.subscriptions.by_id[ident2]
    t.server.absorb_subscriptions([replace(sub2, failures=2)], [])
    t.server.absorb_subscriptions([replace(sub2, failures=0)], [])
    assert t.server.delivery_result(ident2, False) == [RecordDeliveryFailures(ident2, 1)]


def test_a_count_still_being_written_is_kept_over_an_older_stored_one() -> None:
    """A Renew's row read while this instance's count waits to be written carries the count
    from before: its record is taken (the new expiry), the count here is kept (``counting``)."""
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url)
    sub = t.server.subscriptions.by_id[ident]
    assert t.server.delivery_result(ident, False) == [RecordDeliveryFailures(ident, 1)]
    renewed = replace(sub, expires=sub.expires + timedelta(hours=1), failures=0)
    t.server.absorb_subscriptions([renewed], [], counting={ident})
    assert t.server.subscriptions.by_id[ident] == replace(renewed, failures=1)
    assert t.server.delivery_result(ident, False) == [RecordDeliveryFailures(ident, 2)]


def test_an_instance_leaving_quietly_announces_nothing_more() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    token = create_job(t, SHARE)
    send_image(t, token)
    end_job(t, token)
    assert t.server.shutdown(t.clock, last=False) == []
    # The engine's last report after the stop: the job changes, "Stopped" is not announced
    # (the other instances go on serving the repository).
    commands = t.server.processing(ProcessingStarted(token), t.clock)
    assert not any(isinstance(c, AnnounceRepositoryState) for c in commands)
    assert summaries(commands) == []


def test_the_repository_stays_processing_until_every_instance_s_job_has_ended() -> None:
    """Two jobs Processing on other instances, one ends: the rows still make Processing, so
    the leader's tick says nothing; the other ends: Idle, once (the end-to-end test in
    tests/e2e/test_cluster_leader.py cannot tell an early Idle from the right one: both give
    the same sequence of states once the second job has ended)."""
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    tokens = [processing_elsewhere(t)]
    assert t.server.tick(t.clock)[0] == AnnounceRepositoryState(
        RepositoryState.PROCESSING, RepositoryState.IDLE
    )
    tokens.append(processing_elsewhere(t))
    for token, said in zip(tokens, ([], [RepositoryState.IDLE]), strict=True):
        record = t.server.jobs.get(token)
        assert record is not None
        t.server.absorb([record.evolve(state=JobState.COMPLETED)])
        commands = t.server.tick(t.clock)
        assert [c.state for c in commands if isinstance(c, AnnounceRepositoryState)] == said
        assert len(summaries(commands)) == len(said)
    assert t.server.tick(t.clock) == []
