"""The file share filter's file-system primitives (R9, issue 14 §4).

Users of a share can write in it, so every name below a configured share root may have been
planted by one of them.  Each folder below the root is therefore opened relative to its parent's
directory descriptor with ``O_NOFOLLOW`` (a folder replaced by a symbolic link to elsewhere is
refused, never written through), files are created ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to
the final folder's descriptor, and a document gets its visible name by an operation that never
replaces an existing name (``link``, else ``renameat2(RENAME_NOREPLACE)``).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO

from dsc_bindings.durable import fsync_dir_fd, write_all
from dsc_bindings.filters.sharefs import FileFacts

#: A folder below the root: never through a symbolic link.
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A new file: made here, never an existing one, never through a link a user planted.
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Reading a file found in the share: not through a link, and a FIFO planted under the name
#: must not block the open.
EXISTING_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: link() is not supported where the file share lives (some network or FAT file systems).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}
#: renameat2() or its RENAME_NOREPLACE flag is not supported by this kernel or file system.
_NO_NOREPLACE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_RENAME_NOREPLACE = 1  # <linux/fs.h>


class PlantedLink(OSError):
    """A folder below a share root is a symbolic link: refused (FileShareAccessDenied)."""

    def __init__(self, path: PurePath) -> None:
        super().__init__(
            errno.ELOOP, "is a symbolic link, never followed out of the share root", str(path)
        )


@dataclass(frozen=True)
class Folder:
    """A folder of the share open as ``fd``; ``path`` names it in logs and in the journal.
    Implements :class:`~dsc_bindings.filters.sharefs.ShareFolder` on the local file system."""

    fd: int
    path: Path

    def create(self, name: str) -> _NewFile:
        # §5 (issue 14): not world-readable.
        return _NewFile(os.open(name, NEW_FILE, 0o640, dir_fd=self.fd))

    def open_existing(self, name: str) -> BinaryIO | None:
        try:
            fd = os.open(name, EXISTING_FILE, dir_fd=self.fd)
        except OSError:
            return None  # a link, gone, unreadable: not ours
        return os.fdopen(fd, "rb", buffering=0)

    def facts(self, name: str) -> FileFacts | None:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return FileFacts(
            regular=stat.S_ISREG(st.st_mode),
            file_id=st.st_ino,
            links=st.st_nlink,
            size=st.st_size,
            ours=st.st_uid == os.geteuid(),
        )

    def entries(self) -> list[tuple[str, int]]:
        with os.scandir(self.fd) as found:
            return [(entry.name, entry.inode()) for entry in found]

    def place_exclusive(self, tmp: str, name: str) -> bool:
        return place_exclusive(self, tmp, name)

    def unlink_if_present(self, name: str) -> bool:
        return unlink_if_present(self, name)

    def sync(self) -> None:
        fsync_dir_fd(self.fd)


class _NewFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: memoryview) -> None:
        write_all(self.fd, data)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def open_share_folder(root: Path, components: Sequence[str]) -> Iterator[Folder]:
    """Open (making what is missing) ``root/components...``: the root as configured (the
    administrator's path, which may be a symbolic link on purpose), each component below it
    without following a symbolic link."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = root
    try:
        for name in components:
            path = path / name
            child = _open_or_make(fd, name, path)
            os.close(fd)
            fd = child
        yield Folder(fd, path)
    finally:
        os.close(fd)


def _open_or_make(parent: int, name: str, path: Path) -> int:
    try:
        return _open_folder(parent, name, path)
    except FileNotFoundError:
        pass
    try:
        # mkdir never follows a link either; the mode comes from the umask (the systemd unit
        # sets UMask=0027).
        os.mkdir(name, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile (by another job, or planted): opened like any other below
    return _open_folder(parent, name, path)


def _open_folder(parent: int, name: str, path: Path) -> int:
    try:
        return os.open(name, _FOLDER, dir_fd=parent)
    except OSError as exc:
        # With O_DIRECTORY, Linux answers ENOTDIR for a symbolic link (ELOOP without it).
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(parent, name):
            raise PlantedLink(path) from exc
        raise


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def place_exclusive(folder: Folder, tmp: str, name: str) -> bool:
    """Give the complete file ``tmp`` the visible ``name``, or return False when ``name``
    exists (R9: never overwrite, symbolic links included).  With ``link`` the temporary name
    stays (the caller removes it); it is how a re-run finds a placed but unjournaled document.
    """
    try:
        os.link(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    renamed = _rename_noreplace(folder.fd, tmp, name)
    if renamed is not None:
        return renamed
    # Neither: reserve the name (O_EXCL), then rename over the reservation.  A crash in
    # between may leave an empty reserved file, never a partial one.
    try:
        os.close(os.open(name, NEW_FILE, 0o640, dir_fd=folder.fd))
    except FileExistsError:
        return False
    os.replace(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    return True


def _rename_noreplace(fd: int, src: str, dst: str) -> bool | None:
    """renameat2(RENAME_NOREPLACE): True when renamed, False when ``dst`` exists, None when
    this kernel, C library or file system cannot do it."""
    renameat2 = _libc_renameat2()
    if renameat2 is None:
        return None
    if renameat2(fd, os.fsencode(src), fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    if err in _NO_NOREPLACE:
        return None
    raise OSError(err, os.strerror(err), dst)


@functools.cache
def _libc_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2  # glibc 2.28 and later
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def unlink_if_present(folder: Folder, name: str) -> bool:
    """Remove ``name`` (never what a link points to); False when it was not there."""
    try:
        os.unlink(name, dir_fd=folder.fd)
        return True
    except FileNotFoundError:
        return False


__all__ = [
    "EXISTING_FILE",
    "NEW_FILE",
    "Folder",
    "PlantedLink",
    "open_share_folder",
    "place_exclusive",
    "unlink_if_present",
]
