"""Asking before a command removes something for good (``dsc purge``, ``dsc process rm``).

On a terminal the command asks and does nothing unless the answer is yes.  A script says
``--yes``; without a terminal to ask on and without ``--yes`` the command refuses (exit status 2)
instead of guessing: a cron job that forgot ``--yes`` fails visibly, and nothing is removed.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from dsc_bindings.console.support import EXIT_FAILED, EXIT_USAGE, CliError

__all__ = ["add_yes_option", "can_confirm", "confirm"]


def add_yes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do it without asking (for scripts; without a terminal the command needs it)",
    )


def can_confirm(yes: bool, what: str, stdin: TextIO | None = None) -> None:
    """Refuse at once (before any network or directory work) when there is no one to ask."""
    stdin = stdin or sys.stdin
    if not yes and not stdin.isatty():
        raise CliError(
            f"{what} needs confirmation and there is no terminal to ask on; "
            "give --yes to do it from a script",
            EXIT_USAGE,
        )


def confirm(
    question: str, yes: bool, *, stdin: TextIO | None = None, stderr: TextIO | None = None
) -> None:
    """Ask ``question`` on the terminal (the prompt on standard error, so that ``--json`` output
    stays clean); anything but y/yes leaves everything as it was (exit status 1).  The caller
    has called :func:`can_confirm` first."""
    if yes:
        return
    stdin, stderr = stdin or sys.stdin, stderr or sys.stderr
    stderr.write(f"{question} [y/N] ")
    stderr.flush()
    answer = stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        if not answer:
            stderr.write("\n")
        raise CliError("not confirmed; nothing was changed", EXIT_FAILED)
