"""Scan processes through the web console's API (issue 19): ``GET/POST /api/processes`` and
``GET/PUT/DELETE /api/processes/{name}``, with ``[directory]``.

The same objects and the same validation as ``dsc process`` (.directory.scan_processes: the
PSPString checked before anything is written, the DACL from the allowed groups; a process needs
a destination; the scan server's name is never a loopback one, .exposure).  The server's own
directory account (``[directory] bind_user``) writes them, so it needs the rights on
``CN=PSPs,CN=System`` that ``dsc process --as`` gives an administrator; the console checked that
the caller is a scan administrator first (R10).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dsc_bindings.directory.ldap import DirectoryError, DirectoryUnavailable
from dsc_bindings.directory.scan_processes import (
    ProcessStore,
    ScanProcess,
    ScanSettings,
    ValidationError,
)
from dsc_bindings.exposure import is_local_only, url_hostname
from dsc_bindings.runtime.ticket import Wait
from dsc_bindings.webconsole.replies import ApiError, json_reply, then
from dsc_core import Reply

if TYPE_CHECKING:
    from dsc_bindings.webconsole.api import ApiRequest, Caller

__all__ = ["ROUTES"]

log = logging.getLogger("dsc.webconsole")

_LISTS = ("shares", "sharepoint_sites", "emails", "allow")
_FLAGS = ("email_scan_user", "continue_on_error", "duplex")


def _with_store(
    request: ApiRequest, work: Callable[[ProcessStore], Any], done: Callable[[Any], Reply]
) -> Reply | Wait:
    """``work`` on a store bound as the server's account, off the loop; ``done`` answers."""
    directory = request.service.directory
    if directory is None:
        raise ApiError(
            409, "Scan processes live in the directory: this server has no [directory] section."
        )

    def run() -> Any:
        conn = directory.connect()
        try:
            return work(ProcessStore(directory, conn))
        finally:
            conn.unbind()

    asked = request.service.offload(run)

    def decide() -> Reply:
        error = asked.error
        if isinstance(error, ApiError):
            raise error
        if isinstance(error, DirectoryUnavailable):
            raise ApiError(503, f"The directory cannot be reached now ({error}); try later.")
        if isinstance(error, ValidationError):
            raise ApiError(400, f"The scan process is not valid: {error}")
        if isinstance(error, DirectoryError):
            raise ApiError(409, f"The directory refused it: {error}")
        if error is not None:
            raise error
        return done(asked.value)

    return then(Wait(asked, decide), lambda reply: reply)


def _found(store: ProcessStore, name: str) -> ScanProcess:
    process = store.get(name)
    if process is None:
        raise ApiError(404, f"No scan process named {name!r} in the directory.")
    return process


def _changed(process: ScanProcess, body: dict[str, Any]) -> ScanProcess:
    """``process`` with what ``body`` names (the fields of ScanProcess.as_dict) replaced."""
    changes = {**_list_changes(body), **_flag_changes(body), **_name_changes(body)}
    changes["settings"] = _settings_changed(process.settings, body)
    new = replace(process, **changes)
    if not new.has_destination:
        raise ApiError(
            400,
            "A scan process needs a destination: shares, sharepoint_sites, emails or "
            "email_scan_user.",
        )
    return new


def _list_changes(body: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in _LISTS:
        if key in body:
            value = body[key]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ApiError(400, f"{key} must be a list of non-empty texts.")
            changes[key] = tuple(v.strip() for v in value)
    return changes


def _flag_changes(body: dict[str, Any]) -> dict[str, Any]:
    """The process's own flags (duplex, also checked here, is one of its settings')."""
    for key in _FLAGS:
        if key in body and not isinstance(body[key], bool):
            raise ApiError(400, f"{key} must be true or false.")
    return {key: body[key] for key in ("email_scan_user", "continue_on_error") if key in body}


def _name_changes(body: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "document_root_name" in body:
        root = body["document_root_name"]
        if not isinstance(root, str) or not root.strip():
            raise ApiError(400, "document_root_name must be a non-empty text.")
        changes["document_root_name"] = root.strip()
    if "scan_repository" in body:
        host = body["scan_repository"]
        if not isinstance(host, str) or not host.strip() or is_local_only(host.strip()):
            raise ApiError(
                400,
                f"scan_repository {host!r} is not a name devices can reach: give the scan "
                "server's DNS name (e.g. scan.example.com).",
            )
        changes["scan_repository"] = host.strip()
    return changes


def _settings_changed(s: ScanSettings, body: dict[str, Any]) -> ScanSettings:
    resolution = body.get("resolution", s.resolution)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
        raise ApiError(400, "resolution must be a positive whole number (dots per inch).")
    for key in ("format", "color"):
        if key in body and not isinstance(body[key], str):
            raise ApiError(400, f"{key} must be a text.")
    return ScanSettings(
        format=body.get("format", s.format),
        resolution=resolution,
        color=body.get("color", s.color),
        duplex=body.get("duplex", s.duplex),
    )


def _list(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    return _with_store(
        request,
        lambda store: [p.as_dict() for p in store.all()],
        lambda found: request.cacheable({"processes": found}),
    )


def _get(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    name = params["name"]
    return _with_store(
        request,
        lambda store: _found(store, name).as_dict(),
        lambda found: request.cacheable({"process": found}),
    )


def _create(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    body = request.json_body()
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "Give the scan process a name (what users see on the device).")
    host = url_hostname(request.service.config.base_url)
    if "scan_repository" not in body and is_local_only(host):
        raise ApiError(
            409,
            f"This server's public name is unknown (it advertises {host}, which devices cannot "
            'reach): set [server] public_url = "https://scan.example.com:5362", or give '
            "scan_repository.",
        )
    fresh = ScanProcess(name.strip(), str(uuid.uuid4()).upper(), scan_repository=host)
    process = _changed(fresh, body)

    def done(added: ScanProcess) -> Reply:
        log.info("web console: %s added scan process %r", caller.user or "(anyone)", added.name)
        return json_reply(201, {"process": added.as_dict()})

    return _with_store(request, lambda store: store.add(process), done)


def _update(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    body = request.json_body()
    name = params["name"]
    if "name" in body and body["name"] != name:
        raise ApiError(400, "A scan process keeps its name; create a new one to rename it.")

    def work(store: ProcessStore) -> ScanProcess:
        old = _found(store, name)
        new = _changed(old, body)
        return store.update(old, new, allow_changed=new.allow != old.allow)

    def done(new: ScanProcess) -> Reply:
        log.info("web console: %s changed scan process %r", caller.user or "(anyone)", name)
        return json_reply(200, {"process": new.as_dict()})

    return _with_store(request, work, done)


def _delete(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    name = params["name"]

    def work(store: ProcessStore) -> None:
        store.remove(_found(store, name))

    def done(_: None) -> Reply:
        log.info("web console: %s removed scan process %r", caller.user or "(anyone)", name)
        return json_reply(200, {"removed": name})

    return _with_store(request, work, done)


ROUTES = {
    ("GET", "/api/processes"): _list,
    ("POST", "/api/processes"): _create,
    ("GET", "/api/processes/{name}"): _get,
    ("PUT", "/api/processes/{name}"): _update,
    ("DELETE", "/api/processes/{name}"): _delete,
}
