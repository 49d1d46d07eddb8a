"""``run_audit``: roles -> context -> rounds -> reports.

The context (:mod:`pixcell_fed.audit.context`) holds every per-tile result, computed once; the rounds
(:mod:`pixcell_fed.audit.rounds`) run the registered tests (:mod:`pixcell_fed.audit.registry`) on the tiles that
survive each round; the reports are written from both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixcell_fed.audit.gate import FAIL, TestResult
from pixcell_fed.audit.roles import build_roles
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.runlog import get_logger

log = get_logger("audit")


@dataclass(frozen=True)
class SiteFacts:
    """What the site knows about its data beyond the three sets of tiles.

    ``forbidden_strings``: the site's identifiers (slide names, keys, properties) that must not appear in the
    shipped files. ``feature_spaces``: name -> encoder (``.embed``) or callable on uint8 NHWC images: the
    membership test runs in each (privacy) and their nearest-neighbour figures are reported (fidelity).
    ``split_unit``: how T and H were split: "patient", "slide", or None when not known (the report warns unless
    it is "patient").
    """

    forbidden_strings: Sequence[str] = ()
    feature_spaces: Mapping[str, Any] = field(default_factory=dict)
    split_unit: str | None = None


@dataclass
class AuditResult:
    """Outcome of :func:`run_audit`. ``kept``: the synthetic files the verdict covers (flagged ones dropped)."""

    verdict: str
    kept: list[Path]
    report_path: Path
    json_path: Path
    summary_path: Path
    tests: list[TestResult] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    summary_page_path: Path | None = None  # audit_summary.html, the shareable page

    @property
    def passed(self) -> bool:
        """Nothing refused: PASS, WARN or INCONCLUSIVE (the officer decides); FAIL blocks the bundle."""
        return self.verdict != FAIL


def run_audit(
    synthetic: Sequence[str | Path],
    reference: Sequence[str | Path],
    holdout: Sequence[str | Path],
    *,
    out_dir: str | Path,
    audit_cfg: AuditConfig | None = None,
    source_of: Mapping[str, str] | None = None,
    identities: Mapping[str, Any] | None = None,
    site: SiteFacts | None = None,
    conditioning: Mapping[str, Any] | None = None,
) -> AuditResult:
    """Audit synthetic tiles S against their conditioning tiles T with held-out tiles H as the null.

    Writes ``out_dir/audit.json`` and ``out_dir/audit.html`` (on-site: real file names, real tiles),
    ``out_dir/audit_summary.json`` (shareable: statistics, verdicts, thresholds, identities, hashes of the
    audited synthetic files; no real tiles, names, paths or embeddings) and ``out_dir/audit_summary.html`` (its
    inert page, for the consortium). ``source_of`` maps each synthetic tile (path, file name or stem) to its
    source tile in T. ``identities``: the models' identities with weight hashes (no paths), recorded in the
    reports. ``site``: the site's identifiers and encoder spaces (:class:`SiteFacts`). ``conditioning``: the run's
    conditioning claim (:meth:`pixcell_fed.privacy.conditioning.ConditioningClaim.to_record`), stated in every report;
    in dp mode no tile is dropped (the gate only passes or fails) and the shareable summary keeps only what the gate
    needs (:mod:`pixcell_fed.audit.conditioning_section`).
    """
    from pixcell_fed.audit import conditioning_section, report_html, report_json, report_summary_html
    from pixcell_fed.audit.context import build_context
    from pixcell_fed.audit.fidelity import embed_roles, fidelity
    from pixcell_fed.audit.rounds import run_rounds

    cfg = conditioning_section.audit_settings(audit_cfg or AuditConfig(), conditioning)  # dp: no tile dropped
    site = site or SiteFacts()
    roles = build_roles(
        synthetic,
        reference,
        holdout,
        source_of=source_of,
        min_holdout=cfg.min_holdout,
        min_holdout_ratio=cfg.min_holdout_ratio,
    )
    log.info(
        "audit: |S|=%d |T|=%d |H|=%d, mapping %s",
        len(roles.synthetic),
        len(roles.reference),
        len(roles.holdout),
        "given" if roles.has_mapping else "absent",
    )
    embeddings = embed_roles(site.feature_spaces, roles)
    ctx = build_context(
        roles, cfg, forbidden_strings=site.forbidden_strings, embeddings=embeddings, split_unit=site.split_unit
    )
    outcome = run_rounds(ctx)
    figures = fidelity(embeddings, roles, outcome.active, device=cfg.device)
    report = report_json.build_report(ctx, outcome, fidelity=figures, identities=dict(identities or {}))
    if conditioning is not None:
        report["conditioning"] = dict(conditioning)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_json.write_report(out_dir / "audit.json", report)
    summary = conditioning_section.shareable_summary(report_json.build_summary(report), conditioning)
    summary_path = report_json.write_summary(out_dir / "audit_summary.json", summary, roles)
    page_path = report_summary_html.write_summary_html(out_dir / "audit_summary.html", summary, roles)
    html_path = report_html.write_html(out_dir / "audit.html", report)
    kept = [roles.synthetic[i] for i in outcome.active]
    return AuditResult(outcome.verdict, kept, html_path, json_path, summary_path, outcome.tests, report, page_path)
