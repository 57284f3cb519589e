"""The one progress bar of the tools: tqdm on stderr, shown only where stderr is a terminal.

Long work (a calibration over thousands of rows, a load sweep) shows where it is; a pipe or a
log file gets no bar characters, so the report on stdout stays clean to parse.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Never, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(total: int, label: str, unit: str) -> tqdm[Never]:
    """A bar to `update(n)` by hand (for work that advances by more than one unit a step)."""
    return tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr, disable=not sys.stderr.isatty())


def with_progress(
    items: Iterable[T], total: int, label: str, unit: str, size: Callable[[T], int] | None = None
) -> Iterator[T]:
    """Yield the items, advancing a bar by `size(item)` (1 by default) after each."""
    with progress_bar(total, label, unit) as bar:
        for item in items:
            yield item
            bar.update(1 if size is None else size(item))
