"""``audit.json`` (on-site, complete) and ``audit_summary.json`` (shareable: no real tiles, names, paths or
embeddings), with a fail-closed check that the summary names no real file."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.atomic import write_json_atomic
from pixcell_fed.audit import region_copy as rc
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.context import AuditContext, describe
from pixcell_fed.audit.copy_features import DESCRIPTOR_NAME
from pixcell_fed.audit.fidelity_report import summary_section as fidelity_summary_section
from pixcell_fed.audit.gate import THRESHOLD_PROVENANCE
from pixcell_fed.audit.roles import DataRoles
from pixcell_fed.audit.rounds import RoundsOutcome
from pixcell_fed.errors import AuditError
from pixcell_fed.hashing import sha256_file

SCHEMA = "pixcell-fed/audit/1"
SUMMARY_SCHEMA = "pixcell-fed/audit-summary/1"


def _audit_identity() -> dict[str, Any]:
    from pixcell_fed import __version__

    return {
        "package": "pixcell-fed",
        "version": __version__,
        "copy_descriptor": DESCRIPTOR_NAME,
        "pixel_confirmation": "band-passed NCC, max over D4 x shifts x zooms",
        "weights": "none (weight-free)",
    }


def _finite(obj: Any) -> Any:
    """NaN and infinities (statistics of empty sets) become null, so that the files are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


HIST_BINS = np.linspace(0.0, 1.0, 41)


def _tile_records(ctx: AuditContext, outcome: RoundsOutcome) -> list[dict[str, Any]]:
    """One on-site record per synthetic tile: hash, kept or dropped and why, nearest real tile, scores."""
    s, kept = ctx.s_tile, set(outcome.active.tolist())
    paired_sim = np.full(len(s.nn_sim), np.nan, np.float32)
    paired_pixel = np.full(len(s.nn_sim), np.nan, np.float32)
    if ctx.paired is not None:
        paired_sim[ctx.paired.rows], paired_pixel[ctx.paired.rows] = ctx.paired.sims, ctx.paired.pixel
    records = []
    for i, p in enumerate(ctx.roles.synthetic):
        records.append(
            {
                "file": str(p),
                "sha256": sha256_file(p),
                "kept": i in kept,
                "flagged": bool(ctx.reasons[i]),
                "reasons": list(ctx.reasons[i]),
                "dropped_in_round": outcome.dropped_in.get(i),
                "nearest_similarity": float(s.nn_sim[i]),
                "nearest_real": str(ctx.roles.reference[int(s.top.idx[i, 0])]),
                "pixel_score": _num(s.pixel[i]),
                "pixel_match": None if s.pixel_match[i] < 0 else str(ctx.roles.reference[int(s.pixel_match[i])]),
                "nn_ratio": float(s.ratio[i]),
                "paired_similarity": _num(paired_sim[i]),
                "paired_pixel_score": _num(paired_pixel[i]),
                "identifier_findings": ctx.finding_rows.get(i, []),
                "region_copy": rc.evidence(s.region, i, ctx.roles.reference),  # on-site only: never in the summary
            }
        )
    return records


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _figures(ctx: AuditContext, outcome: RoundsOutcome) -> dict[str, Any]:
    s_nn, h_nn = ctx.s_tile.nn_sim[outcome.active], ctx.h_tile.nn_sim
    roc = next((t.figure["roc"] for t in outcome.tests if t.figure and "roc" in t.figure), None)
    return {
        "hist_bins": [float(b) for b in HIST_BINS],
        "hist_S": st.histogram(s_nn, HIST_BINS),
        "hist_H": st.histogram(h_nn, HIST_BINS),
        "percentiles": {"S->T": st.percentiles(s_nn), "H->T": st.percentiles(h_nn)},
        "roc": roc,
    }


def _closest_pairs(ctx: AuditContext) -> list[dict[str, Any]]:
    """Copies first (up to :data:`~pixcell_fed.audit.region_copy.FLAGGED_SHOWN` beyond ``audit.closest_pairs``),
    then the synthetic tiles closest to a real tile; worst first (pixel score or copied region, then descriptor
    similarity). A region copy carries its evidence (``region``: the matched region on both tiles) for drawing."""
    s, syn, ref = ctx.s_tile, ctx.roles.synthetic, ctx.roles.reference
    region_copy = s.region_flagged(ctx.cfg)
    fraction = np.zeros(len(syn)) if s.region is None else s.region.fraction
    order = sorted(
        range(len(syn)),
        key=lambda i: (not s.copy[i], -max(np.nan_to_num(s.pixel[i], nan=-1.0), fraction[i]), -s.nn_sim[i]),
    )
    pairs = []
    for i in order[: max(ctx.cfg.closest_pairs, min(int(s.copy.sum()), rc.FLAGGED_SHOWN))]:
        region = rc.evidence(s.region, i, ref) if region_copy[i] else None
        j = int(s.pixel_match[i] if s.pixel_match[i] >= 0 else s.top.idx[i, 0])
        real = region["real"] if region else str(ref[j])
        pairs.append(
            {
                "synthetic": str(syn[i]),
                "real": real,
                "similarity": float(s.nn_sim[i]),
                "pixel_score": _num(s.pixel[i]),
                "reasons": list(ctx.reasons[i]),
                "region": region,
            }
        )
    return pairs


