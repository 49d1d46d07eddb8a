"""The coordinator's typed configuration, read ONCE from Flower's ``run_config`` (``[tool.flwr.app.config]``).

Keys in ``pyproject.toml`` use dashes (``pool-dir``); they map to the fields below with underscores. Lists are
comma-separated strings (``expected-sites = "alpha,beta"``) and model keyword arguments a JSON string, because
Flower's run config holds scalars only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pixcell_fed.errors import ConfigError

if TYPE_CHECKING:
    from pixcell_fed.federation.pooling import PoolSettings


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator's ServerApp needs: where, what to pool, how to train, what to evaluate."""

    work_dir: Path = Path("coordinator-work")  # pool/, model/, dp_model/ and report/ are written here
    trust_file: Path = Path("trust.json")  # the consortium trust file (site and officer public keys)
    expected_sites: tuple[str, ...] = ()  # sites that should take part (missing ones are reported)
    min_sites: int = 1  # start pooling once this many sites are connected
    wait_for_sites_s: float = 60.0  # ... or after this long
    chunk_mb: float = 512.0  # MB of tiles per data message at most (all queued at once)
    max_attempts: int = 3  # requests per tile before giving up on it
    reply_timeout_s: float = 600.0  # a site silent this long (with requests pending) is dropped
    poll_interval_s: float = 0.1  # how often the coordinator asks the SuperLink for replies
    max_bundle_age_days: float = 0.0  # refuse bundles built longer ago than this (0 = no maximum)
    min_conditioning: Literal["exact", "mixed", "dp"] = "exact"  # refuse bundles conditioned less privately
    max_tile_epsilon: float = 0.0  # dp conditioning: largest per-tile epsilon accepted (0 = no limit)
    max_slide_epsilon: float = 0.0  # dp conditioning: largest per-slide epsilon accepted (0 = no limit)
    recipe: Literal["classifier", "ssl"] = "classifier"
    ssl_method: Literal["simclr", "dino"] = "simclr"  # the ssl recipe's method
    arch: str = "vit_tiny_patch16_224"  # timm backbone
    model_kwargs: Mapping[str, Any] | None = None  # timm keyword arguments (e.g. depth, embed_dim)
    img_size: int = 224
    pretrained_file: Path | None = None  # local backbone weights (offline); none = random init
    mode: Literal["linear_probe", "finetune"] = "finetune"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-4
    seed: int = 0
    evaluate: bool = True  # send the model to every site for evaluation on real tiles
    augmentation_value: bool = True  # ask every site what the pool adds (sites opt in; metrics only)
    augmentation_epochs: int = 0  # 0 = each site's own budget; more than a site allows is never used
    augmentation_max_tiles: int = 0  # 0 = each site's own budget
    dp_rounds: int = 0  # > 0: federated DP fine-tune on the sites' real tiles afterwards
    dp_noise_multiplier: float = 1.0  # asked of each site; a site refuses less than its own floor
    dp_max_grad_norm: float = 1.0
    dp_local_epochs: int = 1
    dp_batch_size: int = 16
    dp_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.min_sites < 1 or self.max_attempts < 1 or self.chunk_mb <= 0 or self.epochs < 1 or self.dp_rounds < 0:
            raise ValueError(
                "coordinator: need min-sites >= 1, max-attempts >= 1, chunk-mb > 0, epochs >= 1, dp-rounds >= 0"
            )
        if not 0.01 <= self.poll_interval_s <= 10 or self.max_bundle_age_days < 0 or self.reply_timeout_s <= 0:
            raise ValueError(
                "coordinator: need poll-interval-s in [0.01, 10], max-bundle-age-days >= 0, reply-timeout-s > 0"
            )
        if self.max_tile_epsilon < 0 or self.max_slide_epsilon < 0:
            raise ValueError("coordinator: max-tile-epsilon and max-slide-epsilon must be >= 0 (0 = no limit)")
        self.conditioning_requirement  # noqa: B018 -- the requirement's own checks (mode, finite bounds), at load time
        if self.dp_rounds:
            self.dp_settings  # noqa: B018 -- the DP settings' own range checks, at load time
        if self.augmentation_epochs < 0 or self.augmentation_max_tiles < 0:
            raise ValueError(
                "coordinator: augmentation-epochs and augmentation-max-tiles must be >= 0 (0 = the site's own)"
            )

    @property
    def augmentation_request(self):
        """What the augmentation round asks of the sites (each site's own budget where 0)."""
        from pixcell_fed.federation.augmentation_value import AugmentationRequest

        return AugmentationRequest(
            epochs=self.augmentation_epochs or None, max_tiles=self.augmentation_max_tiles or None
        )

    @property
    def pool_settings(self) -> PoolSettings:
        from pixcell_fed.federation.pooling import PoolSettings

        return PoolSettings(
            message_mb=self.chunk_mb,
            expected_sites=self.expected_sites,
            max_attempts=self.max_attempts,
            reply_timeout_s=self.reply_timeout_s,
            poll_interval_s=self.poll_interval_s,
            max_bundle_age_days=self.max_bundle_age_days,
            conditioning=self.conditioning_requirement,
        )

    @property
    def conditioning_requirement(self):
        """The least conditioning privacy a bundle must offer to be pooled (docs/privacy.md); any epsilon bound
        admits only ``dp`` bundles."""
        from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement

        return ConditioningRequirement(
            min_mode=self.min_conditioning,
            max_tile_epsilon=self.max_tile_epsilon or None,
            max_slide_epsilon=self.max_slide_epsilon or None,
        )

    @property
    def dp_settings(self):
        """What each DP round asks of the sites (delta and the budget are each site's own)."""
        from pixcell_fed.training.dp import DPSettings

        return DPSettings(
            noise_multiplier=self.dp_noise_multiplier,
            max_grad_norm=self.dp_max_grad_norm,
            epochs=self.dp_local_epochs,
            batch_size=self.dp_batch_size,
            lr=self.dp_lr,
        )

    @property
    def pool_dir(self) -> Path:
        return self.work_dir / "pool"

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "model"

    @property
    def report_dir(self) -> Path:
        return self.work_dir / "report"

    @property
    def refusals_dir(self) -> Path:
        """Where the lead puts the signed refusal notices sites chose to send (:mod:`pixcell_fed.bundle.refusal`)."""
        return self.work_dir / "refusals"


def from_run_config(run_config: Mapping[str, Any]) -> CoordinatorConfig:
    """Build the typed config from Flower's run config (dashes to underscores; lists and JSON decoded)."""
    from pixcell_fed.config import build_dataclass

    data: dict[str, Any] = {}
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name in ("expected_sites",) and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif name == "model_kwargs" and isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except ValueError as exc:
                raise ConfigError(
                    f"run config: model-kwargs is not JSON: {value!r}", hint="write it like '{\"depth\": 2}'"
                ) from exc
        elif name in ("pretrained_file",) and value == "":
            value = None
        data[name] = value
    return build_dataclass(CoordinatorConfig, data, source="run config ([tool.flwr.app.config])")
