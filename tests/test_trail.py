"""The site audit trail: hash-chained JSON lines; edits, deletions, reorders and truncation are detected."""

from __future__ import annotations

import json

import pytest

from pixcell_fed.bundle.trail import GENESIS, append_event, head_path, verify_trail
from pixcell_fed.errors import TrailError


def _trail(tmp_path, n=4):
    path = tmp_path / "audit_trail.jsonl"
    for i in range(n):
        append_event(path, "approve" if i % 2 else "synthesize", run_id=f"run{i}", tiles=i)
    return path


def test_entries_chain_and_verify(tmp_path):
    path = _trail(tmp_path)
    check = verify_trail(path)
    assert check.count == 4
    assert check.entries[0]["prev"] == GENESIS and check.entries[0]["seq"] == 0
    assert [e["run_id"] for e in check.entries] == ["run0", "run1", "run2", "run3"]
    assert check.entries[1]["prev"] != check.entries[2]["prev"]
    assert verify_trail(tmp_path / "empty.jsonl").count == 0


def test_edit_detected(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"tiles":1', b'"tiles":9')
    path.write_bytes(b"".join(lines))
    with pytest.raises(TrailError, match="line 3 does not chain"):
        verify_trail(path)


def test_edit_of_last_entry_detected_by_head(tmp_path):
    path = _trail(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"tiles":3', b'"tiles":7'))
    with pytest.raises(TrailError, match="head file"):
        verify_trail(path)


def test_non_canonical_edit_detected(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[2])
    lines[2] = (json.dumps(entry, indent=1).replace("\n", "") + "\n").encode()
    path.write_bytes(b"".join(lines))
    with pytest.raises(TrailError, match="line 3 was edited"):
        verify_trail(path)


def test_deletion_and_reorder_detected(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    with pytest.raises(TrailError, match="deleted or reordered"):
        verify_trail(path)
    path.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    with pytest.raises(TrailError, match="deleted or reordered"):
        verify_trail(path)


def test_truncation_detected_and_append_refused(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(TrailError, match="cut off"):
        verify_trail(path)
    with pytest.raises(TrailError):
        append_event(path, "approve", run_id="x")  # nothing is appended to a broken trail


def test_half_written_line_detected(tmp_path):
    path = _trail(tmp_path)
    path.write_bytes(path.read_bytes() + b'{"seq":4,')
    with pytest.raises(TrailError, match="incomplete"):
        verify_trail(path)


def test_interrupted_head_update_is_tolerated(tmp_path):
    path = _trail(tmp_path, 3)
    head = head_path(path).read_text()
    append_event(path, "reject", run_id="run3", reason="blurry")
    head_path(path).write_text(head)  # as if killed between the append and the head update
    assert verify_trail(path).count == 4
    append_event(path, "export", run_id="run3")
    assert verify_trail(path).count == 5


def test_reserved_fields_refused(tmp_path):
    from pixcell_fed.errors import UsageError

    with pytest.raises(UsageError, match="reserved"):
        append_event(tmp_path / "t.jsonl", "approve", prev="x")
