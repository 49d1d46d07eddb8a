"""The audit's statistics against scipy and brute force: exact nulls are exact, Holm is Holm, power is power."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from pixcell_fed.audit import exact
from pixcell_fed.audit import statistics as st


def test_perfect_separation_of_two_against_two_is_not_significant():
    # 6 equally likely assignments of 4 tiles to 2 + 2; only one puts both members on top
    assert st.roc_auc([0.9, 0.8], [0.2, 0.1]) == 1.0
    assert st.auc_p_value([0.9, 0.8], [0.2, 0.1]) == pytest.approx(1 / 6)


@pytest.mark.parametrize("n_pos,n_neg,shift", [(5, 7, 0.0), (6, 6, 1.0), (8, 4, -0.5)])
def test_exact_p_value_matches_scipy(n_pos, n_neg, shift):
    rng = np.random.default_rng(n_pos * 10 + n_neg)
    pos, neg = rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)
    ours = st.auc_p_value(pos, neg)
    ref = stats.mannwhitneyu(pos, neg, alternative="greater", method="exact").pvalue
    assert ours == pytest.approx(ref, rel=1e-9)


def test_exact_p_value_with_ties_counts_assignments():
    pos, neg = [0.5, 0.5, 0.7], [0.5, 0.1, 0.1]
    ours = st.auc_p_value(pos, neg)
    ref = stats.permutation_test((pos, neg), lambda a, b: stats.mannwhitneyu(a, b).statistic,
                                 permutation_type="independent", alternative="greater", n_resamples=np.inf).pvalue
    assert ours == pytest.approx(ref, rel=1e-9)
    assert st.auc_p_value([0.3] * 4, [0.3] * 4) == 1.0  # no information at all


def test_large_sets_use_the_normal_law_with_tie_correction():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(0.1, 1, 400), 1)  # rounded: many ties
    neg = np.round(rng.normal(0.0, 1, 500), 1)
    ours = st.auc_p_value(pos, neg)
    ref = stats.mannwhitneyu(pos, neg, alternative="greater", method="asymptotic", use_continuity=True).pvalue
    assert ours == pytest.approx(ref, rel=1e-6)
    assert st.roc_auc(pos, neg) == pytest.approx(stats.mannwhitneyu(pos, neg).statistic / (400 * 500))


def _enumerate(values_a, values_b, statistic):
    """P(statistic >= observed) over every assignment of the pooled values to groups of the same sizes."""
    pooled = np.concatenate([values_a, values_b])
    observed = statistic(np.asarray(values_a), np.asarray(values_b))
    hits = total = 0
    for group in itertools.combinations(range(len(pooled)), len(values_a)):
        mask = np.zeros(len(pooled), bool)
        mask[list(group)] = True
        hits += statistic(pooled[mask], pooled[~mask]) >= observed - 1e-12
        total += 1
    return hits / total


@pytest.mark.parametrize("seed", range(4))
def test_pooled_cuts_and_top_run_are_the_exact_permutation_nulls(seed):
    rng = np.random.default_rng(seed)
    a, b = np.round(rng.normal(0.3, 1, 6), 1), np.round(rng.normal(0, 1, 7), 1)  # rounded: ties at the cuts
    for test in exact.pooled_cuts(a, b, (0.2, 0.5)):
        assert test.p_value == pytest.approx(_enumerate(a, b, lambda x, y, c=test.cut: (x >= c).sum()))
    run = exact.top_run(a, b)
    assert run.p_value == pytest.approx(_enumerate(a, b, lambda x, y: (x > y.max()).sum()))
    assert run.p_value == pytest.approx(math.comb(6, run.observed) / math.comb(13, run.observed))
    fa, fb = a > 0.5, b > 0.5
    ref = stats.fisher_exact([[fa.sum(), (~fa).sum()], [fb.sum(), (~fb).sum()]], alternative="greater").pvalue
    assert exact.flag_count(fa, fb).p_value == pytest.approx(ref)


def test_label_permutation_matches_enumeration_and_is_deterministic():
    weights = np.array([3, 0, 1, 2, 0, 0, 1, 4, 0, 1], float)
    in_group = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0, 0], bool)
    obs = weights[in_group].sum()
    ref = np.mean([weights[list(c)].sum() >= obs for c in itertools.combinations(range(10), 4)])
    first = exact.label_permutation(weights, in_group)
    assert first.p_value == pytest.approx(ref, abs=0.015) and first == exact.label_permutation(weights, in_group)
    assert first.null_mean == pytest.approx(4 * weights.mean())


def test_holm_adjusts_step_down():
    assert exact.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert exact.holm([]) == []


def test_exact_tests_keep_their_level_on_exchangeable_data():
    rng = np.random.default_rng(5)
    rejections = 0
    for _ in range(400):
        pooled = rng.normal(size=75)
        p = min(t.p_value for t in exact.pooled_cuts(pooled[:50], pooled[50:], (0.05, 0.2))) * 2
        rejections += p <= 0.05
    assert rejections / 400 <= 0.05


def test_the_stated_smallest_detectable_leak_is_detected_90_percent_of_the_time():
    group, other, share, alpha = 200, 100, 0.05, 0.01
    total, drawn = group + other, exact.cut_size(share, group + other)
    leaked = exact.detectable_in_selection(total, group, drawn, alpha)
    assert leaked is not None and 1 <= leaked <= drawn
    rng = np.random.default_rng(3)

    def detected(n_leaked):
        values = np.concatenate([rng.normal(size=group), rng.normal(size=other)])
        values[:n_leaked] = 100.0  # leaked tiles at the very top
        test = exact.pooled_cuts(values[:group], values[group:], (share,))[0]
        return test.p_value <= alpha

    assert np.mean([detected(leaked) for _ in range(300)]) >= 0.85
    assert np.mean([detected(leaked - 1) for _ in range(300)]) < 0.9 or leaked == 1
    assert exact.detectable_in_selection(75, 50, 4, 0.01) is None  # four places can never be significant
