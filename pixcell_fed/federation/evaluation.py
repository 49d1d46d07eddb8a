"""Site-side evaluation of a received model on the site's real held-out labelled tiles.

Only rounded aggregate metrics leave the site: accuracy, balanced accuracy, macro F1 and the number of tiles. A
classifier is evaluated as it is; an SSL encoder (spec kind ``encoder``) is evaluated with a k-NN probe fitted at
the site (leave-one-out over the site's own labelled tiles), so no real feature or label leaves either. What the
site accepts (architectures, keyword arguments, weights, class sizes, query budget) is
:mod:`~pixcell_fed.federation.evaluation_policy` and :mod:`~pixcell_fed.federation.query_budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from pixcell_fed.config.schema import FederationEvaluationConfig
    from pixcell_fed.training.models import ModelSpec

#: the aggregate metrics a site answers (with ``n``, the number of tiles evaluated); the report shows these
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
    return {
        "accuracy": float(accuracy),
        "balanced_accuracy": float(sum(recalls) / len(recalls)),
        "macro_f1": float(sum(f1s) / len(f1s)),
        "n": n,
    }


def _predict_classes(model, items, spec, batch_size: int = 64) -> list[str]:
    import torch

    from pixcell_fed.training.data import load_arrays

    classes = spec.classes
    preds: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            logits = model(load_arrays(items[start : start + batch_size], spec))
            preds.extend(classes[int(i)] for i in logits.argmax(1))
    return preds


def _features(model, items, spec, batch_size: int = 64):
    import torch

    from pixcell_fed.training.data import load_arrays

    model.eval()
    with torch.no_grad():
        feats = [
            model(load_arrays(items[start : start + batch_size], spec)) for start in range(0, len(items), batch_size)
        ]
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


def model_metrics(model, spec: ModelSpec, items: Sequence[tuple[Path, str]], *, knn_k: int = 5) -> dict[str, float]:
    """Metrics of a built ``model`` on labelled real tiles: a classifier as it is, an encoder by a k-NN probe."""
    truth = [lab for _, lab in items]
    if spec.kind == "encoder":
        preds = knn_predict_loo(_features(model, items, spec), truth, k=knn_k)
    else:
        preds = _predict_classes(model, items, spec)
    return classification_metrics(truth, preds)


def evaluate_model(state: dict, spec: ModelSpec, eval_dir: str | Path, *, knn_k: int = 5) -> dict[str, Any]:
    """Metrics of the model (weights ``state``, ``spec``) on the labelled tiles in ``eval_dir``, unrounded and
    without limits: for a caller's own models and tiles. A site answers a coordinator through
    :func:`evaluate_request`."""
    from pixcell_fed.training.data import labelled_folder
    from pixcell_fed.training.models import build_model

    items = labelled_folder(eval_dir)
    model = build_model(spec.without_local_weights())
    model.load_state_dict(state)
    metrics: dict[str, Any] = model_metrics(model, spec, items, knn_k=knn_k)
    truth = [lab for _, lab in items]
    known = set(spec.classes)
    metrics["n_unknown_label"] = sum(lab not in known for lab in truth) if spec.kind != "encoder" else 0
    metrics["n_classes"] = len(set(truth))
    metrics["probe"] = "knn_loo" if spec.kind == "encoder" else "none"
    return metrics


def evaluate_request(
    content: RecordDict,
    limits: FederationEvaluationConfig,
    eval_dir: Path | None,
    work_dir: Path | None,
    flower_run: int | str,
) -> dict[str, float]:
    """Answer an ``evaluate`` request within the site's limits: check the model, then charge the query budget,
    then read the held-out tiles; returns the rounded aggregate metrics (see :mod:`evaluation_policy`)."""
    from pixcell_fed.errors import PixcellFedError
    from pixcell_fed.federation import evaluation_policy as policy
    from pixcell_fed.federation import protocol as P
    from pixcell_fed.federation.query_budget import charge_query
    from pixcell_fed.training.data import labelled_folder
    from pixcell_fed.training.models import build_model

    if eval_dir is None or work_dir is None:
        raise P.Refusal(
            "unavailable", f"no held-out folder ({eval_dir}) or no work folder for the query budget ({work_dir})"
        )
    limits = policy.effective_limits(limits, content.get(P.KEY_REQUEST, {}))
    state, sent = P.records_to_model(content, max_bytes=int(limits.max_weights_mb * (1 << 20)))
    spec = policy.check_model_spec(sent, limits)
    try:
        model = build_model(spec)
    except (PixcellFedError, AssertionError) as exc:  # timm checks some arguments with assert
        raise P.Refusal("refused-model", f"the site cannot build the model: {exc}") from exc
    policy.check_weights(state, model)
    model.load_state_dict(state)
    charge_query(work_dir, flower_run, per_run=limits.max_queries_per_run, per_day=limits.max_queries_per_day)
    try:
        items = labelled_folder(eval_dir)
    except PixcellFedError as exc:
        raise P.Refusal("unavailable", exc.message) from exc
    policy.check_tiles_per_class([lab for _, lab in items], limits)
    return rounded_answer(model_metrics(model, spec, items), limits)


def rounded_answer(metrics: dict[str, Any], limits: FederationEvaluationConfig) -> dict[str, float]:
    """What a site answers: the aggregate metrics rounded to ``round_digits``, and the number of tiles evaluated."""
    out = {name: round(float(metrics[name]), limits.round_digits) for name in METRIC_NAMES}
    out["n"] = float(int(metrics["n"]))
    return out
