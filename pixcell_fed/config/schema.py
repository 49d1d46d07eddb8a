"""Typed, immutable configuration of every component. ``configs/site.example.yaml`` documents each key.

Each section is a frozen dataclass whose fields are the keys of that YAML section. Range checks live in
``__post_init__`` so that a bad value fails when the file is loaded, not halfway through a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal


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
        _check(
            bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
            f"site.name must be letters, digits, '-' or '_' (got {self.name!r})",
        )


@dataclass(frozen=True)
class TileQCConfig:
    """Per-tile quality control (``tiling.qc``): each threshold's provenance is
    ``pixcell_fed.slides.quality.QC_PROVENANCE`` (written into tiling.json), each check in docs/tiling.md."""

    enabled: bool = True
    pen_fraction: float = 0.05
    blur_laplacian_var: float = 250.0
    fold_fraction: float = 0.04
    glare_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("pen_fraction", "fold_fraction", "glare_fraction"):
            value = getattr(self, name)
            _check(0.0 < value <= 1.0, f"tiling.qc.{name} must be in (0, 1] (got {value})")
        _check(
            0.0 <= self.blur_laplacian_var <= 1e6,
            f"tiling.qc.blur_laplacian_var must be in [0, 1e6] (got {self.blur_laplacian_var}; 0 turns it off)",
        )


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
    qc: TileQCConfig = field(default_factory=TileQCConfig)

    def __post_init__(self) -> None:
        _check(0.05 <= self.target_mpp <= 20, f"tiling.target_mpp must be in [0.05, 20] (got {self.target_mpp})")
        _check(self.tile_size in (256, 1024), f"tiling.tile_size must be 256 or 1024 (got {self.tile_size})")
        _check(
            0.0 <= self.tissue_fraction <= 1.0, f"tiling.tissue_fraction must be in [0, 1] (got {self.tissue_fraction})"
        )
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
class ConditioningDPConfig:
    """The target guarantee of ``synthesis.conditioning: dp`` (docs/privacy.md): (epsilon, delta) per real tile,
    and the L2 norm every tile's embedding is clipped to before the Gaussian noise is added."""

    epsilon: float = 8.0  # per conditioning tile; the per-slide epsilon follows (see the report)
    delta: float | None = None  # null = 1/(10 N) rounded down to a power of ten, at most 1e-5 (N: tiles)
    clip_norm: float | None = None  # required in dp mode: choose it from public tiles, never from your own

    def __post_init__(self) -> None:
        _check(0 < self.epsilon <= 100, f"synthesis.dp.epsilon must be in (0, 100] (got {self.epsilon})")
        _check(
            self.delta is None or 0 < self.delta <= 1e-3,
            f"synthesis.dp.delta must be in (0, 0.001] or null (got {self.delta})",
        )
        _check(
            self.clip_norm is None or 0 < self.clip_norm <= 1e6,
            f"synthesis.dp.clip_norm must be in (0, 1e6] (got {self.clip_norm})",
        )


@dataclass(frozen=True)
class SynthesisConfig:
    """How PixCell turns embeddings into synthetic tiles."""

    samples_per_tile: int = 1
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    batch_size: int | None = None
    max_conditioning_tiles: int | None = None
    # Conditioning privacy (docs/privacy.md): exact (the paper's), mixed (mean of mix_k tiles of one slide and
    # label: a heuristic) or dp (Gaussian mechanism per tile, synthesis.dp); max_tiles_per_slide bounds the tiles
    # one slide contributes (and so the per-slide guarantee in dp mode).
    conditioning: Literal["exact", "mixed", "dp"] = "exact"
    mix_k: int = 4
    max_tiles_per_slide: int | None = None
    dp: ConditioningDPConfig = field(default_factory=ConditioningDPConfig)

    def __post_init__(self) -> None:
        _check(self.samples_per_tile >= 1, "synthesis.samples_per_tile must be at least 1")
        _check(1 <= self.steps <= 1000, "synthesis.steps must be in [1, 1000]")
        _check(self.guidance is None or self.guidance >= 0, "synthesis.guidance must be >= 0")
        _check(self.batch_size is None or self.batch_size >= 1, "synthesis.batch_size must be at least 1")
        _check(2 <= self.mix_k <= 64, f"synthesis.mix_k must be in [2, 64] (got {self.mix_k})")
        _check(
            self.max_tiles_per_slide is None or self.max_tiles_per_slide >= 1,
            "synthesis.max_tiles_per_slide must be at least 1 or null",
        )
        _check(
            self.conditioning != "dp" or self.dp.clip_norm is not None,
            "synthesis.dp.clip_norm must be set when synthesis.conditioning is dp: the L2 norm each tile's "
            "embedding is clipped to, chosen from public tiles (docs/privacy.md, 'Choosing the clip norm')",
        )


