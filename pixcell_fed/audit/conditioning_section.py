"""What the audit says about how its synthetic set was conditioned (``synthesis.conditioning``, docs/privacy.md).

The run's conditioning claim (:meth:`pixcell_fed.privacy.conditioning.ConditioningClaim.to_record`) is stated in
every report: on the first page of ``audit.html``, in ``audit.json`` and in the shareable summary. For a dp set the
audit also states its own limits: it looks at the real tiles themselves, so its decision and any statistic it
ships are outside the guarantee. It therefore drops no tile (choosing the shipped set by looking at real tiles
would be a release of its own; the gate only passes or fails the whole set) and its shareable summary keeps only
what the gate needs.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping
from typing import Any

from pixcell_fed.config.schema import AuditConfig

#: what a dp-conditioned set ships of its audit: the gate's outcome, not the statistics behind it
DP_SUMMARY_KEYS = (
    "schema",
    "created",
    "verdict",
    "config",
    "provenance",
    "identities",
    "identifier_findings_by_kind",
    "kept_sha256",
    "conditioning",
)
DP_AUDIT_LIMITS = (
    "In dp mode the audit drops no tile: its gate only passes or fails the whole set. The shareable "
    "summary carries only the verdict, each test's status, the number of synthetic tiles audited and "
    "kept, thresholds, model identities and the tiles' hashes; each test's status reveals at most a "
    "few bits about the real tiles. Every other figure of this report stays on site."
)


def is_dp(conditioning: Mapping[str, Any] | None) -> bool:
    return conditioning is not None and conditioning.get("mode") == "dp"


def audit_settings(cfg: AuditConfig, conditioning: Mapping[str, Any] | None) -> AuditConfig:
    """``cfg``, with ``drop_flagged`` off for a dp set (whatever the site's config says)."""
    return dataclasses.replace(cfg, drop_flagged=False) if is_dp(conditioning) and cfg.drop_flagged else cfg


def shareable_summary(summary: dict[str, Any], conditioning: Mapping[str, Any] | None) -> dict[str, Any]:
    """The shareable summary with the claim; for a dp set only the verdict, each test's name and status, the
    number of synthetic tiles audited and kept, thresholds, identities, the metadata findings on the shipped files,
    the kept hashes and the claim. Similarities, histograms, percentiles, ROC curves, fidelity, the sizes of T and
    H and which tiles were flagged are computed from real tiles: they stay in the on-site reports."""
    if conditioning is None:
        return summary
    summary = {**summary, "conditioning": dict(conditioning)}
    if not is_dp(conditioning):
        return summary
    out = {k: summary[k] for k in DP_SUMMARY_KEYS if k in summary}
    out["sizes"] = {k: summary["sizes"][k] for k in ("S", "S_kept") if k in summary.get("sizes", {})}
    out["tests"] = [{k: t[k] for k in ("name", "title", "status", "gates") if k in t} for t in summary["tests"]]
    out["tiles"] = [{"sha256": t["sha256"], "kept": t["kept"]} for t in summary["tiles"]]
    return out


def conditioning_html(record: Mapping[str, Any] | None) -> str:
    """The claim in plain words for the officer; for dp, the mechanism's figures and what is not covered."""
    if not record:
        return ""
    esc = html.escape
    out = [
        f'<div id="conditioning"><h2>Conditioning privacy: {esc(record["mode"])}</h2>'
        f'<p id="conditioning-statement">{esc(record["statement"])}</p>'
    ]
    if record["mode"] == "dp":
        rows = (
            ("Per real tile", f"epsilon {record['tile_epsilon']:.3g}, delta {record['tile_delta']:.0e}"),
            (
                "Per slide",
                f"epsilon {record['slide_epsilon']:.3g}, delta {record['slide_delta']:.0e} (at most "
                f"{record['slide_tiles']} conditioning tiles per slide"
                f"{'' if record['slide_tiles_capped'] else ', as found in this run'})",
            ),
            ("Mechanism", record["mechanism"]),
            (
                "Clip norm, sensitivity, sigma",
                f"{record['clip_norm']:.4g}, {record['sensitivity']:.4g}, "
                f"{record['sigma']:.4g} ({record['vectors_per_tile']} embedding "
                "vector(s) per tile, clipped together)",
            ),
            ("Neighbouring data sets", record["neighbouring"]),
        )
        out.append(
            '<table id="conditioning-guarantee">'
            + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
            + "</table>"
        )
        out.append(f'<p id="conditioning-not-covered"><b>{esc(record["not_covered"])}</b> {esc(DP_AUDIT_LIMITS)}</p>')
    return "".join(out) + "</div>"


def dp_summary_page_body(summary: Mapping[str, Any]) -> list[str]:
    """The body of the shareable summary page (``audit_summary.html``) of a dp set, from what its minimal summary
    holds: the verdict, the claim with what it does not cover, each test's status, identities and thresholds. The
    caller wraps it in the inert page (Content-Security-Policy first in ``<head>``)."""
    esc = html.escape
    sizes = summary.get("sizes", {})
    out = [
        '<section class="page" id="summary"><h1>Memorisation and privacy audit: shareable summary</h1>',
        f'<div class="small">Created {esc(str(summary.get("created", "")))}. Shareable summary of a set made with '
        "differentially private conditioning: it carries the audit's decision, not the statistics behind it.</div>",
        f'<h2 id="verdict">Verdict: {esc(summary["verdict"])}</h2>',
        f'<p id="verdict-sentence">{sizes.get("S_kept", 0):,} of {sizes.get("S", 0):,} synthetic tiles were '
        "audited; none was dropped.</p>",
        conditioning_html(summary.get("conditioning")),
        '<table id="tests"><tr><th>Test</th><th>Status</th></tr>',
    ]
    out += [f"<tr><td>{esc(t['title'])}</td><td>{esc(t['status'])}</td></tr>" for t in summary.get("tests", [])]
    out.append('</table><h2>Models and encoders</h2><table id="identities">')
    for name, ident in summary.get("identities", {}).items():
        body = ", ".join(f"{k}: {v}" for k, v in ident.items()) if isinstance(ident, Mapping) else str(ident)
        out.append(f"<tr><td>{esc(name)}</td><td>{esc(body)}</td></tr>")
    out.append('</table><h2>Thresholds</h2><table id="thresholds">')
    out += [f"<tr><td>audit.{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in summary.get("config", {}).items()]
    return out + ["</table></section>"]
