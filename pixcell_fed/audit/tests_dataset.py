"""The audit's dataset-level tests: statistics of the whole audited set against the held-out null."""

from __future__ import annotations

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.context import AuditContext
from pixcell_fed.audit.gate import NA, PASS, WARN, TestResult, status_two_sided
from pixcell_fed.audit.registry import audit_test


@audit_test("replication")
def replication(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Percentiles of nearest-neighbour similarity S->T against H->T, and the share of S above H's p95."""
    cfg, s_nn, h_nn = ctx.cfg, ctx.s_tile.nn_sim[active], ctx.h_tile.nn_sim
    ps, ph = st.percentiles(s_nn), st.percentiles(h_nn)
    excess = max(ps["p95"] - ph["p95"], ps["p99"] - ph["p99"]) if len(active) else float("nan")
    share_s, share_h = st.share_above(s_nn, cfg.nn_similarity_warn), st.share_above(h_nn, cfg.nn_similarity_warn)
    exceed, p_value = st.exceedance_test(s_nn, h_nn, 95.0)
    return TestResult(
        "replication", "Nearest-neighbour similarity against the held-out null",
        WARN if excess > cfg.replication_percentile_margin and p_value < 0.05 else PASS,
        {"percentile_excess": excess, "percentiles_S": ps, "share_above": share_s,
         "share_above_null_p95": exceed, "p_value": p_value},
        {"replication_percentile_margin": cfg.replication_percentile_margin, "nn_similarity_warn": cfg.nn_similarity_warn},
        f"The 95th/99th percentiles of synthetic-to-real similarity exceed those of held-out-to-real by "
        f"{excess:+.3f} (allowed {cfg.replication_percentile_margin:.3f}); {exceed:.1%} of synthetic tiles lie above "
        f"the held-out 95th percentile (5% expected; binomial p = {p_value:.2g}, warns when < 0.05 and the excess "
        f"is over the margin); {share_s:.1%} of synthetic and {share_h:.1%} of held-out tiles exceed "
        f"{cfg.nn_similarity_warn:.2f}.",
        {"percentiles_H": ph, "share_above": share_h})


@audit_test("dcr")
def dcr(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Train-vs-holdout distance to closest record (SDMetrics DCROverfittingProtection), |T| = |H| subsampled."""
    cfg, n, split = ctx.cfg, len(active), ctx.split
    p = st.dcr_share_closer_to_train(1 - split.s_to_tdcr[active], 1 - split.s_to_hdcr[active]) if n else float("nan")
    score = st.dcr_protection_score(p) if n else float("nan")
    p_lower = p - 1.645 * np.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")
    return TestResult(
        "dcr", "Closer to the conditioning tiles than to held-out tiles?",
        status_two_sided(score, warn=cfg.dcr_score_warn, fail=cfg.dcr_score_fail, higher_is_worse=False,
                         significant=bool(p_lower > 0.5)),
        {"share_closer_to_T": p, "share_lower95": p_lower, "score": score, "subsample_size": split.n_dcr},
        {"dcr_score_warn": cfg.dcr_score_warn, "dcr_score_fail": cfg.dcr_score_fail},
        f"{p:.1%} of synthetic tiles are closer to a conditioning tile than to an equally large set of held-out tiles "
        f"({split.n_dcr:,} each; one-sided 95% lower bound {p_lower:.1%}); 50% is ideal. Protection score {score:.2f} "
        f"(1 best; warns below {cfg.dcr_score_warn:g}, fails below {cfg.dcr_score_fail:g}, when the share is "
        f"significantly above 50%).")


@audit_test("authenticity")
def authenticity(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Alaa et al. (2022): share of synthetic tiles farther from their nearest real tile than it is from its own."""
    cfg, s = ctx.cfg, ctx.s_tile
    auth = float(st.authentic_mask(1 - s.nn_sim[active], s.top.idx[active, 0], ctx.t_self_dist).mean()) \
        if len(active) else float("nan")
    h_auth = ctx.h_authentic_share
    return TestResult(
        "authenticity", "Authenticity (Alaa et al. 2022)",
        WARN if len(active) and auth < h_auth - cfg.authenticity_margin else PASS,
        {"authentic_share": auth}, {"authenticity_margin": cfg.authenticity_margin},
        f"{auth:.1%} of synthetic tiles are authentic (farther from their nearest real tile than that tile is from "
        f"its own nearest real neighbour); real held-out tiles: {h_auth:.1%}.",
        {"authentic_share": h_auth})


@audit_test("membership_inference")
def membership_inference(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """Black-box attack: T members against H non-members, scored by nearest-synthetic similarity."""
    title = "Membership inference from the synthetic set"
    if not len(active):
        return TestResult("membership_inference", title, NA, {}, {}, "Not computed: no synthetic tile is left.",
                          gates=False)
    cfg, split = ctx.cfg, ctx.split
    s_desc = ctx.s_set.desc[active]
    member = F.search_from_real(ctx.t_set.subset(split.t_mia), s_desc, device=cfg.device)
    nonmember = F.search_from_real(ctx.h_set.subset(split.h_mia), s_desc, device=cfg.device)
    mia = st.membership_inference(member, nonmember)
    status = status_two_sided(mia.auc, warn=cfg.mia_auc_warn, fail=cfg.mia_auc_fail, higher_is_worse=True,
                              significant=mia.p_value < 0.05)
    return TestResult(
        "membership_inference", title, status,
        {"auc": mia.auc, "p_value": mia.p_value, "tpr_at_1pct_fpr": mia.tpr_at_1pct_fpr,
         "members": mia.n_members, "nonmembers": mia.n_nonmembers},
        {"mia_auc_warn": cfg.mia_auc_warn, "mia_auc_fail": cfg.mia_auc_fail},
        f"An attacker holding the synthetic set tells conditioning tiles from held-out tiles with AUC {mia.auc:.2f} "
        f"(one-sided Mann-Whitney p = {mia.p_value:.2g}; 0.5 is chance) and catches {mia.tpr_at_1pct_fpr:.1%} of "
        f"conditioning tiles at 1% false positives ({mia.n_members:,} vs {mia.n_nonmembers:,} tiles).",
        figure={"roc": {"fpr": [float(x) for x in mia.fpr], "tpr": [float(x) for x in mia.tpr], "auc": mia.auc}})
