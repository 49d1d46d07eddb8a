"""``audit.html``: a self-contained report (inline SVG figures, base64 tiles) for the site's privacy officer.

First page: the verdict and one plain sentence per test, data-role sizes, identities with weight hashes, the
thresholds with their provenance. Then: nearest-neighbour histograms S->T against H->T, the percentile table, the
ROC of the membership test, and the closest pairs (synthetic | nearest real | difference), worst first. It shows
real tiles: it is for on-site review only and is never shipped.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.atomic import write_text_atomic
from pixcell_fed.audit.conditioning_section import conditioning_html
from pixcell_fed.audit.fidelity_report import html_section as fidelity_html_section
from pixcell_fed.errors import PixcellFedError

_COLOURS = {"PASS": "#1a7f37", "WARN": "#b7791f", "FAIL": "#c53030", "INCONCLUSIVE": "#5a67d8", "N/A": "#718096"}
_VERDICT_WORDS = {
    "PASS": "passed",
    "WARN": "passed with warnings",
    "FAIL": "FAILED: nothing may be shipped",
    "INCONCLUSIVE": "is INCONCLUSIVE: it found no leak, but the sets are too small for that to mean "
    "the synthetic tiles do not leak",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:24px;color:#1a202c}
h1{margin-bottom:4px} h2{border-bottom:1px solid #cbd5e0;padding-bottom:4px;margin-top:36px}
.verdict{font-size:28px;font-weight:700;color:#fff;padding:14px 20px;border-radius:6px;margin:12px 0}
.badge{display:inline-block;min-width:48px;text-align:center;color:#fff;border-radius:4px;padding:2px 6px;font-weight:600}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f7fafc} .small{font-size:12px;color:#4a5568} .pairs{display:flex;flex-wrap:wrap;gap:12px}
.pair{border:1px solid #e2e8f0;padding:6px;border-radius:4px} .pair img{width:128px;height:128px;image-rendering:pixelated}
.page{page-break-after:always} code{font-size:12px}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{_COLOURS.get(status, "#718096")}">{_esc(status)}</span>'


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    return _esc(x)


def histogram_svg(
    bins: list[float], a: list[int], b: list[int], *, label_a: str, label_b: str, width: int = 640, height: int = 260
) -> str:
    """Two overlaid histograms as densities (share of each set per bin), inline SVG."""
    pad_l, pad_b, pad_t = 48, 36, 24
    w, h = width - pad_l - 12, height - pad_b - pad_t
    da = np.asarray(a, float) / max(1, sum(a))
    db = np.asarray(b, float) / max(1, sum(b))
    top = max(float(da.max(initial=0)), float(db.max(initial=0)), 1e-9)
    n = len(da)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="nearest-neighbour similarity histogram" class="figure-hist">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
    ]
    for dens, colour in ((db, "#3182ce"), (da, "#e53e3e")):
        for i, v in enumerate(dens):
            if v <= 0:
                continue
            x = pad_l + i * w / n
            bh = v / top * h
            parts.append(
                f'<rect x="{x:.1f}" y="{pad_t + h - bh:.1f}" width="{w / n:.1f}" height="{bh:.1f}" '
                f'fill="{colour}" fill-opacity="0.5"/>'
            )
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#333"/>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#333"/>')
    for t in range(0, 11, 2):
        x = pad_l + (t / 10) * w
        parts.append(
            f'<text x="{x:.1f}" y="{pad_t + h + 16}" font-size="11" text-anchor="middle">{bins[0] + t / 10 * (bins[-1] - bins[0]):.1f}</text>'
        )
    parts.append(
        f'<text x="{pad_l + w / 2}" y="{height - 4}" font-size="12" text-anchor="middle">nearest-neighbour similarity to T</text>'
    )
    parts.append(
        f'<text x="12" y="{pad_t + h / 2}" font-size="12" transform="rotate(-90 12 {pad_t + h / 2})" text-anchor="middle">share</text>'
    )
    parts.append(
        f'<rect x="{pad_l + 10}" y="6" width="12" height="10" fill="#e53e3e" fill-opacity="0.5"/>'
        f'<text x="{pad_l + 26}" y="15" font-size="12">{_esc(label_a)}</text>'
        f'<rect x="{pad_l + 200}" y="6" width="12" height="10" fill="#3182ce" fill-opacity="0.5"/>'
        f'<text x="{pad_l + 216}" y="15" font-size="12">{_esc(label_b)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def roc_svg(fpr: list[float], tpr: list[float], auc: float, size: int = 300) -> str:
    pad = 40
    s = size - pad - 10
    pts = " ".join(f"{pad + x * s:.1f},{10 + (1 - y) * s:.1f}" for x, y in zip(fpr, tpr))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
        f'aria-label="membership inference ROC" class="figure-roc"><rect width="{size}" height="{size}" fill="#fff"/>'
        f'<rect x="{pad}" y="10" width="{s}" height="{s}" fill="none" stroke="#333"/>'
        f'<line x1="{pad}" y1="{10 + s}" x2="{pad + s}" y2="10" stroke="#a0aec0" stroke-dasharray="4"/>'
        f'<polyline points="{pts}" fill="none" stroke="#c53030" stroke-width="2"/>'
        f'<text x="{pad + s / 2}" y="{size - 4}" font-size="12" text-anchor="middle">false positive rate</text>'
        f'<text x="12" y="{10 + s / 2}" font-size="12" transform="rotate(-90 12 {10 + s / 2})" '
        f'text-anchor="middle">true positive rate</text>'
        f'<text x="{pad + s - 4}" y="{10 + s - 8}" font-size="13" text-anchor="end">AUC {auc:.3f}</text></svg>'
    )


def _png_data_uri(img: np.ndarray) -> str:
    import cv2

    _ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _pair_images(
    syn_path: str, real_path: str, region: dict[str, Any] | None = None, side: int = 128
) -> tuple[str, str, str]:
    import cv2

    from pixcell_fed.audit.copy_features import read_tile, to_gray_thumb
    from pixcell_fed.audit.pixel_confirm import best_aligned_variant, dihedral_images
    from pixcell_fed.audit.region_copy import draw_region_pair

    if region is not None:  # a region copy: the region outlined on both tiles, and the real tile aligned onto it
        syn_img, real_img, aligned = draw_region_pair(read_tile(syn_path), read_tile(real_path), region, side)
        return _png_data_uri(syn_img), _png_data_uri(real_img), _png_data_uri(aligned)
    syn = cv2.resize(read_tile(syn_path), (side, side), interpolation=cv2.INTER_AREA)
    real = cv2.resize(read_tile(real_path), (side, side), interpolation=cv2.INTER_AREA)
    g = best_aligned_variant(to_gray_thumb(syn), to_gray_thumb(real))
    aligned = np.stack([dihedral_images(syn[..., c])[g] for c in range(3)], axis=-1)
    diff = np.clip(np.abs(aligned.astype(np.int16) - real.astype(np.int16)) * 2, 0, 255).astype(np.uint8)
    return _png_data_uri(aligned), _png_data_uri(real), _png_data_uri(255 - diff)


def _dropped_sentence(report: dict[str, Any]) -> str:
    dropped = [t for t in report["tiles"] if not t["kept"]]  # a tile not kept was dropped in an earlier round
    if not dropped:
        return ""
    reasons: dict[str, int] = {}
    for t in dropped:
        for r in t["reasons"]:
            reasons[r] = reasons.get(r, 0) + 1
    why = ", ".join(f"{r}: {n:,}" for r, n in sorted(reasons.items()))
    return (
        f" {len(dropped):,} flagged synthetic tiles ({why}) were dropped in earlier rounds; they are not covered "
        "by this verdict and must not be shipped."
    )


def first_page_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Plain sentences for the first page: the generator's verdict beside the kept set's, whether the sets are
    large enough to conclude (and how much more held-out data would help), and how T and H were split."""
    stats, notes = report["statistics"], []
    gen, kept = stats["generator_verdict"], stats["kept_set_verdict"]
    if len(report["rounds"]) > 1:
        notes.append(
            (
                "generator-verdict",
                f"The generator's verdict, from the first round on everything it made before any tile was "
                f"dropped, is {gen}; the kept set's, from the last round, is {kept}. The audit's verdict is the "
                "worse of the two: dropping tiles repairs rare accidents, never a leaky generator.",
            )
        )
    best, target = stats.get("most_sensitive_test"), stats["target_leak_share"]
    if report["verdict"] == "INCONCLUSIVE" or (best and (best["share"] is None or best["share"] > target)):
        seen = (
            "no test could detect a leak of any size"
            if not best or best["tiles"] is None
            else f"the most sensitive test ({best['name']}) would only have seen a leak of {best['tiles']:,} tiles "
            f"({best['share']:.0%} of the audited set) {best['strength']}"
        )
        more = (
            f" About {best['holdout_for_target']:,} held-out tiles (there are {report['sizes']['H']:,}) would "
            f"let it detect a {target:.0%} leak."
            if best and best.get("holdout_for_target")
            else " Add held-out slides from more patients (and synthesise from more tiles) to conclude."
        )
        notes.append(
            (
                "too-small",
                f"The sets are too small to conclude: {seen}, more than the {target:.0%} the "
                f"audit must be able to detect.{more}",
            )
        )
    unit = stats["split_unit"]
    if unit != "patient":
        how = "by slide (split.unit: slide)" if unit == "slide" else "in a way this audit was not told"
        notes.append(
            (
                "split-warning",
                f"Warning: T and H were split {how}, not by patient. Slides of one patient may sit on both "
                "sides, which makes H look like T and hides leaks; give the labels CSV a patient column to "
                "split by patient.",
            )
        )
    return notes


