"""Where runs, bundles and the audit trail live in a site's work folder: the one place that knows these names.

Layout (inside ``site.work_dir``)::

    audit_trail.jsonl            every synthesize, approve, reject and export, hash-chained
    audit_trail.jsonl.head       count and hash of the trail's last entry
    runs/<run_id>/               one synthesize run (the pipeline's own files: run.json, tiles, audit/...)
    runs/<run_id>/audit/         the run's audit: audit_summary.json (shareable), audit_summary.html, audit.html
    runs/<run_id>/bundle/        the run's bundle, once built
"""

from __future__ import annotations

from pathlib import Path

TRAIL_FILE = "audit_trail.jsonl"
RUNS_DIR = "runs"
BUNDLE_DIR = "bundle"
RUN_JSON = "run.json"
STATE_UNUSABLE = "unusable"  # shown instead of a bundle's state when it is not (or no longer) its run's
AUDIT_DIR = "audit"
AUDIT_SUMMARY = "audit_summary.json"  # the audit's shareable summary: becomes the bundle's audit.json
AUDIT_SUMMARY_HTML = "audit_summary.html"  # the audit's shareable page, bundled when present
AUDIT_REPORT = "audit.html"  # the on-site report (real tiles): never bundled
AUDIT_SUMMARY_PATH = f"{AUDIT_DIR}/{AUDIT_SUMMARY}"


def trail_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / TRAIL_FILE


def run_dir(work_dir: str | Path, run_id: str) -> Path:
    return Path(work_dir) / RUNS_DIR / run_id


def bundle_dir(work_dir: str | Path, run_id: str) -> Path:
    return run_dir(work_dir, run_id) / BUNDLE_DIR


def audit_dir(run: str | Path) -> Path:
    """The audit folder of the run folder ``run``."""
    return Path(run) / AUDIT_DIR


def work_dir_of_bundle(bundle: str | Path) -> Path | None:
    """The work folder holding ``bundle`` when it sits at ``<work>/runs/<run>/bundle``, else ``None``."""
    bundle = Path(bundle).resolve()
    if bundle.parent.parent.name == RUNS_DIR:
        return bundle.parent.parent.parent
    return None
