"""The installation's identity, kept in the data directory (R13 on R1 and R11).

``identity.json`` holds the device UUID and the two hosted services' UUIDs, generated at the
first start, so two servers on one network are two devices (and one server stays the same
device across restarts); the configuration file may set any of them.  It also counts starts:
the count is the WS-Discovery ``wsd:AppSequence`` InstanceId, which must grow with each start.

The file is replaced atomically (write, fsync, rename, fsync of the folder), so a crash leaves
the old or the new one, never a torn one.

With ``[store] kind = "postgresql"`` the identity lives in the database instead (.pgidentity,
issue 17 point 1): :func:`installation_of` and :func:`record_start_of` choose by the storage.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dsc_bindings.store.backends import StorageSettings
from dsc_core import ServerConfig

__all__ = [
    "IDENTITY_FILE",
    "UUID_KEYS",
    "Installation",
    "installation_of",
    "load_installation",
    "record_start",
    "record_start_of",
]

IDENTITY_FILE = "identity.json"
UUID_KEYS = ("device_uuid", "dsp_service_uuid", "dsc_service_uuid")


@dataclass(frozen=True, slots=True)
class Installation:
    device_uuid: str
    dsp_service_uuid: str
    dsc_service_uuid: str
    #: Starts so far (the AppSequence InstanceId of the current run after record_start).
    starts: int = 0

    def apply(self, config: ServerConfig, configured: Mapping[str, str]) -> ServerConfig:
        """``config`` with this installation's UUIDs, except those the configuration set."""
        changes = {key: getattr(self, key) for key in UUID_KEYS if key not in configured}
        return config.replace(**changes)


def load_installation(data_dir: Path) -> Installation:
    """The stored identity, created (fresh UUIDs, no starts) when there is none yet."""
    path = Path(data_dir) / IDENTITY_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        installation = _fresh()
        _write(path, installation)
        return installation
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); move it away to start afresh") from exc
    try:
        values = [str(uuid.UUID(str(raw[key]))) for key in UUID_KEYS]
        starts = int(raw.get("starts", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a dsc-server identity file ({exc})") from exc
    return Installation(values[0], values[1], values[2], starts=starts)


def _fresh() -> Installation:
    return Installation(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))


def data_folder_seed(data_dir: Path) -> Installation:
    """What a database without an identity adopts: the data folder's (so a server moved onto
    PostgreSQL stays the device its clients know, its counter still growing), else fresh UUIDs
    (no file is written)."""
    if (Path(data_dir) / IDENTITY_FILE).exists():
        return load_installation(data_dir)
    return _fresh()


def installation_of(data_dir: Path, storage: StorageSettings) -> Installation:
    """The identity where ``storage`` keeps it: the database, or the data folder."""
    if storage.store_kind == "postgresql":
        from dsc_bindings.runtime.pgidentity import PostgresIdentity

        identity = PostgresIdentity(storage.dsn, storage.password_file)
        return identity.load(lambda: data_folder_seed(data_dir))
    return load_installation(data_dir)


def record_start_of(data_dir: Path, storage: StorageSettings) -> Installation:
    """Count one more start where ``storage`` keeps the identity; the new count."""
    if storage.store_kind == "postgresql":
        from dsc_bindings.runtime.pgidentity import PostgresIdentity

        identity = PostgresIdentity(storage.dsn, storage.password_file)
        return identity.record_start(lambda: data_folder_seed(data_dir))
    return record_start(data_dir)


def record_start(data_dir: Path) -> Installation:
    """Count one more start; returns the identity with the new count."""
    current = load_installation(data_dir)
    started = Installation(
        current.device_uuid, current.dsp_service_uuid, current.dsc_service_uuid, current.starts + 1
    )
    _write(Path(data_dir) / IDENTITY_FILE, started)
    return started


def _write(path: Path, installation: Installation) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {key: getattr(installation, key) for key in UUID_KEYS}
    data["starts"] = installation.starts
    # A temporary name of this process's own: two processes starting on one folder at once
    # (`uvicorn --workers 2`, before the folder lock refuses the second) each write a whole file;
    # with one shared name the first rename took the other's file away (ENOENT at its rename).
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(part, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)
