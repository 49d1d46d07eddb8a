"""Where runs, bundles and the audit trail live in a site's work folder, and what state each is in.

Layout (inside ``site.work_dir``)::

    audit_trail.jsonl            every synthesize, approve, reject and export, hash-chained
    audit_trail.jsonl.head       count and hash of the trail's last entry
    runs/<run_id>/               one synthesize run (the pipeline's own files: run.json, tiles, audit/...)
    runs/<run_id>/bundle/        the run's bundle, once built

A run's own state is read from ``runs/<run_id>/run.json`` (key ``state``) when the pipeline wrote one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pixcell_fed.errors import BundleError, TrailError

TRAIL_FILE = "audit_trail.jsonl"
RUNS_DIR = "runs"
BUNDLE_DIR = "bundle"
RUN_JSON = "run.json"


def trail_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / TRAIL_FILE


def run_dir(work_dir: str | Path, run_id: str) -> Path:
    return Path(work_dir) / RUNS_DIR / run_id


def bundle_dir(work_dir: str | Path, run_id: str) -> Path:
    return run_dir(work_dir, run_id) / BUNDLE_DIR


def work_dir_of_bundle(bundle: str | Path) -> Path | None:
    """The work folder holding ``bundle`` when it sits at ``<work>/runs/<run>/bundle``, else ``None``."""
    bundle = Path(bundle).resolve()
    if bundle.parent.parent.name == RUNS_DIR:
        return bundle.parent.parent.parent
    return None


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    run_state: str
    bundle: str | None
    bundle_state: str
    verdict: str | None
    tiles: int | None


@dataclass(frozen=True)
class SiteStatus:
    work_dir: str
    runs: list[RunStatus]
    trail_entries: int
    trail_head: str | None
    trail_ok: bool
    trail_problem: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def _run_state(folder: Path) -> str:
    path = folder / RUN_JSON
    if not path.is_file():
        return "unknown"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return "unreadable run.json"
    state = data.get("state") if isinstance(data, dict) else None
    return str(state) if state else "unknown"


def site_status(work_dir: str | Path) -> SiteStatus:
    """Runs, their bundles with states, and the audit trail's health."""
    from pixcell_fed.bundle.layout import read_bundle_json
    from pixcell_fed.bundle.trail import verify_trail

    work_dir = Path(work_dir)
    runs = []
    runs_root = work_dir / RUNS_DIR
    for folder in sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []:
        bdir = folder / BUNDLE_DIR
        bundle, bstate, verdict, tiles = None, "no bundle", None, None
        if bdir.is_dir():
            bundle = str(bdir)
            try:
                info = read_bundle_json(bdir)
                bstate, verdict, tiles = info["state"], info["verdict"], info["counts"]["tiles"]
            except BundleError as exc:
                bstate = f"damaged ({exc.message})"
        runs.append(RunStatus(run_id=folder.name, run_state=_run_state(folder), bundle=bundle, bundle_state=bstate,
                              verdict=verdict, tiles=tiles))
    trail = trail_path(work_dir)
    try:
        check = verify_trail(trail)
        entries, head, ok, problem = check.count, (check.head if check.count else None), True, None
    except TrailError as exc:
        entries, head, ok, problem = 0, None, False, exc.message
    return SiteStatus(work_dir=str(work_dir), runs=runs, trail_entries=entries, trail_head=head, trail_ok=ok,
                      trail_problem=problem)


def newest_approved_bundle(work_dir: str | Path) -> Path | None:
    """The newest ``runs/*/bundle`` in ``work_dir`` whose bundle.json is valid and approved, or None."""
    from pixcell_fed.bundle.layout import STATE_APPROVED, read_bundle_json

    found = []
    for info in Path(work_dir).glob(f"{RUNS_DIR}/*/{BUNDLE_DIR}/bundle.json"):
        try:
            if read_bundle_json(info.parent)["state"] == STATE_APPROVED:
                found.append((info.stat().st_mtime, info.parent))
        except (OSError, BundleError):
            continue
    return max(found)[1] if found else None


def resolve_trail(bundle: str | Path, config_path: str | Path | None = None) -> Path:
    """The audit trail a decision on ``bundle`` is recorded in: the config's work folder, or the bundle's own."""
    from pixcell_fed.errors import UsageError

    if config_path is not None:
        from pixcell_fed.config import load_site_config

        return trail_path(load_site_config(config_path).site.work_dir)
    work = work_dir_of_bundle(bundle)
    if work is None:
        raise UsageError(f"cannot tell which site work folder {bundle} belongs to",
                         hint="pass --config site.yaml so that the decision is recorded in the site's audit trail")
    return trail_path(work)
