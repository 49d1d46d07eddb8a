"""The audit's dataset-level tests: exact tests of the audited set against the held-out null, each with the
smallest leak it could have detected. :func:`pixcell_fed.audit.gate.decide` corrects them together (Holm).

A leak, in the power statements: a synthetic tile that is a real conditioning tile plus noise. Each test says how
many such tiles, and how close to their sources, it would catch with probability 0.9.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pixcell_fed.audit import exact
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.context import AuditContext
from pixcell_fed.audit.gate import NA, PASS, SET, TestResult
from pixcell_fed.audit.registry import audit_test

REPLICATION_CUTS = (0.01, 0.05, 0.20)
"""Top shares of the pooled synthetic and held-out similarities to T that the replication test counts in."""
MEMBERSHIP_CUTS = (0.01, 0.05)
"""Top shares of the pooled membership scores of real tiles: low false-positive rates (1 % and 5 %)."""
HOLDOUT_GROWTH, HOLDOUT_MAX_FACTOR = 1.25, 200
"""Grid of held-out sizes searched for the one that would let a test detect ``audit.target_leak_share``."""


def _na(name: str, title: str) -> TestResult:
    return TestResult(name, title, NA, {}, {}, "Not computed: no synthetic tile is left.", gates=False, level=SET)


def _alpha(ctx: AuditContext) -> float:
    """Each test's level in the power calculation: its share of alpha in the worst case of Holm's correction."""
    return ctx.cfg.alpha / max(ctx.family_size, 1)


def _detectable(ctx: AuditContext, audited: int, tiles_at: Callable[[int], int | None], strength: str) -> dict:
    """The smallest detectable leak with the held-out set as it is, and the held-out size that would let the test
    detect the target share (None when no size up to HOLDOUT_MAX_FACTOR times the current one would)."""
    n_h, target = len(ctx.roles.holdout), ctx.cfg.target_leak_share
    tiles = tiles_at(n_h)
    share = tiles / audited if tiles is not None and audited else None
    needed = None
    if audited and (share is None or share > target):

        def enough(size: int) -> bool:
            found = tiles_at(size)
            return found is not None and found / audited <= target

        grid = [n_h]
        while grid[-1] < HOLDOUT_MAX_FACTOR * n_h:
            grid.append(int(np.ceil(grid[-1] * HOLDOUT_GROWTH)))
        if enough(grid[-1]):  # detection improves with more held-out tiles: bisect the grid
            lo, hi = 0, len(grid) - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if enough(grid[mid]) else (mid, hi)
            needed = grid[hi]
    return {"tiles": tiles, "share": share, "strength": strength, "holdout_for_target": needed}


def _set_result(
    name: str, title: str, p_value: float, detectable: dict, statistic: dict, sentence: str, **extra
) -> TestResult:
    return TestResult(
        name,
        title,
        PASS,
        statistic,
        extra.pop("thresholds", {}),
        sentence,
        level=SET,
        p_value=float(p_value),
        detectable=detectable,
        **extra,
    )


def _bonferroni(tests: list[exact.CountTest]) -> tuple[float, exact.CountTest]:
    best = min(tests, key=lambda t: t.p_value)
    return min(1.0, best.p_value * len(tests)), best


@audit_test("replication", level=SET)
def replication(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Are synthetic tiles over-represented at the top of the pooled similarities to T (S and H pooled)?"""
    title = "Nearest-neighbour similarity against the held-out null"
    if not len(active):
        return _na("replication", title)
    nb = ctx.neighbours
    s_nn, h_nn = nb.s_to_t.sims[active, 0], nb.h_to_t.sims[:, 0]
    cuts = exact.pooled_cuts(s_nn, h_nn, REPLICATION_CUTS)
    p, best = _bonferroni(cuts)
    share = REPLICATION_CUTS[cuts.index(best)]
    m = len(active)
    _, at = exact.best_pooled_cut(m, len(h_nn), REPLICATION_CUTS, _alpha(ctx))
    detect = _detectable(
        ctx,
        m,
        lambda n_h: exact.detectable_pooled_cuts(m, n_h, REPLICATION_CUTS, _alpha(ctx)),
        _strength(cuts[at or 0].cut),
    )
    return _set_result(
        "replication",
        title,
        p,
        detect,
        {
            "percentiles_S": st.percentiles(s_nn),
            "cuts": {f"top {q:.0%}": c.to_dict() for q, c in zip(REPLICATION_CUTS, cuts)},
        },
        f"Of the {best.selected:,} synthetic and held-out tiles most similar to a conditioning tile (the top "
        f"{share:.0%}, similarity >= {best.cut:.3f}), {best.observed:,} are synthetic where {best.expected:.1f} are "
        f"expected if synthetic tiles were no closer to T than new real tissue (exact hypergeometric test, best of "
        f"{len(cuts)} cuts).",
        null={"percentiles_H": st.percentiles(h_nn)},
    )