@dataclass(frozen=True)
class SplitConfig:
    """Which slides condition synthesis (T) and which are held out (H): whole patients (the labels CSV's patient
    column), or, only when set explicitly, single slides."""

    holdout_fraction: float = 0.34
    seed: int = 0
    unit: Literal["patient", "slide"] = "patient"

    def __post_init__(self) -> None:
        _check(0.0 < self.holdout_fraction < 1.0, "split.holdout_fraction must be strictly between 0 and 1")
        _check(self.unit in ("patient", "slide"), f"split.unit must be 'patient' or 'slide' (got {self.unit!r})")


@dataclass(frozen=True)
class AuditConfig:
    """Thresholds of the privacy audit. Each default's provenance is written in the report
    (``pixcell_fed.audit.gate.THRESHOLD_PROVENANCE``)."""

    copy_similarity: float = 0.65
    copy_pixel_confirm: float = 0.60
    max_copy_share: float = 0.01
    nn_ratio: float = 1 / 3
    alpha: float = 0.05
    fail_alpha: float = 0.001
    target_leak_share: float = 0.05
    encoder_membership_tpr_warn: float = 0.05
    encoder_membership_tpr_fail: float = 0.25
    min_holdout: int = 20
    min_holdout_ratio: float = 0.5
    top_k: int = 5
    drop_flagged: bool = True
    max_rounds: int = 2
    closest_pairs: int = 24
    device: str = "auto"  # where the searches run: auto (CUDA when present), cpu, cuda, cuda:N
    region_copy: bool = True
    region_copy_min_fraction: float = 0.25
    region_copy_candidates: int = 5
    region_copy_min_inliers: int = 6
    region_copy_correlation: float = 0.6
    # fidelity (docs/audit.md, "Fidelity"): never gates unless set; then WARN when FD(S,T)/FD(H,T) is above it
    fidelity_warn_fd_ratio: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.fidelity_warn_fd_ratio is None or 1.0 <= self.fidelity_warn_fd_ratio <= 1000.0,
            f"audit.fidelity_warn_fd_ratio must be null or in [1, 1000] (got {self.fidelity_warn_fd_ratio}; "
            "1 = as close to the conditioning tiles as new real tissue)",
        )
        for name in ("copy_similarity", "copy_pixel_confirm"):
            value = getattr(self, name)
            _check(0.0 < value <= 1.0, f"audit.{name} must be in (0, 1] (got {value})")
        _check(0.0 <= self.max_copy_share < 1.0, f"audit.max_copy_share must be in [0, 1) (got {self.max_copy_share})")
        _check(0.0 < self.nn_ratio < 1.0, f"audit.nn_ratio must be in (0, 1) (got {self.nn_ratio})")
        _check(
            0.0 < self.fail_alpha <= self.alpha <= 0.2,
            f"audit: need 0 < fail_alpha <= alpha <= 0.2 (got {self.fail_alpha}, {self.alpha})",
        )
        _check(
            0.0 < self.target_leak_share <= 1.0,
            f"audit.target_leak_share must be in (0, 1] (got {self.target_leak_share})",
        )
        _check(
            0.0 <= self.encoder_membership_tpr_warn <= self.encoder_membership_tpr_fail <= 1.0,
            "audit: need 0 <= encoder_membership_tpr_warn <= encoder_membership_tpr_fail <= 1",
        )
        _check(self.min_holdout >= 2, "audit.min_holdout must be at least 2")
        _check(0.0 <= self.min_holdout_ratio <= 10.0, "audit.min_holdout_ratio must be in [0, 10]")
        _check(self.top_k >= 2, "audit.top_k must be at least 2 (the distance-ratio test needs two neighbours)")
        _check(self.max_rounds >= 1, "audit.max_rounds must be at least 1")
        _check(self.closest_pairs >= 0, "audit.closest_pairs must be >= 0")
        _check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"audit.device must be auto, cpu, cuda or cuda:N (got {self.device!r})",
        )
        _check(
            0.0 < self.region_copy_min_fraction <= 1.0,
            f"audit.region_copy_min_fraction must be in (0, 1] (got {self.region_copy_min_fraction})",
        )
        _check(
            1 <= self.region_copy_candidates <= 100,
            f"audit.region_copy_candidates must be in [1, 100] (got {self.region_copy_candidates})",
        )
        _check(
            self.region_copy_min_inliers >= 3,
            f"audit.region_copy_min_inliers must be at least 3 (got {self.region_copy_min_inliers})",
        )
        _check(
            0.0 < self.region_copy_correlation < 1.0,
            f"audit.region_copy_correlation must be in (0, 1) (got {self.region_copy_correlation})",
        )