ONSITE_NOTE = (
    "On-site report: it shows real tiles and must not leave the site. The shareable record is audit_summary.json."
)


def render_html(report: dict[str, Any]) -> str:
    verdict = report["verdict"]
    out = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Privacy audit: {verdict}</title>'
        f"<style>{_CSS}</style></head><body>"
    ]
    out += first_page(report, note=ONSITE_NOTE)
    out += _figures_section(report)
    out.append("</body></html>")
    return "".join(out)


def first_page(report: dict[str, Any], *, note: str) -> list[str]:
    """The first page, from fields the on-site report and the shareable summary both have: the verdict and one
    plain sentence per test, data-role sizes, rounds, identities, thresholds with provenance. ``note`` (plain
    text) says which report this is."""
    verdict = report["verdict"]
    sizes = report["sizes"]
    out = ['<section class="page" id="summary"><h1>Memorisation and privacy audit</h1>']
    memorisation = next((t for t in report["tests"] if t["name"] == "memorisation"), None)
    if memorisation is not None:  # the first sentence: how many tiles were copies, and what that means
        out.append(f'<p id="memorisation-sentence"><strong>{_esc(memorisation["sentence"])}</strong></p>')
    out.append(f'<div class="small">Created {_esc(report["created"])}. {_esc(note)}</div>')
    out.append(f'<div class="verdict" id="verdict" style="background:{_COLOURS[verdict]}">Verdict: {verdict}</div>')
    out.append(
        f'<p id="verdict-sentence">The audit {_VERDICT_WORDS[verdict]}. {sizes["S_kept"]:,} of {sizes["S"]:,} '
        f"synthetic tiles were audited in the final round against {sizes['T']:,} conditioning tiles (T) and "
        f"{sizes['H']:,} held-out real tiles (H).{_dropped_sentence(report)}</p>"
    )
    out.append(conditioning_html(report.get("conditioning")))
    out += [f'<p id="{key}">{_esc(text)}</p>' for key, text in first_page_notes(report)]
    out.append("<table><tr><th>Test</th><th>Status</th><th>Finding</th></tr>")
    for t in report["tests"]:
        out.append(f"<tr><td>{_esc(t['title'])}</td><td>{_badge(t['status'])}</td><td>{_esc(t['sentence'])}</td></tr>")
    out.append("</table>")
    out.append(
        "<h2>Data roles</h2><table><tr><th>Role</th><th>Tiles</th></tr>"
        f"<tr><td>S: synthetic tiles to ship (audited / given)</td><td>{sizes['S_kept']:,} / {sizes['S']:,}</td></tr>"
        f"<tr><td>T: real tiles that conditioned S</td><td>{sizes['T']:,}</td></tr>"
        f"<tr><td>H: real tiles of slides never used for conditioning (the null)</td><td>{sizes['H']:,}</td></tr>"
        f"<tr><td>Mapping s &rarr; t(s) given</td><td>{'yes' if sizes['mapping'] else 'no'}</td></tr></table>"
    )
    out.append(
        "<h2>Rounds</h2><table><tr><th>Round</th><th>Audited</th><th>Flagged</th><th>Dropped</th><th>Verdict</th></tr>"
    )
    for r in report["rounds"]:
        out.append(
            f"<tr><td>{r['round']}</td><td>{r['audited']:,}</td><td>{r['flagged']:,}</td>"
            f"<td>{r.get('dropped', 0):,}</td><td>{_badge(r['verdict'])}</td></tr>"
        )
    out.append("</table>")
    out.append("<h2>Models and encoders</h2><table><tr><th>Component</th><th>Identity</th></tr>")
    for name, ident in report["identities"].items():
        body = (
            ident
            if not isinstance(ident, dict)
            else "<br>".join(f"{_esc(k)}: <code>{_esc(v)}</code>" for k, v in ident.items())
        )
        out.append(f"<tr><td>{_esc(name)}</td><td>{body if isinstance(ident, dict) else _esc(body)}</td></tr>")
    out.append("</table>")
    out.append(
        "<h2>Thresholds and their provenance</h2><table><tr><th>Setting</th><th>Value</th><th>Provenance</th></tr>"
    )
    for key, value in report["config"].items():
        out.append(
            f"<tr><td><code>audit.{_esc(key)}</code></td><td>{_fmt(value)}</td>"
            f'<td class="small">{_esc(report["provenance"].get(key, "operational setting"))}</td></tr>'
        )
    out.append("</table></section>")
    return out


