"""A coordinator's requirement on how a bundle's synthetic set was conditioned, and the bundle's signed claim.

The claim (:class:`pixcell_fed.privacy.conditioning.ConditioningClaim`) is the audit's ``conditioning`` record,
copied into ``bundle.json``: both are covered by the site's signature, and verification demands that they agree.
A run settings' requirement (e.g. ``min-conditioning = "dp"`` and ``max-slide-epsilon = 8``) is checked on a
verified bundle by :func:`conditioning_refusal`: a reason to refuse it, or ``None``.

Who could abuse it: a site can only claim what its own signed audit states, and the claimed guarantee is recomputed
from the mechanism's parameters when the bundle is read (an understated epsilon is refused); the coordinator cannot
lower a site's protection through this check, only refuse a bundle that offers less than the consortium requires.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pixcell_fed.privacy.conditioning import MODE_RANK, MODES, ConditioningClaim, exact_claim


@dataclass(frozen=True)
class ConditioningRequirement:
    """The least a consortium accepts: a minimum mode (``exact`` < ``mixed`` < ``dp``) and, optionally, the largest
    per-tile and per-slide epsilon and delta. Any epsilon or delta bound admits only ``dp`` bundles (the other
    modes have no guarantee)."""

    min_mode: str = "exact"
    max_tile_epsilon: float | None = None
    max_slide_epsilon: float | None = None
    max_delta: float | None = None

    def __post_init__(self) -> None:
        if self.min_mode not in MODES:
            raise ValueError(f"minimum conditioning mode must be one of {', '.join(MODES)} (got {self.min_mode!r})")
        for name in ("max_tile_epsilon", "max_slide_epsilon"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number (got {value!r})")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise ValueError(f"max-delta must be in (0, 1) (got {self.max_delta!r})")

    @property
    def requires_nothing(self) -> bool:
        return (
            self.min_mode == "exact"
            and self.max_tile_epsilon is None
            and self.max_slide_epsilon is None
            and self.max_delta is None
        )

    def describe(self) -> str:
        parts = [f"conditioning {self.min_mode} or stronger"]
        for label, value in (
            ("per-tile epsilon", self.max_tile_epsilon),
            ("per-slide epsilon", self.max_slide_epsilon),
            ("delta", self.max_delta),
        ):
            if value is not None:
                parts.append(f"{label} <= {value:g}")
        return ", ".join(parts)


def conditioning_refusal(claim: ConditioningClaim, requirement: ConditioningRequirement) -> str | None:
    """Why a bundle with ``claim`` does not meet ``requirement``, in one sentence; ``None`` when it does."""
    if MODE_RANK[claim.mode] < MODE_RANK[requirement.min_mode]:
        return (
            f"its synthetic set was made with {claim.mode} conditioning, the consortium requires "
            f"{requirement.min_mode} or stronger"
        )
    bounds = (
        ("per-tile epsilon", claim.epsilon_per_tile, requirement.max_tile_epsilon),
        ("per-slide epsilon", claim.epsilon_per_slide, requirement.max_slide_epsilon),
        ("delta", claim.dp.tile_delta if claim.mode == "dp" else math.inf, requirement.max_delta),
    )
    for label, value, limit in bounds:
        if limit is not None and not value <= limit:
            shown = "unbounded (no formal guarantee)" if math.isinf(value) else f"{value:.3g}"
            return f"its {label} is {shown}, above the consortium's limit of {limit:g}"
    return None


def claim_of_audit(audit: Mapping[str, Any]) -> ConditioningClaim:
    """The conditioning claim a run's shareable audit makes; an audit without one claims ``exact`` (no guarantee).
    Raises :class:`pixcell_fed.privacy.conditioning.ClaimError` for a malformed claim."""
    record = audit.get("conditioning")
    return exact_claim() if record is None else ConditioningClaim.from_record(record)


__all__ = ["ConditioningRequirement", "claim_of_audit", "conditioning_refusal"]