@dataclass(frozen=True)
class KeysConfig:
    """The site's signing key and the public keys of its privacy officers (Ed25519)."""

    site_private_key: Path = Path("keys/site_signing.key")
    passphrase_env: str | None = None
    officers: tuple[str, ...] = ()  # the only keys 'site-agent approve' and 'reject' accept

    def __post_init__(self) -> None:
        from pixcell_fed.errors import KeyFileError
        from pixcell_fed.keys import parse_public_key, public_key_raw

        seen: dict[bytes, int] = {}
        for i, text in enumerate(self.officers):
            try:
                raw = public_key_raw(parse_public_key(text, source=f"keys.officers[{i}]"))
            except KeyFileError as exc:
                raise ValueError(f"{exc.message} (paste the line 'site-agent officer-key' printed)") from exc
            _check(raw not in seen, f"keys.officers[{i}] repeats keys.officers[{seen.get(raw)}]")
            seen[raw] = i


@dataclass(frozen=True)
class DPPolicy:
    """The site's own limits for the DP fine-tune on its real tiles (``federation.dp``). A coordinator's request
    can only ask for less privacy loss than these allow; everything else is refused before training."""

    epsilon_budget: float = 8.0  # total epsilon this site ever spends (at delta), over rounds, runs, restarts
    delta: float | None = None  # null = 1/(10 N) rounded down to a power of ten (N: training tiles)
    min_noise_multiplier: float = 1.0  # requests with less noise are refused
    max_grad_norm: float = 1.0  # largest per-tile clipping norm a request may ask for
    max_local_epochs: int = 1  # most passes over the training tiles in one round
    min_batch_size: int = 4  # expected batch size (Poisson sampling) bounds of a request
    max_batch_size: int = 256
    count_granularity: int = 100  # examples reported rounded to a multiple of this; 0 = not reported

    def __post_init__(self) -> None:
        _check(
            0 < self.epsilon_budget <= 100,
            f"federation.dp.epsilon_budget must be in (0, 100] (got {self.epsilon_budget})",
        )
        _check(
            self.delta is None or 0 < self.delta <= 1e-2,
            f"federation.dp.delta must be in (0, 0.01] or null (got {self.delta})",
        )
        _check(
            0.3 <= self.min_noise_multiplier <= 100,
            f"federation.dp.min_noise_multiplier must be in [0.3, 100] (got {self.min_noise_multiplier})",
        )
        _check(
            0 < self.max_grad_norm <= 100, f"federation.dp.max_grad_norm must be in (0, 100] (got {self.max_grad_norm})"
        )
        _check(self.max_local_epochs >= 1, "federation.dp.max_local_epochs must be at least 1")
        _check(
            1 <= self.min_batch_size <= self.max_batch_size, "federation.dp: need 1 <= min_batch_size <= max_batch_size"
        )
        _check(self.count_granularity >= 0, "federation.dp.count_granularity must be >= 0 (0 = do not report counts)")


#: Backbones a site evaluates by default: timm ViT/DeiT/ConvNeXt (the families that also train under DP-SGD).
EVALUATION_ARCHITECTURES = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "convnext_tiny",
    "convnext_small",
)
#: timm keyword arguments a site accepts in an evaluation request by default, with their [min, max] (numbers only).
EVALUATION_MODEL_KWARGS = MappingProxyType(
    {
        "patch_size": (4.0, 32.0),
        "depth": (1.0, 24.0),
        "embed_dim": (16.0, 1024.0),
        "num_heads": (1.0, 16.0),
        "mlp_ratio": (1.0, 8.0),
        "drop_rate": (0.0, 0.9),
        "drop_path_rate": (0.0, 0.9),
    }
)


