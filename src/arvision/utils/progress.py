"""Progress of the long phases outside training: evaluation, encoding, sampling, feature extraction.

    with phase("encoding the token cache", total=len(dataset)) as bar:
        for images, _ in loader:
            ...
            bar.advance(len(images))

    for chunk in track(images.split(batch_size), "reference statistics", total=len(images)):
        ...

On a terminal (`sys.stderr.isatty()`) a phase is a live bar with its name, done/total, rate and time left; a phase
that starts while another is on screen adds its own row. Off a terminal (CI, SLURM logs, pytest) nothing is drawn:
one log line when the phase starts and one when it ends. Only rank 0 of a multi-process run shows or logs anything.
Progress never touches a random stream or a tensor, so what a phase computes is the same either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

log = logging.getLogger("arvision")

T = TypeVar("T")

_screen: Progress | None = None  # the live display on screen; phases started under it add a row to it


def world_rank() -> int:
    """This process's rank in a multi-process run (0 when there is a single process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def note(message: str, *args: object, logger: logging.Logger = log) -> None:
    """A log line from rank 0 only (the other ranks do the same work and would repeat it)."""
    if world_rank() == 0:
        logger.info(message, *args)


class _Rate(ProgressColumn):
    """Items per second, in the phase's unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
        return Text(f"{speed:.1f} {task.fields['unit']}/s" if speed else "", style="progress.data.speed")


class Phase:
    """What a running phase offers its loop: `advance(n)` after each n items."""

    def __init__(self, screen: Progress | None = None, task: int = 0) -> None:
        self.done = 0
        self._screen = screen
        self._task = task

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._screen is not None:
            self._screen.advance(self._task, n)


@contextmanager
def phase(name: str, total: int | None, *, unit: str = "img", stream: TextIO | None = None,
          logger: logging.Logger = log) -> Iterator[Phase]:
    """A long phase of `total` items (None: unknown) shown on `stream` (default: stderr) when it is a terminal,
    else logged through `logger` as one line at its start and one at its end."""
    global _screen
    stream = sys.stderr if stream is None else stream
    if world_rank() != 0:
        yield Phase()
        return
    if not stream.isatty():
        started = time.perf_counter()
        logger.info("%s: %s %s", name, "?" if total is None else total, unit)
        bar = Phase()
        yield bar
        seconds = time.perf_counter() - started
        logger.info("%s: %d %s in %.1f s (%.1f %s/s)", name, bar.done, unit, seconds, bar.done / max(seconds, 1e-9),
                    unit)
        return
    owner = _screen is None
    if owner:
        _screen = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                           console=Console(file=stream, force_terminal=True), refresh_per_second=2)
        _screen.start()
    screen = _screen
    task = screen.add_task(name, total=total, unit=unit)
    try:
        yield Phase(screen, task)
    finally:
        screen.stop_task(task)  # freezes its rate and elapsed time
        if owner:
            screen.stop()
            _screen = None


def track(items: Iterable[T], name: str, *, total: int | None, size: Callable[[T], int] = len, unit: str = "img",
          stream: TextIO | None = None) -> Iterator[T]:
    """`items` (batches) as one `phase`, advanced by `size(batch)` once the loop body has handled each."""
    with phase(name, total, unit=unit, stream=stream) as bar:
        for item in items:
            yield item
            bar.advance(size(item))


__all__ = ["Phase", "note", "phase", "track", "world_rank"]
