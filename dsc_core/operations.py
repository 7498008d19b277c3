"""Pieces shared by the WS-DSP and MS-BDSRR operations: the request element, users (R10),
job lookup, requested element names (R5) and undo on store failure."""

from __future__ import annotations

from collections.abc import Callable

from lxml import etree

from . import faults, names
from .args import Args, Item
from .commands import Command
from .jobstate import JobInput, Refused
from .model import Job
from .server import Call, OpResult
from .xmlread import Element, children, split


def request_element(call: Call, ns: str, *locals_: str) -> tuple[Element, Args]:
    """The Body's single request element, one of ``locals_`` in ``ns`` (R4 step 6)."""
    args = Args(ns)
    body_children = list(children(call.envelope.body))
    if not body_children:
        raise args.invalid(ns, locals_[0])
    payload = body_children[0]
    if split(payload.tag) not in [(ns, local) for local in locals_]:
        raise args.invalid(*split(payload.tag))
    if len(body_children) > 1:
        raise args.invalid(*split(body_children[1].tag))
    return payload, args


# --- Users and authorization (R10) ----------------------------------------------------------


def identity(call: Call) -> str:
    """The authenticated identity when client certificates are required, else ''."""
    if call.config.require_client_certificates:
        return call.info.identity or ""
    return ""


def user_name(call: Call, user_identifier: str) -> str:
    """JobOriginatingUserName: the certificate identity, else the SID mapped by the user
    directory (unmapped: the SID itself)."""
    if call.config.require_client_certificates and call.info.identity:
        return call.info.identity
    return call.config.user_directory.get(user_identifier, user_identifier)


def require_scan_admin(call: Call) -> None:
    """R4 step 5: MS-BDSRR needs a scan administrator when client certificates are required;
    without them every client is one (said in the log at start)."""
    if (
        call.config.require_client_certificates
        and (call.info.identity or "") not in call.config.scan_admins
    ):
        raise faults.not_scan_admin()


def find_job(call: Call, ns: str, token: str, *, own_only: bool) -> Job:
    """R4 step 7.  For WS-DSP (``own_only``) a job of another user is treated as not found."""
    job = call.server.jobs.get(token)
    if job is None or (own_only and job.owner != identity(call)):
        raise faults.job_not_found(ns, token)
    return job


def change(
    call: Call, ns: str, job: Job, job_input: JobInput, **changes: object
) -> tuple[Job, list[Command], Callable[[], list[Command]]]:
    """Apply an input from a request; a refusal becomes the fault REFUSALS names."""
    try:
        new, commands = call.server.apply(job, job_input, call.now, **changes)
    except Refused as refused:
        if refused.fault == "ClientErrorJobTokenNotFound":
            raise faults.job_not_found(ns, job.token) from None
        raise faults.operation_failed(ns) from None

    def undo() -> list[Command]:
        return call.server.restore_job(job, new, call.now)

    return new, commands, undo


# --- Requested elements (R5) ------------------------------------------------------------------


def requested_names(call: Call, args: Args, el: Element, ns: str) -> list[tuple[str, str]]:
    names_ = args.sequence(el, ns, (Item("Name", 1, 2**31),), allow_other=False)["Name"]
    if len(names_) > call.config.limits.max_requested_names:
        raise args.invalid(ns, "Name")
    return [args.qname(n) for n in names_]


def element_data(
    parent: Element, ns: str, qname: tuple[str, str], valid: bool, nsmap: dict[str, str]
) -> Element:
    """One ``ElementData`` echoing the requested QName with a prefix the response binds (R3)."""
    el = etree.SubElement(parent, f"{{{ns}}}ElementData")
    el.set(f"{{{ns}}}Name", qname_text(qname, nsmap))
    el.set(f"{{{ns}}}Valid", "true" if valid else "false")
    return el


def qname_text(qname: tuple[str, str], nsmap: dict[str, str]) -> str:
    ns, local = qname
    if not ns:
        return local
    for prefix, uri in nsmap.items():
        if uri == ns:
            return f"{prefix}:{local}"
    for prefix, uri in names.PREFIXES.items():
        if uri == ns and prefix not in nsmap:
            nsmap[prefix] = ns
            return f"{prefix}:{local}"
    prefix = f"n{len(nsmap)}"
    nsmap[prefix] = ns
    return f"{prefix}:{local}"


def result(
    action: str,
    payload: Element,
    nsmap: dict[str, str],
    commands: list[Command] | None = None,
    undo: Callable[[], list[Command]] | None = None,
) -> OpResult:
    return OpResult(action, payload, nsmap, commands or [], undo)
