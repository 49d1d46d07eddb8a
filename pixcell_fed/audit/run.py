"""``run_audit``: roles -> features -> per-tile flags -> dataset tests -> gate, in rounds, then the reports.

Per-tile results (nearest real tile, copy confirmation, z-score, distance ratio, paired check, identifiers) do not
depend on the rest of S, so they are computed once; each round recomputes the dataset-level tests on the tiles
that survive. When ``audit.drop_flagged`` is on, flagged tiles are dropped and the audit re-runs, up to
``audit.max_rounds`` rounds. The verdict is that of the last round, on exactly the tiles in ``AuditResult.kept``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import region_copy as rc
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.gate import FAIL, NA, PASS, WARN, TestResult, status_two_sided, verdict_of
from pixcell_fed.audit.identifiers import scan_for_identifiers
from pixcell_fed.audit.roles import DataRoles, build_roles
from pixcell_fed.hashing import sha256_file
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.runlog import get_logger

log = get_logger("audit")

HIST_BINS = np.linspace(0.0, 1.0, 41)
FLAG_REASONS = ("copy", "paired_copy", "zscore", "nn_ratio", "paired_zscore", "identifier")
FAIL_REASONS = ("copy", "paired_copy", "identifier")


@dataclass
class AuditResult:
    """Outcome of :func:`run_audit`. ``kept``: the synthetic files the verdict covers (flagged ones dropped)."""

    verdict: str
    kept: list[Path]
    report_path: Path
    json_path: Path
    summary_path: Path
    tests: list[TestResult] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict in (PASS, WARN)


@dataclass
class _PerTile:
    """Per-tile results for a query set against T (S, or H as the null)."""

    top: Any
    pixel: np.ndarray
    pixel_match: np.ndarray
    z: np.ndarray
    ratio: np.ndarray
    region: rc.RegionCopies | None = None

    @property
    def nn_sim(self) -> np.ndarray:
        return self.top.sims[:, 0]

    def copy(self, cfg: AuditConfig) -> np.ndarray:
        """Whole-tile copies (pixel-confirmed) and region copies (geometrically and pixel-confirmed)."""
        whole = np.nan_to_num(self.pixel, nan=-1.0) >= cfg.copy_pixel_confirm
        return whole if self.region is None else whole | self.region.flagged(cfg.region_copy_min_fraction)


def _per_tile(queries: F.TileSet, t: F.TileSet, cfg: AuditConfig, null: st.NullModel | None, top=None,
              region_index: rc.RealIndex | None = None) -> _PerTile:
    top = F.search_real(queries, t, cfg.top_k, device=cfg.device) if top is None else top
    pixel, match = F.confirm_candidates(queries, t, top, cfg.copy_similarity)
    z = null.z(top.sims[:, 0]) if null is not None else np.zeros(len(queries))
    region = None if region_index is None else rc.find_region_copies(
        queries.work, region_index, candidates=cfg.region_copy_candidates, min_inliers=cfg.region_copy_min_inliers,
        correlation=cfg.region_copy_correlation, device=cfg.device)
    return _PerTile(top, pixel, match, z, st.nn_distance_ratio(top.sims), region)


def run_audit(synthetic: Sequence[str | Path], reference: Sequence[str | Path], holdout: Sequence[str | Path], *,
              source_of: Mapping[str, str] | None = None, audit_cfg: AuditConfig | None = None,
              out_dir: str | Path, extra_feature_spaces: Mapping[str, Any] | None = None,
              identities: Mapping[str, Any] | None = None, forbidden_strings: Sequence[str] = ()) -> AuditResult:
    """Audit synthetic tiles S against their conditioning tiles T with held-out tiles H as the null.

    Writes ``out_dir/audit.json`` and ``out_dir/audit.html`` (on-site: real file names, real tiles) and
    ``out_dir/audit_summary.json`` (shareable: statistics, verdicts, thresholds, identities, hashes of the
    audited synthetic files; no real tiles, names, paths or embeddings). ``source_of`` maps each synthetic tile
    (path, file name or stem) to its source tile in T. ``extra_feature_spaces``: name -> encoder (``.embed``) or
    callable on uint8 NHWC images, reported as fidelity. ``forbidden_strings``: the site's identifiers (slide
    names, keys, properties) that must not appear in the shipped files.
    """
    from pixcell_fed.audit import report_html, report_json

    cfg = audit_cfg or AuditConfig()
    out_dir = Path(out_dir)
    roles = build_roles(synthetic, reference, holdout, source_of=source_of, min_holdout=cfg.min_holdout,
                        min_holdout_ratio=cfg.min_holdout_ratio)
    log.info("audit: |S|=%d |T|=%d |H|=%d, mapping %s", len(roles.synthetic), len(roles.reference),
             len(roles.holdout), "given" if roles.has_mapping else "absent")
    rng = np.random.default_rng(cfg.seed)
    work_side = rc.kp.WORK_SIDE if cfg.region_copy else None
    s_set = F.TileSet.from_files(roles.synthetic, "synthetic", work_side=work_side)
    t_set = F.TileSet.from_files(roles.reference, "reference", work_side=work_side)
    h_set = F.TileSet.from_files(roles.holdout, "holdout", work_side=work_side)
    region_index = rc.RealIndex.build(t_set.work) if cfg.region_copy else None

    # The null: H against T, as if H were synthetic.
    h_top = F.search_real(h_set, t_set, cfg.top_k, device=cfg.device)
    null = st.NullModel.fit(h_top.sims[:, 0])
    h_tile = _per_tile(h_set, t_set, cfg, null, top=h_top, region_index=region_index)
    s_tile = _per_tile(s_set, t_set, cfg, null, region_index=region_index)
    t_self = F.search_real(t_set, t_set, 1, device=cfg.device, exclude_self=True)
    t_self_dist = 1.0 - t_self.sims[:, 0] if t_self.sims.shape[1] else np.ones(len(t_set))

    # Second holdout split: H_mia (non-members of the membership attack) and H_dcr (the DCR holdout reference).
    h_perm = rng.permutation(len(h_set))
    h_mia_rows, h_dcr_rows = np.sort(h_perm[: len(h_set) // 2]), np.sort(h_perm[len(h_set) // 2:])
    t_mia_rows = np.sort(rng.choice(len(t_set), size=min(len(t_set), len(h_mia_rows)), replace=False))
    t_dcr_rows = np.sort(rng.choice(len(t_set), size=min(len(t_set), len(h_dcr_rows)), replace=False))
    h_dcr, t_dcr = h_set.subset(h_dcr_rows), t_set.subset(t_dcr_rows)
    s_to_tdcr = F.search_real(s_set, t_dcr, 1, device=cfg.device).sims[:, 0]
    s_to_hdcr = F.search_real(s_set, h_dcr, 1, device=cfg.device).sims[:, 0]

    # Paired check s vs t(s).
    paired = None
    if roles.has_mapping:
        rows_s = np.array(sorted(roles.source_index), dtype=np.int64)
        rows_t = np.array([roles.source_index[i] for i in rows_s], dtype=np.int64)
        sims = F.pair_similarity(s_set, rows_s, t_set, rows_t)
        pix = F.confirm_given_pairs(s_set, rows_s, t_set, rows_t, sims, cfg.copy_similarity)
        paired = {"rows": rows_s, "sims": sims, "pixel": pix, "z": null.z(sims)}

    # Identifying content in the files to be shipped.
    findings = scan_for_identifiers(roles.synthetic, forbidden_strings)
    finding_rows: dict[int, list[str]] = {}
    index_of = {str(p): i for i, p in enumerate(roles.synthetic)}
    for f in findings:
        finding_rows.setdefault(index_of[f.path], []).append(f"{f.kind}: {f.detail}")

    # Per-tile reasons.
    n_s = len(s_set)
    reasons: list[list[str]] = [[] for _ in range(n_s)]
    for i in np.flatnonzero(s_tile.copy(cfg)):
        reasons[i].append("copy")
    for i in np.flatnonzero(s_tile.z > cfg.zscore):
        reasons[i].append("zscore")
    for i in np.flatnonzero(s_tile.ratio < cfg.nn_ratio):
        reasons[i].append("nn_ratio")
    paired_sim = np.full(n_s, np.nan, np.float32)
    paired_pixel = np.full(n_s, np.nan, np.float32)
    if paired is not None:
        paired_sim[paired["rows"]] = paired["sims"]
        paired_pixel[paired["rows"]] = paired["pixel"]
        for n, i in enumerate(paired["rows"]):
            if np.nan_to_num(paired["pixel"][n], nan=-1.0) >= cfg.copy_pixel_confirm:
                reasons[i].append("paired_copy")
            if paired["z"][n] > cfg.zscore:
                reasons[i].append("paired_zscore")
    for i in finding_rows:
        reasons[i].append("identifier")
    h_flagged = h_tile.copy(cfg) | (h_tile.z > cfg.zscore) | (h_tile.ratio < cfg.nn_ratio)
    h_auth_share = float(st.authentic_mask(1 - h_tile.nn_sim, h_tile.top.idx[:, 0], t_self_dist).mean())

    # Rounds.
    def tests_of(active: np.ndarray):
        return _round_tests(cfg, active, s_set, t_set, h_set, s_tile, h_tile, h_flagged, reasons, paired, findings,
                            finding_rows, t_self_dist, h_auth_share, s_to_tdcr, s_to_hdcr, t_mia_rows, h_mia_rows,
                            len(h_dcr_rows), roles)

    active = np.arange(n_s)
    dropped_in: dict[int, int] = {}
    rounds: list[dict[str, Any]] = []
    for round_no in range(1, cfg.max_rounds + 1):
        tests, mia = tests_of(active)
        verdict = verdict_of(tests)
        flagged = [int(i) for i in active if reasons[i]]
        rounds.append({"round": round_no, "audited": int(len(active)), "flagged": len(flagged), "verdict": verdict,
                       "tests": {t.name: t.status for t in tests}})
        log.info("audit round %d: %d tiles, %d flagged, verdict %s", round_no, len(active), len(flagged), verdict)
        if not (cfg.drop_flagged and flagged and round_no < cfg.max_rounds):
            break
        for i in flagged:
            dropped_in[i] = round_no
        active = np.array([i for i in active if i not in dropped_in], dtype=np.int64)
        rounds[-1]["dropped"] = len(flagged)
        if len(active) == 0:
            tests, mia = tests_of(active)
            verdict = FAIL
            rounds.append({"round": round_no + 1, "audited": 0, "flagged": 0, "verdict": FAIL,
                           "tests": {t.name: t.status for t in tests}})
            break

    kept = [roles.synthetic[i] for i in active]
    fidelity = _fidelity(extra_feature_spaces or {}, roles, active)
    s_hashes = [sha256_file(p) for p in roles.synthetic]
    tiles = []
    active_set = set(active.tolist())
    for i, p in enumerate(roles.synthetic):
        j = int(s_tile.top.idx[i, 0])
        tiles.append({
            "file": str(p), "sha256": s_hashes[i], "kept": i in active_set, "flagged": bool(reasons[i]),
            "reasons": list(reasons[i]), "dropped_in_round": dropped_in.get(i),
            "nearest_similarity": float(s_tile.nn_sim[i]), "nearest_real": str(roles.reference[j]),
            "pixel_score": None if np.isnan(s_tile.pixel[i]) else float(s_tile.pixel[i]),
            "pixel_match": None if s_tile.pixel_match[i] < 0 else str(roles.reference[int(s_tile.pixel_match[i])]),
            "z": float(s_tile.z[i]), "nn_ratio": float(s_tile.ratio[i]),
            "paired_similarity": None if np.isnan(paired_sim[i]) else float(paired_sim[i]),
            "paired_pixel_score": None if np.isnan(paired_pixel[i]) else float(paired_pixel[i]),
            "identifier_findings": finding_rows.get(i, []),
            "region_copy": rc.evidence(s_tile.region, i, roles.reference),
        })
    act = active
    figures = {
        "hist_bins": [float(b) for b in HIST_BINS],
        "hist_S": st.histogram(s_tile.nn_sim[act], HIST_BINS),
        "hist_H": st.histogram(h_tile.nn_sim, HIST_BINS),
        "percentiles": {"S->T": st.percentiles(s_tile.nn_sim[act]), "H->T": st.percentiles(h_tile.nn_sim)},
        "roc": {"fpr": [float(x) for x in mia.fpr], "tpr": [float(x) for x in mia.tpr], "auc": mia.auc}
        if mia is not None else None,
    }
    # Copies first (each with the matched region drawn when it is a region copy), then the closest pairs.
    s_copy = s_tile.copy(cfg)
    region_copy = np.zeros(n_s, bool) if s_tile.region is None else s_tile.region.flagged(cfg.region_copy_min_fraction)
    region_fraction = np.zeros(n_s) if s_tile.region is None else s_tile.region.fraction
    order = sorted(range(n_s), key=lambda i: (not s_copy[i], -max(np.nan_to_num(s_tile.pixel[i], nan=-1.0),
                                                                  region_fraction[i]), -s_tile.nn_sim[i]))
    shown = max(cfg.closest_pairs, min(int(s_copy.sum()), rc.FLAGGED_SHOWN))
    closest = []
    for i in order[:shown]:
        region = rc.evidence(s_tile.region, i, roles.reference) if region_copy[i] else None
        j = int(s_tile.pixel_match[i] if s_tile.pixel_match[i] >= 0 else s_tile.top.idx[i, 0])
        closest.append({"synthetic": str(roles.synthetic[i]),
                        "real": region["real"] if region else str(roles.reference[j]),
                        "similarity": float(s_tile.nn_sim[i]),
                        "pixel_score": None if np.isnan(s_tile.pixel[i]) else float(s_tile.pixel[i]),
                        "reasons": list(reasons[i]), "region": region})
    report = report_json.build_report(
        cfg=cfg, verdict=verdict, roles=roles, kept=kept, rounds=rounds, tests=tests, tiles=tiles, figures=figures,
        fidelity=fidelity, closest=closest, findings=findings, identities=dict(identities or {}),
        null={"mean": null.mean, "std": null.std, "h_flagged": int(h_flagged.sum()), "h_size": len(h_set),
              "h_copies": int(h_tile.copy(cfg).sum())})
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_json.write_report(out_dir / "audit.json", report)
    summary = report_json.build_summary(report)
    summary_path = report_json.write_summary(out_dir / "audit_summary.json", summary, roles)
    html_path = report_html.write_html(out_dir / "audit.html", report)
    return AuditResult(verdict, kept, html_path, json_path, summary_path, tests, report)


def _round_tests(cfg: AuditConfig, active: np.ndarray, s_set: F.TileSet, t_set: F.TileSet, h_set: F.TileSet,
                 s_tile: _PerTile, h_tile: _PerTile, h_flagged: np.ndarray, reasons: list[list[str]], paired,
                 findings, finding_rows, t_self_dist: np.ndarray, h_auth_share: float, s_to_tdcr: np.ndarray,
                 s_to_hdcr: np.ndarray, t_mia_rows: np.ndarray, h_mia_rows: np.ndarray, n_dcr: int,
                 roles: DataRoles):
    act = np.asarray(active, dtype=np.int64)
    n, n_h = len(act), len(h_set)
    tests: list[TestResult] = []

    # 1. Per-tile copy detection: any confirmed copy fails.
    copies = int(s_tile.copy(cfg)[act].sum()) if n else 0
    h_copies = int(h_tile.copy(cfg).sum())
    region_copies = int(s_tile.region.flagged(cfg.region_copy_min_fraction)[act].sum()) if n and s_tile.region else 0
    tests.append(TestResult(
        "copy_detection", "Copies of real tiles", FAIL if copies else PASS,
        {"copies": copies, "audited": n, "candidates_confirmed": int(np.isfinite(s_tile.pixel[act]).sum()) if n else 0,
         "region_copies": region_copies},
        {"copy_similarity": cfg.copy_similarity, "copy_pixel_confirm": cfg.copy_pixel_confirm,
         **({"region_copy_min_fraction": cfg.region_copy_min_fraction,
             "region_copy_min_inliers": cfg.region_copy_min_inliers,
             "region_copy_correlation": cfg.region_copy_correlation} if cfg.region_copy else {})},
        f"{copies:,} of {n:,} synthetic tiles are confirmed copies of a real conditioning tile (up to rotation, flip, "
        f"re-compression, colour change, crop or noise)"
        + (f", {region_copies:,} of them because a region of at least {cfg.region_copy_min_fraction:.0%} of the tile "
           f"copies part of a real tile (any rotation, flip, scale 0.7-1.4)" if cfg.region_copy else "")
        + f"; real held-out tiles gave {h_copies:,} of {n_h:,}.",
        {"copies": h_copies, "size": n_h}))

    # 2. Paired check s vs its own source t(s).
    if paired is None:
        tests.append(TestResult("paired", "Each synthetic tile against its own source", NA, {}, {},
                                "Not applicable: no mapping from synthetic tiles to their source tiles was given.",
                                gates=False))
    else:
        keep = np.isin(paired["rows"], act)
        sims, pix, z = paired["sims"][keep], paired["pixel"][keep], paired["z"][keep]
        n_copy = int((np.nan_to_num(pix, nan=-1.0) >= cfg.copy_pixel_confirm).sum())
        n_z = int((z > cfg.zscore).sum())
        status = FAIL if n_copy else WARN if n_z else PASS
        tests.append(TestResult(
            "paired", "Each synthetic tile against its own source", status,
            {"pairs": int(keep.sum()), "copies": n_copy, "above_zscore": n_z,
             "median_similarity": float(np.median(sims)) if sims.size else None},
            {"copy_pixel_confirm": cfg.copy_pixel_confirm, "zscore": cfg.zscore},
            f"{n_copy:,} of {int(keep.sum()):,} synthetic tiles copy their own source tile and {n_z:,} are closer to it "
            f"than {cfg.zscore:g} standard deviations above the held-out null; median similarity to the source "
            f"{float(np.median(sims)) if sims.size else float('nan'):.3f} against a held-out nearest-neighbour median "
            f"of {float(np.median(h_tile.nn_sim)):.3f}.",
            {"median_nn_similarity": float(np.median(h_tile.nn_sim))}))

    # 3. Per-tile outliers against the null: z-score and nearest/second-nearest ratio.
    n_z = int((s_tile.z[act] > cfg.zscore).sum()) if n else 0
    n_r = int((s_tile.ratio[act] < cfg.nn_ratio).sum()) if n else 0
    h_z, h_r = int((h_tile.z > cfg.zscore).sum()), int((h_tile.ratio < cfg.nn_ratio).sum())
    tests.append(TestResult(
        "outliers", "Tiles unusually close to one real tile", WARN if (n_z or n_r) else PASS,
        {"above_zscore": n_z, "below_nn_ratio": n_r, "audited": n},
        {"zscore": cfg.zscore, "nn_ratio": cfg.nn_ratio},
        f"{n_z:,} of {n:,} synthetic tiles lie more than {cfg.zscore:g} standard deviations above the held-out null "
        f"and {n_r:,} are much closer to one real tile than to any other (ratio < {cfg.nn_ratio:.2f}); real held-out "
        f"tiles gave {h_z:,} and {h_r:,} of {n_h:,}.",
        {"above_zscore": h_z, "below_nn_ratio": h_r, "size": n_h, "flagged": int(h_flagged.sum())}))

    # 4. Dataset-level replication: percentiles of NN similarity S->T vs H->T.
    ps, ph = st.percentiles(s_tile.nn_sim[act]), st.percentiles(h_tile.nn_sim)
    excess = max(ps["p95"] - ph["p95"], ps["p99"] - ph["p99"]) if n else float("nan")
    share_s = st.share_above(s_tile.nn_sim[act], cfg.nn_similarity_warn)
    share_h = st.share_above(h_tile.nn_sim, cfg.nn_similarity_warn)
    exceed, p_value = st.exceedance_test(s_tile.nn_sim[act], h_tile.nn_sim, 95.0)
    tests.append(TestResult(
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
        {"percentiles_H": ph, "share_above": share_h}))

    # 5. Train-vs-holdout distance to closest record, |T| = |H| subsampled.
    p = st.dcr_share_closer_to_train(1 - s_to_tdcr[act], 1 - s_to_hdcr[act]) if n else float("nan")
    score = st.dcr_protection_score(p) if n else float("nan")
    p_lower = p - 1.645 * np.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")
    tests.append(TestResult(
        "dcr", "Closer to the conditioning tiles than to held-out tiles?",
        status_two_sided(score, warn=cfg.dcr_score_warn, fail=cfg.dcr_score_fail, higher_is_worse=False,
                         significant=bool(p_lower > 0.5)),
        {"share_closer_to_T": p, "share_lower95": p_lower, "score": score, "subsample_size": n_dcr},
        {"dcr_score_warn": cfg.dcr_score_warn, "dcr_score_fail": cfg.dcr_score_fail},
        f"{p:.1%} of synthetic tiles are closer to a conditioning tile than to an equally large set of held-out tiles "
        f"({n_dcr:,} each; one-sided 95% lower bound {p_lower:.1%}); 50% is ideal. Protection score {score:.2f} (1 "
        f"best; warns below {cfg.dcr_score_warn:g}, fails below {cfg.dcr_score_fail:g}, when the share is "
        f"significantly above 50%)."))

    # 6. Authenticity (Alaa et al. 2022).
    auth = float(st.authentic_mask(1 - s_tile.nn_sim[act], s_tile.top.idx[act, 0], t_self_dist).mean()) if n else float("nan")
    tests.append(TestResult(
        "authenticity", "Authenticity (Alaa et al. 2022)",
        WARN if n and auth < h_auth_share - cfg.authenticity_margin else PASS,
        {"authentic_share": auth}, {"authenticity_margin": cfg.authenticity_margin},
        f"{auth:.1%} of synthetic tiles are authentic (farther from their nearest real tile than that tile is from "
        f"its own nearest real neighbour); real held-out tiles: {h_auth_share:.1%}.",
        {"authentic_share": h_auth_share}))

    # 7. Black-box membership inference: T members vs H_mia non-members, scored by nearest-synthetic similarity.
    mia = None
    if n:
        s_desc = s_set.desc[act]
        member = F.search_from_real(t_set.subset(t_mia_rows), s_desc, device=cfg.device)
        nonmember = F.search_from_real(h_set.subset(h_mia_rows), s_desc, device=cfg.device)
        mia = st.membership_inference(member, nonmember)
        significant = mia.p_value < 0.05
        status = status_two_sided(mia.auc, warn=cfg.mia_auc_warn, fail=cfg.mia_auc_fail, higher_is_worse=True,
                                  significant=significant)
        tests.append(TestResult(
            "membership_inference", "Membership inference from the synthetic set", status,
            {"auc": mia.auc, "p_value": mia.p_value, "tpr_at_1pct_fpr": mia.tpr_at_1pct_fpr,
             "members": mia.n_members, "nonmembers": mia.n_nonmembers},
            {"mia_auc_warn": cfg.mia_auc_warn, "mia_auc_fail": cfg.mia_auc_fail},
            f"An attacker holding the synthetic set tells conditioning tiles from held-out tiles with AUC {mia.auc:.2f} "
            f"(one-sided Mann-Whitney p = {mia.p_value:.2g}; 0.5 is chance) and catches {mia.tpr_at_1pct_fpr:.1%} of "
            f"conditioning tiles at 1% false positives ({mia.n_members:,} vs {mia.n_nonmembers:,} tiles)."))
    else:
        tests.append(TestResult("membership_inference", "Membership inference from the synthetic set", NA, {},
                                {}, "Not computed: no synthetic tile is left.", gates=False))

    # 8. Identifying content in the files to be shipped.
    n_find = sum(len(finding_rows.get(int(i), [])) for i in act)
    n_files = sum(1 for i in act if int(i) in finding_rows)
    tests.append(TestResult(
        "identifiers", "Identifying content in the files to ship", FAIL if n_find else PASS,
        {"findings": n_find, "files": n_files, "scanned": n}, {},
        f"{n_find:,} identifying item(s) (names, slide properties, image metadata) found in {n_files:,} of {n:,} "
        f"files to ship."))
    return tests, mia


def _fidelity(spaces: Mapping[str, Any], roles: DataRoles, active: np.ndarray) -> dict[str, Any]:
    """Per extra feature space (e.g. the conditioning encoder): NN cosine S->T vs H->T and paired cosine."""
    from pixcell_fed.audit.search import topk_cosine

    out: dict[str, Any] = {}
    for name, space in spaces.items():
        fn = F.as_embed_fn(space)
        s = F.embed_files(fn, [roles.synthetic[i] for i in active])
        t = F.embed_files(fn, list(roles.reference))
        h = F.embed_files(fn, list(roles.holdout))
        s_nn = topk_cosine(s, t, 1).sims[:, 0] if len(s) else np.zeros(0)
        h_nn = topk_cosine(h, t, 1).sims[:, 0]
        entry: dict[str, Any] = {"dim": int(t.shape[1]), "S->T": st.percentiles(s_nn), "H->T": st.percentiles(h_nn)}
        if roles.has_mapping:
            pos = {int(i): n for n, i in enumerate(active)}
            pairs = [(pos[i], j) for i, j in roles.source_index.items() if i in pos]
            if pairs:
                a = np.stack([s[i] for i, _ in pairs])
                b = np.stack([t[j] for _, j in pairs])
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
                entry["paired"] = st.percentiles(cos)
        out[name] = entry
    return out
