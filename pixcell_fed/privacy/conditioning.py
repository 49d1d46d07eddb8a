"""Privacy modes of the conditioning embeddings (``synthesis.conditioning``), and the claim a site signs about them.

A synthetic tile depends on the real data only through the conditioning embedding of its source tile (the 16
sub-tile embeddings of a 1024 px tile): PixCell's weights were trained elsewhere and the sampler's noise is
independent of the data. So the mode chosen here decides what the synthetic set can reveal about each real tile:

- ``exact``: each synthetic tile is conditioned on its source tile's embedding, as in the PixCell paper. No
  formal guarantee; the audit checks empirically that no tile is a copy.
- ``mixed``: each synthetic tile is conditioned on the mean of ``k`` embeddings drawn from the same slide and
  label, so no single tile determines it. A heuristic, not a guarantee: the mean still depends on each tile.
- ``dp``: the Gaussian mechanism on the L2-clipped embedding. A tile's embedding vectors are concatenated (1 x D
  for 256 px tiles, 16 x D for 1024 px: all 16 counted together) and clipped as one vector to norm ``C``; two tiles
  then differ by at most ``2 C`` (the sensitivity: any tile replaced by any other), and Gaussian noise of standard
  deviation ``sigma``, calibrated exactly to the target (epsilon, delta) per tile
  (:mod:`pixcell_fed.privacy.gaussian_mechanism`), is added to every coordinate. Every synthetic tile made from the
  result is post-processing, so the synthetic set is (epsilon, delta)-DP with respect to each conditioning tile.
  A slide with ``k`` conditioning tiles is protected as a group: ``k`` independent releases of mu-Gaussian
  mechanisms are exactly one ``sqrt(k) mu``-Gaussian mechanism, so the per-slide (epsilon, delta) is exact too.

The noise comes from the operating system's CSPRNG (:func:`secure_standard_normal`), never from the run's seeds.
:class:`ConditioningClaim` is what the site states and signs (audit summary, ``bundle.json``); a coordinator
parses it with :meth:`ConditioningClaim.from_record`, which recomputes every guarantee from the mechanism's
parameters and refuses a claim that does not follow from them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pixcell_fed.privacy import gaussian_mechanism as gm

if TYPE_CHECKING:
    import numpy as np

MODES = ("exact", "mixed", "dp")
#: how much each mode protects, for "at least this mode" requirements (a coordinator's minimum)
MODE_RANK = {"exact": 0, "mixed": 1, "dp": 2}
GUARANTEE = {"exact": "none", "mixed": "none (heuristic)", "dp": "differential privacy"}
MECHANISM = (
    "Gaussian mechanism on the L2-clipped conditioning embedding, sigma calibrated exactly to "
    "(epsilon, delta) per tile (analytic Gaussian mechanism, Balle and Wang 2018)"
)
NEIGHBOURING = (
    "one conditioning tile replaced by any other tile; per slide: every conditioning tile of one slide replaced"
)
NOT_COVERED = (
    "Not covered by the guarantee: the audit's pass or fail decision and the few statistics shipped with "
    "it (it looked at the real tiles themselves), the class label each tile inherits from its slide, and "
    "the number of tiles per label."
)
_REL_TOL = 1e-9


class ClaimError(ValueError):
    """A conditioning claim that is malformed or does not follow from its mechanism's parameters."""


def _fmt(x: float) -> str:
    return "infinity" if math.isinf(x) else f"{x:.3g}"


@dataclass(frozen=True)
class DPParameters:
    """The parameters of a dp claim, all present (:attr:`ConditioningClaim.dp`)."""

    clip_norm: float
    sensitivity: float
    sigma: float
    vectors_per_tile: int
    tile_epsilon: float
    tile_delta: float
    slide_tiles: int
    slide_epsilon: float
    slide_delta: float

    @property
    def tile_mu(self) -> float:
        return self.sensitivity / self.sigma

    @property
    def slide_mu(self) -> float:
        return gm.group_mu(self.tile_mu, self.slide_tiles, same_release=False)


