"""A site's local fine-tune of a small classifier on its own labelled tiles, and the paired comparison of two such
fine-tunes on its held-out tiles: what the pool adds (issue 15; the round is
:mod:`pixcell_fed.federation.augmentation_value`).

Pure training: the caller builds the models, reads its folders and decides what leaves. :func:`finetune` runs
the same recipe (AdamW, epochs, batch size, seeded data order) on whatever model it is given, so two runs differ
only in where they start. :func:`paired_difference` compares two sets of predictions on the same tiles with a
seeded paired bootstrap.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

if TYPE_CHECKING:
    import torch

    from pixcell_fed.training.models import ModelSpec

#: the metrics compared (:func:`pixcell_fed.federation.evaluation.classification_metrics` computes the same)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class FinetuneRecipe:
    """How both fine-tunes train: the same recipe and budget for each."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    mode: Literal["finetune", "linear_probe"] = "finetune"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("fine-tune recipe: need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0")


def stratified_sample(items: Sequence[tuple[Path, str]], max_items: int, seed: int) -> list[tuple[Path, str]]:
    """At most ``max_items`` of ``items``, each label keeping its share (at least one tile), in a seeded order."""
    items = sorted(items, key=lambda it: (it[1], str(it[0])))
    if len(items) <= max_items:
        return list(items)
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    take = {label: max(1, int(max_items * len(group) / len(items))) for label, group in by_label.items()}
    order = sorted(by_label, key=lambda lab: (-len(by_label[lab]), lab))  # the slots rounding left, largest first
    while sum(take.values()) < max_items:
        for label in order:
            if sum(take.values()) < max_items and take[label] < len(by_label[label]):
                take[label] += 1
    out = [item for label, group in sorted(by_label.items()) for item in rng.sample(group, take[label])]
    return sorted(out, key=lambda it: (it[1], str(it[0])))


def with_head(model: torch.nn.Module, n_classes: int) -> torch.nn.Module:
    """``model`` with a fresh classification head of ``n_classes`` outputs (timm's ``reset_classifier``)."""
    reset = cast("Callable[[int], None]", model.reset_classifier)  # timm's method, untyped on nn.Module
    reset(n_classes)
    return model


def finetune(
    model: torch.nn.Module,
    items: Sequence[tuple[Path, str]],
    classes: Sequence[str],
    spec: ModelSpec,
    recipe: FinetuneRecipe,
) -> int:
    """Train ``model`` in place on ``items`` (labels among ``classes``) with ``recipe``; returns the optimiser
    steps taken. The data order depends on ``recipe.seed`` only, so two models see the same batches."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pixcell_fed.training.data import TileDataset

    if recipe.mode == "linear_probe":
        for p in model.parameters():
            p.requires_grad_(False)
        head = cast("Callable[[], torch.nn.Module]", model.get_classifier)()  # timm's method, untyped on nn.Module
        for p in head.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    tiles = cast("Dataset[Any]", TileDataset(list(items), list(classes), spec))  # map-style: len and getitem
    loader: DataLoader = DataLoader(
        tiles, batch_size=recipe.batch_size, shuffle=True, generator=torch.Generator().manual_seed(recipe.seed)
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = 0
    model.train()
    for _ in range(recipe.epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            steps += 1
    model.eval()
    return steps


def predict(
    model: torch.nn.Module, items: Sequence[tuple[Path, str]], spec: ModelSpec, batch_size: int = 64
) -> np.ndarray:
    """Class indices predicted for ``items``."""
    import torch

    from pixcell_fed.training.data import load_arrays

    model.eval()
    with torch.no_grad():
        out = [
            model(load_arrays(items[start : start + batch_size], spec)).argmax(1).numpy()
            for start in range(0, len(items), batch_size)
        ]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def metrics_of(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 over the classes present in ``truth`` (as
    :func:`~pixcell_fed.federation.evaluation.classification_metrics`), from a confusion matrix."""
    truth, pred = np.asarray(truth, np.int64), np.asarray(pred, np.int64)
    if truth.size == 0:
        return dict.fromkeys(METRICS, 0.0)
    confusion = np.bincount(truth * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return _from_confusion(confusion[None])[0]


def _from_confusion(confusion: np.ndarray) -> list[dict[str, float]]:
    """Metrics of a stack of confusion matrices (B, C, C), rows = truth."""
    tp = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
    support, predicted = confusion.sum(axis=2).astype(np.float64), confusion.sum(axis=1).astype(np.float64)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, tp / np.where(present, support, 1), 0.0)
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
        f1 = np.where(
            precision + recall > 0,
            2 * precision * recall / np.where(precision + recall > 0, precision + recall, 1),
            0.0,
        )
    n_present = present.sum(axis=1)
    accuracy = tp.sum(axis=1) / confusion.sum(axis=(1, 2))
    balanced = (recall * present).sum(axis=1) / n_present
    macro_f1 = (f1 * present).sum(axis=1) / n_present
    return [
        {"accuracy": float(a), "balanced_accuracy": float(b), "macro_f1": float(f)}
        for a, b, f in zip(accuracy, balanced, macro_f1)
    ]


def paired_difference(
    truth: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_classes: int,
    *,
    bootstrap: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Metrics of predictions ``a`` and ``b`` on the same tiles, and ``a - b`` per metric with a seeded paired
    bootstrap percentile interval (each replicate resamples the tiles once, for both)."""
    truth, pred_a, pred_b = (np.asarray(x, np.int64) for x in (truth, pred_a, pred_b))
    n = len(truth)
    a, b = metrics_of(truth, pred_a, n_classes), metrics_of(truth, pred_b, n_classes)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {name: [] for name in METRICS}
    per_block = max(1, min(bootstrap, (8 * 2**20) // max(1, 8 * n)))
    for start in range(0, bootstrap, per_block):
        rows = rng.integers(0, n, size=(min(per_block, bootstrap - start), n))
        conf = []
        for pred in (pred_a, pred_b):
            codes = truth[rows] * n_classes + pred[rows]
            offsets = np.arange(len(rows))[:, None] * n_classes * n_classes
            counts = np.bincount((codes + offsets).ravel(), minlength=len(rows) * n_classes * n_classes)
            conf.append(_from_confusion(counts.reshape(len(rows), n_classes, n_classes)))
        for ma, mb in zip(*conf):
            for name in METRICS:
                diffs[name].append(ma[name] - mb[name])
    alpha = (1 - confidence) / 2
    difference = {}
    for name in METRICS:
        low, high = np.quantile(diffs[name], [alpha, 1 - alpha])
        difference[name] = {"value": a[name] - b[name], "low": float(low), "high": float(high)}
    return {"a": a, "b": b, "difference": difference, "n": n, "bootstrap": bootstrap, "confidence": confidence}
