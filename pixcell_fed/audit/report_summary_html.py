"""``audit_summary.html``: the audit's shareable page, the one a consortium lead opens from a bundle.

Rendered from the shareable summary only (``audit_summary.json``'s content, :func:`report_json.build_summary`):
the verdicts and one plain sentence per test, the set sizes, rounds, identities, thresholds with their provenance,
the nearest-neighbour figures, the null's numbers and the fidelity figures. Numbers and words: no real tile, no
file name, no path. The page is inert: the Content-Security-Policy of :mod:`pixcell_fed.html_policy` first in
``<head>``, inline styles and inline SVG figures, no script, no URL (the bundle builder and ``coordinator verify``
refuse any other page). Its text goes through the same fail-closed check as the JSON summary
(:func:`report_json.check_no_role_names`) before it is written. A set made with dp conditioning ships a minimal
summary (:mod:`pixcell_fed.audit.conditioning_section`): its page states the decision and the guarantee only.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pixcell_fed.atomic import write_text_atomic
from pixcell_fed.audit.conditioning_section import dp_summary_page_body, is_dp
from pixcell_fed.audit.fidelity_report import html_section as fidelity_html_section
from pixcell_fed.audit.report_html import _CSS, _esc, _fmt, first_page, similarity_figures
from pixcell_fed.audit.report_json import check_no_role_names
from pixcell_fed.audit.roles import DataRoles
from pixcell_fed.html_policy import INERT_CSP_META

SHAREABLE_NOTE = (
    "Shareable summary of this site's audit: statistics and figures only, no real tiles and no file "
    "names. The site's privacy officer decided on the full on-site report, which never leaves the site."
)
_NULL_ROWS = (
    ("h_size", "held-out tiles (H)"),
    ("h_flagged", "held-out tiles flagged as if they were synthetic"),
    ("h_copies", "held-out tiles confirmed as copies of a conditioning tile"),
    ("h_nn_median", "median nearest-neighbour similarity H->T"),
    ("h_nn_max", "largest nearest-neighbour similarity H->T"),
)


def _value(x: Any) -> str:
    return "n/a" if x is None else _fmt(x)


def _null_section(null: dict[str, Any]) -> list[str]:
    """The held-out tiles against T, as if they were synthetic: what 'normal' looks like."""
    out = [
        '<h2>The null: held-out tiles against T</h2><p class="small">Real tiles of slides that conditioned '
        'nothing, put through the same tests as the synthetic tiles.</p><table id="null">'
    ]
    out += [f"<tr><td>{label}</td><td>{_value(null.get(key))}</td></tr>" for key, label in _NULL_ROWS if key in null]
    return out + ["</table>"]


def _fidelity_section(summary: dict[str, Any]) -> list[str]:
    """Every fidelity figure of every encoder space, as the summary holds it (the on-site report's renderer)."""
    return [
        fidelity_html_section(
            summary["fidelity"], summary.get("identities"), (summary.get("config") or {}).get("fidelity_warn_fd_ratio")
        )
    ]


def _identifier_section(by_kind: dict[str, int]) -> list[str]:
    out = ["<h2>Identifier scan of the synthetic files</h2>"]
    if not by_kind:
        return out + ['<p id="identifier-findings">No identifying content was found in the synthetic files.</p>']
    out.append('<table id="identifier-findings"><tr><th>Kind of finding</th><th>Count</th></tr>')
    out += [f"<tr><td>{_esc(kind)}</td><td>{_value(n)}</td></tr>" for kind, n in sorted(by_kind.items())]
    return out + ["</table>"]


def render_summary_html(summary: dict[str, Any]) -> str:
    """The inert shareable page of a shareable summary (see the module docstring)."""
    out = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{INERT_CSP_META}'
        f"<title>Privacy audit summary: {_esc(summary['verdict'])}</title><style>{_CSS}</style></head><body>"
    ]
    if is_dp(summary.get("conditioning")):  # a dp set ships the decision, not the statistics (no figures, no null)
        body = dp_summary_page_body(summary) + _identifier_section(summary.get("identifier_findings_by_kind", {}))
        return "".join(out + body) + "</body></html>"
    out += first_page(summary, note=SHAREABLE_NOTE)
    out += [
        '<section id="figures">',
        *similarity_figures(summary["figures"]),
        *_null_section(summary["null"]),
        *_fidelity_section(summary),
        *_identifier_section(summary["identifier_findings_by_kind"]),
        "</section></body></html>",
    ]
    return "".join(out)


def write_summary_html(path: Path, summary: dict[str, Any], roles: DataRoles) -> Path:
    """Write the page after checking that no file name or folder of any role appears in its text, as written or
    as a browser shows it (fail closed: nothing is written otherwise)."""
    page = render_summary_html(summary)
    check_no_role_names(page + "\n" + html.unescape(page), roles, what="the shareable summary page")
    return write_text_atomic(path, page)
