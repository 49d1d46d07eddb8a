"""Recipe ``ssl``: self-supervised pre-training of a timm backbone on the pooled tiles, ``method`` ``simclr`` or
``dino``.

* ``simclr``: lightly's NT-Xent loss and projection head on two torchvision-augmented views per tile.
* ``dino``: self-distillation with an EMA teacher and multi-crop views, from lightly's DINO head, loss,
  transform and momentum update (:mod:`pixcell_fed.training.dino`); PixCell's privacy experiment trained
  DINOv2-family models on synthetic tiles, and pathology foundation models are DINO-family.

Labels are not needed. The checkpoint is the backbone alone (spec kind ``encoder``, ``num_classes=0``: the
model returns pooled features), saved like the classifier's, so each site can evaluate it with a k-NN probe on
its own real labelled tiles (:mod:`pixcell_fed.federation.evaluation`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

from pixcell_fed.errors import UsageError
from pixcell_fed.runlog import get_logger
from pixcell_fed.training import TrainResult, register_recipe
from pixcell_fed.training.classifier import STATE_FILE

log = get_logger(__name__)


@dataclass(frozen=True)
class SSLConfig:
    """How the self-supervised encoder is trained (``temperature`` and ``projection_dim``: SimCLR; ``dino_*``: DINO)."""

    method: Literal["simclr", "dino"] = "simclr"
    arch: str = "vit_tiny_patch16_224"
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    img_size: int = 224
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    projection_dim: int = 128
    dino_prototypes: int = 4096  # output dimension of the DINO head (the paper's K; 65,536 at ImageNet scale)
    dino_local_views: int = 2  # small local crops per tile besides the two global crops (the paper: 6-10)
    dino_teacher_momentum: float = 0.996  # EMA momentum of the teacher at the start (cosine schedule to 1)
    seed: int = 0
    pretrained_file: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.temperature <= 0:
            raise ValueError(
                "ssl: need epochs >= 1, batch_size >= 2 (SimCLR contrasts pairs in a batch), temperature > 0"
            )
        if self.dino_prototypes < 2 or self.dino_local_views < 0 or not 0 <= self.dino_teacher_momentum < 1:
            raise ValueError("ssl: need dino_prototypes >= 2, dino_local_views >= 0, 0 <= dino_teacher_momentum < 1")


def augment(x):
    """SimCLR-style views of a normalised NCHW batch: random resized crop, flips, colour jitter (per sample)."""
    import torch
    from torchvision.transforms import v2

    size = x.shape[-1]
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.4, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.05)], p=0.8),
        ]
    )
    return torch.stack([transform(img) for img in x])


def _lightly():
    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
    except ImportError as exc:
        raise UsageError(
            "the 'ssl' recipe needs lightly", hint="pip install lightly (a dependency of pixcell-fed)"
        ) from exc
    return NTXentLoss, SimCLRProjectionHead


def train_ssl(items: Sequence[tuple[Path, str | None]], out_dir: str | Path, cfg: SSLConfig) -> TrainResult:
    """``cfg.method`` on the images of ``items``; writes the encoder checkpoint to ``out_dir`` (resumable per
    epoch)."""
    import torch

    from pixcell_fed.training.models import ModelSpec

    if len(items) < 2:
        raise UsageError(
            "the pooled set has fewer than two tiles", hint="pool more tiles before self-supervised training"
        )
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(
        arch=cfg.arch,
        img_size=cfg.img_size,
        kwargs=cfg.kwargs,
        kind="encoder",
        pretrained_file=str(cfg.pretrained_file) if cfg.pretrained_file else None,
    )
    if cfg.method == "dino":
        from pixcell_fed.training.dino import train_dino

        history = train_dino(items, out_dir, cfg, spec, out_dir / STATE_FILE)
    else:
        history = _train_simclr(items, out_dir, cfg, spec)
    return TrainResult(checkpoint=out_dir, spec=spec, history=history)


def _train_simclr(items: Sequence[tuple[Path, str | None]], out_dir: Path, cfg: SSLConfig, spec) -> list[dict]:
    """SimCLR on the images of ``items``; writes the encoder checkpoint to ``out_dir``; returns the curve."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pixcell_fed.atomic import atomic_path
    from pixcell_fed.training.data import TileDataset
    from pixcell_fed.training.models import build_model, save_checkpoint

    NTXentLoss, SimCLRProjectionHead = _lightly()  # noqa: N806  # classes, named as lightly names them
    backbone = build_model(spec)
    head = SimCLRProjectionHead(backbone.num_features, backbone.num_features, cfg.projection_dim)
    loss_fn = NTXentLoss(temperature=cfg.temperature)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start = 0
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("arch") == cfg.arch and state.get("recipe") == "ssl" and state.get("method", "simclr") == "simclr":
            backbone.load_state_dict(state["model"])
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = int(state["epoch"]) + 1, list(state["history"])
    tiles = cast("Dataset[Any]", TileDataset(list(items), [], spec))  # map-style: len and getitem
    loader: DataLoader = DataLoader(
        tiles,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if len(loader) == 0:
        loader = DataLoader(tiles, batch_size=len(items), shuffle=True)
    for epoch in range(start, cfg.epochs):
        backbone.train()
        head.train()
        total, n = 0.0, 0
        for x, _ in loader:
            z0, z1 = head(backbone(augment(x))), head(backbone(augment(x)))
            loss = loss_fn(z0, z1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "samples": n})
        log.info("ssl epoch %d/%d: %s", epoch + 1, cfg.epochs, history[-1])
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "model": backbone.state_dict(),
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "arch": cfg.arch,
                    "recipe": "ssl",
                    "method": "simclr",
                },
                tmp,
            )
    save_checkpoint(backbone, spec, out_dir, extra={"recipe": "ssl", "method": "simclr", "history": history})
    return history


@register_recipe("ssl", SSLConfig)
def run(pool_dir: str | Path, out_dir: str | Path, cfg: SSLConfig) -> TrainResult:
    """``cfg.method`` (SimCLR or DINO) on the pooled set in ``pool_dir`` (labels ignored)."""
    from pixcell_fed.training.data import pooled_items

    return train_ssl(pooled_items(pool_dir), out_dir, cfg)
