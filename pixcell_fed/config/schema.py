"""Typed, immutable configuration of every component. ``configs/site.example.yaml`` documents each key.

Each section is a frozen dataclass whose fields are the keys of that YAML section. Range checks live in
``__post_init__`` so that a bad value fails when the file is loaded, not halfway through a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class SiteSection:
    """Who this site is and where its files live."""

    name: str = "site"
    slides_dir: Path = Path("slides")
    work_dir: Path = Path("work")
    labels_csv: Path | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
               f"site.name must be letters, digits, '-' or '_' (got {self.name!r})")


@dataclass(frozen=True)
class TilingConfig:
    """How slides become tiles."""

    target_mpp: float = 0.5
    tile_size: int = 256
    tissue_fraction: float = 0.5
    thumbnail_max_side: int = 2048
    saturation_threshold: int = 8
    median_blur: int = 7
    min_component_fraction: float = 0.0005
    workers: int = 2
    mpp_overrides: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    write_overviews: bool = True

    def __post_init__(self) -> None:
        _check(0.05 <= self.target_mpp <= 20, f"tiling.target_mpp must be in [0.05, 20] (got {self.target_mpp})")
        _check(self.tile_size in (256, 1024), f"tiling.tile_size must be 256 or 1024 (got {self.tile_size})")
        _check(0.0 <= self.tissue_fraction <= 1.0, f"tiling.tissue_fraction must be in [0, 1] (got {self.tissue_fraction})")
        _check(self.workers >= 1, f"tiling.workers must be at least 1 (got {self.workers})")
        _check(self.median_blur % 2 == 1, f"tiling.median_blur must be odd (got {self.median_blur})")
        _check(256 <= self.thumbnail_max_side <= 16384, "tiling.thumbnail_max_side must be in [256, 16384]")
        for name, mpp in self.mpp_overrides.items():
            _check(0.01 <= mpp <= 100, f"tiling.mpp_overrides[{name!r}] must be in [0.01, 100] (got {mpp})")


@dataclass(frozen=True)
class ModelsConfig:
    """Local folders of the weights a site downloaded by hand, and where to run them."""

    pixcell_dir: Path | None = None
    vae_dir: Path | None = None
    encoder: str = "uni2-h"
    encoder_dir: Path | None = None
    extra_audit_encoders: Mapping[str, Path | None] = field(default_factory=lambda: MappingProxyType({}))
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass(frozen=True)
class SynthesisConfig:
    """How PixCell turns embeddings into synthetic tiles."""

    samples_per_tile: int = 1
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    batch_size: int | None = None
    max_conditioning_tiles: int | None = None

    def __post_init__(self) -> None:
        _check(self.samples_per_tile >= 1, "synthesis.samples_per_tile must be at least 1")
        _check(1 <= self.steps <= 1000, "synthesis.steps must be in [1, 1000]")
        _check(self.guidance is None or self.guidance >= 0, "synthesis.guidance must be >= 0")
        _check(self.batch_size is None or self.batch_size >= 1, "synthesis.batch_size must be at least 1")


@dataclass(frozen=True)
class SplitConfig:
    """Which slides condition synthesis (T) and which are held out (H), split by slide."""

    holdout_fraction: float = 0.34
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0.0 < self.holdout_fraction < 1.0, "split.holdout_fraction must be strictly between 0 and 1")


@dataclass(frozen=True)
class AuditConfig:
    """Thresholds of the privacy audit. Each default's provenance is written in the report
    (``pixcell_fed.audit.gate.THRESHOLD_PROVENANCE``)."""

    copy_similarity: float = 0.65
    copy_pixel_confirm: float = 0.60
    nn_similarity_warn: float = 0.85
    nn_ratio: float = 1 / 3
    zscore: float = 4.0
    replication_percentile_margin: float = 0.05
    dcr_score_warn: float = 0.8
    dcr_score_fail: float = 0.5
    authenticity_margin: float = 0.15
    mia_auc_warn: float = 0.6
    mia_auc_fail: float = 0.7
    min_holdout: int = 20
    min_holdout_ratio: float = 0.5
    top_k: int = 5
    drop_flagged: bool = True
    max_rounds: int = 2
    closest_pairs: int = 24
    device: str = "cpu"
    seed: int = 0
    region_copy: bool = True
    region_copy_min_fraction: float = 0.25
    region_copy_candidates: int = 5
    region_copy_min_inliers: int = 6
    region_copy_correlation: float = 0.6

    def __post_init__(self) -> None:
        for name in ("copy_similarity", "copy_pixel_confirm", "nn_similarity_warn"):
            value = getattr(self, name)
            _check(0.0 < value <= 1.0, f"audit.{name} must be in (0, 1] (got {value})")
        _check(0.0 < self.nn_ratio < 1.0, f"audit.nn_ratio must be in (0, 1) (got {self.nn_ratio})")
        _check(self.zscore > 0, f"audit.zscore must be > 0 (got {self.zscore})")
        _check(0.0 <= self.dcr_score_fail <= self.dcr_score_warn <= 1.0,
               "audit: need 0 <= dcr_score_fail <= dcr_score_warn <= 1")
        _check(0.0 <= self.authenticity_margin <= 1.0, "audit.authenticity_margin must be in [0, 1]")
        _check(0.5 <= self.mia_auc_warn <= self.mia_auc_fail <= 1.0, "audit: need 0.5 <= mia_auc_warn <= mia_auc_fail <= 1")
        _check(self.min_holdout >= 2, "audit.min_holdout must be at least 2")
        _check(0.0 <= self.min_holdout_ratio <= 10.0, "audit.min_holdout_ratio must be in [0, 10]")
        _check(self.top_k >= 2, "audit.top_k must be at least 2 (the distance-ratio test needs two neighbours)")
        _check(self.max_rounds >= 1, "audit.max_rounds must be at least 1")
        _check(self.closest_pairs >= 0, "audit.closest_pairs must be >= 0")
        _check(0.0 < self.region_copy_min_fraction <= 1.0,
               f"audit.region_copy_min_fraction must be in (0, 1] (got {self.region_copy_min_fraction})")
        _check(1 <= self.region_copy_candidates <= 100,
               f"audit.region_copy_candidates must be in [1, 100] (got {self.region_copy_candidates})")
        _check(self.region_copy_min_inliers >= 3,
               f"audit.region_copy_min_inliers must be at least 3 (got {self.region_copy_min_inliers})")
        _check(0.0 < self.region_copy_correlation < 1.0,
               f"audit.region_copy_correlation must be in (0, 1) (got {self.region_copy_correlation})")


@dataclass(frozen=True)
class KeysConfig:
    """The site's signing key (Ed25519)."""

    site_private_key: Path = Path("keys/site_signing.key")
    passphrase_env: str | None = None


@dataclass(frozen=True)
class FederationConfig:
    """How this site joins the consortium's Flower deployment."""

    superlink: str = "127.0.0.1:9092"
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    port: int = 9094
    chunk_mb: int = 64
    eval_dir: Path | None = None
    bundle_dir: Path | None = None
    train_dir: Path | None = None


@dataclass(frozen=True)
class SiteConfig:
    """The whole site configuration (``site.yaml``)."""

    site: SiteSection = field(default_factory=SiteSection)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
