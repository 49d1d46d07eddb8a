"""The audit's per-tile tests: each synthetic tile is judged on its own, so dropping a flagged tile repairs them;
and the memorisation rate, which judges the generator by how many of its tiles were copies and is never repaired."""

from __future__ import annotations

import numpy as np

from pixcell_fed.audit.context import AuditContext
from pixcell_fed.audit.gate import FAIL, GENERATOR, NA, PASS, WARN, TestResult
from pixcell_fed.audit.registry import audit_test
from pixcell_fed.config.schema import AuditConfig


@audit_test("memorisation", level=GENERATOR)
def memorisation(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Share of all synthetic tiles, before anything is dropped, confirmed as copies (of any real tile or of their
    own source). Any copy warns; more than ``audit.max_copy_share`` fails: the generator memorises."""
    cfg, n = ctx.cfg, len(ctx.roles.synthetic)
    copied = ctx.s_tile.copy.copy()
    if ctx.paired is not None:
        copied[ctx.paired.rows[ctx.paired.copy]] = True
    k = int(copied.sum())
    share = k / n if n else 0.0
    status = FAIL if share > cfg.max_copy_share else WARN if k else PASS
    return TestResult(
        "memorisation",
        "Memorisation rate of the generator",
        status,
        {"copies": k, "generated": n, "copy_share": share},
        {"max_copy_share": cfg.max_copy_share},
        memorisation_sentence(k, n, share, cfg.max_copy_share),
    )


def memorisation_sentence(copies: int, generated: int, share: float, max_share: float) -> str:
    """What the number of copies among all generated tiles means, in one sentence for the officer."""
    if not copies:
        return f"None of the {generated:,} synthetic tiles is a copy of a real tile: no sign of memorisation."
    head = f"{copies:,} of the {generated:,} synthetic tiles ({share:.1%}) were copies of real tiles"
    if share > max_share:
        return (
            f"{head}: the generator memorises its inputs (more than the {max_share:.1%} accepted as rare "
            "accidents), so every tile it made is suspect, including those that escaped detection, and nothing "
            "from this run may be shipped; dropping the copies does not change this."
        )
    return (
        f"{head}: within the {max_share:.1%} accepted as rare accidents; the copies are dropped and never "
        "shipped, but look at them in the closest pairs below."
    )


@audit_test("copy_detection")
def copy_detection(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Any synthetic tile confirmed as a copy of a conditioning tile, or of a region of one, fails."""
    cfg, n, n_h = ctx.cfg, len(active), len(ctx.h_tile.nn_sim)
    copies = int(ctx.s_tile.copy[active].sum())
    region_copies = int(ctx.s_tile.region_flagged(cfg)[active].sum())
    h_copies = int(ctx.h_tile.copy.sum())
    return TestResult(
        "copy_detection",
        "Copies of real tiles",
        FAIL if copies else PASS,
        {
            "copies": copies,
            "audited": n,
            "candidates_confirmed": int(np.isfinite(ctx.s_tile.pixel[active]).sum()),
            "region_copies": region_copies,
        },
        {
            "copy_similarity": cfg.copy_similarity,
            "copy_pixel_confirm": cfg.copy_pixel_confirm,
            **_region_thresholds(cfg),
        },
        f"{copies:,} of {n:,} synthetic tiles are confirmed copies of a real conditioning tile (up to rotation, flip, "
        f"re-compression, colour change, crop or noise)"
        + _region_clause(cfg, region_copies)
        + f"; real held-out tiles gave {h_copies:,} of {n_h:,}.",
        {"copies": h_copies, "size": n_h},
    )


def _region_thresholds(cfg: AuditConfig) -> dict[str, float]:
    if not cfg.region_copy:
        return {}
    return {
        "region_copy_min_fraction": cfg.region_copy_min_fraction,
        "region_copy_min_inliers": cfg.region_copy_min_inliers,
        "region_copy_correlation": cfg.region_copy_correlation,
    }


def _region_clause(cfg: AuditConfig, region_copies: int) -> str:
    """The copy sentence's part about region copies (empty when they are not sought)."""
    if not cfg.region_copy:
        return ""
    return (
        f", {region_copies:,} of them because a region of at least {cfg.region_copy_min_fraction:.0%} of the tile "
        "copies part of a real tile (any rotation, flip, scale 0.7-1.4)"
    )


@audit_test("paired")
def paired(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Each synthetic tile against its own source t(s): a copy fails; closer than any held-out tile is to T flags."""
    title = "Each synthetic tile against its own source"
    if ctx.paired is None:
        return TestResult(
            "paired",
            title,
            NA,
            {},
            {},
            "Not applicable: no mapping from synthetic tiles to their source tiles was given.",
            gates=False,
        )
    cfg, pairs, h_nn = ctx.cfg, ctx.paired, ctx.h_tile.nn_sim
    keep = pairs.among(active)
    sims = pairs.sims[keep]
    n_copy = int(pairs.copy[keep].sum())
    n_close = int((sims > h_nn.max()).sum()) if h_nn.size else 0
    median = float(np.median(sims)) if sims.size else float("nan")
    h_median = float(np.median(h_nn))
    return TestResult(
        "paired",
        title,
        FAIL if n_copy else PASS,
        {
            "pairs": int(keep.sum()),
            "copies": n_copy,
            "above_every_held_out": n_close,
            "median_similarity": median if sims.size else None,
        },
        {"copy_pixel_confirm": cfg.copy_pixel_confirm},
        f"{n_copy:,} of {int(keep.sum()):,} synthetic tiles copy their own source tile; {n_close:,} are closer to "
        f"it than any held-out tile is to its nearest conditioning tile (flagged and dropped); median similarity "
        f"to the source {median:.3f} against a held-out nearest-neighbour median of {h_median:.3f}.",
        {"median_nn_similarity": h_median},
    )


@audit_test("identifiers")
def identifiers(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Any identifying content (names, slide properties, image metadata) in a file to ship fails."""
    n_find = sum(len(ctx.finding_rows.get(int(i), [])) for i in active)
    n_files = sum(1 for i in active if int(i) in ctx.finding_rows)
    return TestResult(
        "identifiers",
        "Identifying content in the files to ship",
        FAIL if n_find else PASS,
        {"findings": n_find, "files": n_files, "scanned": len(active)},
        {},
        f"{n_find:,} identifying item(s) (names, slide properties, image metadata) found in {n_files:,} of "
        f"{len(active):,} files to ship.",
    )
