"""The file share filter's steps on a share reached over SMB 2/3 (issue 21), behind the same
interface as the local ones (sharefs.ShareFolder), with the same guarantees:

- every open carries FILE_OPEN_REPARSE_POINT: a symbolic link, junction or other reparse point
  a user planted on the share is opened as itself, never followed;
- each folder below the share is looked at before it is used: a reparse point is refused
  (:class:`PlantedLink`, FileShareAccessDenied), so nothing is written outside the UNC path;
- a file is made with the FILE_CREATE disposition (fails on an existing name) and gets its
  visible name by a hard link (FileLinkInformation, ReplaceIfExists = FALSE), else a rename
  that does not replace: a document never overwrites one, and a partial file never shows.

smbprotocol's errors become OSErrors with the errno the filter maps (R9): access denied and a
refused logon are EACCES, a full disk or quota ENOSPC, a broken connection or a server silent
past ``[smb] timeout`` (every call runs under a deadline, smbwatch) :class:`SmbConnectionLost`
(the filter delivers once more on a fresh connection).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import PureWindowsPath
from typing import Any

import smbclient
from smbprotocol.exceptions import (
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBException,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import NtStatus
from smbprotocol.open import CreateOptions, FileAttributes

from dsc_bindings.filters.sharefolder import PlantedLink
from dsc_bindings.filters.sharefs import FileFacts
from dsc_bindings.filters.smbsettings import SmbSettings
from dsc_bindings.filters.smbwatch import SmbConnectionLost

_NO_FOLLOW = CreateOptions.FILE_OPEN_REPARSE_POINT
_REPARSE = FileAttributes.FILE_ATTRIBUTE_REPARSE_POINT
_DIRECTORY = FileAttributes.FILE_ATTRIBUTE_DIRECTORY

#: NTSTATUS -> the errno the filter maps to a reason (R9).
_ERRNO = {
    NtStatus.STATUS_ACCESS_DENIED: errno.EACCES,
    NtStatus.STATUS_LOGON_FAILURE: errno.EACCES,
    NtStatus.STATUS_BAD_NETWORK_NAME: errno.EACCES,  # no such share: nothing to write to
    NtStatus.STATUS_PASSWORD_EXPIRED: errno.EACCES,
    NtStatus.STATUS_STOPPED_ON_SYMLINK: errno.ELOOP,  # a link in the path (Windows servers)
    NtStatus.STATUS_DISK_FULL: errno.ENOSPC,
    0xC0000044: errno.EDQUOT,  # STATUS_QUOTA_EXCEEDED
    NtStatus.STATUS_OBJECT_NAME_COLLISION: errno.EEXIST,
    NtStatus.STATUS_OBJECT_NAME_NOT_FOUND: errno.ENOENT,
    NtStatus.STATUS_OBJECT_PATH_NOT_FOUND: errno.ENOENT,
}
#: The server cannot make hard links (FAT, some NAS): rename without replacing instead.
_NO_HARD_LINKS = {NtStatus.STATUS_NOT_SUPPORTED, NtStatus.STATUS_INVALID_DEVICE_REQUEST}


@contextmanager
def _translated(where: str) -> Iterator[None]:
    try:
        yield
    except SMBOSError as exc:
        code = _ERRNO.get(exc.ntstatus, exc.errno or errno.EIO)
        raise _os_error(code, str(exc), where) from exc
    except SMBResponseException as exc:
        raise _os_error(_ERRNO.get(exc.status, errno.EIO), str(exc), where) from exc
    except SMBAuthenticationError as exc:
        raise PermissionError(errno.EACCES, f"logon refused: {exc}", where) from exc
    except SMBConnectionClosed as exc:
        raise SmbConnectionLost(errno.ECONNRESET, str(exc) or "connection closed", where) from exc
    except (SMBException, ValueError) as exc:
        raise OSError(errno.EIO, str(exc), where) from exc
    except (ConnectionError, TimeoutError) as exc:
        raise SmbConnectionLost(exc.errno or errno.ECONNRESET, str(exc), where) from exc


class _Server:
    """One server of ``[smb]``: its calls are made with the account's options, each under the
    answer deadline, their errors translated."""

    def __init__(self, settings: SmbSettings, host: str) -> None:
        self.host = host
        self.options = settings.client_options()
        self._settings = settings

    @contextmanager
    def call(self, where: str) -> Iterator[None]:
        watch = self._settings.pool.watch
        with watch.within(self.host, self._settings.timeout, where), _translated(where):
            yield


def _os_error(code: int, text: str, where: str) -> OSError:
    kinds: dict[int, type[OSError]] = {
        errno.EEXIST: FileExistsError,
        errno.ENOENT: FileNotFoundError,
        errno.EACCES: PermissionError,
    }
    return kinds.get(code, OSError)(code, text, where)


class SmbFolder:
    """One folder of a share, as :class:`~dsc_bindings.filters.sharefs.ShareFolder`."""

    def __init__(self, path: PureWindowsPath, server: _Server) -> None:
        self.path = path
        self._server = server
        self._options = server.options

    def _unc(self, name: str) -> str:
        return f"{self.path}\\{name}"

    def create(self, name: str) -> SmbNewFile:
        unc = self._unc(name)
        with self._server.call(unc):
            raw = smbclient.open_file(
                unc, mode="xb", buffering=0, create_options=_NO_FOLLOW, **self._options
            )
        return SmbNewFile(raw, unc, self._server)

    def open_existing(self, name: str) -> SmbExistingFile | None:
        unc = self._unc(name)
        try:
            with self._server.call(unc):
                raw = smbclient.open_file(
                    unc,
                    mode="rb",
                    buffering=0,
                    share_access="r",
                    create_options=_NO_FOLLOW,
                    **self._options,
                )
        except SmbConnectionLost:
            raise
        except OSError:
            return None
        return SmbExistingFile(raw, unc, self._server)

    def facts(self, name: str) -> FileFacts | None:
        unc = self._unc(name)
        try:
            with self._server.call(unc):
                st = smbclient.lstat(unc, **self._options)
        except FileNotFoundError:
            return None
        return FileFacts(
            regular=not st.st_file_attributes & (_REPARSE | _DIRECTORY),
            file_id=st.st_ino,
            links=st.st_nlink,
            size=st.st_size,
            ours=True,  # see FileFacts.ours
        )

    def entries(self) -> list[tuple[str, int]]:
        with self._server.call(str(self.path)):
            return [(e.name, e.inode()) for e in smbclient.scandir(str(self.path), **self._options)]

    def place_exclusive(self, tmp: str, name: str) -> bool:
        src, dst = self._unc(tmp), self._unc(name)
        try:
            with self._server.call(dst):
                try:
                    smbclient.link(src, dst, follow_symlinks=False, **self._options)
                    return True
                except SMBOSError as exc:
                    if exc.ntstatus not in _NO_HARD_LINKS:
                        raise
                # FileRenameInformation with ReplaceIfExists = FALSE.
                smbclient.rename(src, dst, **self._options)
                return True
        except FileExistsError:
            return False

    def unlink_if_present(self, name: str) -> bool:
        unc = self._unc(name)
        try:
            with self._server.call(unc):
                smbclient.remove(unc, **self._options)  # opened FILE_OPEN_REPARSE_POINT
            return True
        except FileNotFoundError:
            return False

    def sync(self) -> None:
        """Names on an SMB server are the server's to make durable; the files were flushed."""


