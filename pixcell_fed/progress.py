"""The one progress helper of the package: tqdm bars on stderr, switched off globally by one call or env var.

``PIXCELL_FED_NO_PROGRESS=1`` (or ``--no-progress`` on the CLIs) turns every bar off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar, overload

T = TypeVar("T")

_ENV = "PIXCELL_FED_NO_PROGRESS"


def set_progress_enabled(enabled: bool) -> None:
    """Turn progress bars on or off for this process and the worker processes it starts."""
    if enabled:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = "1"


def progress_enabled() -> bool:
    return os.environ.get(_ENV, "") not in ("1", "true", "yes")


class ProgressBar(Protocol):
    """What ``progress(None, ...)`` returns: a bar advanced by hand."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


@overload
def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]: ...


@overload
def progress(iterable: None = None, *, total: int | None = None, desc: str = "", unit: str = "it") -> ProgressBar: ...


def progress(
    iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T] | ProgressBar:
    """Wrap ``iterable`` in a progress bar on stderr (or return a bar to ``update()`` when it is None)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not progress_enabled(),
        dynamic_ncols=True,
        leave=False,
    )