def similarity_figures(fig: dict[str, Any]) -> list[str]:
    """The nearest-neighbour histogram S->T against H->T, its percentiles and the membership ROC (numbers only: both
    the on-site report and the shareable page show them)."""
    out = ["<h2>Nearest-neighbour similarity: S&rarr;T against H&rarr;T</h2>"]
    out.append(
        '<p class="small">Copy-detector similarity of each synthetic tile (red) and each held-out real tile (blue) '
        "to its nearest conditioning tile. Copies sit at the far right; a red mass right of the blue one "
        "means the synthetic set is closer to T than new real tissue is.</p>"
    )
    out.append(
        histogram_svg(
            fig["hist_bins"],
            fig["hist_S"],
            fig["hist_H"],
            label_a="S -> T (synthetic)",
            label_b="H -> T (held-out null)",
        )
    )
    cols = sorted(fig["percentiles"]["S->T"], key=lambda name: int(name[1:]))
    out.append(
        '<h2>Percentiles</h2><table id="percentiles"><tr><th>Set</th>'
        + "".join(f"<th>{'max' if c == 'p100' else _esc(c)}</th>" for c in cols)
        + "</tr>"
    )
    for label in ("S->T", "H->T"):
        row = fig["percentiles"][label]
        out.append(
            f"<tr><td>{_esc(label)}</td>"
            + "".join(f"<td>{'n/a' if row[c] is None else f'{row[c]:.4f}'}</td>" for c in cols)
            + "</tr>"
        )
    out.append("</table>")
    if fig.get("roc"):
        out.append(
            '<h2>Membership inference ROC</h2><p class="small">Attack: a real tile is called a member of T '
            "when it is similar to some synthetic tile. The diagonal is chance.</p>"
        )
        out.append(roc_svg(fig["roc"]["fpr"], fig["roc"]["tpr"], fig["roc"]["auc"]))
    return out


