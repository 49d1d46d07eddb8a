"""Atomic file writes and an exclusive lock on a folder: nothing half-written is ever read as whole.

Writers put bytes in a temporary file beside the target, fsync it, then ``os.replace`` it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pixcell_fed.errors import LockedError


@contextlib.contextmanager
def atomic_path(target: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries that a killed writer left in ``folder`` (call it only while holding the folder's lock).

    Returns how many were removed. They were never visible under their final names, so nothing is lost.
    """
    folder = Path(folder)
    removed = 0
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def write_bytes_atomic(target: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``target`` atomically and return the path."""
    with atomic_path(target, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | Path, text: str, *, mode: int | None = None) -> Path:
    return write_bytes_atomic(target, text.encode("utf-8"), mode=mode)


def write_json_atomic(target: str | Path, obj: Any) -> Path:
    return write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(target: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame as parquet, atomically."""
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(target)


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``folder``; a second holder gets :class:`LockedError`.

    The lock is an ``flock`` on ``folder/.lock``: the kernel releases it when the process dies, even by SIGKILL,
    so a killed run never leaves a stale lock behind.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / ".lock"
    fh = open(lock_file, "a+")  # noqa: SIM115  # the lock lives as long as this handle; closed below
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise LockedError(
            f"another {what} is already running on {folder}",
            hint="wait for it to finish (see 'site-agent status'), or use a different work folder",
        ) from exc
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield folder
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
