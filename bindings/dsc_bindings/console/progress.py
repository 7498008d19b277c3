"""Upload progress bars for ``dsc scan`` (rich), on standard error, only when it is a terminal.

Drawn without rich's refresh thread: :meth:`Progress.advance` redraws at most ten times a
second from the uploading thread, so nothing runs behind the upload's back.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskProgressColumn,
    TextColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

__all__ = ["Progress", "human"]


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


class Progress:
    """One file's bar: label, bar, percentage, bytes sent of total, rate."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        width: int = 30,
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._last = 0.0
        self._bar: RichProgress | None = None
        if self.enabled:
            self._bar = RichProgress(
                TextColumn("{task.description}", style="bold"),
                BarColumn(bar_width=width),
                TaskProgressColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(file=self.stream, force_terminal=True, highlight=False),
                auto_refresh=False,
                transient=False,
            )
            self._task = self._bar.add_task(label[:24], total=self.total)
            self._bar.start()

    def advance(self, count: int) -> None:
        self.done += count
        if self._bar is None:
            return
        self._bar.update(self._task, completed=min(self.done, self.total))
        now = time.monotonic()
        if now - self._last > 0.1 or self.done >= self.total:
            self._last = now
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total))
            self._bar.refresh()
            self._bar.stop()
            self._bar = None
