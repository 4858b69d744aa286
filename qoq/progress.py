"""How long steps tell the user what they are doing: silent for the Python API, rich for the CLI.

On a terminal, every step is a live rich line: a bar with ETA when its size is known, a spinner with the
elapsed time when not. Elsewhere (logs, CI, pipes) a step that runs over ~2 s prints one plain line then,
one every $QOQ_PROGRESS_INTERVAL seconds (default 10) and one when it ends: never a line per update,
never minutes of silence.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
INTERVAL_ENV = "QOQ_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


class Task:
    """Handle of a running step: `advance` it as work gets done (no-op on the silent reporter)."""

    def __init__(self, total: float | None = None):
        self.total = total
        self.completed = 0.0

    def advance(self, amount: float = 1) -> None:
        self.completed += amount


class Reporter:
    """Silent reporter (the default of the Python API)."""

    def info(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "") -> Iterator[Task]:
        yield Task(total)

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        with self.task(message):
            yield

    def track(self, items: Iterable[T], description: str, total: int | None = None, unit: str = "") -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        with self.task(description, total, unit) as task:
            for item in items:
                yield item
                task.advance()


def progress_interval() -> float:
    """Seconds between plain progress lines ($QOQ_PROGRESS_INTERVAL, default 10)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        value = DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


class RichReporter(Reporter):
    """Progress on a rich console (stderr by default, so stdout stays clean)."""

    def __init__(self, console=None, interval: float | None = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.interval = interval if interval is not None else progress_interval()
        self._live = None  # one rich Progress shared by nested steps (rich allows one live display)
        self._active = 0
        self._lock = threading.Lock()

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "") -> Iterator[Task]:
        if self.console.is_terminal:
            with self._live_task(description, total, unit) as task:
                yield task
        else:
            with _PlainTask(self.console, description, total, unit, self.interval) as task:
                yield task

    @contextmanager
    def _live_task(self, description: str, total: float | None, unit: str) -> Iterator[Task]:
        progress = self._start_live()
        task_id = progress.add_task(description, total=total, count="", eta="")
        task = _LiveTask(progress, task_id, total, unit)
        started = time.perf_counter()
        try:
            yield task
            progress.update(task_id, total=total or task.completed or 1, completed=total or task.completed or 1)
        except BaseException:
            progress.remove_task(task_id)  # the error says what happened
            raise
        else:
            if time.perf_counter() - started < _PlainTask.GRACE:
                progress.remove_task(task_id)  # quick steps leave no line behind
        finally:
            self._stop_live()

    def _start_live(self):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        with self._lock:
            if self._live is None:
                self._live = Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
                                      BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                                      TextColumn("{task.fields[eta]}"), console=self.console, transient=False)
                self._live.start()
            self._active += 1
            return self._live

    def _stop_live(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._live is not None:
                self._live.stop()
                self._live = None


class _LiveTask(Task):
    def __init__(self, progress, task_id, total, unit: str):
        super().__init__(total)
        self._progress, self._id, self._unit = progress, task_id, unit
        self._show()

    def advance(self, amount: float = 1) -> None:
        super().advance(amount)
        self._progress.advance(self._id, amount)
        self._show()

    def _show(self) -> None:
        if not self.total:
            return
        state = next(t for t in self._progress.tasks if t.id == self._id)
        remaining = state.time_remaining if self.completed and self.completed < self.total else None
        self._progress.update(self._id, count=f"{_count(self.completed, '')}/{_count(self.total, self._unit)}",
                              eta="" if remaining is None else f"eta {format_duration(remaining)}")


class _PlainTask(Task):
    """Lines from a background thread: the first once the step has run for a moment, then one per interval,
    and the last when it ends. A step that ends sooner prints nothing (a bad input stays a one-line error)."""

    GRACE = 2.0  # seconds before a step is worth a line

    def __init__(self, console, description: str, total: float | None, unit: str, interval: float):
        super().__init__(total)
        self.console, self.description, self.unit, self.interval = console, description, unit, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="qoq-progress", daemon=True)
        self._start = time.perf_counter()
        self._said = False

    def __enter__(self) -> "_PlainTask":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if not self._said:
            return
        elapsed = format_duration(time.perf_counter() - self._start)
        if exc_type is None:
            done = f"{_count(self.completed, self.unit)}, " if self.total else ""
            self._say(f"{self.description}: done ({done}{elapsed})")
        else:
            self._say(f"{self.description}: stopped after {elapsed}")

    def _tick(self) -> None:
        if self._stop.wait(min(self.GRACE, self.interval)):
            return
        count = f" ({_count(self.completed, '')}/{_count(self.total, self.unit)})" if self.total else ""
        self._say(f"{self.description}…{count}")
        while not self._stop.wait(self.interval):
            self._say(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        if not self.total:
            done = f"{_count(self.completed, self.unit)} so far, " if self.completed else ""
            return f"{self.description}: {done}{format_duration(elapsed)}"
        done = self.completed / self.total
        eta = f", eta {format_duration(elapsed / done * (1 - done))}" if done > 0 else ""
        return (f"{self.description}: {_count(self.completed, '')}/{_count(self.total, self.unit)} "
                f"({done:.0%}), {format_duration(elapsed)}{eta}")

    def _say(self, text: str) -> None:
        self._said = True
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)


def _count(n: float, unit: str) -> str:
    text = f"{int(n):,}" if float(n).is_integer() else f"{n:,.1f}"
    return f"{text} {unit}" if unit else text


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """No transformers / datasets / hub bars, load reports or warnings unless `verbose` (ours stay)."""
    if verbose:
        yield
        return
    restore = []
    try:
        from transformers.utils import logging as hf_logging

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        restore.append(lambda: (hf_logging.set_verbosity(level),
                                hf_logging.enable_progress_bar() if bars else None))
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        hub_bars = not are_progress_bars_disabled()
        disable_progress_bars()
        restore.append(lambda: enable_progress_bars() if hub_bars else None)
    except ImportError:
        pass
    datasets = sys.modules.get("datasets")  # importing it costs seconds: when not loaded yet, its env switch
    if datasets is None and "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        restore.append(lambda: os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None))
    elif datasets is not None:
        try:
            ds_bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bar()
            restore.append(lambda: datasets.enable_progress_bar() if ds_bars else None)
        except AttributeError:
            pass
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category,
                                        module=r"(transformers|datasets|huggingface_hub|torch)")
            yield
    finally:
        for undo in reversed(restore):
            undo()
