"""The small interface the file share filter delivers through (R9, issue 21): one folder of a
share, opened without following links, whatever carries it (a local or mounted folder:
sharefolder; a share reached over SMB 2/3: smbfolder).  The delivery logic (fileshare) is
written once against it, so every guarantee holds for both: create-only files, a visible name
given without replacing one, no link followed out of the share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Protocol


@dataclass(frozen=True)
class FileFacts:
    """What the filter needs to know of a name in the folder (never through a link)."""

    #: A plain file (not a folder, link, reparse point, device or FIFO).
    regular: bool
    #: The file's identity on its volume (inode; SMB file id): hard links share it.
    file_id: int
    links: int
    size: int
    #: Made by the server's own account (a local folder: the owner is our uid).  Over SMB the
    #: owner is not read (it needs READ_CONTROL and a security descriptor parser); the name,
    #: the link count and the bytes still have to match.
    ours: bool


class NewFile(Protocol):
    """A file the folder just created (create-only): written in chunks, then made durable."""

    def write(self, data: memoryview) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class ExistingFile(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


class ShareFolder(Protocol):
    """One folder of a share, below a root the administrator configured."""

    @property
    def path(self) -> PurePath:
        """Names the folder in logs and in the resume journal (a local path, or the UNC path)."""
        ...

    def create(self, name: str) -> NewFile:
        """A new file ``name``: fails (FileExistsError) rather than open an existing one, and
        never through a link planted under the name."""
        ...

    def open_existing(self, name: str) -> ExistingFile | None:
        """``name`` for reading, not through a link; None when it cannot be opened."""
        ...

    def facts(self, name: str) -> FileFacts | None:
        """What ``name`` is (not following a link), or None when it is not there."""
        ...

    def entries(self) -> list[tuple[str, int]]:
        """Every name in the folder with its file id."""
        ...

    def place_exclusive(self, tmp: str, name: str) -> bool:
        """Give the complete file ``tmp`` the visible ``name``, or False when ``name`` exists
        (R9: never overwrite).  A hard link where possible (``tmp`` stays; the caller removes
        it): it is how a re-run finds a placed but unjournaled document."""
        ...

    def unlink_if_present(self, name: str) -> bool:
        """Remove ``name`` (never what a link points to); False when it was not there."""
        ...

    def sync(self) -> None:
        """Make the folder's new names durable (a no-op where the server does it)."""
        ...


__all__ = ["ExistingFile", "FileFacts", "NewFile", "ShareFolder"]
