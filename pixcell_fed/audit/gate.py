"""PASS / WARN / FAIL / INCONCLUSIVE per test and for the audit, each threshold with the provenance that is printed
beside it in the report.

Per-tile tests (copies, identifiers, the paired check) judge single tiles: any copy or identifier FAILs. The
dataset-level tests each return an exact p-value and the smallest leak they could have detected; :func:`decide`
corrects their p-values together (Holm), so that a clean set raises a false alarm at most ``audit.alpha`` of the
time, and a false FAIL at most ``audit.fail_alpha``. A dataset-level test that finds nothing PASSes only if it could
have detected ``audit.target_leak_share`` leaked tiles; otherwise it is INCONCLUSIVE and says what it could have
detected. The audit's verdict: FAIL if any test FAILs, else WARN if any WARNs, else INCONCLUSIVE if no
dataset-level test could have detected the target leak, else PASS. Tests that do not apply are "N/A".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pixcell_fed.audit.exact import holm

PASS, WARN, FAIL, NA, INCONCLUSIVE = "PASS", "WARN", "FAIL", "N/A", "INCONCLUSIVE"
VERDICTS = (PASS, WARN, INCONCLUSIVE, FAIL)
SEVERITY = {NA: 0, PASS: 1, INCONCLUSIVE: 2, WARN: 3, FAIL: 4}
#: levels of tests: judged per tile (repaired by dropping), per audited set (each round; round 1 also stands as the
#: generator's verdict), or once for the generator (round 1 only, carried through every round)
TILE, SET, GENERATOR = "tile", "set", "generator"

_CALIBRATION = "docs/audit.md, section 'Calibration' (the simulation harness of tests/test_audit_calibration.py)"

THRESHOLD_PROVENANCE: dict[str, str] = {
    "copy_similarity": "Copy-candidate cutoff on the weight-free descriptor (cosine, max over rotations, flips and "
    "crops). Calibrated on the real CMU-1 H&E slide: planted copies (identity, rotation, flip, JPEG "
    "q70, colour jitter, 90% crop, noise) score >= 0.75, so 0.65 keeps every copy a candidate; "
    "candidates are then confirmed in pixel space (Carlini et al. 2023: check the top candidates in "
    "pixel space).",
    "copy_pixel_confirm": "Pixel-space confirmation (max band-passed normalised correlation over rotations, flips, "
    "shifts and zooms). Calibrated on the real CMU-1 slide: planted copies >= 0.91, unrelated "
    "tiles (including touching neighbours) <= 0.46; 0.60 sits between with margin on both sides.",
    "max_copy_share": "Largest share of all generated tiles, counted in the first round before anything is dropped, "
    "that may be confirmed copies (of any real tile or of their own source) and still be dropped as "
    "rare accidents; above it the generator is memorising and every tile it made is suspect, so "
    "the audit fails whatever is dropped. 1% is the starting point of issue 12 (a memorising "
    "generator copied 140 of 165 tiles); any copy at all warns.",
    "nn_ratio": "Nearest / second-nearest distance ratio below which a tile is flagged (Gu, Yoon et al.: 1/3); the "
    "count of flagged tiles is tested against the held-out tiles' count (Fisher's exact test).",
    "alpha": "Family-wise false-alarm rate of the dataset-level tests: their exact p-values are corrected together "
    "(Holm), so a clean set warns at most this often at any size. Measured: " + _CALIBRATION + ".",
    "fail_alpha": "Holm-adjusted p-value below which a dataset-level finding FAILs rather than WARNs: a clean set "
    "fails at most this often. Measured: " + _CALIBRATION + ".",
    "target_leak_share": "Share of leaked synthetic tiles that a dataset-level test must be able to detect (with 90% "
    "probability, at its share of alpha) before finding nothing counts as PASS; otherwise the "
    "test is INCONCLUSIVE. 5% is the smallest leak of issue 20's review; detection at the large "
    "size is measured in " + _CALIBRATION + ".",
    "encoder_membership_tpr_warn": "Encoder spaces only (the conditioning encoder and extra encoders): share of "
    "conditioning tiles the membership attack must catch at 1% false positives, "
    "beside significance, before it warns (house default; S is generated to match T "
    "in the conditioning encoder's space, so a small effect is expected).",
    "encoder_membership_tpr_fail": "Encoder spaces only: share caught at 1% false positives, beside a significance "
    "below fail_alpha, above which the test fails (house default).",
    "min_holdout": "Smallest holdout set the audit accepts: fewer tiles cannot calibrate a null (house default).",
    "min_holdout_ratio": "Smallest |H| / |T| accepted: audit.md asks |H| >= |T| / 2, ideally equal.",
    "fidelity_warn_fd_ratio": "Fidelity, not privacy: warns when FD(S, T) / FD(H, T) (Fréchet distance in an encoder "
    "space against real held-out tissue on as many tiles; PixCell reports FD-type "
    "fidelity) is significantly above this value; off (null) by default, house setting.",
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
    "check. Calibrated on the real CMU-1 slide: planted region copies give >= 10 inliers "
    "(quarter mosaics, 70% crops), held-out and new tiles against the conditioning tiles at "
    "most 4.",
    "region_copy_correlation": "Local normalised correlation of aligned, band-passed tissue that counts as the same "
    "tissue. Calibrated on the real CMU-1 slide: planted region copies (blurred, restained, "
    "rotated, rescaled) correlate at a median >= 0.90 inside the region; unrelated tissue "
    "leaves no region even with relaxed settings (3 inliers, correlation 0.4: largest "
    "region 0.08 of a tile).",
    "region_copy_candidates": "Real tiles (or mirror images) verified per synthetic tile, nearest by VLAD similarity "
    "of local SIFT descriptors: every planted region copy on the real CMU-1 slide was "
    "confirmed among the first 5, also among 1,000 overlapping distractor tiles.",
}


@dataclass
class TestResult:
    """One test's outcome: what was measured, against what, and a plain sentence for the officer.

    Dataset-level tests also carry their exact ``p_value``, the ``adjusted_p`` of the family (set by
    :func:`decide`) and ``detectable``: the smallest leak they could have detected (tiles, share of S, strength)
    and the held-out set that would let them detect ``audit.target_leak_share``.
    """

    __test__ = False  # not a pytest test class

    name: str
    title: str
    status: str
    statistic: dict[str, Any]
    thresholds: dict[str, float]
    sentence: str
    null: dict[str, Any] = field(default_factory=dict)
    gates: bool = True
    level: str = TILE
    p_value: float | None = None
    adjusted_p: float | None = None
    detectable: dict[str, Any] | None = None
    alarm_allowed: tuple[bool, bool] = field(default=(True, True), repr=False)  # (may warn, may fail): effect floors
    figure: dict[str, Any] | None = field(default=None, repr=False)  # figure data (e.g. a ROC), not a statistic

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["figure"], out["alarm_allowed"]
        out["provenance"] = {k: THRESHOLD_PROVENANCE.get(k, "") for k in self.thresholds}
        return out

    @property
    def in_family(self) -> bool:
        return self.level == SET and self.gates and self.p_value is not None


def decide(results: list[TestResult], cfg: Any) -> list[TestResult]:
    """Holm across the round's dataset-level tests, then each one's status and concluding sentence (in place)."""
    family = [r for r in results if r.in_family]
    for r, adjusted in zip(family, holm([r.p_value for r in family if r.p_value is not None])):
        may_warn, may_fail = r.alarm_allowed
        r.adjusted_p = adjusted
        if adjusted < cfg.fail_alpha and may_fail:
            r.status = FAIL
        elif adjusted < cfg.alpha and may_warn:
            r.status = WARN
        else:
            share = (r.detectable or {}).get("share")
            r.status = PASS if share is not None and share <= cfg.target_leak_share else INCONCLUSIVE
        r.sentence = f"{r.sentence} {conclusion(r, cfg, len(family))}"
    return results


def conclusion(r: TestResult, cfg: Any, family: int) -> str:
    """The sentence that says what the corrected p-value means, and for INCONCLUSIVE what could have been seen."""
    p = f"exact p = {r.p_value:.2g}, Holm-adjusted over {family} tests p = {r.adjusted_p:.2g}"
    if r.status == FAIL:
        return f"A leak ({p}, below {cfg.fail_alpha:g})."
    if r.status == WARN:
        return f"Significant ({p}, below {cfg.alpha:g})."
    if r.status == PASS and r.adjusted_p < cfg.alpha:
        return f"Significant ({p}) but below this test's effect floor."
    d = r.detectable or {}
    seen = (
        "it could not detect a leak of any size at these set sizes"
        if d.get("tiles") is None
        else f"it would detect {d['tiles']:,} leaked tiles ({d['share']:.1%} of the audited set) {d['strength']}"
    )
    if r.status == PASS:
        return f"Nothing found ({p}); {seen}."
    more = d.get("holdout_for_target")
    need = (
        f" About {more:,} held-out tiles would let it detect {cfg.target_leak_share:.0%}."
        if more
        else f" No realistic held-out set lets it detect {cfg.target_leak_share:.0%} with this many synthetic tiles."
    )
    return f"Inconclusive ({p}): {seen}, more than the {cfg.target_leak_share:.0%} it must detect.{need}"


def worst(*statuses: str) -> str:
    return max(statuses, key=lambda s: SEVERITY[s])


def verdict_of(results: Iterable[TestResult]) -> str:
    """FAIL > WARN > INCONCLUSIVE (no dataset-level test could detect the target leak) > PASS."""
    results = [r for r in results if r.gates]
    statuses = [r.status for r in results]
    if FAIL in statuses or WARN in statuses:
        return FAIL if FAIL in statuses else WARN
    family = [r.status for r in results if r.level == SET and r.status != NA]
    if family and all(s == INCONCLUSIVE for s in family):
        return INCONCLUSIVE
    return PASS
