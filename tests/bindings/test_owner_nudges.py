"""The core's owner (runtime/owner.py) nudges the ticker exactly after the calls that moved the
core's count of deadline changes (``ScanServer.deadline_changes``), whichever way the call came
in: inline under the lock, inline in the owning loop, or handed to the loop from another thread
(``call`` and ``soon``); a call that raised after a change nudges too."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import pytest

from dsc_bindings.runtime.owner import CoreOwner
from dsc_core import DeadlineChanges


class ThreadLoop:
    """A real thread that owns the core while it runs (a LoopHandle): runs what it is handed,
    in order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="test-loop")
        self._thread.start()

    def call_soon(self, function: Callable[[], object]) -> None:
        self._queue.put(function)

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, function: Callable[[], object]) -> None:
        """Run ``function`` in the loop's thread and wait for it."""
        done = threading.Event()
        self.call_soon(lambda: (function(), done.set()))
        assert done.wait(10), "the loop did not run it"

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while (function := self._queue.get()) is not None:
            function()


class Nudges:
    """The nudges given, with the thread that gave each."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)


@pytest.fixture
def owned() -> tuple[CoreOwner, DeadlineChanges, Nudges]:
    changes = DeadlineChanges()
    nudges = Nudges()
    return CoreOwner(changes, nudges), changes, nudges


@pytest.fixture
def loop(owned: tuple[CoreOwner, DeadlineChanges, Nudges]) -> Iterator[ThreadLoop]:
    owner, _, _ = owned
    handle = ThreadLoop()
    detach = owner.attach(handle)
    yield handle
    detach()
    handle.stop()


def test_without_a_loop_a_call_nudges_only_when_it_moved_the_count(
    owned: tuple[CoreOwner, DeadlineChanges, Nudges],
) -> None:
    owner, changes, nudges = owned
    assert owner.call(lambda: 42) == 42
    assert nudges.threads == []  # a read
    owner.call(changes.moved)
    assert len(nudges.threads) == 1

    def two_changes() -> None:
        changes.moved()
        changes.moved()

    owner.call(two_changes)
    assert len(nudges.threads) == 2  # one nudge per call that moved it, however far
    owner.soon(lambda: None)
    owner.soon(changes.moved)
    assert len(nudges.threads) == 3


def test_a_call_that_raised_after_a_change_still_nudges(
    owned: tuple[CoreOwner, DeadlineChanges, Nudges],
) -> None:
    owner, changes, nudges = owned

    def change_then_fail() -> None:
        changes.moved()
        raise ValueError("a bug after the change")

    with pytest.raises(ValueError):
        owner.call(change_then_fail)
    assert len(nudges.threads) == 1
    owner.soon(change_then_fail)  # logged, not raised
    assert len(nudges.threads) == 2


def test_with_a_loop_calls_from_other_threads_nudge_in_the_loop(
    owned: tuple[CoreOwner, DeadlineChanges, Nudges], loop: ThreadLoop
) -> None:
    owner, changes, nudges = owned
    owner.call(lambda: None)
    owner.call(changes.moved)  # handed to the loop, waited for
    owner.soon(lambda: None)
    owner.soon(changes.moved)
    loop.run(lambda: None)  # both hand-offs ran before this
    assert nudges.threads == ["test-loop", "test-loop"]


def test_with_a_loop_its_own_calls_nudge_inline(
    owned: tuple[CoreOwner, DeadlineChanges, Nudges], loop: ThreadLoop
) -> None:
    owner, changes, nudges = owned
    seen: list[int] = []

    def in_the_loop() -> None:
        owner.call(lambda: None)
        owner.call(changes.moved)
        seen.append(len(nudges.threads))  # nudged before call() returned
        owner.soon(changes.moved)
        seen.append(len(nudges.threads))

    loop.run(in_the_loop)
    assert seen == [1, 2]


class Interrupted(BaseException):
    """Not an Exception (as KeyboardInterrupt and SystemExit are not): the owner lets it
    through, and must still nudge for the change made before it."""


def test_a_hand_off_interrupted_by_a_base_exception_after_a_change_still_nudges(
    owned: tuple[CoreOwner, DeadlineChanges, Nudges], loop: ThreadLoop
) -> None:
    """``soon`` without a loop, and in the owning loop's own thread (both run the call inline):
    the nudge comes with the call, not with whatever call happens to come next."""
    owner, changes, nudges = owned

    def change_then_interrupt() -> None:
        changes.moved()
        raise Interrupted

    def in_the_loop() -> None:
        with pytest.raises(Interrupted):
            owner.soon(change_then_interrupt)

    loop.run(in_the_loop)
    assert nudges.threads == ["test-loop"]


def test_without_a_loop_a_hand_off_interrupted_after_a_change_still_nudges(
    owned: tuple[CoreOwner, DeadlineChanges, Nudges],
) -> None:
    owner, changes, nudges = owned

    def change_then_interrupt() -> None:
        changes.moved()
        raise Interrupted

    with pytest.raises(Interrupted):
        owner.soon(change_then_interrupt)
    assert len(nudges.threads) == 1
