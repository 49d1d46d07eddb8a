"""The Gaussian mechanism's exact guarantee, checked against computations that share no code with it: numerical
integration of the hockey-stick divergence, Opacus's PRV accountant, and the classical calibration's bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from pixcell_fed.privacy import gaussian_mechanism as gm


def hockey_stick(epsilon: float, mu: float) -> float:
    """delta(epsilon) = integral of max(0, p(x) - e^eps q(x)) for p = N(mu, 1), q = N(0, 1), by quadrature.

    The integrand is positive exactly where the log-likelihood ratio mu x - mu^2/2 exceeds epsilon."""
    x0 = epsilon / mu + mu / 2
    value, _ = integrate.quad(lambda x: stats.norm.pdf(x, loc=mu) - math.exp(epsilon) * stats.norm.pdf(x), x0, np.inf,
                              epsabs=1e-14, epsrel=1e-10, limit=200)
    return value


def prv_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` un-subsampled Gaussian releases (sensitivity 1, noise ``noise_multiplier``), by Opacus."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(noise_multiplier, 1.0, steps)]
    return float(accountant.get_epsilon(delta=delta, eps_error=0.002))


@pytest.mark.parametrize("epsilon,mu", [(0.0, 0.5), (0.5, 0.3), (1.0, 1.0), (4.0, 1.5), (8.0, 2.5), (16.0, 3.0)])
def test_privacy_profile_is_the_hockey_stick_divergence(epsilon, mu):
    assert gm.privacy_profile(epsilon, mu) == pytest.approx(hockey_stick(epsilon, mu), rel=1e-6, abs=1e-15)


@pytest.mark.parametrize("epsilon,delta,sensitivity", [(0.5, 1e-5, 1.0), (1.0, 1e-5, 2.0), (2.0, 1e-6, 3.5),
                                                       (8.0, 1e-5, 14.0), (8.0, 1e-8, 1.0), (16.0, 1e-6, 2.0)])
def test_sigma_is_the_smallest_noise_meeting_the_target(epsilon, delta, sensitivity):
    sigma = gm.calibrate_sigma(epsilon, delta, sensitivity)
    # at sigma the divergence (by quadrature, not the closed form) is exactly delta; 1% less noise breaks the target
    assert hockey_stick(epsilon, sensitivity / sigma) == pytest.approx(delta, rel=1e-5)
    assert hockey_stick(epsilon, sensitivity / (0.99 * sigma)) > delta * 1.01
    if epsilon < 1:  # where the classical calibration is valid, it is (epsilon, delta)-DP and needs more noise
        classical = sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon
        assert sigma < classical and gm.privacy_profile(epsilon, sensitivity / classical) <= delta


def test_a_known_calibration_from_the_literature():
    # epsilon = 1, delta = 1e-5, sensitivity 1: the analytic sigma is about 3.73, against 4.84 for the classical
    # sigma = sqrt(2 ln(1.25/delta)) / epsilon (Balle and Wang 2018 discuss this gap)
    assert gm.calibrate_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=2e-4)
    assert math.sqrt(2 * math.log(1.25 / 1e-5)) == pytest.approx(4.8448, abs=2e-4)


#: Opacus's PRV code takes log(1 - q), which is log(0) for the un-subsampled releases compared here (harmless)
PRV_Q1 = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@PRV_Q1
@pytest.mark.parametrize("sigma,delta", [(0.6, 1e-5), (1.0, 1e-6), (3.0, 1e-5)])
def test_epsilon_agrees_with_opacus_prv_accountant(sigma, delta):
    ours = gm.epsilon_for(delta, 1 / sigma)
    theirs = prv_epsilon(sigma, 1, delta)
    assert theirs >= ours - 1e-3  # Opacus's figure is an upper bound on the exact value
    assert theirs == pytest.approx(ours, abs=0.01)


@PRV_Q1
@pytest.mark.parametrize("k", [1, 4, 25])
def test_group_of_independent_releases_is_sqrt_k_times_mu(k):
    # k tiles of one slide, each released with its own noise: composition of k Gaussian mechanisms (Opacus, k steps)
    # equals one Gaussian mechanism with mu * sqrt(k) (our closed form)
    sigma, delta = 2.0, 1e-5
    ours = gm.epsilon_for(delta, gm.group_mu(1 / sigma, k, same_release=False))
    assert prv_epsilon(sigma, k, delta) == pytest.approx(ours, abs=0.02)
    assert gm.group_mu(0.5, k, same_release=True) == pytest.approx(0.5 * k)


def test_epsilon_and_mu_are_inverse_and_monotone():
    delta = 1e-6
    mus = [gm.mu_for(e, delta) for e in (0.5, 1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(mus, mus[1:]))  # more epsilon allows less noise
    for e, mu in zip((0.5, 1, 2, 4, 8, 16), mus):
        assert gm.epsilon_for(delta, mu) == pytest.approx(e, rel=1e-8)
    assert gm.epsilon_for(0.5, 0.1) == 0.0  # a delta that large needs no epsilon at all


@pytest.mark.parametrize("bad", [lambda: gm.calibrate_sigma(0, 1e-5, 1), lambda: gm.calibrate_sigma(1, 0, 1),
                                 lambda: gm.calibrate_sigma(1, 1e-5, 0), lambda: gm.calibrate_sigma(math.inf, 1e-5, 1),
                                 lambda: gm.epsilon_for(1e-5, 0), lambda: gm.group_mu(1.0, 0, same_release=False)])
def test_no_guarantee_settings_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_default_delta_is_below_one_over_ten_n_at_a_power_of_ten():
    for n, expected in ((1, 1e-1), (99, 1e-3), (100, 1e-3), (101, 1e-4), (50_000, 1e-6)):
        assert gm.default_delta(n) == pytest.approx(expected)
        assert gm.default_delta(n) <= 1 / (10 * n)
