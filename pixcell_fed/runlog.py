"""Run logs: each job writes a plain-text log file beside its outputs and logs to stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

LOGGER_NAME = "pixcell_fed"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def configure_stderr_logging(verbose: bool = False) -> None:
    """Log to stderr (results go to stdout). Called once by each CLI."""
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_pixcell_stderr", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._pixcell_stderr = True  # type: ignore[attr-defined]
        root.addHandler(handler)


@contextlib.contextmanager
def run_log(path: str | Path) -> Iterator[Path]:
    """Also append everything logged under ``pixcell_fed`` to ``path`` for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger(LOGGER_NAME)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
