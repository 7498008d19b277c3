"""``dsc_bindings.runtime.clock``: the service's ids and time (issue 20 made both cheaper)."""

from __future__ import annotations

import os
import threading
import uuid

from dsc_bindings.runtime import clock


def test_ids_are_random_version_4_uuids_across_refills() -> None:
    ids = [clock.new_uuid() for _ in range(3 * 256 + 5)]  # over three refills
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # the canonical lower-case spelling
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every variant nibble is drawn: the low two bits stay random under the RFC's "10".
    assert {text[19] for text in ids} == set("89ab")


def test_threads_drawing_at_once_get_distinct_ids() -> None:
    drawn: list[list[str]] = [[] for _ in range(4)]

    def draw(into: list[str]) -> None:
        into.extend(clock.new_uuid() for _ in range(2000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [text for into in drawn for text in into]
    assert len(set(every)) == len(every) == 8000


def test_a_forked_child_does_not_reuse_its_parents_ids() -> None:
    clock.new_uuid()  # the parent holds unused ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.close(read)
        os.write(write, clock.new_uuid().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parents_next = [clock.new_uuid() for _ in range(256)]
    assert uuid.UUID(child).version == 4 and child not in parents_next
