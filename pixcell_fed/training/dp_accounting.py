"""Epsilon of composed DP-SGD steps, and the site's delta.

One function computes the epsilon of DP-SGD for the whole project: Opacus's PRV accountant over every step batch,
returning its upper bound (so the figure is a guarantee, not an estimate). Steps with the same noise multiplier and
sample rate are merged first (composition does not depend on order). The default delta is
:func:`pixcell_fed.privacy.gaussian_mechanism.default_delta`, shared with DP conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pixcell_fed.privacy.gaussian_mechanism import default_delta  # noqa: F401 (the site's delta: one definition)
from pixcell_fed.training.dp import DPSteps


def epsilon_spent(steps: Iterable[DPSteps], delta: float) -> float:
    """Epsilon at ``delta`` of all ``steps`` composed; ``inf`` when the accountant finds no finite bound."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
    merged: dict[tuple[float, float], int] = {}
    for s in steps:
        key = (float(s.noise_multiplier), float(s.sample_rate))
        merged[key] = merged.get(key, 0) + int(s.steps)
    merged = {k: n for k, n in merged.items() if n > 0}
    if not merged:
        return 0.0
    if any(sigma <= 0 or not 0 < q <= 1 for sigma, q in merged):
        return math.inf
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(sigma, q, n) for (sigma, q), n in sorted(merged.items())]
    try:
        eps = float(accountant.get_epsilon(delta=delta))
    except (OverflowError, ValueError, ZeroDivisionError, FloatingPointError, MemoryError):
        return math.inf
    return eps if math.isfinite(eps) else math.inf