@audit_test("outliers", level=SET)
def outliers(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Tiles closer to T than every held-out tile is, and tiles much closer to one real tile than to any other."""
    title = "Tiles unusually close to one real tile"
    if not len(active):
        return _na("outliers", title)
    cfg, s, h = ctx.cfg, ctx.s_tile, ctx.h_tile
    above = exact.top_run(s.nn_sim[active], h.nn_sim)
    ratio = exact.flag_count(s.ratio[active] < cfg.nn_ratio, h.ratio < cfg.nn_ratio)
    p = min(1.0, 2 * min(above.p_value, ratio.p_value))
    m, n_h = len(active), len(h.nn_sim)
    detect = _detectable(
        ctx,
        m,
        lambda size: exact.detectable_top_run(m, size, _alpha(ctx) / 2),
        _strength(above.cut, "above every held-out tile's"),
    )
    h_ratio = int((h.ratio < cfg.nn_ratio).sum())
    return _set_result(
        "outliers",
        title,
        p,
        detect,
        {
            "above_every_held_out": above.observed,
            "p_above": above.p_value,
            "below_nn_ratio": ratio.observed - h_ratio,
            "p_nn_ratio": ratio.p_value,
            "audited": m,
        },
        f"{above.observed:,} of {m:,} synthetic tiles are closer to a conditioning tile than every one of the "
        f"{n_h:,} held-out tiles is ({above.expected:.1f} expected; flagged and dropped), and "
        f"{ratio.observed - h_ratio:,} are much closer to one real tile than to any other (ratio < {cfg.nn_ratio:.2f}; "
        f"held-out tiles: {h_ratio:,} of {n_h:,}); exact tests, the smaller p-value doubled.",
        null={"below_nn_ratio": h_ratio, "size": n_h, "flagged": int(ctx.h_flagged.sum())},
        thresholds={"nn_ratio": cfg.nn_ratio},
    )


@audit_test("dcr", level=SET)
def dcr(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Distance to closest record: is each synthetic tile's nearest real tile in T more often than chance?"""
    title = "Closer to the conditioning tiles than to held-out tiles?"
    if not len(active):
        return _na("dcr", title)
    nb, m = ctx.neighbours, len(active)
    n_t, n_r = nb.n_t, len(nb.r_self)
    counts = np.bincount(nb.s_real[active], minlength=n_r).astype(np.float64)
    perm = exact.label_permutation(counts, np.arange(n_r) < n_t)

    def tiles_at(n_h: int) -> int | None:  # counts spread over more real tiles: the null's spread scales with them
        sd = perm.null_sd * np.sqrt((n_t * n_h / (n_t + n_h) ** 2) / (n_t * (n_r - n_t) / n_r**2))
        return exact.detectable_shift(sd, n_h / (n_t + n_h), _alpha(ctx))

    detect = _detectable(ctx, m, tiles_at, "closer to their source than to any other real tile")
    return _set_result(
        "dcr",
        title,
        perm.p_value,
        detect,
        {
            "share_closer_to_T": perm.observed / m,
            "expected_share": perm.null_mean / m,
            "permutations": exact.PERMUTATIONS,
        },
        f"{perm.observed / m:.1%} of synthetic tiles have their nearest real tile among the {n_t:,} conditioning "
        f"rather than the {n_r - n_t:,} held-out tiles, where {perm.null_mean / m:.1%} is expected if it did not "
        f"matter which real tiles conditioned them (all of T and H; {exact.PERMUTATIONS:,} relabellings of the real "
        f"tiles with a fixed seed).",
    )


@audit_test("authenticity", level=SET)
def authenticity(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Alaa et al. (2022): a tile closer to its nearest real tile t* than t* is to its own nearest real tile is
    inauthentic; are synthetic tiles inauthentic more often than held-out tiles are?"""
    title = "Authenticity (Alaa et al. 2022)"
    if not len(active):
        return _na("authenticity", title)
    nb, m = ctx.neighbours, len(active)
    s_in = nb.s_to_t.sims[active, 0] > nb.t_self[nb.s_to_t.idx[active, 0]]
    h_in = nb.h_to_t.sims[:, 0] > nb.t_self[nb.h_to_t.idx[:, 0]]
    test = exact.flag_count(s_in, h_in)
    rate = float(h_in.mean()) if h_in.size else 0.0
    detect = _detectable(
        ctx,
        m,
        lambda n_h: exact.detectable_flags(m, n_h, rate, _alpha(ctx)),
        f"closer to their source than it is to its nearest other conditioning tile (similarity "
        f"above {float(np.median(nb.t_self)):.2f}, the median)",
    )
    return _set_result(
        "authenticity",
        title,
        test.p_value,
        detect,
        {"authentic_share": 1.0 - float(s_in.mean()), "inauthentic": int(s_in.sum()), "audited": m},
        f"{1.0 - float(s_in.mean()):.1%} of synthetic tiles are authentic (farther from their nearest conditioning "
        f"tile than that tile is from its own nearest one); real held-out tiles: {1.0 - rate:.1%} (Fisher's exact "
        f"test on the inauthentic counts).",
        null={"authentic_share": 1.0 - rate},
    )


@audit_test("membership_inference", level=SET, all_spaces=True)
def membership_inference(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Density-calibrated attack: a real tile is called a member when it is closer to the synthetic set than to its
    nearest other real tile; are conditioning tiles over-represented among the top scores (low false positives)?"""
    name = "membership_inference" if ctx.primary else f"membership_inference:{ctx.neighbours.name}"
    title = "Membership inference from the synthetic set" + ("" if ctx.primary else f" ({ctx.neighbours.name})")
    if not len(active):
        return _na(name, title)
    cfg, nb, m = ctx.cfg, ctx.neighbours, len(active)
    score = nb.nearest_synthetic(active) - nb.r_self
    members, others = score[: nb.n_t], score[nb.n_t :]
    cuts = exact.pooled_cuts(members, others, MEMBERSHIP_CUTS)
    p, best = _bonferroni(cuts)
    tpr, auc = st.tpr_at_fpr(members, others, 0.01), st.roc_auc(members, others)
    base = float(np.median(nb.r_self[: nb.n_t]))
    _, at = exact.best_pooled_cut(nb.n_t, len(others), MEMBERSHIP_CUTS, _alpha(ctx))
    cut = cuts[at or 0].cut
    detect = _detectable(
        ctx,
        m,
        lambda n_h: exact.detectable_pooled_cuts(nb.n_t, n_h, MEMBERSHIP_CUTS, _alpha(ctx)),
        _strength(None if cut is None else base + cut),
    )
    thresholds, allowed = {}, (True, True)
    if not ctx.primary:
        thresholds = {
            "encoder_membership_tpr_warn": cfg.encoder_membership_tpr_warn,
            "encoder_membership_tpr_fail": cfg.encoder_membership_tpr_fail,
        }
        allowed = (tpr >= cfg.encoder_membership_tpr_warn, tpr >= cfg.encoder_membership_tpr_fail)
    fpr_curve, tpr_curve = st.roc_curve(members, others)
    return _set_result(
        name,
        title,
        p,
        detect,
        {
            "auc": auc,
            "tpr_at_1pct_fpr": tpr,
            "members": len(members),
            "nonmembers": len(others),
            "space": nb.name,
            "cuts": {f"top {q:.0%}": c.to_dict() for q, c in zip(MEMBERSHIP_CUTS, cuts)},
        },
        f"An attacker holding the synthetic set scores each real tile by its similarity to the nearest synthetic "
        f"tile minus that to its nearest other real tile ({nb.name} space): {best.observed:,} of the "
        f"{best.selected:,} top-scoring real tiles are conditioning tiles where {best.expected:.1f} are expected "
        f"(exact test over all {len(members):,} conditioning and {len(others):,} held-out tiles); it catches "
        f"{tpr:.1%} of conditioning tiles at 1% false positives (AUC {auc:.2f}).",
        thresholds=thresholds,
        alarm_allowed=allowed,
        figure={"roc": {"fpr": _thin(fpr_curve), "tpr": _thin(tpr_curve), "auc": auc}} if ctx.primary else None,
    )


def _strength(similarity: float | None, relation: str = "of at least") -> str:
    """How close to its source a leaked tile must be for a test to see it, in words (None: the test has no cut)."""
    if similarity is None:
        return "not at all (there is nothing to compare with)"
    if similarity >= 0.995:
        return "only if they are near-exact copies of their sources"
    return f"at a similarity to their source {relation} {similarity:.2f}"


def _thin(curve: np.ndarray, points: int = 200) -> list[float]:
    """At most ``points`` points of a monotone curve (figures are binned before they are shared)."""
    idx = np.unique(np.linspace(0, len(curve) - 1, min(points, len(curve))).round().astype(int))
    return [float(curve[i]) for i in idx]
