"""The WS-Eventing operations of both hosted services (R7): Subscribe, Renew, GetStatus and
Unsubscribe.  The rules themselves (filters, expiry, delivery) are in ``eventing.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import faults, names
from .commands import Command, EndSubscription, StoreSubscription
from .operation import Operation, OpResult, Request, no_arguments
from .users import identity, is_scan_admin
from .xmlread import Element, split

A = names.Action
_NSMAP = {"wse": names.WSE}


def _read_payload(local: str) -> Callable[[Request], Element]:
    """The reader of a request whose body must be ``wse:<local>`` (InvalidMessage otherwise)."""

    def read(request: Request) -> Element:
        payload = request.envelope.payload
        if payload is None or split(payload.tag) != (names.WSE, local):
            raise faults.eventing(
                "InvalidMessage",
                # No Detail: an empty wse:{local} would not be a valid one (the reason says).
                f"the Body must hold one wse:{local}",
            )
        return payload

    return read


def _service_hint(request: Request) -> str | None:
    """Which hosted service a Subscribe is for: by wsa:To or the request path (R7)."""
    where = f"{request.envelope.addressing.to or ''} {request.info.path}"
    if request.config.dsp_service_uuid in where:
        return "dsp"
    if request.config.dsc_service_uuid in where:
        return "dsc"
    return None


def _restricted_to(request: Request) -> str | None:
    """R13 (R10 on eventing): None for a scan administrator (everyone without client
    certificates); else the identity whose own jobs' events it may receive."""
    if is_scan_admin(request.config, request.info):
        return None
    return identity(request.config, request.info)


def subscribe(request: Request, payload: Element) -> OpResult:
    subscriptions = request.state.subscriptions
    sub, response = subscriptions.subscribe(
        request.envelope, payload, _service_hint(request), request.now, _restricted_to(request)
    )

    def undo() -> list[Command]:
        subscriptions.forget(sub.identifier)
        return []

    return OpResult(
        A.SUBSCRIBE_RESPONSE, response, dict(_NSMAP), [StoreSubscription(sub)], undo=undo
    )


def renew(request: Request, payload: Element) -> OpResult:
    subscriptions = request.state.subscriptions
    before, renewed, response = subscriptions.renew(
        request.envelope, payload, request.now, _restricted_to(request)
    )

    def undo() -> list[Command]:
        subscriptions.put_back(before)
        return []

    return OpResult(
        A.RENEW_RESPONSE, response, dict(_NSMAP), [StoreSubscription(renewed)], undo=undo
    )


def get_status(request: Request, _args: None) -> OpResult:
    response = request.state.subscriptions.get_status(
        request.envelope, request.now, _restricted_to(request)
    )
    return OpResult(A.GET_STATUS_RESPONSE, response, dict(_NSMAP))


def unsubscribe(request: Request, _args: None) -> OpResult:
    subscriptions = request.state.subscriptions
    ended = subscriptions.unsubscribe(request.envelope, request.now, _restricted_to(request))

    def undo() -> list[Command]:
        subscriptions.put_back(ended)
        return []

    return OpResult(
        A.UNSUBSCRIBE_RESPONSE,
        None,
        dict(_NSMAP),
        [EndSubscription(ended.identifier)],
        undo=undo,
    )


OPERATIONS: tuple[Operation[Any], ...] = (
    Operation(A.SUBSCRIBE, names.WSE, _read_payload("Subscribe"), subscribe),
    Operation(A.RENEW, names.WSE, _read_payload("Renew"), renew),
    Operation(A.GET_STATUS, names.WSE, no_arguments, get_status),
    Operation(A.UNSUBSCRIBE, names.WSE, no_arguments, unsubscribe),
)
