"""The answers of the web console's API: JSON replies with headers of their own, errors that
say what to do, and following a Wait chain to an answer (.api)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dsc_bindings.http.site import ApiReply
from dsc_bindings.runtime.ticket import Wait
from dsc_core import Reply

__all__ = ["JSON_TYPE", "ApiError", "ApiReply", "json_reply", "then"]

JSON_TYPE = "application/json; charset=utf-8"


class ApiError(Exception):
    """An answer that is an error: HTTP ``status`` with ``{"error": message}``."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    def reply(self) -> ApiReply:
        return json_reply(self.status, {"error": self.message}, self.headers)


def json_reply(status: int, value: object, headers: tuple[tuple[str, str], ...] = ()) -> ApiReply:
    body = json.dumps(value, default=str).encode()
    return ApiReply(status, JSON_TYPE, body, (("Cache-Control", "no-store"), *headers))


def then(step: object, function: Callable[[Any], Reply | Wait]) -> Reply | Wait:
    """``function`` of the result of ``step`` (a value, or a Wait chain ending in one); an
    ApiError raised on the way is its answer."""
    if isinstance(step, Wait):
        waited = step

        def resume() -> Reply | Wait:
            try:
                value = waited.resume()
            except ApiError as exc:
                return exc.reply()
            return then(value, function)

        return Wait(waited.ticket, resume)
    try:
        return function(step)
    except ApiError as exc:
        return exc.reply()
