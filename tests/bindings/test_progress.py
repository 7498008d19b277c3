"""The upload progress bar (rich): drawn on a terminal, silent otherwise."""

from __future__ import annotations

import io

from dsc_bindings.console.progress import Progress, human


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal() -> None:
    out = Tty()
    bar = Progress("page1.png", 2048, stream=out, width=10)
    bar.advance(1024)
    bar.advance(1024)
    bar.close()
    text = out.getvalue()
    assert "page1.png" in text and "100%" in text
    assert "━" * 10 in text  # the bar, full
    assert "2.0/2.0 kB" in text and "/s" in text
    assert text.removesuffix("\x1b[?25h").endswith("\n")


def test_progress_is_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress("x", 10, stream=out)
    bar.advance(10)
    bar.close()
    assert out.getvalue() == ""


def test_human_sizes() -> None:
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KB"
    assert human(200 * 1024 * 1024) == "200.0 MB"
