"""The fidelity section of the audit's outputs: the shareable numbers and the HTML.

The maths is :mod:`pixcell_fed.audit.fidelity_metrics`; :mod:`pixcell_fed.audit.fidelity` computes the figures per
encoder space (``audit.json`` keeps them whole under ``"fidelity"``) and holds the optional ``fidelity`` test. This
module renders them: the numbers-only section of the shareable ``audit_summary.json``, and the section of
``audit.html`` and of the shareable page ``audit_summary.html``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

#: the four manifold figures, each with what it asks (docs/audit.md, "Fidelity")
MANIFOLD_FIGURES = (
    (
        "precision",
        "Precision",
        "share of the tiles that look like some real conditioning tile (Kynkäänniemi et al. 2019)",
    ),
    (
        "recall",
        "Recall",
        "share of the real conditioning tiles that some tile of the set looks like (Kynkäänniemi et al. 2019)",
    ),
    (
        "density",
        "Density",
        "how many real neighbourhoods each tile falls in, 1 = as many as real tissue (Naeem et al. 2020)",
    ),
    (
        "coverage",
        "Coverage",
        "share of the real neighbourhoods that hold at least one tile of the set (Naeem et al. 2020)",
    ),
)
_NUMERIC_KEYS = (
    "dim",
    "k",
    "confidence",
    "bootstrap",
    "bootstrap_seed",
    "sizes",
    "fd",
    "S->T",
    "H->T",
    "paired",
    *(name for name, _, _ in MANIFOLD_FIGURES),
)


def _confidence(fidelity: Mapping[str, Any]) -> float:
    return float(next((e.get("confidence") for e in fidelity.values() if e.get("confidence")), 0.95))


# ------------------------------------------------------------------------------------------------ shareable


def _numbers(value: Any) -> Any:
    """Only numbers (and None) below the section's keys: no text travels in the shareable fidelity section."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Mapping):
        kept = {str(k): _numbers(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None}
    return None


def summary_section(fidelity: Mapping[str, Any]) -> dict[str, Any]:
    """The fidelity figures for ``audit_summary.json``: per encoder space, numbers only."""
    return {str(name): _numbers({k: entry[k] for k in _NUMERIC_KEYS if k in entry}) for name, entry in fidelity.items()}


# ------------------------------------------------------------------------------------------------------ HTML


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    size = abs(value)
    return (
        f"{value:,.0f}"
        if size >= 100
        else f"{value:.1f}"
        if size >= 10
        else f"{value:.2f}"
        if size >= 1
        else f"{value:.3f}"
    )


def interval_text(cell: Mapping[str, Any] | None) -> str:
    if not cell or cell.get("value") is None:
        return "n/a"
    if cell.get("low") is None:
        return _num(cell["value"])
    return f"{_num(cell['value'])} ({_num(cell['low'])} to {_num(cell['high'])})"


def _is_twin(identities: Mapping[str, Any]) -> bool:
    return any(isinstance(ident, Mapping) and ident.get("twin") for ident in identities.values())


def html_section(
    fidelity: Mapping[str, Any], identities: Mapping[str, Any] | None = None, warn_fd_ratio: float | None = None
) -> str:
    """The "Fidelity" section of ``audit.html``: per encoder space, FD against the floor and the four manifold
    figures for S and for H, in plain words; empty when no encoder space was given."""
    if not fidelity:
        return ""
    esc = html.escape
    out = ['<section id="fidelity"><h2>Fidelity in encoder spaces (not privacy)</h2>']
    if _is_twin(identities or {}):
        out.append(
            '<p class="twin" style="color:#c53030;font-weight:600">The generator or encoder of this run is an '
            "untrained twin (a demo or test set-up): these figures show the plumbing, not model quality.</p>"
        )
    conf = _confidence(fidelity)
    out.append(
        '<p class="small">How much the synthetic tiles (S) look like the real tiles that conditioned them (T), in the '
        "spaces of the conditioning encoder and of any other encoder the site added, next to the same figures for "
        "real held-out tiles of this site (H): new real tissue is the standard S can reach. Lower Fréchet distance "
        "is closer; a ratio FD(S, T) / FD(H, T) near 1 means S is as close to T as new real tissue is. Precision "
        "and density say whether S looks real, recall and coverage whether S covers the variety of T. S is made to "
        "match T in the conditioning encoder's space, so none of this is a privacy test. "
        f"Brackets: {conf:.0%} bootstrap intervals. "
        + (
            "These figures do not gate the audit."
            if warn_fd_ratio is None
            else f"The audit warns when a ratio's interval lies wholly above {warn_fd_ratio:g} "
            "(audit.fidelity_warn_fd_ratio)."
        )
        + "</p>"
    )
    for name, entry in fidelity.items():
        sizes = entry.get("sizes") or {}
        out.append(f"<h3>{esc(str(name))} ({esc(str(entry.get('dim')))} dims)</h3>")
        if sizes:
            out.append(
                f'<p class="small">S and H compared on {sizes.get("compared", 0):,} tiles each (of '
                f"{sizes.get('S', 0):,} and {sizes.get('H', 0):,}), against all {sizes.get('T', 0):,} tiles of T; "
                f"neighbourhoods of k = {esc(str(entry.get('k')))}.</p>"
            )
        out.append(
            '<table class="fidelity"><tr><th>Figure</th><th>S: synthetic</th><th>H: new real tissue (floor)</th>'
            "<th>What it asks</th></tr>"
        )
        fd = entry.get("fd")
        if fd:
            out.append(
                f"<tr><td>Fréchet distance to T</td><td>{interval_text(fd.get('S->T'))}</td>"
                f'<td>{interval_text(fd.get("H->T"))}</td><td class="small">distance between the Gaussians '
                "fitted to each set and to T (Heusel et al. 2017); lower is closer</td></tr>"
            )
            out.append(
                f'<tr><td><b>FD ratio S / H</b></td><td colspan="2"><b>{interval_text(fd.get("ratio"))}</b></td>'
                '<td class="small">1 = as close to T as new real tissue; far above 1 = not</td></tr>'
            )
        for key, title, meaning in MANIFOLD_FIGURES:
            cell = entry.get(key)
            if cell:
                out.append(
                    f"<tr><td>{esc(title)}</td><td>{interval_text(cell.get('S'))}</td>"
                    f'<td>{interval_text(cell.get("H"))}</td><td class="small">{esc(meaning)}</td></tr>'
                )
        if "S->T" in entry:
            out.append(
                f"<tr><td>Nearest-neighbour cosine to T (percentiles)</td><td>{_pct(entry['S->T'])}</td>"
                f'<td>{_pct(entry["H->T"])}</td><td class="small">similarity of each tile to its most similar '
                "tile of T</td></tr>"
            )
        if "paired" in entry:
            out.append(
                f'<tr><td>s against its own source t(s)</td><td colspan="2">{_pct(entry["paired"])}</td>'
                '<td class="small">cosine of each synthetic tile to the tile that conditioned it</td></tr>'
            )
        out.append("</table>")
        out.extend(
            f'<p class="small">Not computed: {esc(str(reason))}.</p>' for reason in entry.get("not_computed") or []
        )
    out.append("</section>")
    return "".join(out)


def _pct(row: Mapping[str, Any] | None) -> str:
    if not row:
        return "n/a"
    return ", ".join(f"{html.escape(str(k))} {_num(v)}" for k, v in row.items() if k in ("p50", "p95", "p100"))
