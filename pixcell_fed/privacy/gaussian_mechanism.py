"""The Gaussian mechanism's exact (epsilon, delta) guarantee and its calibration.

A mechanism ``M(x) = f(x) + N(0, sigma^2 I)`` whose L2 sensitivity is ``Delta`` is (epsilon, delta)-differentially
private if and only if

    delta >= Phi(Delta / (2 sigma) - epsilon sigma / Delta) - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta)

(Balle and Wang 2018, "Improving the Gaussian mechanism for differential privacy: analytical calibration and
optimal denoising", ICML, Theorem 8). Everything here is written with ``mu = Delta / sigma`` (the mechanism is
then mu-Gaussian differentially private in the sense of Dong, Roth and Su 2019), because composition and group
privacy are exact in mu: ``k`` independent releases of ``mu``-mechanisms compose to one ``sqrt(k) mu``-mechanism,
and a change of ``k`` records in one release of sensitivity ``Delta`` is a release of sensitivity ``k Delta``.

The curve is evaluated with scipy's log normal CDF (no cancellation for tiny deltas) and inverted with Brent's
method; unlike the classical ``sigma = Delta sqrt(2 ln(1.25 / delta)) / epsilon`` it holds for every epsilon
(the classical one only for epsilon < 1) and gives the smallest sigma that meets the target.
"""

from __future__ import annotations

import math

#: the largest epsilon and mu searched: beyond these, nothing is protected in any useful sense
MAX_EPSILON = 1e4
MAX_MU = 1e4


def _check_mu(mu: float) -> float:
    mu = float(mu)
    if not (mu > 0 and math.isfinite(mu)):
        raise ValueError(f"mu (sensitivity / sigma) must be a positive finite number (got {mu!r})")
    return mu


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
    return delta


def privacy_profile(epsilon: float, mu: float) -> float:
    """The smallest delta for which a ``mu``-Gaussian mechanism is (epsilon, delta)-DP (Balle and Wang, Theorem 8)."""
    from scipy.special import log_ndtr

    mu, epsilon = _check_mu(mu), float(epsilon)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (got {epsilon!r})")
    if math.isinf(epsilon):
        return 0.0
    log_a = float(log_ndtr(mu / 2 - epsilon / mu))  # log Phi(mu/2 - eps/mu)
    log_b = epsilon + float(log_ndtr(-mu / 2 - epsilon / mu))  # log(e^eps Phi(-mu/2 - eps/mu))
    if log_b >= log_a:  # equal up to rounding: the profile is 0 to float precision
        return 0.0
    return max(0.0, math.exp(log_a) * -math.expm1(log_b - log_a))


def epsilon_for(delta: float, mu: float) -> float:
    """The smallest epsilon at which a ``mu``-Gaussian mechanism is (epsilon, ``delta``)-DP."""
    from scipy.optimize import brentq

    delta, mu = _check_delta(delta), _check_mu(mu)
    if privacy_profile(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while privacy_profile(hi, mu) > delta:
        hi *= 2
        if hi > MAX_EPSILON:
            return math.inf
    return float(brentq(lambda e: privacy_profile(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12, maxiter=500))


def mu_for(epsilon: float, delta: float) -> float:
    """The largest mu (sensitivity / sigma) for which the Gaussian mechanism is (``epsilon``, ``delta``)-DP."""
    from scipy.optimize import brentq

    epsilon, delta = float(epsilon), _check_delta(delta)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number (got {epsilon!r})")
    lo, hi = 1.0, 1.0
    while privacy_profile(epsilon, lo) > delta:
        lo /= 2
    while privacy_profile(epsilon, hi) <= delta:
        hi *= 2
        if hi > MAX_MU:
            raise ValueError(f"(epsilon={epsilon}, delta={delta}) needs no noise at any sensible scale")
    return float(brentq(lambda m: privacy_profile(epsilon, m) - delta, lo, hi, xtol=1e-14, rtol=1e-13, maxiter=500))


def calibrate_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest noise standard deviation making a release of L2 ``sensitivity`` (``epsilon``, ``delta``)-DP."""
    sensitivity = float(sensitivity)
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be a positive finite number (got {sensitivity!r})")
    return sensitivity / mu_for(epsilon, delta)


def group_mu(mu: float, records: int, *, same_release: bool) -> float:
    """The mu protecting a group of ``records`` records (group privacy, exact for Gaussian mechanisms).

    ``same_release``: the records enter one release (its sensitivity grows ``records``-fold, so mu does); otherwise
    each record has its own release with independent noise (the releases compose: ``sqrt(records)`` times mu).
    """
    mu = _check_mu(mu)
    if isinstance(records, bool) or not isinstance(records, int) or records < 1:
        raise ValueError(f"records must be a positive integer (got {records!r})")
    return mu * records if same_release else mu * math.sqrt(records)


def default_delta(n_records: int) -> float:
    """A delta for ``n_records`` records when the site sets none: 1/(10 N), rounded down to a power of ten, so
    that the delta a site reports tells its record count only to an order of magnitude."""
    if n_records < 1:
        raise ValueError("need at least one record")
    return 10.0 ** math.floor(math.log10(1.0 / (10 * n_records)))
