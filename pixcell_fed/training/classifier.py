"""Recipe ``classifier``: a timm backbone trained on the pooled labelled tiles (linear probe or fine-tune).

Checkpoints are ``model.safetensors`` + ``config.json`` (the model spec, classes and training curve), loadable
with :func:`pixcell_fed.training.models.load_checkpoint`. ``train_state.pt`` beside them holds the optimizer
and epoch so that an interrupted run resumes where it stopped. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
recipe trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 writes the files.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

from pixcell_fed.errors import UsageError
from pixcell_fed.runlog import get_logger
from pixcell_fed.training import TrainResult, register_recipe

log = get_logger(__name__)

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class ClassifierConfig:
    """How the shared classifier is trained."""

    arch: str = "vit_tiny_patch16_224"
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    img_size: int = 224
    mode: Literal["linear_probe", "finetune"] = "finetune"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    val_fraction: float = 0.1
    seed: int = 0
    pretrained_file: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.img_size < 8 or not 0 <= self.val_fraction < 1:
            raise ValueError("classifier: need epochs >= 1, batch_size >= 1, img_size >= 8, 0 <= val_fraction < 1")


def dist_context():
    """(rank, world_size, device) -- initialises torch.distributed when launched by torchrun."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def split_items(items: Sequence[tuple[Path, str]], val_fraction: float, seed: int):
    """Deterministic train/validation split, stratified by label."""
    by_label: dict[str, list] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    train, val = [], []
    rng = random.Random(seed)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: str(it[0]))
        rng.shuffle(group)
        n_val = int(round(len(group) * val_fraction)) if len(group) > 2 else 0
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


def _set_trainable(model, mode: str) -> None:
    if mode == "linear_probe":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)


def train_classifier(
    items: Sequence[tuple[Path, str | None]],
    out_dir: str | Path,
    cfg: ClassifierConfig,
    *,
    classes: Sequence[str] | None = None,
) -> TrainResult:
    """Train on labelled ``(path, label)`` items; write the checkpoint to ``out_dir``; resume if one is there."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data.distributed import DistributedSampler

    from pixcell_fed.atomic import atomic_path
    from pixcell_fed.training.data import TileDataset
    from pixcell_fed.training.models import ModelSpec, build_model, save_checkpoint

    labelled = [(p, lab) for p, lab in items if lab is not None]
    if not labelled:
        raise UsageError(
            "the pooled set has no labelled tiles",
            hint="the classifier recipe needs bundles with a label column; use the 'ssl' recipe for unlabelled sets",
        )
    classes = sorted({lab for _, lab in labelled}) if classes is None else list(classes)
    if len(classes) < 2:
        raise UsageError(
            f"need at least two classes to train a classifier (got {classes})",
            hint="pool bundles with more than one label",
        )
    out_dir = Path(out_dir)
    rank, world, device = dist_context()
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(
        arch=cfg.arch,
        classes=tuple(classes),
        img_size=cfg.img_size,
        kwargs=cfg.kwargs,
        pretrained_file=str(cfg.pretrained_file) if cfg.pretrained_file else None,
    )
    model = build_model(spec)
    _set_trainable(model, cfg.mode)
    train_items, val_items = split_items(labelled, cfg.val_fraction, cfg.seed)
    train_set = cast("Dataset[Any]", TileDataset(train_items, classes, spec))  # map-style: len and getitem
    sampler: DistributedSampler | None = (
        DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    loader: DataLoader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=False,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start_epoch = 0
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("classes") == classes and state.get("arch") == cfg.arch:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"]) + 1
            history = list(state["history"])
            if rank == 0:
                log.info("resuming classifier training at epoch %d from %s", start_epoch + 1, state_path)
    model.to(device)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        stats = torch.tensor([loss_sum, correct, total], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        seen = stats[2].clamp(min=1)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(stats[0] / seen),
            "train_accuracy": float(stats[1] / seen),
            "samples": int(stats[2]),
        }
        if rank == 0 and val_items:
            row["val_accuracy"] = _accuracy(model, val_items, classes, spec, device)
        history.append(row)
        if rank == 0:
            log.info("classifier epoch %d/%d: %s", epoch + 1, cfg.epochs, row)
            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(state_path) as tmp:
                torch.save(
                    {
                        "model": {k: v.cpu() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "classes": classes,
                        "arch": cfg.arch,
                    },
                    tmp,
                )
    if rank == 0:
        save_checkpoint(
            model,
            spec,
            out_dir,
            extra={"recipe": "classifier", "mode": cfg.mode, "history": history, "world_size": world},
        )
    if world > 1:
        dist.barrier()
    return TrainResult(checkpoint=out_dir, spec=spec, history=history)


def _accuracy(model, items, classes, spec, device) -> float:
    import torch

    from pixcell_fed.training.data import load_arrays

    index = {c: i for i, c in enumerate(classes)}
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(items), 64):
            batch = items[start : start + 64]
            pred = model(load_arrays(batch, spec).to(device)).argmax(1).cpu()
            correct += sum(int(p) == index[lab] for p, (_, lab) in zip(pred, batch))
    model.train()
    return correct / max(len(items), 1)


@register_recipe("classifier", ClassifierConfig)
def run(pool_dir: str | Path, out_dir: str | Path, cfg: ClassifierConfig) -> TrainResult:
    """Train the classifier on the pooled set in ``pool_dir``."""
    from pixcell_fed.training.data import pooled_items

    return train_classifier(pooled_items(pool_dir), out_dir, cfg)
