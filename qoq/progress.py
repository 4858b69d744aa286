"""How long steps tell the user what they are doing: silent for the Python API, rich for the CLI."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Reporter:
    """Silent reporter (the default of the Python API)."""

    def info(self, message: str) -> None:
        pass

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        yield

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items


class RichReporter(Reporter):
    """Progress bars and status lines on a rich console (stderr by default, so stdout stays clean)."""

    def __init__(self, console=None):
        from rich.console import Console
        self.console = console or Console(stderr=True)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        with self.console.status(message):
            yield

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        if not self.console.is_terminal:  # logs and CI: one plain line per step instead of a live bar
            yield from self._track_plain(items, description, total)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)

    def _track_plain(self, items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
        import time
        start = time.perf_counter()
        for i, item in enumerate(items, 1):
            yield item
            self.console.print(f"{description}: {i}/{total or '?'} ({time.perf_counter() - start:.1f} s)",
                               highlight=False)
