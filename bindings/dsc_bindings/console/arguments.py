"""The options every client command takes (which server, which TLS files, how to print)
and the argument types they share (``--since``/``--before WHEN``)."""

from __future__ import annotations

import argparse
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:5362/ScanServer"


def client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("DSC_SERVER", DEFAULT_SERVER),
        help=f"scan server URL (default: $DSC_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument("--ca", type=Path, help="CA certificate to trust for an https server")
    p.add_argument(
        "--cert", type=Path, help="client certificate (PEM) when the server requires one"
    )
    p.add_argument("--key", type=Path, help="private key of --cert, if not in the same file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--wide", action="store_true", help="print every column and whole tokens, never cut"
    )


def since(text: str) -> datetime:
    """--since: an ISO date or time (local unless it has an offset), or an age like 2h, 30m, 7d."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
        return datetime.now().astimezone() - timedelta(
            **{unit[match.group(2)]: int(match.group(1))}
        )
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date/time (2026-12-01, 2026-12-01T08:00) nor an age "
            "(30m, 2h, 7d)"
        ) from None
    return value if value.tzinfo is not None else value.astimezone()
