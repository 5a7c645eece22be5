"""Progress bars (rich) that stay quiet when output is not a terminal or EDGEBRAIN_QUIET=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

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
