"""The site audit trail: an append-only JSON-lines log whose entries are chained by hash.

Each line is the canonical JSON of one entry: ``seq`` (0, 1, 2...), ``time`` (UTC), ``event``, its fields, and
``prev``, the sha256 of the previous line's bytes (64 zeros for the first). Editing, deleting or reordering an
entry breaks the chain at that point. A sidecar ``<trail>.head`` holds the count and the hash of the last line,
so that cutting entries off the end is detected too. Whoever can rewrite the whole file and its head can still
forge it: write the head hash shown by ``site-agent status`` down somewhere else to anchor it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcell_fed.atomic import write_text_atomic
from pixcell_fed.errors import TrailError, UsageError

GENESIS = "0" * 64
RESERVED = frozenset({"seq", "time", "event", "prev"})
_EVENT_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,39}$")


@dataclass(frozen=True)
class TrailCheck:
    """Result of :func:`verify_trail`: the entries, their count and the hash of the last line."""

    entries: list[dict]
    head: str

    @property
    def count(self) -> int:
        return len(self.entries)


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def head_path(trail_path: Path) -> Path:
    return trail_path.with_name(trail_path.name + ".head")


def _canonical(entry: dict) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str
    ).encode("ascii")


@contextlib.contextmanager
def _locked(trail_path: Path) -> Iterator[None]:
    import fcntl

    trail_path.parent.mkdir(parents=True, exist_ok=True)
    with open(trail_path.with_name(trail_path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # appends are short: wait for the other writer
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_lines(trail_path: Path, data: bytes) -> TrailCheck:
    if data and not data.endswith(b"\n"):
        raise TrailError(
            f"{trail_path}: the last entry is incomplete (no final newline)",
            hint="a write was interrupted; keep a copy of the file and tell the site's security officer",
        )
    entries: list[dict] = []
    prev = GENESIS
    for number, line in enumerate(data.splitlines(), start=1):
        where = f"{trail_path}: line {number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise TrailError(
                f"{where} is not valid JSON: the trail was edited", hint="restore the trail from a backup"
            ) from exc
        if not isinstance(entry, dict) or not set(entry) >= RESERVED:
            raise TrailError(
                f"{where} is not a trail entry: the trail was edited", hint="restore the trail from a backup"
            )
        if _canonical(entry) != line:
            raise TrailError(
                f"{where} was edited (not the bytes this entry was written as)", hint="restore the trail from a backup"
            )
        if entry["seq"] != number - 1:
            raise TrailError(
                f"{where} has sequence number {entry['seq']}, expected {number - 1}: entries were deleted or reordered",
                hint="restore the trail from a backup",
            )
        if entry["prev"] != prev:
            raise TrailError(
                f"{where} does not chain to the previous entry: an entry before it was edited, deleted or reordered",
                hint="restore the trail from a backup",
            )
        entries.append(entry)
        prev = _line_hash(line)
    return TrailCheck(entries=entries, head=prev)


def _check_head(trail_path: Path, check: TrailCheck) -> None:
    head_file = head_path(trail_path)
    if not head_file.exists():
        if check.entries:
            raise TrailError(
                f"{head_file} is missing although the trail has {check.count} entries",
                hint="restore the trail and its head file from a backup",
            )
        return
    try:
        head = json.loads(head_file.read_text(encoding="utf-8"))
        count, digest = int(head["count"]), str(head["head"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TrailError(f"{head_file} is unreadable", hint="restore it from a backup") from exc
    if count == check.count and digest == check.head:
        return
    if count == check.count - 1 and digest == check.entries[-1]["prev"]:
        return  # interrupted between appending the line and updating the head: the chain itself is whole
    raise TrailError(
        f"{trail_path}: {check.count} entries end in {check.head[:16]}..., but the head file records "
        f"{count} entries ending in {digest[:16]}...: entries were cut off or the file was replaced",
        hint="restore the trail from a backup",
    )


def verify_trail(trail_path: str | Path) -> TrailCheck:
    """Check the whole chain and the head file; :class:`TrailError` names the first broken line."""
    trail_path = Path(trail_path)
    data = trail_path.read_bytes() if trail_path.exists() else b""
    check = _check_lines(trail_path, data)
    _check_head(trail_path, check)
    return check


def append_event(trail_path: str | Path, event: str, **fields: Any) -> dict:
    """Append one entry (after checking the chain so far) and return it."""
    trail_path = Path(trail_path)
    if not _EVENT_RE.match(event):
        raise UsageError(f"invalid trail event name {event!r}", hint="use lowercase words such as 'approve'")
    clash = RESERVED & set(fields)
    if clash:
        raise UsageError(f"trail fields {', '.join(sorted(clash))} are reserved", hint="rename them")
    with _locked(trail_path):
        check = verify_trail(trail_path)
        entry = {
            "seq": check.count,
            "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "event": event,
            "prev": check.head,
            **fields,
        }
        line = _canonical(entry)
        if b"\n" in line:
            raise UsageError("trail fields may not contain raw newlines", hint="this is a bug in pixcell-fed")
        fd = os.open(trail_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        write_text_atomic(
            head_path(trail_path), json.dumps({"count": check.count + 1, "head": _line_hash(line)}) + "\n"
        )
    return json.loads(line)