@dataclass(frozen=True)
class LocalTrainingConfig:
    """The site's own recipe and budget for the opt-in measurement of what the pool adds
    (``federation.local_training``; docs/federation.md, "What the pool adds at each site"). A coordinator's request
    can only lower ``epochs`` and ``max_tiles``; everything else is the site's. Which models the site accepts, how
    large, and how many such queries it answers are its evaluation limits (``federation.evaluation``)."""

    epochs: int = 3  # passes over the training tiles, the same for both fine-tunes
    max_tiles: int = 2000  # at most this many training tiles (a seeded sample, stratified by label)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    mode: Literal["finetune", "linear_probe"] = "finetune"
    generic_weights: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))  # arch: weights file
    bootstrap: int = 1000  # replicates of the paired bootstrap interval of the difference
    seed: int = 0

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 1000, f"federation.local_training.epochs must be in [1, 1000] (got {self.epochs})")
        _check(self.max_tiles >= 2, f"federation.local_training.max_tiles must be at least 2 (got {self.max_tiles})")
        _check(1 <= self.batch_size <= 4096, "federation.local_training.batch_size must be in [1, 4096]")
        _check(
            0 < self.lr <= 1 and 0 <= self.weight_decay <= 1,
            "federation.local_training: need 0 < lr <= 1 and 0 <= weight_decay <= 1",
        )
        _check(self.bootstrap >= 100, "federation.local_training.bootstrap must be at least 100")


@dataclass(frozen=True)
class FederationEvaluationConfig:
    """What this site's federated evaluation accepts and answers. A coordinator's request can only tighten it."""

    architectures: tuple[str, ...] = EVALUATION_ARCHITECTURES
    kinds: tuple[Literal["classifier", "encoder"], ...] = ("classifier", "encoder")
    model_kwargs: Mapping[str, tuple[float, float]] = field(default_factory=lambda: EVALUATION_MODEL_KWARGS)
    max_img_size: int = 512
    max_classes: int = 64
    max_weights_mb: float = 1024.0
    min_tiles_per_class: int = 10
    round_digits: int = 2
    max_queries_per_run: int = 4
    max_queries_per_day: int = 20

    def __post_init__(self) -> None:
        _check(
            all(a and a.replace("_", "").isalnum() for a in self.architectures),
            "federation.evaluation.architectures must be timm model names",
        )
        for name, bounds in self.model_kwargs.items():
            _check(
                name.replace("_", "").isalnum() and len(bounds) == 2 and bounds[0] <= bounds[1],
                f"federation.evaluation.model_kwargs[{name!r}] must be [min, max] with min <= max",
            )
        _check(16 <= self.max_img_size <= 4096, "federation.evaluation.max_img_size must be in [16, 4096]")
        _check(2 <= self.max_classes <= 10000, "federation.evaluation.max_classes must be in [2, 10000]")
        _check(0 < self.max_weights_mb <= 65536, "federation.evaluation.max_weights_mb must be in (0, 65536]")
        _check(self.min_tiles_per_class >= 1, "federation.evaluation.min_tiles_per_class must be at least 1")
        _check(0 <= self.round_digits <= 6, "federation.evaluation.round_digits must be in [0, 6]")
        _check(
            self.max_queries_per_run >= 0 and self.max_queries_per_day >= 0,
            "federation.evaluation.max_queries_per_run and max_queries_per_day must be >= 0 (0 = no evaluation)",
        )


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
    evaluation: FederationEvaluationConfig = field(default_factory=FederationEvaluationConfig)
    dp: DPPolicy = field(default_factory=DPPolicy)
    # opt-in: fine-tune a small classifier on train_dir twice (from the pool's model and from a generic start) and
    # send back only the two sets of metrics on the held-out tiles and their difference
    allow_local_training: bool = False
    local_training: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    # The Flower app bundle(s) this site runs, by SHA-256 ('site-agent app-hash'): one hash or a list. Messages of
    # any other app are refused by the site's launcher, unanswered. Empty: 'site-agent serve' refuses to start.
    app_sha256: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        from pixcell_fed.hashing import is_sha256_hex

        pins = (self.app_sha256,) if isinstance(self.app_sha256, str) else tuple(self.app_sha256)
        for pin in pins:
            _check(
                is_sha256_hex(pin),
                f"federation.app_sha256: {pin!r} is not a SHA-256 (64 lowercase hex digits; see 'site-agent app-hash')",
            )
        object.__setattr__(self, "app_sha256", pins)  # always a tuple after loading
        for arch in self.local_training.generic_weights:
            _check(
                arch in self.evaluation.architectures,
                f"federation.local_training.generic_weights names {arch!r}, "
                "which is not in federation.evaluation.architectures",
            )


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
