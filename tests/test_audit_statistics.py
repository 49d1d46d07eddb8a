"""The audit's statistics against scipy: the membership test's significance must not collapse on small sets."""

import numpy as np
import pytest
from scipy import stats

from pixcell_fed.audit import statistics as st


def test_perfect_separation_of_two_against_two_is_not_significant():
    # 6 equally likely assignments of 4 tiles to 2 + 2; only one puts both members on top
    assert st.roc_auc([0.9, 0.8], [0.2, 0.1]) == 1.0
    assert st.auc_p_value([0.9, 0.8], [0.2, 0.1]) == pytest.approx(1 / 6)
    assert st.membership_inference(np.array([0.9, 0.8]), np.array([0.2, 0.1])).p_value > 0.05


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
