"""The bundle is the run's: a bundle may leave a site only as what its own run audited and did not refuse.

A run folder ``<work>/runs/<run_id>/`` records what its audit decided: ``run.json`` (the pipeline's ``verdict``)
and ``audit/audit_summary.json`` (the shareable audit: the verdict and the sha256 of every kept tile). A bundle of
that run must carry exactly that audit (the bytes the builder writes for it) and exactly its kept tiles, hash for
hash, and neither record may say FAIL. The builder takes the audit from nowhere else; the officer's approval
checks all of it first; ``site-agent status`` and the site's serving check it again.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.work_layout import AUDIT_SUMMARY, AUDIT_SUMMARY_PATH, RUN_JSON, audit_dir
from pixcell_fed.errors import BundleError


def run_refusal(run: Path) -> str | None:
    """Why nothing of run folder ``run`` may leave the site (a recorded FAIL), or ``None``."""
    state_file = run / RUN_JSON
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            return f"run {run.name}: its {RUN_JSON} is unreadable, so its verdict is unknown"
        if isinstance(state, dict) and state.get("verdict") == "FAIL":
            return f"run {run.name} was refused by its audit (verdict FAIL in {RUN_JSON})"
    summary = audit_dir(run) / AUDIT_SUMMARY
    if summary.is_file():
        try:
            verdict = json.loads(summary.read_text(encoding="utf-8")).get("verdict")
        except (UnicodeDecodeError, ValueError, AttributeError):
            return f"run {run.name}: its audit summary is unreadable, so its verdict is unknown"
        if verdict == "FAIL":
            return f"run {run.name} was refused by its audit (verdict FAIL in {AUDIT_SUMMARY_PATH})"
    return None


def read_run_audit(run: Path) -> dict:
    """The run's own shareable audit summary, validated; :class:`BundleError` when missing or not shareable."""
    from pixcell_fed.bundle.shareable import validate_shareable_audit

    path = audit_dir(run) / AUDIT_SUMMARY
    if not path.is_file():
        raise BundleError(
            f"run {run.name} has no audit summary ({AUDIT_SUMMARY_PATH})",
            hint="a bundle is built only from a run whose audit finished; run synthesize",
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(
            f"run {run.name}: {AUDIT_SUMMARY_PATH} is not valid JSON ({exc})",
            hint="run the audit again (site-agent synthesize continues the run)",
        ) from exc
    return validate_shareable_audit(summary, source=f"run {run.name}: {AUDIT_SUMMARY_PATH}")


def tile_set_problem(hashes: list[str], kept: list[str]) -> str | None:
    """How tile hashes differ from an audit's kept set (as multisets), or ``None`` when they are exactly it."""
    ours, audited = Counter(hashes), Counter(kept)
    if ours == audited:
        return None
    extra, missing = sum((ours - audited).values()), sum((audited - ours).values())
    return f"{extra} tile(s) the audit did not keep, {missing} kept tile(s) missing"


def binding_problem(bundle_dir: Path, run: Path, info: dict | None = None) -> str | None:
    """Why ``bundle_dir`` is not (or no longer) the bundle of run folder ``run``, or ``None`` when it is."""
    from pixcell_fed.bundle.manifest import read_manifest
    from pixcell_fed.bundle.shareable import HASHES_KEY, audit_json_text

    info = info if info is not None else L.read_bundle_json(bundle_dir)
    if info["run_id"] != run.name:
        return f"it is the bundle of run {info['run_id']}, not of run {run.name}"
    refusal = run_refusal(run)
    if refusal:
        return refusal
    try:
        audit = read_run_audit(run)
        carried = (bundle_dir / L.AUDIT).read_bytes()
        frame = read_manifest(bundle_dir / L.MANIFEST)
    except (OSError, BundleError) as exc:
        return getattr(exc, "message", str(exc))
    if carried != audit_json_text(audit).encode("ascii"):
        return f"its {L.AUDIT} is not the audit of run {run.name} ({AUDIT_SUMMARY_PATH})"
    problem = tile_set_problem(list(frame["sha256"]), list(audit[HASHES_KEY]))
    return f"its tiles are not exactly the audit's kept set: {problem}" if problem else None
