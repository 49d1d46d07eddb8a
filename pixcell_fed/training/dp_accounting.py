"""Epsilon of composed DP-SGD steps, and the site's delta.

One function computes epsilon for the whole project: Opacus's PRV accountant over every step batch, returning
its upper bound (so the figure is a guarantee, not an estimate). Steps with the same noise multiplier and sample
rate are merged first (composition does not depend on order).
"""

from __future__ import annotations

import math
from typing import Iterable

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


def default_delta(n_examples: int) -> float:
    """The site's delta when site.yaml sets none: 1/(10 N), rounded down to a power of ten, so that the delta a
    site reports tells its training-set size only to an order of magnitude."""
    if n_examples < 1:
        raise ValueError("need at least one example")
    return 10.0 ** math.floor(math.log10(1.0 / (10 * n_examples)))
