"""A rescuer and the stalled run it took a job from, at the one moment that matters (issue 18
point 2, filters/fileshare._taken_over): the stalled run checked its lease before the rescue and
places its temporary file while the rescuer deals with it.  The interleaving is forced: the
stalled run's placement runs from inside the rescuer's call that removes the stalled run's
temporary name, just before or just after it, on a real local folder."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import pytest

from dsc_bindings.filters import FilterSettings, fileshare
from dsc_bindings.filters.sharefolder import Folder, open_share_folder
from dsc_bindings.filters.sharefs import ExistingFile, FileFacts, NewFile
from dsc_core.model import FileShareInstructions
from test_filters_support import make_documents, make_job

STALLED, RESCUER = 1, 2
PLACED = "inv_0001.png"


@dataclass
class RescuerJournal:
    """The rescuer's records (a fresh run: nothing recorded yet; its lease held)."""

    run: int
    damaged: bool = False
    added: list[tuple[int, int, str]] = field(default_factory=list)

    def get(self, directory: PurePath, document_id: int) -> tuple[int, str] | None:
        return next(((n, name) for d, n, name in self.added if d == document_id), None)

    def names_in(self, directory: PurePath) -> set[str]:
        return {name for _d, _n, name in self.added}

    def check(self) -> None:
        pass

    def add(self, directory: PurePath, document_id: int, counter: int, name: str) -> None:
        self.added.append((document_id, counter, name))


class StalledRunPlaces:
    """The real folder, with the stalled run placing its file (a hard link from its temporary
    name, as ``place_exclusive`` does) when the rescuer first removes that temporary name:
    ``before`` or after the removal."""

    def __init__(self, folder: Folder, stalled_tmp: str, *, before: bool) -> None:
        self._folder = folder
        self._stalled_tmp = stalled_tmp
        self._before = before
        #: What the stalled run's placement did: True placed, False name taken, or the error.
        self.outcome: bool | OSError | None = None

    def _stalled_run_places(self) -> None:
        try:
            self.outcome = self._folder.place_exclusive(self._stalled_tmp, PLACED)
        except OSError as exc:
            self.outcome = exc

    @property
    def path(self) -> PurePath:
        return self._folder.path

    def create(self, name: str) -> NewFile:
        return self._folder.create(name)

    def open_existing(self, name: str) -> ExistingFile | None:
        return self._folder.open_existing(name)

    def facts(self, name: str) -> FileFacts | None:
        return self._folder.facts(name)

    def entries(self) -> list[tuple[str, int]]:
        return self._folder.entries()

    def place_exclusive(self, tmp: str, name: str) -> bool:
        return self._folder.place_exclusive(tmp, name)

    def unlink_if_present(self, name: str) -> bool:
        first = name == self._stalled_tmp and self.outcome is None
        if first and self._before:
            self._stalled_run_places()
        removed = self._folder.unlink_if_present(name)
        if first and not self._before:
            self._stalled_run_places()
        return removed

    def sync(self) -> None:
        self._folder.sync()


@pytest.mark.parametrize("before", [True, False], ids=["placed-before-removal", "after"])
def test_a_stalled_run_placing_while_the_rescuer_takes_over_leaves_one_copy(
    tmp_path: Path, before: bool
) -> None:
    """Before: the rescuer looked at the stalled run's temporary file (not yet placed), then
    unlinked it; a placement in between went unseen and the rescuer placed a second copy
    (inv_0001.png and inv_0002.png).  Now the rescuer takes the file first: placed before, it
    is found and recorded; after, the stalled run's placement fails.  One copy either way."""
    [(document, source)] = make_documents(tmp_path / "spool", ("png", b"one" * 5000))
    job = make_job(FileShareInstructions((r"\\h\s",)), document_root_name="inv")
    stalled_tmp = fileshare._temporary(job.token, document.document_id, STALLED)[0]
    journal = RescuerJournal(RESCUER)
    with open_share_folder(tmp_path / "out", ("alice",)) as real:
        # The stalled run wrote the whole document and checked its lease: it is about to place.
        (tmp_path / "out" / "alice" / stalled_tmp).write_bytes(source.read_bytes())
        folder = StalledRunPlaces(real, stalled_tmp, before=before)
        delivery = fileshare._Delivery("inv", document.format, source)
        counter = fileshare._copy_one(
            delivery,
            folder,
            job,
            document,
            1,
            journal,
            FilterSettings(),
            threading.Event(),
        )
    names = sorted(os.listdir(tmp_path / "out" / "alice"))
    assert names == [PLACED], names
    assert (counter, journal.added) == (1, [(1, 1, PLACED)])
    assert (tmp_path / "out" / "alice" / PLACED).read_bytes() == b"one" * 5000
    if before:
        assert folder.outcome is True
    else:
        assert isinstance(folder.outcome, FileNotFoundError), folder.outcome
