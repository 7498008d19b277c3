"""dsc_bindings.durable: the write and fsync helpers the spool and the file share filter share."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dsc_bindings import durable


def test_write_all_writes_every_byte_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    sizes: list[int] = []

    def short_write(fd: int, data: memoryview) -> int:  # at most 3 bytes per call
        sizes.append(len(data))
        return real_write(fd, data[:3])

    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(os, "write", short_write)
        assert durable.write_all(fd, b"0123456789") == 10
        assert durable.write_all(fd, memoryview(bytearray(b"ab"))) == 2
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789ab"
    assert sizes[:4] == [10, 7, 4, 1]


def test_write_all_reports_a_file_that_takes_nothing_as_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(os, "write", lambda fd, data: 0)
        with pytest.raises(OSError) as raised:
            durable.write_all(fd, b"x")
        assert raised.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_fsync_dir_tolerates_only_a_file_system_that_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable.fsync_dir(tmp_path)  # a real directory: fine

    def refuse(code: int) -> None:
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fsync)

    refuse(errno.EINVAL)  # this file system cannot fsync a directory at all
    durable.fsync_dir(tmp_path)
    refuse(errno.EIO)  # a real failure: the entry may not be durable
    with pytest.raises(OSError):
        durable.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        durable.fsync_dir(tmp_path / "missing")
