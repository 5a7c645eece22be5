"""Progress bars (rich) that stay quiet when output is not a terminal or EDGEBRAIN_QUIET=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .errors import EdgebrainError

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("EDGEBRAIN_QUIET", "") != "1"


def track(items: Iterable[T], description: str = "working", total: int | None = None) -> Iterator[T]:
    if not enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    if not console.is_terminal:  # a CI log: a plain line every 30 s instead of a live bar
        yield from _beating(items, description, total)
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=not console.is_terminal) as p:
        task = p.add_task(description, total=total)
        for it in items:
            yield it
            p.advance(task)


class BudgetExpired(EdgebrainError):
    """The time budget ran out before a step (raised between steps, never half-way through a write)."""


class Deadline:
    """A wall-clock budget for a whole command (``--time-budget SECONDS``; None: no limit).

    Long steps ask :meth:`expired` / :meth:`check` between units of work they can stop after
    (an int8 setting tried, an accuracy-control evaluation), so an expired budget stops the
    work cleanly and the best result verified so far is kept."""

    def __init__(self, seconds: float | None) -> None:
        import time

        if seconds is not None and not seconds > 0:
            raise ValueError(f"--time-budget must be a positive number of seconds, got {seconds}")
        self.seconds = seconds
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        import time

        return time.monotonic() - self._t0

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self, step: str) -> None:
        if self.expired():
            raise BudgetExpired(f"time budget of {self.seconds:g} s spent ({self.elapsed():.0f} s elapsed) before "
                                f"{step}")


class Heartbeat:
    """'still working' lines on stderr for a step with no natural progress bar: the first unit done,
    then at most one line every ``every`` seconds, with the count of units done and the time spent (quiet with EDGEBRAIN_QUIET=1)."""

    def __init__(self, step: str, every: float = 30.0, total: int | None = None, at_once: bool = True) -> None:
        import time

        self.step, self.every, self.total = step, every, total
        self.done = 0
        self._t0 = time.monotonic()
        # the first unit is reported at once, unless only steps that last are to be reported
        self._last = float("-inf") if at_once else self._t0

    def tick(self, n: int = 1) -> None:
        import time

        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every and enabled():
            self._last = now
            of = f"/{self.total}" if self.total else ""
            print(f"{self.step}: {self.done}{of} done, {now - self._t0:.0f} s", file=sys.stderr, flush=True)


def _beating(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    beat = Heartbeat(description, total=total, at_once=False)
    for it in items:
        yield it
        beat.tick()