def _figures_section(report: dict[str, Any]) -> list[str]:
    """Histogram, percentiles, ROC, fidelity and the closest pairs: the pages after the first."""
    out = ['<section id="figures">', *similarity_figures(report["figures"])]
    out.append(
        fidelity_html_section(report["fidelity"], report["identities"], report["config"].get("fidelity_warn_fd_ratio"))
    )
    out.append(
        '<h2>Closest pairs, worst first</h2><p class="small">synthetic (rotated/flipped to match) | nearest real '
        "tile | difference (white = equal). For a region copy: synthetic | real tile, the matched region "
        "outlined on both | the real tile aligned onto the synthetic one. On-site review only.</p>"
        '<div class="pairs" id="closest-pairs">'
    )
    for pair in report["closest_pairs"]:
        try:
            a, b, d = _pair_images(pair["synthetic"], pair["real"], pair.get("region"))
        except (PixcellFedError, OSError) as exc:  # a tile that vanished since the audit must not stop the report
            out.append(f'<div class="pair small">cannot show pair: {_esc(exc)}</div>')
            continue
        px = "n/a" if pair["pixel_score"] is None else f"{pair['pixel_score']:.3f}"
        if pair.get("region"):
            r = pair["region"]
            px += (
                f", region {r['fraction']:.0%} of the tile ({r['inliers']} matches, rotation {r['angle']:.0f}&deg;, "
                f"scale {r['scale']:.2f}{', mirrored' if r['mirrored'] else ''})"
            )
        out.append(
            f'<div class="pair"><img src="{a}" alt="synthetic"><img src="{b}" alt="nearest real">'
            f'<img src="{d}" alt="difference"><div class="small">similarity {pair["similarity"]:.3f}, pixel '
            f"{px}{' &mdash; ' + _esc(', '.join(pair['reasons'])) if pair['reasons'] else ''}<br>"
            f"{_esc(Path(pair['synthetic']).name)} | {_esc(Path(pair['real']).name)}</div></div>"
        )
    out.append("</div></section>")
    return out


def write_html(path: Path, report: dict[str, Any]) -> Path:
    return write_text_atomic(path, render_html(report))
