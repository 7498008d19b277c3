"""Which files ``dsc scan`` sends: each FILE argument as given, and every regular file of a
DIRECTORY argument, sorted by name (a scanner's pages, saved as page-001.png, page-002.png ...,
arrive in their order)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dsc_bindings.console.support import EXIT_USAGE, CliError

__all__ = ["scan_inputs"]


def scan_inputs(arguments: Sequence[str]) -> list[Path]:
    """The files to send, in order; a usage error for a missing path or an empty directory.

    Hidden files (``.DS_Store``, editor droppings) and sub-directories of a directory are
    skipped: they are never scanned pages."""
    files: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                (p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")),
                key=lambda p: p.name,
            )
            if not found:
                raise CliError(f"no files to scan in the directory {path}", EXIT_USAGE)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"no such file or directory: {path}", EXIT_USAGE)
    return files
