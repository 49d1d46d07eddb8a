"""Each pooled site's fidelity figures, read from the signed shareable audit of its bundle, for the consortium
report: FD(S, T) against the held-out floor FD(H, T), their ratio, and precision, recall, density and coverage
of S and of H, per encoder space (:mod:`pixcell_fed.audit.fidelity_metrics` computed them at the site).

The audit travelled with the bundle and was verified with it; its numbers are still checked here (finite, in
their ranges) before they reach the report, and names are kept only when they are plain.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pixcell_fed.audit.fidelity_report import MANIFOLD_FIGURES, interval_text

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+\- ]{1,80}$")
_ROLES = ("S", "H")
MAX_SPACES = 16


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


def _cell(raw: Any, low: float, high: float) -> dict[str, float | None] | None:
    if not isinstance(raw, Mapping):
        return None
    cell = {k: _number(raw.get(k), low, high) for k in ("value", "low", "high")}
    return cell if cell["value"] is not None else None


def _mapping(value: Any) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else {}


def space_figures(entry: Any) -> dict[str, Any] | None:
    """The checked figures of one encoder space of a shareable audit (None when there are none)."""
    if not isinstance(entry, Mapping):
        return None
    fd = _mapping(entry.get("fd"))
    out: dict[str, Any] = {"fd": {key: _cell(fd.get(key), 0.0, 1e12) for key in ("S->T", "H->T", "ratio")}}
    for name, _, _ in MANIFOLD_FIGURES:
        raw = _mapping(entry.get(name))
        out[name] = {role: _cell(raw.get(role), 0.0, 1e6 if name == "density" else 1.0) for role in _ROLES}
    sizes = _mapping(entry.get("sizes"))
    out["compared"] = int(sizes["compared"]) if _number(sizes.get("compared"), 0, 1e9) is not None else None
    return out if out["fd"]["ratio"] or any(out[n]["S"] for n, _, _ in MANIFOLD_FIGURES) else None


def audit_fidelity(audit: Any) -> dict[str, dict[str, Any]]:
    """Per encoder space, the checked fidelity figures of one shareable audit (``audit.json`` of a bundle)."""
    spaces = audit.get("fidelity") if isinstance(audit, Mapping) else None
    if not isinstance(spaces, Mapping):
        return {}
    out = {}
    for i, (name, entry) in enumerate(list(spaces.items())[:MAX_SPACES]):
        figures = space_figures(entry)
        if figures is not None:
            out[name if isinstance(name, str) and _NAME_RE.match(name) else f"space {i + 1}"] = figures
    return out


def pooled_fidelity(pool_dir: str | Path, sites: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """site -> space -> figures, for every pooled site whose bundle is in the pool (``bundles/<site>/<run_id>``)."""
    from pixcell_fed.bundle.layout import AUDIT

    out = {}
    for site, status in sorted(sites.items()):
        run_id = status.get("run_id")
        if status.get("status") != "complete" or not run_id:
            continue
        path = Path(pool_dir) / "bundles" / site / str(run_id) / AUDIT
        try:
            out[site] = audit_fidelity(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            out[site] = {}
    return out


def fidelity_section_html(by_site: Mapping[str, Mapping[str, Any]], twins: list[str]) -> str:
    """The consortium report's "Fidelity of each site's synthetic set" section."""
    if not by_site:
        return ""
    esc = html.escape
    out = [
        "<h2>Fidelity of each site's synthetic set</h2>",
        "<p>From each site's signed audit: in each encoder space, the Fréchet distance of the synthetic tiles (S) "
        "to the real tiles that conditioned them (T), beside that of new real tissue of the same site (H, on as "
        "many tiles); a ratio S / H near 1 means the synthetic set is as close to the site's tissue as new real "
        "tissue is. Precision and density: does S look real; recall and coverage: does S cover T's variety "
        "(H's values in the next column). Brackets: 95% bootstrap intervals.</p>",
    ]
    if twins:
        out.append(
            f"<p class='bad'>{esc(', '.join(twins))}: untrained twin models; these fidelity figures show the "
            "plumbing, not model quality.</p>"
        )
    head = ["site", "encoder space", "FD ratio S / H", "FD(S, T)", "FD(H, T)"]
    for _, title, _ in MANIFOLD_FIGURES:
        head += [f"{title} S", f"{title} H"]
    rows = []
    for site, spaces in sorted(by_site.items()):
        if not spaces:
            rows.append(
                f"<tr><td>{esc(site)}</td><td class='text' colspan='{len(head) - 1}'>no fidelity figures in its "
                "audit</td></tr>"
            )
        for space, fig in spaces.items():
            cells = [interval_text(fig["fd"].get(key)) for key in ("ratio", "S->T", "H->T")]
            for name, _, _ in MANIFOLD_FIGURES:
                cells += [interval_text(fig[name].get("S")), interval_text(fig[name].get("H"))]
            rows.append(
                f"<tr><td>{esc(site)}</td><td class='text'>{esc(space)}</td>"
                + "".join(f"<td>{esc(c)}</td>" for c in cells)
                + "</tr>"
            )
    out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")
    return "".join(out)