@dataclass(frozen=True)
class ConditioningClaim:
    """What a site states about how its synthetic set was conditioned (see the module docstring).

    ``dp`` fields: ``clip_norm`` C, ``sensitivity`` (2 C), ``sigma``, ``vectors_per_tile`` (1 or 16),
    ``tile_epsilon``/``tile_delta`` (the target), ``slide_tiles`` (k, the most conditioning tiles one slide
    contributes: the cap ``synthesis.max_tiles_per_slide`` when ``slide_tiles_capped``, otherwise the largest
    slide of the run) and ``slide_epsilon``/``slide_delta`` (exact group guarantee at the same delta).
    """

    mode: str
    mix_k: int | None = None
    clip_norm: float | None = None
    sensitivity: float | None = None
    sigma: float | None = None
    vectors_per_tile: int | None = None
    tile_epsilon: float | None = None
    tile_delta: float | None = None
    slide_tiles: int | None = None
    slide_tiles_capped: bool | None = None
    slide_epsilon: float | None = None
    slide_delta: float | None = None

    @property
    def dp(self) -> DPParameters:
        """The dp parameters; :class:`ClaimError` for another mode or a dp claim that lacks one."""
        values = {
            "clip_norm": self.clip_norm,
            "sensitivity": self.sensitivity,
            "sigma": self.sigma,
            "vectors_per_tile": self.vectors_per_tile,
            "tile_epsilon": self.tile_epsilon,
            "tile_delta": self.tile_delta,
            "slide_tiles": self.slide_tiles,
            "slide_epsilon": self.slide_epsilon,
            "slide_delta": self.slide_delta,
        }
        missing = [key for key, value in values.items() if value is None]
        if self.mode != "dp" or missing:
            raise ClaimError(f"not a complete dp claim (mode {self.mode!r}; missing {', '.join(missing) or 'nothing'})")
        return DPParameters(**values)  # type: ignore[arg-type]  # None ruled out just above

    @property
    def tile_mu(self) -> float | None:
        return None if self.mode != "dp" else self.dp.tile_mu

    @property
    def slide_mu(self) -> float | None:
        return None if self.mode != "dp" else self.dp.slide_mu

    @property
    def epsilon_per_slide(self) -> float:
        """Per-slide epsilon; infinity for the modes without a guarantee."""
        return self.dp.slide_epsilon if self.mode == "dp" else math.inf

    @property
    def epsilon_per_tile(self) -> float:
        return self.dp.tile_epsilon if self.mode == "dp" else math.inf

    def statement(self) -> str:
        """The claim in plain words for a privacy officer or a consortium lead."""
        if self.mode == "exact":
            return (
                "Exact conditioning: each synthetic tile was generated from the embedding of one real tile, as in "
                "the PixCell paper. There is no formal privacy guarantee; the audit checks empirically that no "
                "synthetic tile is a copy of a real one."
            )
        if self.mode == "mixed":
            return (
                f"Mixed conditioning: each synthetic tile was generated from the mean of the embeddings of up to "
                f"{self.mix_k} real tiles of one slide and label, so no single tile determines it. This is a "
                "heuristic, not a formal guarantee: the mean still depends on every tile in it."
            )
        dp = self.dp
        cap = "at most" if self.slide_tiles_capped else "in this run at most"
        how = (
            "the cap synthesis.max_tiles_per_slide"
            if self.slide_tiles_capped
            else "the largest slide of this run; set synthesis.max_tiles_per_slide to bound it in advance"
        )
        return (
            f"Differential privacy per real tile: (epsilon = {_fmt(dp.tile_epsilon)}, delta = "
            f"{dp.tile_delta:.0e}). Every synthetic tile depends on the real data only through its source "
            f"tile's embedding, clipped to norm {dp.clip_norm:.4g} and released with Gaussian noise of sigma "
            f"{dp.sigma:.4g} from the operating system's secure random generator. Per slide (a slide "
            f"contributes {cap} {dp.slide_tiles} conditioning tiles: {how}): (epsilon = "
            f"{_fmt(dp.slide_epsilon)}, delta = {dp.slide_delta:.0e}), by exact group privacy of the "
            "Gaussian mechanism. A patient with several slides is protected as the group of all their tiles."
        )

    def short(self) -> str:
        """One line for tables: mode and, for dp, both guarantees."""
        if self.mode != "dp":
            return f"{self.mode} (no formal guarantee)"
        dp = self.dp
        return (
            f"dp: per tile epsilon {_fmt(dp.tile_epsilon)}, per slide epsilon {_fmt(dp.slide_epsilon)} "
            f"(<= {dp.slide_tiles} tiles), delta {dp.tile_delta:.0e}"
        )

    def to_record(self) -> dict[str, Any]:
        """The shareable record (audit summary and ``bundle.json``, under the site's signature)."""
        record: dict[str, Any] = {"mode": self.mode, "guarantee": GUARANTEE[self.mode], "statement": self.statement()}
        if self.mode == "mixed":
            record["mix_k"] = self.mix_k
        if self.mode == "dp":
            record.update(
                {
                    "mechanism": MECHANISM,
                    "neighbouring": NEIGHBOURING,
                    "not_covered": NOT_COVERED,
                    "clip_norm": self.clip_norm,
                    "sensitivity": self.sensitivity,
                    "sigma": self.sigma,
                    "vectors_per_tile": self.vectors_per_tile,
                    "tile_epsilon": self.tile_epsilon,
                    "tile_delta": self.tile_delta,
                    "tile_mu": self.tile_mu,
                    "slide_tiles": self.slide_tiles,
                    "slide_tiles_capped": self.slide_tiles_capped,
                    "slide_epsilon": self.slide_epsilon,
                    "slide_delta": self.slide_delta,
                    "slide_mu": self.slide_mu,
                }
            )
        return record

    @classmethod
    def from_record(cls, record: Any) -> ConditioningClaim:
        """Parse and check a record made by :meth:`to_record` (e.g. from a bundle): exact keys and types, and every
        guarantee recomputed from the mechanism's parameters. Raises :class:`ClaimError` with the reason."""
        if not isinstance(record, Mapping):
            raise ClaimError(f"expected a mapping, got {type(record).__name__}")
        mode = record.get("mode")
        if mode not in MODES:
            raise ClaimError(f"mode {str(mode)[:40]!r} is not one of {', '.join(MODES)}")
        fields: dict[str, Any] = {"mode": mode}
        if mode == "mixed":
            fields["mix_k"] = _integer(record, "mix_k", minimum=2)
        if mode == "dp":
            for key in (
                "clip_norm",
                "sensitivity",
                "sigma",
                "tile_epsilon",
                "tile_delta",
                "slide_epsilon",
                "slide_delta",
            ):
                fields[key] = _positive(record, key)
            fields["vectors_per_tile"] = _integer(record, "vectors_per_tile", minimum=1)
            fields["slide_tiles"] = _integer(record, "slide_tiles", minimum=1)
            if not isinstance(record.get("slide_tiles_capped"), bool):
                raise ClaimError("slide_tiles_capped must be true or false")
            fields["slide_tiles_capped"] = record["slide_tiles_capped"]
        claim = cls(**fields)
        if mode == "dp":
            claim._check_consistent(record)
        expected = claim.to_record()
        if set(record) != set(expected):
            raise ClaimError(f"keys {sorted(map(str, record))} differ from those of a {mode} claim {sorted(expected)}")
        for key, value in expected.items():
            if isinstance(value, str) and record[key] != value:
                raise ClaimError(f"'{key}' is not the text this claim produces")
        return claim

    def _check_consistent(self, record: Mapping) -> None:
        """Every derived number follows from clip norm, sigma and delta; the stated epsilons are not understated."""
        dp = self.dp
        if not 0 < dp.tile_delta < 1 or dp.slide_delta != dp.tile_delta:
            raise ClaimError("delta must be in (0, 1) and the same per tile and per slide")
        if not math.isclose(dp.sensitivity, 2 * dp.clip_norm, rel_tol=_REL_TOL):
            raise ClaimError(f"sensitivity {dp.sensitivity} is not twice the clip norm {dp.clip_norm}")
        for key, value in (("tile_mu", dp.tile_mu), ("slide_mu", dp.slide_mu)):
            if not (isinstance(record.get(key), (int, float)) and math.isclose(record[key], value, rel_tol=_REL_TOL)):
                raise ClaimError(f"{key} does not follow from the sensitivity, sigma and slide tiles")
        for what, eps, mu in (("per-tile", dp.tile_epsilon, dp.tile_mu), ("per-slide", dp.slide_epsilon, dp.slide_mu)):
            actual = gm.epsilon_for(dp.tile_delta, mu)
            if actual > eps * (1 + 1e-6) + 1e-9:
                raise ClaimError(
                    f"the {what} epsilon {eps:.6g} understates the mechanism's {actual:.6g} at delta "
                    f"{dp.tile_delta:.1e}"
                )


