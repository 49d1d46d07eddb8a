"""The consortium report's "What the pool adds at each site" section: per site, the metrics of a classifier
fine-tuned on the site's own tiles from the pool's model and from a generic start, on the site's held-out tiles,
and their difference with its interval; sites that do not allow local training are listed as such."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from pixcell_fed.training.local_finetune import METRICS

_TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}
_BASELINES = {"site-weights": "the site's generic weights", "random-init": "a random initialisation"}
_STATUS = {"not-allowed": "does not allow local training (federation.allow_local_training: false)"}


def _pct(value: float) -> str:
    return f"{value:+.3f}"


def augmentation_section_html(rows: Mapping[str, Mapping[str, Any]] | None, twins: list[str]) -> str:
    """The section, or an empty string when the round did not run."""
    if rows is None:
        return ""
    esc = html.escape
    out = [
        "<h2>What the pool adds at each site</h2>",
        "<p>Each site that allows it fine-tuned a small classifier on its own labelled real tiles twice, with its "
        "own recipe and budget: from the model trained on the pool, and from the same backbone's generic start. "
        "Both were evaluated on the site's real held-out tiles; only these metrics left the site, no weights. "
        "Difference: pool minus generic start, with its 95% paired bootstrap interval over the held-out tiles "
        "(an interval above 0: the pool helps this site).</p>",
    ]
    if twins:
        out.append(
            f"<p class='bad'>The pool holds synthetic tiles from untrained twin models "
            f"({esc(', '.join(twins))}): these figures show the plumbing, not what a real pool adds.</p>"
        )
    head = "".join(
        f"<th>{esc(h)}</th>"
        for h in (
            "site",
            "status",
            "generic start",
            "held-out tiles",
            "epochs",
            *[f"{_TITLES[m]}: pool / generic" for m in METRICS],
            *[f"{_TITLES[m]} difference" for m in METRICS],
        )
    )
    body = []
    for site, row in sorted(rows.items()):
        status = row.get("status")
        if status != "done":
            detail = _STATUS.get(str(status)) or f"{status}" + (f" ({row['code']})" if row.get("code") else "") + (
                f": {row['reason']}" if row.get("reason") else ""
            )
            body.append(
                f"<tr><td>{esc(site)}</td><td class='text' colspan='{5 + 2 * len(METRICS)}'>{esc(detail)}</td></tr>"
            )
            continue
        cells = [
            esc(_BASELINES.get(str(row.get("baseline")), str(row.get("baseline")))),
            str(int(row["n"])),
            str(int(row["epochs"])),
        ]
        cells += [f"{row['pool'][m]:.3f} / {row['generic'][m]:.3f}" for m in METRICS]
        for m in METRICS:
            d = row["difference"][m]
            mark = " class='ok'" if d["low"] > 0 else " class='bad'" if d["high"] < 0 else ""
            cells.append(f"<span{mark}>{_pct(d['value'])} ({_pct(d['low'])} to {_pct(d['high'])})</span>")
        body.append(
            f"<tr><td>{esc(site)}</td><td class='text'>measured</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    out.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
    return "".join(out)
