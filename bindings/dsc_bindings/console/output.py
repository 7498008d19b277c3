"""How the ``dsc`` client commands print: rich tables that fit the terminal, times, closed pipes.

- Tables fit the terminal (``$COLUMNS``, else the terminal's width, else 100 columns when the
  output is a pipe or a file): long cells are cut with an ellipsis, one line per row, so that
  ``grep`` and ``head`` see one job per line.  ``--wide`` prints every cell whole (the table is
  as wide as it needs).
- Times from the server (ISO 8601 with a UTC offset, R6) are shown in local time, to the second;
  ``--json`` keeps them as the server sent them.
- A reader that goes away (``dsc history | head -1``) ends the command quietly: see
  :func:`quiet_broken_pipe`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from rich import box
from rich.console import Console
from rich.table import Table

#: Width used when the output is not a terminal and $COLUMNS is not set.
PIPE_WIDTH = 100
#: A job token is a GUID (36 characters); lists show its first characters, like git's short
#: hashes, and every command that takes a TOKEN also takes such a prefix.
SHORT_TOKEN = 8

__all__ = [
    "PIPE_WIDTH",
    "SHORT_TOKEN",
    "Column",
    "console",
    "local_time",
    "parse_time",
    "print_pairs",
    "print_table",
    "printable",
    "quiet_broken_pipe",
    "short_token",
]


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: its header and how it behaves when the table must shrink."""

    header: str
    #: Never cut (states, counts, times); the other columns give way first.
    keep: bool = False
    #: Align right (numbers).
    numeric: bool = False
    #: Shown only with --wide.
    wide_only: bool = False


def console(stream: TextIO | None = None, *, wide: bool = False) -> Console:
    """A rich console on ``stream`` (standard output) sized as the module docstring says."""
    stream = stream or sys.stdout
    width: int | None = None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        width = int(columns)
    elif not stream.isatty():
        width = PIPE_WIDTH
    if wide:
        width = 10_000  # as wide as the rows need: nothing is cut
    return Console(
        file=stream,
        width=width,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=False,
        # Colour only on a terminal (and never when NO_COLOR is set: rich honours it).
        color_system="auto" if stream.isatty() else None,
    )


#: Spaces between two columns.
GAP = 2
#: A column that gives way is never cut below this (or its header, if shorter).
MIN_CUT = 8


def fit_widths(natural: Sequence[int], keep: Sequence[bool], width: int) -> list[int]:
    """Column widths that fit ``width``: columns to keep stay whole; the others give way,
    widest first, down to :data:`MIN_CUT`.  If that is not enough, the line is as narrow as
    it can be (the kept columns are never cut)."""
    widths = list(natural)
    excess = sum(widths) + GAP * (len(widths) - 1) - width
    while excess > 0:
        candidates = [i for i, w in enumerate(widths) if not keep[i] and w > MIN_CUT]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        others = [widths[i] for i in candidates if i != widest]
        # Shrink the widest down to the next widest (or by the excess), one step at a time.
        step = min(excess, widths[widest] - max([MIN_CUT, *others]) or 1)
        widths[widest] -= step
        excess -= step
    return widths


def print_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    wide: bool = False,
    stream: TextIO | None = None,
) -> None:
    """A header line, a rule, and one line per row, fitting the width (or whole with ``wide``)."""
    out = console(stream, wide=wide)
    shown = [i for i, c in enumerate(columns) if wide or not c.wide_only]
    natural = [max([len(columns[i].header), *(len(r[i]) for r in rows)]) for i in shown]
    widths = natural if wide else fit_widths(natural, [columns[i].keep for i in shown], out.width)
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        # The box's column separator is one space; one space of right padding makes the GAP.
        padding=(0, GAP - 1, 0, 0),
        expand=False,
        header_style="bold",
    )
    for i, w in zip(shown, widths, strict=True):
        column = columns[i]
        table.add_column(
            column.header,
            justify="right" if column.numeric else "left",
            no_wrap=True,
            overflow="ellipsis",
            width=w,
        )
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    out.print(table, crop=not wide)


def print_pairs(pairs: Sequence[tuple[str, str]], *, stream: TextIO | None = None) -> None:
    """A two-column "name  value" block (one job in detail); values are never cut."""
    width = max((len(name) for name, _ in pairs), default=0)
    out = stream or sys.stdout
    for name, value in pairs:
        out.write(f"{name.ljust(width)}  {value}".rstrip() + "\n")


def printable(text: str) -> str:
    """``text`` from the wire with every control character escaped (``\\x1b``, ``\\n``...), so
    that a server or a notification can neither move the cursor, recolour the terminal nor
    forge a second line of output.  Printable characters, non-ASCII included, stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_token(token: str, wide: bool = False) -> str:
    return token if wide or len(token) <= SHORT_TOKEN else token[:SHORT_TOKEN]


def parse_time(text: str) -> datetime | None:
    """An xs:dateTime from the server (``Z`` or an offset), or None when empty or unreadable."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.astimezone()


def local_time(text: str, *, wide: bool = False) -> str:
    """A server time for a table: local time to the second (with the offset under --wide)."""
    value = parse_time(text)
    if value is None:
        return text or "-"
    local = value.astimezone()
    if wide:
        return local.isoformat(timespec="seconds")
    return local.strftime("%Y-%m-%d %H:%M:%S")


def quiet_broken_pipe() -> int:
    """The reader of standard output went away (``dsc history | head -1``).

    Point standard output at /dev/null so that the interpreter's final flush does not fail a
    second time (Python's documented recipe for SIGPIPE), and return 141, the status of a
    program ended by SIGPIPE, which is what shells expect from a writer whose reader left.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing left to flush
        pass
    return 141