def _integer(record: Mapping, key: str, *, minimum: int) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ClaimError(f"{key} must be an integer >= {minimum} (got {str(value)[:40]})")
    return value


def _positive(record: Mapping, key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ClaimError(f"{key} must be a positive finite number (got {str(value)[:40]})")
    return float(value)


def exact_claim() -> ConditioningClaim:
    return ConditioningClaim(mode="exact")


def mixed_claim(k: int) -> ConditioningClaim:
    return ConditioningClaim(mode="mixed", mix_k=int(k))


def dp_claim(
    *, epsilon: float, delta: float, clip_norm: float, vectors_per_tile: int, slide_tiles: int, slide_tiles_capped: bool
) -> ConditioningClaim:
    """Calibrate the mechanism for a target (``epsilon``, ``delta``) per tile and state both guarantees."""
    sensitivity = 2.0 * float(clip_norm)
    sigma = gm.calibrate_sigma(epsilon, delta, sensitivity)
    slide_mu = gm.group_mu(sensitivity / sigma, int(slide_tiles), same_release=False)
    return ConditioningClaim(
        mode="dp",
        clip_norm=float(clip_norm),
        sensitivity=sensitivity,
        sigma=sigma,
        vectors_per_tile=int(vectors_per_tile),
        tile_epsilon=float(epsilon),
        tile_delta=float(delta),
        slide_tiles=int(slide_tiles),
        slide_tiles_capped=bool(slide_tiles_capped),
        slide_epsilon=gm.epsilon_for(delta, slide_mu),
        slide_delta=float(delta),
    )


def clip_tiles(embeddings: np.ndarray, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's vectors (all axes after the first, concatenated) scaled to L2 norm at most ``clip_norm``.

    Returns the clipped float64 array (same shape) and a boolean mask of the tiles that were scaled down.
    """
    import numpy as np

    x = np.asarray(embeddings, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings must be finite")
    flat = x.reshape(len(x), -1)
    norms = np.linalg.norm(flat, axis=1)
    clipped = norms > clip_norm
    scale = np.ones_like(norms)
    scale[clipped] = clip_norm / norms[clipped]
    return (flat * scale[:, None]).reshape(x.shape), clipped


def secure_standard_normal(shape: Sequence[int]) -> np.ndarray:
    """Standard normal float64 samples from the operating system's CSPRNG (``os.urandom``), by Box-Muller.

    Nothing seeds it, so nothing the run records (seeds, config) or the coordinator sees can reproduce it.
    """
    import numpy as np

    n = int(np.prod(shape))
    pairs = (n + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # 53 random bits each, shifted into the open interval (0, 1): log(u1) is always finite
    u1 = ((bits[0] >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = ((bits[1] >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return z[:n].reshape(tuple(shape))


def privatize(embeddings: np.ndarray, claim: ConditioningClaim) -> tuple[np.ndarray, int]:
    """The dp release of ``embeddings [N, n_tok, D]``: clipped per tile, plus secure Gaussian noise of the claim's
    sigma on every coordinate. Returns float32 privatized embeddings and how many tiles were clipped (site-internal:
    it helps choose the clip norm and must not be shipped)."""
    import numpy as np

    if claim.mode != "dp":
        raise ValueError(f"privatize needs a dp claim, got mode {claim.mode!r}")
    x = np.asarray(embeddings)
    if x.ndim != 3 or x.shape[1] != claim.vectors_per_tile:
        raise ValueError(f"expected embeddings [N, {claim.vectors_per_tile}, D], got shape {x.shape}")
    clipped, was_clipped = clip_tiles(x, claim.dp.clip_norm)
    noisy = clipped + claim.dp.sigma * secure_standard_normal(clipped.shape)
    return noisy.astype(np.float32), int(was_clipped.sum())


def mix_within_groups(
    embeddings: np.ndarray, groups: Sequence[Hashable], k: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``mixed`` mode: row i becomes the mean of row i and ``k - 1`` other rows of the same group (fewer when the
    group is smaller), drawn without replacement. Returns the mixed float32 array and, per row, the rows averaged."""
    import numpy as np

    x = np.asarray(embeddings, dtype=np.float64)
    groups = list(groups)
    if len(groups) != len(x):
        raise ValueError(f"{len(groups)} group keys for {len(x)} embeddings")
    if k < 2:
        raise ValueError(f"k must be at least 2 (got {k})")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    mixed = np.empty_like(x)
    used: list[np.ndarray] = []
    for i, g in enumerate(groups):
        others = np.array([j for j in members[g] if j != i], dtype=np.int64)
        take = rng.choice(others, size=min(k - 1, len(others)), replace=False) if len(others) else others
        rows = np.concatenate([[i], np.sort(take)]).astype(np.int64)
        mixed[i] = x[rows].mean(axis=0)
        used.append(rows)
    return mixed.astype(np.float32), used
