"""What every ``dsc`` command shares: exit codes and the one-line error.  (A module of its
own so that ``python -m dsc_bindings.console.main`` and the command modules agree on one CliError.)"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
