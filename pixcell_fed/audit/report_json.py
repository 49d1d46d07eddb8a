"""``audit.json`` (on-site, complete) and ``audit_summary.json`` (shareable: no real tiles, names, paths or
embeddings), with a fail-closed check that the summary names no real file."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from pixcell_fed.atomic import write_json_atomic
from pixcell_fed.audit.copy_features import DESCRIPTOR_NAME
from pixcell_fed.audit.gate import THRESHOLD_PROVENANCE, TestResult
from pixcell_fed.audit.roles import DataRoles
from pixcell_fed.errors import AuditError

SCHEMA = "pixcell-fed/audit/1"
SUMMARY_SCHEMA = "pixcell-fed/audit-summary/1"


def _audit_identity() -> dict[str, Any]:
    from pixcell_fed import __version__

    return {"package": "pixcell-fed", "version": __version__, "copy_descriptor": DESCRIPTOR_NAME,
            "pixel_confirmation": "band-passed NCC, max over D4 x shifts x zooms", "weights": "none (weight-free)"}


def _finite(obj: Any) -> Any:
    """NaN and infinities (statistics of empty sets) become null, so that the files are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build_report(*, cfg, verdict: str, roles: DataRoles, kept: Sequence[Path], rounds: list[dict],
                 tests: list[TestResult], tiles: list[dict], figures: dict, fidelity: dict, closest: list[dict],
                 findings: list, identities: dict, null: dict) -> dict[str, Any]:
    """Every number of the audit, for the on-site record and the HTML report."""
    from pixcell_fed.config import to_plain

    thresholds = to_plain(cfg)
    return _finite({
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "verdict": verdict,
        "sizes": {**roles.sizes(), "S_kept": len(kept), "mapping": roles.has_mapping},
        "config": thresholds,
        "provenance": {k: v for k, v in THRESHOLD_PROVENANCE.items() if k in thresholds},
        "identities": {"audit": _audit_identity(), **identities},
        "rounds": rounds,
        "tests": [t.to_dict() for t in tests],
        "null": null,
        "figures": figures,
        "fidelity": fidelity,
        "closest_pairs": closest,
        "identifier_findings": [f.to_dict() for f in findings],
        "tiles": tiles,
        "kept_sha256": sorted(t["sha256"] for t in tiles if t["kept"]),
    })


def write_report(path: Path, report: dict[str, Any]) -> Path:
    return write_json_atomic(path, report)


def _scrub_test(test: dict[str, Any]) -> dict[str, Any]:
    return {k: test[k] for k in ("name", "title", "status", "statistic", "thresholds", "provenance", "sentence",
                                 "null", "gates")}


def build_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The shareable twin: statistics, verdicts, thresholds with provenance, identities, and per audited synthetic
    file only its sha256, flags and nearest similarity. Allow-listed field by field."""
    findings_by_kind: dict[str, int] = {}
    for f in report["identifier_findings"]:
        findings_by_kind[f["kind"]] = findings_by_kind.get(f["kind"], 0) + 1
    return {
        "schema": SUMMARY_SCHEMA,
        "created": report["created"],
        "verdict": report["verdict"],
        "sizes": report["sizes"],
        "config": report["config"],
        "provenance": report["provenance"],
        "identities": report["identities"],
        "rounds": report["rounds"],
        "tests": [_scrub_test(t) for t in report["tests"]],
        "null": report["null"],
        "figures": report["figures"],
        "fidelity": report["fidelity"],
        "identifier_findings_by_kind": findings_by_kind,
        "tiles": [{"sha256": t["sha256"], "kept": t["kept"], "flagged": t["flagged"], "reasons": t["reasons"],
                   "nearest_similarity": t["nearest_similarity"]} for t in report["tiles"]],
        "kept_sha256": report["kept_sha256"],
    }


def write_summary(path: Path, summary: dict[str, Any], roles: DataRoles) -> Path:
    """Write the summary after checking that no file name or folder of any role appears in it (fail closed)."""
    text = json.dumps(summary, sort_keys=True, default=str)
    folded = text.casefold()
    needles = set()
    for p in (*roles.synthetic, *roles.reference, *roles.holdout):
        needles.add(p.name)
        needles.add(str(p.parent.resolve()))
    leaks = sorted(n for n in needles if len(n) >= 5 and n.casefold() in folded)
    if leaks:
        raise AuditError(f"the shareable audit summary would contain {len(leaks)} file name(s) or folder(s), e.g. "
                         f"{leaks[0]!r}; it was not written",
                         hint="identities passed to run_audit must not contain paths or real file names")
    return write_json_atomic(path, summary)
