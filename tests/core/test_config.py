"""Limits and ServerConfig are checked when made: a wrong type or range is a ValueError that
names the field and the value (issue 6), never a fault on every later request."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from dsc_core import Limits, ServerConfig
from dsc_core.config import max_request_bytes, reserved_slots

INT_LIMITS = [f.name for f in dataclasses.fields(Limits) if f.type in ("int", int)]
SHARE_LIMITS = ["max_connection_share", "new_client_share"]
SECONDS_LIMITS = [
    f.name
    for f in dataclasses.fields(Limits)
    if f.name not in INT_LIMITS and f.name not in SHARE_LIMITS
]


def test_the_issue_example() -> None:
    with pytest.raises(ValueError) as raised:
        Limits(max_image_bytes="abc")  # type: ignore[arg-type]
    assert str(raised.value) == "Limits.max_image_bytes must be a positive int, got 'abc'"


def test_every_limit_is_a_count_seconds_or_a_share() -> None:
    assert len(INT_LIMITS) == 17 and SECONDS_LIMITS == [
        "head_timeout",
        "body_timeout",
        "idle_timeout",
        "delivery_connect_timeout",
        "delivery_answer_timeout",
    ]
    Limits()  # the R12 defaults pass their own checks


@pytest.mark.parametrize("name", INT_LIMITS)
@pytest.mark.parametrize("bad", ["abc", "10", 0, -1, 1.5, True, None])
def test_count_limits_need_a_positive_int(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"^Limits\.{name} must be a positive int, got "):
        Limits(**{name: bad})
    assert getattr(Limits(**{name: 1}), name) == 1


@pytest.mark.parametrize("bad", ["0.5", 0, -0.5, 1.01, math.nan, math.inf, True, None])
def test_connection_share_is_a_fraction(bad: Any) -> None:
    with pytest.raises(
        ValueError, match=r"^Limits\.max_connection_share must be a share greater than 0"
    ):
        Limits(max_connection_share=bad)
    assert Limits(max_connection_share=1).max_connection_share == 1
    assert Limits(max_connection_share=0.25).max_connection_share == 0.25


@pytest.mark.parametrize("bad", ["0.1", -0.1, 1, 1.5, math.nan, math.inf, True, None])
def test_new_client_share_is_a_fraction_below_one(bad: Any) -> None:
    with pytest.raises(
        ValueError, match=r"^Limits\.new_client_share must be a share of at least 0 and less than 1"
    ):
        Limits(new_client_share=bad)
    assert Limits(new_client_share=0).new_client_share == 0  # no reserve
    assert reserved_slots(1000, Limits()) == 100  # the default: 10 %
    assert reserved_slots(4, Limits()) == 0  # rounded down: a tiny server keeps none


@pytest.mark.parametrize("name", SECONDS_LIMITS)
@pytest.mark.parametrize("bad", ["30", 0, -0.5, math.nan, math.inf, False, None])
def test_timeouts_need_positive_finite_seconds(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"^Limits\.{name} must be a positive number of seconds"):
        Limits(**{name: bad})
    assert getattr(Limits(**{name: 5}), name) == 5  # TOML writes whole seconds as ints
    assert getattr(Limits(**{name: 0.25}), name) == 0.25


SERVER_CASES: list[tuple[str, object, str]] = [
    ("limits", {"max_image_bytes": 5}, "a Limits"),
    ("device_uuid", "not-a-uuid", "a UUID string"),
    ("dsp_service_uuid", 42, "a UUID string"),
    ("dsc_service_uuid", "", "a UUID string"),
    ("base_url", "ftp://scan.example", "an http:// or https:// URL"),
    ("base_url", None, "an http:// or https:// URL"),
    ("friendly_name", "", "a non-empty str"),
    ("manufacturer", 7, "a non-empty str"),
    ("model_name", None, "a non-empty str"),
    ("firmware_version", "", "a non-empty str"),
    ("serial_number", 0, "a str"),
    ("filters", ("fileshare", "fax"), "a tuple of 'email', 'fileshare', 'sharepoint'"),
    ("filters", ["email"], "a tuple of"),
    ("job_timeout_seconds", 0, "a positive number of seconds"),
    ("job_timeout_seconds", "600", "a positive number of seconds"),
    ("history_size", -1, "an int of at least 0"),
    ("history_size", 2.5, "an int of at least 0"),
    ("require_client_certificates", "yes", "a bool"),
    ("scan_admins", {"admin"}, "a frozenset of str"),
    ("scan_admins", frozenset({1}), "a frozenset of str"),
    ("user_directory", {"S-1-5": 5}, "a mapping of str to str"),
    ("user_email", ["a@b"], "a mapping of str to str"),
    ("process_names", {1: "x"}, "a mapping of str to str"),
    ("subscription_default_seconds", -1, "a positive number of seconds"),
    ("subscription_max_seconds", math.inf, "a positive number of seconds"),
    ("delivery_failures_before_end", 0, "a positive int"),
    ("delivery_failures_before_end", True, "a positive int"),
]


@pytest.mark.parametrize(
    "name,bad,what", SERVER_CASES, ids=[f"{n}={b!r}" for n, b, _ in SERVER_CASES]
)
def test_server_config_fields(name: str, bad: object, what: str) -> None:
    with pytest.raises(ValueError) as raised:
        ServerConfig(**{name: bad})  # type: ignore[arg-type]
    assert str(raised.value).startswith(f"ServerConfig.{name} must be {what}")
    assert str(raised.value).endswith(f", got {bad!r}")
    with pytest.raises(ValueError, match=rf"^ServerConfig\.{name} "):
        ServerConfig().replace(**{name: bad})  # a reload is checked the same way


def test_server_config_accepts_what_the_server_uses() -> None:
    config = ServerConfig(
        limits=Limits(max_image_bytes=1),
        base_url="https://scan.example:5362",
        filters=("email",),
        history_size=0,  # keep no completed job
        job_timeout_seconds=1,
        require_client_certificates=True,
        scan_admins=frozenset({"admin@corp.example"}),
        user_directory={"S-1-5-21-7": "alice@corp.example"},
        serial_number="",
    )
    assert config.replace(filters=()).filters == ()


def test_max_request_bytes_is_image_envelope_and_mime_framing() -> None:
    limits = Limits(max_image_bytes=1000, max_envelope_bytes=100, max_part_header_bytes=10)
    assert max_request_bytes(limits) == 1000 + 100 + 3 * 10 + 1024
