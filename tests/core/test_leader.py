"""The leader's duties as core inputs (issue 18 point 4): of several instances on a shared store
only the leader announces the repository state, derived from every instance's rows, and runs the
sweeps that end subscriptions (``tick``); one flag says which, set by ``ScanServer.lead`` and
cleared by ``follow``.  An announcement carries its own events.  The failure count of a
subscription comes with its stored record (``absorb_subscriptions``)."""

from __future__ import annotations

from collections.abc import Sequence
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


def summaries(commands: Sequence[object]) -> list[Deliver]:
    """The RepositoryStatusSummaryEvents among ``commands``: an announcement's events."""
    events = [e for c in commands if isinstance(c, AnnounceRepositoryState) for e in c.events]
    assert not any(isinstance(c, Deliver) and _is_summary(c) for c in commands)  # none outside
    return [e for e in events if _is_summary(e)]


def _is_summary(event: Deliver) -> bool:
    return names.Action.DSC_STATUS_SUMMARY_EVENT.encode() in event.body


def announced(commands: Sequence[object]) -> list[tuple[RepositoryState, RepositoryState]]:
    """(state, previous) of each AnnounceRepositoryState among ``commands``."""
    return [(c.state, c.previous) for c in commands if isinstance(c, AnnounceRepositoryState)]


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
    assert announced(t.commands) == []
    assert summaries(t.commands) == []
    assert t.server.tick(t.clock) == []


def test_the_leader_announces_a_change_made_elsewhere_once_at_its_tick() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    processing_elsewhere(t)
    # Absorbing emits nothing; the leader's next tick announces what the rows make.
    first = t.server.tick(t.clock)
    assert announced(first) == [(RepositoryState.PROCESSING, RepositoryState.IDLE)]
    assert len(first) == 1 and len(summaries(first)) == 1  # the event inside the announcement
    assert b"<dsc:RepositoryState>Processing</dsc:RepositoryState>" in summaries(first)[0].body
    assert t.server.tick(t.clock) == []  # once


def test_a_new_leader_announces_what_the_old_one_did_not_and_repeats_nothing() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    t.server.follow()
    processing_elsewhere(t)
    # The old leader died before announcing Processing: subscribers last heard Idle.
    commands = t.server.lead(RepositoryState.IDLE, t.clock)
    assert announced(commands) == [(RepositoryState.PROCESSING, RepositoryState.IDLE)]
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


def test_only_the_leader_s_tick_ends_an_expired_subscription_without_subscription_end() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10S")
    later = t.clock + timedelta(seconds=11)
    t.server.follow()
    assert t.server.next_deadline() is None
    assert t.server.tick(later) == []
    assert ident in t.server.subscriptions.by_id  # a follower waits for the leader's end
    # ... and neither delivers to it nor counts it meanwhile.
    body = etree.Element(f"{{{names.DSC}}}RepositoryStatusSummaryEvent")
    assert t.server.subscriptions.notify(names.Action.DSC_STATUS_SUMMARY_EVENT, body, later) == []
    assert t.server.lead(RepositoryState.IDLE, later) == []  # nothing to announce
    assert t.server.next_deadline() == t.clock + timedelta(seconds=10)
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
    assert announced(commands) == []
    assert summaries(commands) == []


def test_the_repository_stays_processing_until_every_instance_s_job_has_ended() -> None:
    """Two jobs Processing on other instances, one ends: the rows still make Processing, so
    the leader's tick says nothing; the other ends: Idle, once (the end-to-end test in
    tests/e2e/test_cluster_leader.py cannot tell an early Idle from the right one: both give
    the same sequence of states once the second job has ended)."""
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    tokens = [processing_elsewhere(t)]
    assert announced(t.server.tick(t.clock)) == [(RepositoryState.PROCESSING, RepositoryState.IDLE)]
    tokens.append(processing_elsewhere(t))
    for token, said in zip(tokens, ([], [RepositoryState.IDLE]), strict=True):
        record = t.server.jobs.get(token)
        assert record is not None
        t.server.absorb([record.evolve(state=JobState.COMPLETED)])
        commands = t.server.tick(t.clock)
        assert [state for state, _ in announced(commands)] == said
        assert len(summaries(commands)) == len(said)
    assert t.server.tick(t.clock) == []


