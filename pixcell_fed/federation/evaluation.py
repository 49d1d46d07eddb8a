"""Site-side evaluation of a received model on the site's real held-out labelled tiles.

Only metrics leave the site: accuracy, balanced accuracy, macro F1 and counts. A classifier is evaluated as it
is; an SSL encoder (spec kind ``encoder``) is evaluated with a k-NN probe fitted at the site (leave-one-out over
the site's own labelled tiles), so no real feature or label leaves either.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from pixcell_fed.training.models import ModelSpec

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1")


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the true classes) and macro F1 (over true classes)."""
    n = len(y_true)
    if n == 0:
        return {"accuracy": 0.0, "balanced_accuracy": 0.0, "macro_f1": 0.0, "n": 0}
    classes = sorted(set(y_true))
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / n
    recalls, f1s = [], []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        recall = tp / (tp + fn) if tp + fn else 0.0
        precision = tp / (tp + fp) if tp + fp else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"accuracy": float(accuracy), "balanced_accuracy": float(sum(recalls) / len(recalls)),
            "macro_f1": float(sum(f1s) / len(f1s)), "n": n}


def _predict_classes(model, items, spec, batch_size: int = 64) -> list[str]:
    import torch

    from pixcell_fed.training.data import load_arrays

    classes = spec.classes
    preds: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            logits = model(load_arrays(items[start:start + batch_size], spec))
            preds.extend(classes[int(i)] for i in logits.argmax(1))
    return preds


def _features(model, items, spec, batch_size: int = 64):
    import torch

    from pixcell_fed.training.data import load_arrays

    feats = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            feats.append(model(load_arrays(items[start:start + batch_size], spec)))
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def knn_predict_loo(features, labels: Sequence[str], k: int = 5) -> list[str]:
    """Leave-one-out cosine k-NN predictions (majority vote, ties to the nearest)."""

    sim = features @ features.T
    sim.fill_diagonal_(-float("inf"))
    k = max(1, min(k, len(labels) - 1))
    top = sim.topk(k, dim=1).indices
    preds = []
    for row in top.tolist():
        votes: dict[str, int] = {}
        for j in row:
            votes[labels[j]] = votes.get(labels[j], 0) + 1
        best = max(votes.values())
        preds.append(next(labels[j] for j in row if votes[labels[j]] == best))
    return preds


def evaluate_model(state: dict, spec: "ModelSpec", eval_dir: str | Path, *, knn_k: int = 5) -> dict[str, float]:
    """Metrics of the model (weights ``state``, ``spec``) on the labelled real tiles in ``eval_dir``."""
    from pixcell_fed.training.data import labelled_folder
    from pixcell_fed.training.models import build_model

    items = labelled_folder(eval_dir)
    model = build_model(spec.without_local_weights())
    model.load_state_dict(state)
    truth = [lab for _, lab in items]
    if spec.kind == "encoder":
        preds = knn_predict_loo(_features(model, items, spec), truth, k=knn_k)
        probe = "knn_loo"
    else:
        preds = _predict_classes(model, items, spec)
        probe = "none"
    metrics = classification_metrics(truth, preds)
    known = set(spec.classes)
    metrics["n_unknown_label"] = sum(lab not in known for lab in truth) if spec.kind != "encoder" else 0
    metrics["n_classes"] = len(set(truth))
    metrics["probe"] = probe
    return metrics
