"""Progress bars for long work.

Algorithms report progress through `track` or `task`; they do not know whether anything is shown. The CLI
opens a `display()` around a build, which renders bars with rich on a terminal; everywhere else (tests,
--quiet, library use) the calls cost nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_bars = None  # rich.progress.Progress while a display is open


@contextmanager
def display(enabled: bool = True) -> Iterator[None]:
    """Show progress bars for the duration of the block (no-op when not enabled)."""
    global _bars
    if not enabled or _bars is not None:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    _bars = bars
    try:
        with bars:
            yield
    finally:
        _bars = None


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A bar for one step; yields `advance(n)`."""
    if _bars is None:
        yield lambda n=1: None
        return
    task_id = _bars.add_task(description, total=total)
    try:
        yield lambda n=1: _bars.advance(task_id, n)
    finally:
        _bars.remove_task(task_id)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as advance:
        for item in items:
            yield item
            advance(1)