class SmbNewFile:
    def __init__(self, raw: Any, where: str, server: _Server) -> None:
        self._raw = raw
        self._where = where
        self._server = server

    def write(self, data: memoryview) -> None:
        with self._server.call(self._where):
            while data:
                written = self._raw.write(data)  # at most the server's maximum write size
                data = data[written:]

    def sync(self) -> None:
        with self._server.call(self._where):
            self._raw.fd.flush()  # SMB2 FLUSH: the server writes the file to stable storage

    def close(self) -> None:
        with self._server.call(self._where):
            self._raw.close()


class SmbExistingFile:
    def __init__(self, raw: Any, where: str, server: _Server) -> None:
        self._raw = raw
        self._where = where
        self._server = server

    def read(self, size: int = -1, /) -> bytes:
        with self._server.call(self._where):
            data: bytes = self._raw.read(size) or b""
            return data

    def close(self) -> None:
        with self._server.call(self._where):
            self._raw.close()


@contextmanager
def open_smb_folder(
    settings: SmbSettings, host: str, share: str, components: Sequence[str]
) -> Iterator[SmbFolder]:
    """``\\\\host\\share\\components...``, making what is missing; each folder below the share
    is looked at without following a reparse point and refused if it is one (or if it cannot
    be seen once made: Samba hides a link that leads out of the share)."""
    server = _Server(settings, host)
    options = server.options
    path = PureWindowsPath(f"\\\\{host}\\{share}\\")
    for name in components:
        path = path / name
        unc = str(path)
        with server.call(unc):
            try:
                st = smbclient.lstat(unc, **options)
            except SMBOSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                try:
                    smbclient.mkdir(unc, **options)
                except SMBOSError as made:
                    # EEXIST: made meanwhile, or planted; ENOENT: Samba's answer for a name
                    # that is a link leading out of the share.  Looked at again below.
                    if made.errno not in (errno.EEXIST, errno.ENOENT):
                        raise
                try:
                    st = smbclient.lstat(unc, **options)
                except SMBOSError as gone:
                    if gone.errno == errno.ENOENT:
                        raise PlantedLink(path) from gone  # pathlib type: named in the log
                    raise
        if st.st_file_attributes & _REPARSE:
            raise PlantedLink(path)
        if not st.st_file_attributes & _DIRECTORY:
            raise NotADirectoryError(errno.ENOTDIR, "is not a folder", unc)
    yield SmbFolder(path, server)


def share_problem(settings: SmbSettings, unc: str) -> str | None:
    """For /healthz (``[smb] health_shares``): None when the share answers, else why not."""
    parts = [p for p in unc.replace("/", "\\").split("\\") if p]
    try:
        with open_smb_folder(settings, parts[0], parts[1], ()) as folder:
            folder.entries()  # connects, logs on, opens the share and lists it
            return None
    except OSError as exc:
        return f"{unc}: {exc.strerror or exc}"


__all__ = ["SmbConnectionLost", "SmbFolder", "open_smb_folder", "share_problem"]