def test_one_server_leads_from_the_start_and_one_flag_says_whether_it_sweeps_and_announces() -> (
    None
):
    """``lead`` sets the one flag, ``follow`` clears it: both duties go with it, neither alone
    (a server that swept without announcing, or the reverse, was possible while ``tick`` took
    its own ``sweeps`` argument)."""
    t = InProcessTransport()
    assert t.server.leads  # the only server: never told to follow
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10S")
    expiry = t.clock + timedelta(seconds=10)
    assert t.server.next_deadline() == expiry
    t.server.follow()
    assert not t.server.leads
    processing_elsewhere(t)
    later = expiry + timedelta(seconds=1)
    assert t.server.next_deadline() is None
    assert t.server.tick(later) == []  # neither the expiry nor the announcement
    assert ident in t.server.subscriptions.by_id
    commands = t.server.lead(RepositoryState.IDLE, later)
    assert t.server.leads
    assert announced(commands) == [(RepositoryState.PROCESSING, RepositoryState.IDLE)]
    assert t.server.next_deadline() == expiry
    assert t.server.tick(later) == [EndSubscription(ident)]


def test_an_instance_whose_term_taking_failed_follows_then_catches_up_when_it_takes_one() -> None:
    """runtime/announcing.py: a leader whose next term cannot be taken follows (its core is
    told ``follow``): it neither sweeps nor announces, even of its own changes, until a term
    is taken; then ``lead`` announces what it missed, once, and its tick runs the sweeps that
    fell due meanwhile."""
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10S")
    listening, _ = subscribe(t, t.server.config.dsc_url)  # hears the announcement
    t.server.follow()  # the term was lost and taking a new one failed
    token = create_job(t, SHARE)
    send_image(t, token)
    end_job(t, token)
    t.engine(ProcessingStarted(token))  # its own change: Processing, not announced
    late = t.clock + timedelta(seconds=30)
    assert announced(t.commands) == [] and t.server.tick(late) == []
    assert t.server.next_deadline() is None
    # The next tick takes a term; the row says subscribers last heard Idle.
    commands = t.server.lead(RepositoryState.IDLE, late)
    assert announced(commands) == [(RepositoryState.PROCESSING, RepositoryState.IDLE)]
    assert [e.subscription_id for e in summaries(commands)] == [listening]
    assert t.server.tick(late) == [EndSubscription(ident)]
    assert t.server.tick(late) == []


def test_an_announcement_carries_its_events_one_per_subscriber() -> None:
    t = InProcessTransport()
    first, _ = subscribe(t, t.server.config.dsc_url)
    second, _ = subscribe(t, t.server.config.dsc_url)
    processing_elsewhere(t)
    [announcement] = t.server.tick(t.clock)
    assert isinstance(announcement, AnnounceRepositoryState)
    assert [e.subscription_id for e in announcement.events] == [first, second]
    assert all(_is_summary(e) for e in announcement.events)


def test_one_server_hands_an_announcement_s_events_to_its_subscribers() -> None:
    """The in-process transport is one server: the events inside the announcement are
    delivered like any other (``InProcessTransport.deliveries``), nothing else is recorded."""
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    processing_elsewhere(t)
    before = len(t.deliveries)
    t.advance(0)  # the tick, its commands carried out
    delivered = [d for d in t.deliveries[before:] if _is_summary(d)]
    assert len(delivered) == 1
    assert b"<dsc:RepositoryState>Processing</dsc:RepositoryState>" in delivered[0].body
