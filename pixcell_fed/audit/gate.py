"""PASS / WARN / FAIL per test against the thresholds of :class:`~pixcell_fed.config.schema.AuditConfig`, each
threshold with the provenance that is printed beside it in the report.

A FAIL anywhere makes the verdict FAIL, which blocks the bundle; otherwise any WARN makes it WARN. Tests that do
not apply to an audit (the paired test without a mapping) are "N/A" and do not count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

PASS, WARN, FAIL, NA = "PASS", "WARN", "FAIL", "N/A"

THRESHOLD_PROVENANCE: dict[str, str] = {
    "copy_similarity": "Copy-candidate cutoff on the weight-free descriptor (cosine, max over rotations, flips and "
                       "crops). Calibrated on the real CMU-1 H&E slide: planted copies (identity, rotation, flip, JPEG "
                       "q70, colour jitter, 90% crop, noise) score >= 0.75, so 0.65 keeps every copy a candidate; "
                       "candidates are then confirmed in pixel space (Carlini et al. 2023: check the top candidates in "
                       "pixel space).",
    "copy_pixel_confirm": "Pixel-space confirmation (max band-passed normalised correlation over rotations, flips, "
                          "shifts and zooms). Calibrated on the real CMU-1 slide: planted copies >= 0.91, unrelated "
                          "tiles (including touching neighbours) <= 0.46; 0.60 sits between with margin on both sides.",
    "nn_similarity_warn": "Similarity above which a synthetic tile counts as a near replica in the replication "
                          "share, the analogue of SSCD's 90%-precision copy threshold 0.75 (Pizzi et al. 2022; "
                          "Somepalli et al. 2023 used 0.5); reported beside the holdout's share.",
    "nn_ratio": "Nearest / second-nearest distance ratio below which a tile is flagged (Gu, Yoon et al.: 1/3).",
    "zscore": "Calibrated per-tile score z = (sim - mean_H) / std_H above which a tile is flagged (audit.md: list "
              "every s with z > 4).",
    "replication_percentile_margin": "Allowed excess of the S->T nearest-neighbour similarity percentiles (p95, p99) "
                                     "over the H->T null (house default). Warns only when, in addition, the share "
                                     "of S above H's 95th percentile is significantly above 5% (one-sided exact "
                                     "binomial, p < 0.05): dataset-level, it barely moves when a few tiles are copies.",
    "dcr_score_warn": "SDMetrics DCROverfittingProtection score min(2(1-p), 1) below which the test warns, when p is "
                      "significantly above 0.5 (one-sided 95% binomial bound); house default; 1 is ideal, p = share "
                      "of S closer to T than to an equal-size H.",
    "dcr_score_fail": "DCROverfittingProtection score below which the test fails: at 0.5, three quarters of S are "
                      "closer to T than to H (house default).",
    "authenticity_margin": "Alaa et al. 2022 authenticity: the test warns when the share of authentic synthetic "
                           "tiles falls this far below the share for real held-out tiles (house default).",
    "mia_auc_warn": "Membership-inference AUC (distance attack, T vs held-out tiles) above which the test warns, when "
                    "significantly above 0.5 (one-sided Mann-Whitney U test, p < 0.05; exact for small sets); 0.5 is no leak.",
    "mia_auc_fail": "Membership-inference AUC above which the test fails, when significantly above 0.5.",
    "min_holdout": "Smallest holdout set the audit accepts: fewer tiles cannot calibrate a null (house default).",
    "min_holdout_ratio": "Smallest |H| / |T| accepted: audit.md asks |H| >= |T| / 2, ideally equal.",
    # Region-level copy detection (pixcell_fed/audit/region_copy.py); the figures are in docs/audit.md, "Region copies"
    # (tests/test_audit_validation.py prints them).
    "region_copy_min_fraction": "Smallest copied region that flags a synthetic tile, as a share of its area (issue 17: "
                                "a quarter, 128 x 128 px of a 256 px tile, the same share of a 1024 px tile); a tile "
                                "is flagged when the measured region reaches 0.8 x this share (0.2). Calibrated on "
                                "real tiles of the CMU-1 slide overlapping partly: the measured region never exceeded "
                                "the true overlap by more than 0.006; overlaps under 18.75% were never flagged, "
                                "overlaps of 25-30% in 24 of 25 pairs, larger ones always; planted quarter-tile "
                                "mosaics measured >= 0.25 (p5 0.257) and were all flagged.",
    "region_copy_min_inliers": "Keypoint matches the similarity transform (RANSAC) must explain before the pixel "
                               "check. Calibrated on the real CMU-1 slide: planted region copies give >= 10 inliers (quarter "
                               "mosaics, 70% crops), held-out and new tiles against the conditioning tiles at most 4.",
    "region_copy_correlation": "Local normalised correlation of aligned, band-passed tissue that counts as the same "
                               "tissue. Calibrated on the real CMU-1 slide: planted region copies (blurred, restained, "
                               "rotated, rescaled) correlate at a median >= 0.90 inside the region; unrelated tissue "
                               "leaves no region even with relaxed settings (3 inliers, correlation 0.4: largest "
                               "region 0.08 of a tile).",
    "region_copy_candidates": "Real tiles (or mirror images) verified per synthetic tile, nearest by VLAD similarity "
                              "of local SIFT descriptors: every planted region copy on the real CMU-1 slide was confirmed "
                              "among the first 5, also among 1,000 overlapping distractor tiles.",
}


@dataclass
class TestResult:
    """One test's outcome: what was measured, against what, and a plain sentence for the officer."""

    name: str
    title: str
    status: str
    statistic: dict[str, Any]
    thresholds: dict[str, float]
    sentence: str
    null: dict[str, Any] = field(default_factory=dict)
    gates: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["provenance"] = {k: THRESHOLD_PROVENANCE.get(k, "") for k in self.thresholds}
        return out


def verdict_of(results: Iterable[TestResult]) -> str:
    statuses = [r.status for r in results if r.gates]
    if FAIL in statuses:
        return FAIL
    if WARN in statuses:
        return WARN
    return PASS


def status_two_sided(value: float, *, warn: float, fail: float, higher_is_worse: bool, significant: bool = True) -> str:
    """FAIL/WARN/PASS of a value against two cut-offs; ``significant=False`` never raises an alarm."""
    if value != value or not significant:  # NaN: not enough data
        return PASS
    if higher_is_worse:
        return FAIL if value >= fail else WARN if value >= warn else PASS
    return FAIL if value < fail else WARN if value < warn else PASS