def _verdicts(ctx: AuditContext, outcome: RoundsOutcome) -> dict[str, Any]:
    """The two verdicts behind the audit's, how T and H were split, and what the set sizes let the audit see."""
    family = [(t.name, t.detectable) for t in outcome.tests if t.in_family and t.detectable]
    best = min(family, key=lambda nd: nd[1]["share"] if nd[1]["share"] is not None else 2.0, default=None)
    return {
        "generator_verdict": outcome.generator_verdict,
        "kept_set_verdict": outcome.kept_verdict,
        "generator_tests": {t.name: t.status for t in outcome.generator},
        "split_unit": ctx.split_unit or "unknown",
        "target_leak_share": ctx.cfg.target_leak_share,
        "most_sensitive_test": None if best is None else {"name": best[0], **best[1]},
    }


def build_report(ctx: AuditContext, outcome: RoundsOutcome, *, fidelity: dict, identities: dict) -> dict[str, Any]:
    """Every number of the audit, for the on-site record and the HTML report."""
    from pixcell_fed.config import to_plain

    thresholds = to_plain(ctx.cfg)
    tiles = _tile_records(ctx, outcome)
    return _finite(
        {
            "schema": SCHEMA,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "verdict": outcome.verdict,
            "statistics": _verdicts(ctx, outcome),
            "sizes": {**ctx.roles.sizes(), "S_kept": len(outcome.active), "mapping": ctx.roles.has_mapping},
            "config": thresholds,
            "provenance": {k: v for k, v in THRESHOLD_PROVENANCE.items() if k in thresholds},
            "identities": {"audit": _audit_identity(), **identities},
            "rounds": outcome.rounds,
            "tests": [t.to_dict() for t in outcome.tests],
            "null": describe(ctx),
            "figures": _figures(ctx, outcome),
            "fidelity": fidelity,
            "closest_pairs": _closest_pairs(ctx),
            "identifier_findings": [f.to_dict() for f in ctx.findings],
            "tiles": tiles,
            "kept_sha256": sorted(t["sha256"] for t in tiles if t["kept"]),
        }
    )


def write_report(path: Path, report: dict[str, Any]) -> Path:
    return write_json_atomic(path, report)


def _scrub_test(test: dict[str, Any]) -> dict[str, Any]:
    return {
        k: test[k]
        for k in (
            "name",
            "title",
            "status",
            "statistic",
            "thresholds",
            "provenance",
            "sentence",
            "null",
            "gates",
            "level",
            "p_value",
            "adjusted_p",
            "detectable",
        )
    }


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
        "statistics": report["statistics"],
        "sizes": report["sizes"],
        "config": report["config"],
        "provenance": report["provenance"],
        "identities": report["identities"],
        "rounds": report["rounds"],
        "tests": [_scrub_test(t) for t in report["tests"]],
        "null": report["null"],
        "figures": report["figures"],
        "fidelity": fidelity_summary_section(report["fidelity"]),
        "identifier_findings_by_kind": findings_by_kind,
        "tiles": [
            {
                "sha256": t["sha256"],
                "kept": t["kept"],
                "flagged": t["flagged"],
                "reasons": t["reasons"],
                "nearest_similarity": t["nearest_similarity"],
            }
            for t in report["tiles"]
        ],
        "kept_sha256": report["kept_sha256"],
    }


def _occurring(text: str, needles: set[str]) -> list[str]:
    """The needles that occur in ``text``, in time linear in the text (one ``in`` per needle would take |needles| x
    |text|: hours for 100,000 tiles). An occurrence lies inside a run of characters that needles use, so only the
    substrings of those runs with a needle's length are looked up."""
    import re

    if not needles:
        return []
    lengths = sorted({len(n) for n in needles})
    runs = re.compile(
        "[" + "".join(re.escape(c) for c in sorted(set("".join(needles)))) + "]{" + str(lengths[0]) + ",}"
    )
    found: set[str] = set()
    checked: set[str] = set()
    for token in (m.group() for m in runs.finditer(text)):
        if token in checked:
            continue
        checked.add(token)
        for size in lengths:
            if size > len(token):
                break
            found |= needles.intersection(token[i : i + size] for i in range(len(token) - size + 1))
    return sorted(found)


def check_no_role_names(text: str, roles: DataRoles, *, what: str) -> None:
    """Fail closed: refuse a shareable text (``what``: which file it is) in which any file name or folder of S, T or
    H appears (case-insensitive). Nothing is written when it raises."""
    needles = set()
    for p in (*roles.synthetic, *roles.reference, *roles.holdout):
        needles.add(p.name)
        needles.add(str(p.parent.resolve()))
    leaks = _occurring(text.casefold(), {n.casefold() for n in needles if len(n) >= 5})
    if leaks:
        raise AuditError(
            f"{what} would contain {len(leaks)} file name(s) or folder(s), e.g. {leaks[0]!r}; it was not written",
            hint="identities passed to run_audit must not contain paths or real file names",
        )


def write_summary(path: Path, summary: dict[str, Any], roles: DataRoles) -> Path:
    """Write the summary after checking that no file name or folder of any role appears in it (fail closed)."""
    # the text as a reader decodes it: names outside ASCII would hide behind \u escapes in json.dumps's default
    text = json.dumps(summary, sort_keys=True, default=str, ensure_ascii=False)
    check_no_role_names(text, roles, what="the shareable audit summary")
    return write_json_atomic(path, summary)
