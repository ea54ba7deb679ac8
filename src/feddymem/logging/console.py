"""Terminal output: rich tables, and progress bars that stay quiet under CI or ``quiet=true``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def progress_enabled(quiet: bool) -> bool:
    """Whether progress bars are shown: not quiet, and stderr is a terminal."""
    return not quiet and not os.environ.get("CI") and sys.stderr.isatty()


def _ignore(n: int = 1) -> None:
    """A progress callback that does nothing (no bars shown)."""


class Reporter:
    """Prints run information and hands out progress callbacks."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        # Logs and pipes get wide lines rather than rich's 80-column default, so tables stay readable.
        self.console = Console(quiet=quiet, highlight=False, width=None if sys.stdout.isatty() else 160)
        self._progress: Progress | None = None
        self.show_bars = progress_enabled(quiet)

    def print(self, *args, **kwargs) -> None:
        """Print a line (nothing when quiet)."""
        self.console.print(*args, **kwargs)
        self.console.file.flush()  # round lines reach a log file or pipe as they happen

    def warn(self, message: str) -> None:
        """One ``warning: ...`` line on stderr, shown even when quiet (quiet hides progress, not problems)."""
        print(f"warning: {message}", file=sys.stderr, flush=True)

    @contextmanager
    def bars(self) -> Iterator[None]:
        """While open, :meth:`task` draws live bars (when enabled)."""
        if not self.show_bars:
            yield
            return
        self._progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        with self._progress:
            yield
        self._progress = None

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A callback that advances a bar by ``n`` and removes it when full; a no-op without bars."""
        progress = self._progress
        if progress is None:
            return _ignore
        task_id = progress.add_task(description, total=total)
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            progress.advance(task_id, n)
            if done >= total:
                progress.remove_task(task_id)

        return advance

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        """Print a titled table (nothing when quiet)."""
        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KB, MB or GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
