"""The consortium report: ``report.json`` (everything) and ``report.html`` (one self-contained page).

Which sites took part, how many tiles each contributed, their audit verdicts and conditioning privacy, who is
missing or rejected and why, which sites their own audit refused (from the signed refusal notices they chose to
send), a montage of pooled synthetic tiles per site, the training curves, and each site's accuracy, balanced
accuracy and macro F1 on its own real held-out tiles, with the figures pooled across sites (weighted by tiles
evaluated).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pixcell_fed.atomic import write_json_atomic, write_text_atomic
from pixcell_fed.federation.augmentation_report import augmentation_section_html
from pixcell_fed.federation.evaluation import METRIC_NAMES
from pixcell_fed.federation.site_fidelity import fidelity_section_html

_METRIC_HEADERS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}

#: What the DP figures mean (docs/federation.md, "What the guarantee covers").
DP_GUARANTEE = (
    "Privacy unit: one real tile of a site's training set. Epsilon is each site's own total over every "
    "DP round it ever ran (all runs, from its privacy ledger), at the site's delta; a slide or patient "
    "with k tiles is protected only at about k times epsilon. Outside the guarantee: the synthetic "
    "bundles (protected by the audit and the officer's approval), the evaluation metrics, and the "
    "approximate size of each site's training set."
)

#: What the conditioning column means (docs/privacy.md).
CONDITIONING_NOTE = (
    "Conditioning privacy: how each site conditioned its synthetic tiles, as its signed bundle states. "
    "'exact' and 'mixed' carry no formal guarantee (the audit checks for copies); 'dp' sets are "
    "differentially private with respect to each real tile (epsilon per tile) and each slide "
    "(epsilon per slide, by group privacy over the slide's conditioning tiles), at the delta shown. "
    "Not covered: the audit's decision and shipped statistics, and each tile's class label."
)


def _conditioning(record: Any) -> str:
    from pixcell_fed.privacy.conditioning import ClaimError, ConditioningClaim

    if record is None:
        return "not stated"
    try:
        return ConditioningClaim.from_record(record).short()
    except ClaimError:
        return "invalid claim"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.text{text-align:left}.bad{color:#b00}.ok{color:#070}
svg{border:1px solid #ddd;background:#fcfcfc}.montage img{image-rendering:auto;border:1px solid #ddd}"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape("" if value is None else str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)

    def cell(c: Any) -> str:
        numeric = isinstance(c, (int, float)) and not isinstance(c, bool)
        return f"<td>{_fmt(c)}</td>" if numeric else f"<td class='text'>{_fmt(c)}</td>"

    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _curve(history: list[dict], keys: tuple[str, ...]) -> str:
    """An inline SVG line chart of ``keys`` over epochs."""
    if not history:
        return "<p>no training epochs</p>"
    w, h, pad = 480, 200, 30
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    series = {k: [float(r[k]) for r in history if k in r] for k in keys}
    values = [v for s in series.values() for v in s] or [0.0]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(history) - 1, 1)
    parts = [f'<svg width="{w}" height="{h}" role="img">']
    for i, (key, vals) in enumerate(series.items()):
        if not vals:
            continue
        pts = " ".join(
            f"{pad + j * (w - 2 * pad) / n:.1f},{h - pad - (v - lo) * (h - 2 * pad) / span:.1f}"
            for j, v in enumerate(vals)
        )
        parts.append(f'<polyline fill="none" stroke="{colours[i % 4]}" stroke-width="2" points="{pts}"/>')
        parts.append(
            f'<text x="{pad + 130 * i}" y="16" fill="{colours[i % 4]}" font-size="12">{html.escape(key)}</text>'
        )
    parts.append(
        f'<text x="2" y="{h - pad}" font-size="10">{lo:.2f}</text><text x="2" y="{pad}" font-size="10">{hi:.2f}</text>'
    )
    parts.append(f'<text x="{w - pad - 40}" y="{h - 8}" font-size="10">epoch {len(history)}</text></svg>')
    return "".join(parts)


def _metric_header(first: str) -> list[str]:
    return [first, "tiles"] + [_METRIC_HEADERS[name] for name in METRIC_NAMES]


def _sites_section(pool: dict[str, Any]) -> list[str]:
    sites = pool.get("sites", {})
    out = [
        "<h2>Sites</h2>",
        _table(
            [
                "site",
                "status",
                "bundle run",
                "generator",
                "tiles",
                "received",
                "audit verdict",
                "conditioning privacy",
                "note",
            ],
            [
                [
                    s,
                    st.get("status"),
                    st.get("run_id"),
                    st.get("generator"),
                    st.get("n_tiles"),
                    st.get("n_received"),
                    st.get("audit_verdict"),
                    _conditioning(st.get("conditioning")),
                    st.get("reason"),
                ]
                for s, st in sorted(sites.items())
            ],
        ),
        f"<p>{html.escape(CONDITIONING_NOTE)}</p>",
    ]
    if pool.get("conditioning_requirement"):
        out.append(
            f"<p>The consortium requires {html.escape(str(pool['conditioning_requirement']))}; a bundle "
            "offering less is rejected before any of its tiles is transferred.</p>"
        )
    if pool.get("ignored_nodes"):
        out.append(
            "<p class='bad'>Connected nodes ignored (their key is no trusted site's, or does not match the "
            "name they were registered under):</p><ul>"
            + "".join(f"<li>{html.escape(str(n))}</li>" for n in pool["ignored_nodes"])
            + "</ul>"
        )
    if pool.get("removed_sites"):
        out.append(
            f"<p>Removed from the pool (no longer in the trust file): "
            f"{html.escape(', '.join(pool['removed_sites']))}.</p>"
        )
    return out


def _refusals_section(refusals: dict[str, Any]) -> list[str]:
    """Sites whose own audit refused their run, from the signed notices they chose to send (numbers only)."""
    notices = refusals.get("sites") or {}
    out: list[str] = []
    if notices:
        out.append(
            "<h2>Refused by their own audit</h2><p>These sites shared no tiles: their audit FAILED, so no "
            "bundle was built. What is shown is the signed refusal notice each chose to send (the audit's "
            "shareable summary: verdicts and figures only).</p>"
        )
        out.append(
            _table(
                ["site", "run", "verdict", "generator", "why (the audit's words)"],
                [
                    [
                        s,
                        n.get("run_id"),
                        n.get("verdict"),
                        n.get("generator"),
                        "; ".join(str(r) for r in n.get("reasons") or []) or "not stated",
                    ]
                    for s, n in sorted(notices.items())
                ],
            )
        )
    if refusals.get("ignored"):
        out.append(
            "<p class='bad'>Refusal notices ignored (they did not verify):</p><ul>"
            + "".join(f"<li>{html.escape(str(r))}</li>" for r in refusals["ignored"])
            + "</ul>"
        )
    return out


def _montage_section(montage: dict[str, Any]) -> list[str]:
    """Per pooled site: randomly chosen pooled synthetic tiles (never real ones), label counts, audit facts."""
    if not montage:
        return []
    out = [
        "<h2>What was shared, at a glance</h2><p>Randomly chosen synthetic tiles from the pool (what each site's "
        "officer approved; never a real tile), with each site's label counts and its audit as its shareable "
        "summary states it.</p>"
    ]
    for site, m in sorted(montage.items()):
        counts = ", ".join(f"{html.escape(str(k))}: {int(v)}" for k, v in (m.get("label_counts") or {}).items())
        out.append(
            f"<div class='montage' id='montage-{html.escape(site)}'><h3>{html.escape(site)}</h3>"
            f"<p>{int(m.get('n_tiles', 0))} pooled tiles ({counts or 'no labels'}); {int(m.get('shown', 0))} shown.</p>"
        )
        if m.get("png_base64"):
            out.append(
                f"<img alt='pooled synthetic tiles of {html.escape(site)}' "
                f"src='data:image/png;base64,{html.escape(str(m['png_base64']))}'>"
            )
        audit = m.get("audit")
        if audit:
            tests = audit.get("tests", [])
            out.append(
                f"<p>Audit verdict: <b>{html.escape(str(audit.get('verdict')))}</b> ("
                + "; ".join(f"{html.escape(t.get('title', ''))}: {html.escape(t.get('status', ''))}" for t in tests)
                + ")</p><details><summary>each test in the audit's words</summary><ul>"
                + "".join(
                    f"<li>{html.escape(t.get('title', ''))}: {html.escape(t.get('sentence', ''))}</li>" for t in tests
                )
                + "</ul></details>"
            )
        out.append("</div>")
    return out


def render_html(report: dict[str, Any]) -> str:
    pool = report.get("pool", {})
    sites = pool.get("sites", {})
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>pixcell-fed consortium report</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>Consortium report</h1>",
    ]
    out.append(
        f"<p>{len(pool.get('complete', []))} site(s) pooled, {pool.get('n_pooled', 0)} synthetic tiles. "
        f"Missing: <span class='bad'>{html.escape(', '.join(pool.get('missing', [])) or 'none')}</span>. "
        f"Rejected: <span class='bad'>{html.escape(', '.join(pool.get('rejected', [])) or 'none')}</span>.</p>"
    )
    twins = sorted(s for s, st in sites.items() if "twin" in str(st.get("generator") or ""))
    if twins:
        out.append(
            f"<p class='bad'>The synthetic tiles of {html.escape(', '.join(twins))} come from untrained twin "
            "models (a demo or test set-up): the figures below show the plumbing, not model quality.</p>"
        )
    out += _sites_section(pool)
    refused = sorted((report.get("refusals") or {}).get("sites") or {})
    if refused:
        out.append(
            f"<p class='bad'>Refused by their own audit (no bundle, nothing shared): "
            f"{html.escape(', '.join(refused))}.</p>"
        )
    out += _refusals_section(report.get("refusals") or {})
    out += _montage_section(report.get("montage") or {})
    out.append(fidelity_section_html(report.get("fidelity") or {}, twins))
    training = report.get("training")
    out.append("<h2>Training</h2>")
    if training:
        spec = training.get("spec", {})
        out.append(
            f"<p>Recipe <b>{html.escape(str(training.get('recipe')))}</b>, "
            f"backbone {html.escape(str(spec.get('arch')))}, "
            f"classes {html.escape(', '.join(spec.get('classes', [])))}.</p>"
        )
        hist = training.get("history", [])
        out.append(_curve(hist, ("train_loss",)) + " " + _curve(hist, ("train_accuracy", "val_accuracy")))
    else:
        out.append("<p class='bad'>no model was trained (nothing pooled)</p>")
    out.append("<h2>Evaluation on each site's real held-out tiles</h2>")
    rows = []
    for site, m in sorted(report.get("evaluation", {}).items()):
        if "error" in m:
            rows.append([site, "error: " + str(m["error"])] + [""] * len(METRIC_NAMES))
        else:
            rows.append([site, int(m.get("n", 0))] + [m.get(name) for name in METRIC_NAMES])
    pooled = report.get("pooled_evaluation") or {}
    if pooled:
        rows.append(
            ["pooled (weighted by tiles)", int(pooled.get("n", 0))] + [pooled.get(name) for name in METRIC_NAMES]
        )
    out.append(_table(_metric_header("site"), rows) if rows else "<p>no evaluation</p>")
    out.append(augmentation_section_html(report.get("augmentation"), twins))
    dp = report.get("dp")
    if dp:
        out.append("<h2>DP fine-tune on real tiles (Opacus DP-SGD at each site + FedAvg)</h2>")
        out.append(f"<p>{html.escape(DP_GUARANTEE)}</p>")
        out.append(
            _table(
                [
                    "site",
                    "status",
                    "rounds trained",
                    "epsilon spent (site total)",
                    "delta",
                    "budget left",
                    "tiles (rounded)",
                    "reason",
                ],
                [
                    [
                        s,
                        v.get("status"),
                        v.get("rounds"),
                        v.get("epsilon"),
                        v.get("delta"),
                        v.get("epsilon_remaining"),
                        v.get("examples", "not reported"),
                        v.get("reason") or "",
                    ]
                    for s, v in sorted(dp.get("privacy", {}).items())
                ],
            )
        )
        rows = [
            [s, int(m.get("n", 0))] + [m.get(name) for name in METRIC_NAMES]
            for s, m in sorted(dp.get("evaluation", {}).items())
            if "error" not in m
        ]
        out.append(_table(_metric_header("site (after DP fine-tune)"), rows))
    out.append(
        f"<p>Generated by pixcell-fed in {report.get('seconds', 0)} s. Only metrics left the sites.</p></body></html>"
    )
    return "".join(out)


def write_report(report: dict[str, Any], folder: str | Path) -> Path:
    """Write ``report.json`` and ``report.html`` into ``folder``; returns the HTML path."""
    folder = Path(folder)
    write_json_atomic(folder / "report.json", report)
    return write_text_atomic(folder / "report.html", render_html(report))
