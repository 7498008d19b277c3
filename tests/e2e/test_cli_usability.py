"""Smaller things an administrator hits with ``dsc``: ``purge`` and ``process rm`` ask on a
terminal (a real pseudo-terminal) and refuse without one unless ``--yes``; shell completion for
bash (completed by a real bash) and zsh; the LICENSE and the CHANGELOG."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from client_support import on_terminal
from e2e_support import ROOT, ServerProcess, Soap, child_env, dsc, serving

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(ServerProcess(tmp_path_factory.mktemp("usability") / "data")) as server:
        yield server


def dsc_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsc_bindings.console.main", *args]


def test_purge_asks_on_a_terminal_and_needs_yes_without_one(
    server: ServerProcess, tmp_path: Path
) -> None:
    page = tmp_path / "page.png"
    page.write_bytes(PNG)
    token = dsc("scan", "--server", server.url, "-q", "--json", str(page)).json()["token"]
    soap = Soap(server.url)
    soap.wait_ended(token)
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    purge = ("purge", "--server", server.url, "--before", tomorrow)

    scripted = dsc(*purge)  # no terminal, no --yes: refused before anything is sent
    assert scripted.code == 2, scripted
    assert scripted.err == (
        "dsc: dsc purge needs confirmation and there is no terminal to ask on; "
        "give --yes to do it from a script\n"
    )
    assert soap.in_history(token) is not None

    code, said = on_terminal(dsc_args(*purge), "n", child_env())
    assert code == 1, said
    assert re.search(
        r"Remove every job that ended before .* from the history of .*\? \[y/N\]", said
    )
    assert "dsc: not confirmed; nothing was changed" in said
    assert soap.in_history(token) is not None

    code, said = on_terminal(dsc_args(*purge), "y", child_env())
    assert code == 0, said
    assert re.search(r"\d+ job\(s\) that ended before .* removed from the history", said), said
    assert soap.in_history(token) is None


def test_process_rm_needs_yes_without_a_terminal(tmp_path: Path) -> None:
    # Refused before the configuration or the directory is even read.
    run = dsc("process", "rm", "Invoices", "--config", str(tmp_path / "none.toml"))
    assert run.code == 2, run
    assert "dsc process rm needs confirmation" in run.err and "--yes" in run.err, run.err
    helped = dsc("process", "rm", "--help")
    assert "-y, --yes" in helped.out


@pytest.fixture
def dsc_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has a ``dsc`` that runs this checkout, as an install has."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "dsc"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m dsc_bindings.console.main "$@"\n')
    wrapper.chmod(0o755)
    env = child_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def bash_completes(env: dict[str, str], line: str) -> list[str]:
    """What a real bash offers for ``line`` after loading ``dsc completion bash``."""
    script = (
        'eval "$(dsc completion bash)"\n'
        'COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$1"\n'
        '[[ "$1" == *" " ]] && COMP_WORDS+=("")\n'
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        "_python_argcomplete dsc\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "-c", script, "bash", line], capture_output=True, timeout=60, env=env
    )
    assert done.returncode == 0, done
    return [c.strip() for c in done.stdout.decode().splitlines() if c.strip()]


def test_bash_completion(dsc_on_path: dict[str, str]) -> None:
    assert bash_completes(dsc_on_path, "dsc pu") == ["purge"]
    offered = set(bash_completes(dsc_on_path, "dsc process "))
    assert {"list", "show", "add", "edit", "rm"} <= offered, offered
    assert bash_completes(dsc_on_path, "dsc purge --y") == ["--yes"]
    assert "--process-name" in bash_completes(dsc_on_path, "dsc scan --process")
    assert {"bash", "zsh"} <= set(bash_completes(dsc_on_path, "dsc completion "))


def test_zsh_completion(dsc_on_path: dict[str, str], tmp_path: Path) -> None:
    script = dsc("completion", "zsh")
    assert script.code == 0 and script.out.startswith("#compdef dsc"), script
    # What the script asks dsc for when zsh completes "dsc hist" (argcomplete's protocol).
    answer = tmp_path / "completions"
    done = subprocess.run(
        ["dsc"],
        capture_output=True,
        timeout=60,
        env={
            **dsc_on_path,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_SHELL": "zsh",
            "COMP_LINE": "dsc hist",
            "COMP_POINT": "8",
            "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
        },
    )
    assert done.returncode == 0, done
    assert answer.read_text().startswith("history"), answer.read_text()
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip(
            "zsh is not installed (Debian package zsh): its parse of the script is untested"
        )
    checked = subprocess.run([zsh, "-n", "-c", script.out], capture_output=True, timeout=60)
    assert checked.returncode == 0, checked


def test_license_is_apache_2_and_the_changelog_keeps_a_changelog() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in changelog
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    assert headings[:2] == ["Unreleased", "0.1.0"], headings
    unreleased = changelog.split("## [0.1.0]")[0]
    for section in re.findall(r"^### (.+)$", changelog, re.M):
        assert section in {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert "### " in unreleased
