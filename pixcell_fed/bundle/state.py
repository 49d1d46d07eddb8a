"""What state each run and bundle of a site's work folder is in (the layout: :mod:`pixcell_fed.bundle.work_layout`).

A run's own state is read from ``runs/<run_id>/run.json`` (keys ``state`` and ``verdict``) when the pipeline
wrote one. A bundle counts only while it is its run's (:mod:`pixcell_fed.bundle.run_binding`): status shows
any other as unusable, and it is never served.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pixcell_fed.bundle.work_layout import (  # noqa: F401  (re-exported: the work folder's names)
    AUDIT_DIR,
    AUDIT_REPORT,
    AUDIT_SUMMARY,
    AUDIT_SUMMARY_HTML,
    AUDIT_SUMMARY_PATH,
    BUNDLE_DIR,
    RUN_JSON,
    RUNS_DIR,
    STATE_UNUSABLE,
    TRAIL_FILE,
    audit_dir,
    bundle_dir,
    run_dir,
    trail_path,
    work_dir_of_bundle,
)
from pixcell_fed.errors import BundleError, TrailError


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    run_state: str
    bundle: str | None
    bundle_state: str
    verdict: str | None
    tiles: int | None
    problem: str | None = None  # why the bundle may not ship although its state says otherwise


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
    from pixcell_fed.bundle.run_binding import binding_problem
    from pixcell_fed.bundle.trail import verify_trail

    work_dir = Path(work_dir)
    runs = []
    runs_root = work_dir / RUNS_DIR
    for folder in sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []:
        bdir = folder / BUNDLE_DIR
        bundle, bstate, verdict, tiles, problem = None, "no bundle", None, None, None
        if bdir.is_dir():
            bundle = str(bdir)
            try:
                info = read_bundle_json(bdir)
                bstate, verdict, tiles = info["state"], info["verdict"], info["counts"]["tiles"]
                problem = binding_problem(bdir, folder, info)
            except BundleError as exc:
                bstate = f"damaged ({exc.message})"
            if problem:  # never shown as approved (or awaiting) beside a run that refused it
                bstate = STATE_UNUSABLE
        runs.append(
            RunStatus(
                run_id=folder.name,
                run_state=_run_state(folder),
                bundle=bundle,
                bundle_state=bstate,
                verdict=verdict,
                tiles=tiles,
                problem=problem,
            )
        )
    trail = trail_path(work_dir)
    try:
        check = verify_trail(trail)
        entries, head, ok, trail_problem = check.count, (check.head if check.count else None), True, None
    except TrailError as exc:
        entries, head, ok, trail_problem = 0, None, False, exc.message
    return SiteStatus(
        work_dir=str(work_dir),
        runs=runs,
        trail_entries=entries,
        trail_head=head,
        trail_ok=ok,
        trail_problem=trail_problem,
    )


def newest_approved_bundle(work_dir: str | Path) -> Path | None:
    """The newest ``runs/*/bundle`` in ``work_dir`` that is valid, approved and its run's, or None."""
    from pixcell_fed.bundle.layout import BUNDLE_JSON, STATE_APPROVED, read_bundle_json
    from pixcell_fed.bundle.run_binding import binding_problem

    found = []
    for path in Path(work_dir).glob(f"{RUNS_DIR}/*/{BUNDLE_DIR}/{BUNDLE_JSON}"):
        bundle = path.parent
        try:
            info = read_bundle_json(bundle)
            if info["state"] == STATE_APPROVED and binding_problem(bundle, bundle.parent, info) is None:
                found.append((path.stat().st_mtime, bundle))
        except (OSError, BundleError):
            continue
    return max(found)[1] if found else None
