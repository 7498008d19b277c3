"""Shell completion for ``dsc`` (argcomplete): ``dsc completion bash|zsh`` prints the script that
a shell sources to complete commands and options, e.g. in ~/.bashrc::

    eval "$(dsc completion bash)"

The completions themselves come from the argument parser (argcomplete runs ``dsc`` with
``_ARGCOMPLETE`` set; :func:`autocomplete` answers and exits before any command runs), so they
never drift from ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import argcomplete
from argcomplete.shell_integration import shellcode

from dsc_bindings.console.support import EXIT_OK

__all__ = ["SHELLS", "add_parser", "autocomplete"]

SHELLS = ("bash", "zsh")


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request from the shell and exit; return at once otherwise."""
    argcomplete.autocomplete(parser)


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(shellcode(["dsc"], shell=args.shell))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "completion",
        help="print the shell completion script (bash or zsh)",
        description="Print the completion script for SHELL. Load it from ~/.bashrc with: eval "
        '"$(dsc completion bash)", or from ~/.zshrc (after compinit) with: eval '
        '"$(dsc completion zsh)".',
    )
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    p.set_defaults(func=cmd_completion)
