"""Durable file writes shared by the job store's spool and the file share filter: every byte
written, and a directory entry (create, rename, delete) made to survive a crash."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write every byte (``os.write`` may write fewer than asked); no copy, no buffer.  Returns
    how many bytes were written."""
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a regular file only does this when it cannot take more
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
    return total


def fsync_dir(path: Path) -> None:
    """Make a rename/create/delete inside ``path`` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync_dir_fd(fd)
    finally:
        os.close(fd)


def fsync_dir_fd(fd: int) -> None:
    """:func:`fsync_dir` for a directory already open as ``fd``."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some file systems cannot fsync a directory at all
            raise
