"""Recipe ``dp_finetune``: federated fine-tuning on the sites' REAL tiles, DP-SGD (Opacus) at each site + FedAvg.

Each round the coordinator sends the current weights; every site trains ``local_epochs`` with Opacus DP-SGD
(per-sample clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier``, Poisson sampling) on its real
labelled tiles and returns the new weights, its number of examples and its epsilon at the configured delta so
far. The site keeps its privacy accountant's history in the run's node state, so epsilon accumulates over
rounds. The coordinator averages the weights (weighted by examples) and reports epsilon per site.

Only DP-compatible backbones are accepted (timm ViT/DeiT/ConvNeXt, or models with GroupNorm); the site checks
with Opacus's ModuleValidator AND a real DP step, and refuses others with a clear error before training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pixcell_fed.errors import FederationError
from pixcell_fed.federation import protocol as P
from pixcell_fed.runlog import get_logger
from pixcell_fed.training import RECIPES

if TYPE_CHECKING:
    from flwr.app import RecordDict

log = get_logger(__name__)

ACCOUNTANT_KEY = "dp-accountant"


def check_dp_compatible(model) -> None:
    """Refuse a model Opacus cannot train (lists every incompatible layer at once)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise FederationError(
            f"model is not compatible with DP-SGD: {'; '.join(str(e) for e in errors[:5])}",
            hint="use a timm ViT/DeiT/ConvNeXt backbone, or one built with GroupNorm instead of BatchNorm")


def local_dp_train(model, images, labels, *, noise_multiplier: float, max_grad_norm: float, delta: float,
                   epochs: int, batch_size: int, lr: float, history: list | None = None, seed: int = 0):
    """DP-SGD on (images, labels) tensors; returns (trained module, epsilon, accountant history)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    check_dp_compatible(model)
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    engine = PrivacyEngine(accountant="prv")
    if history:
        engine.accountant.history = [tuple(h) for h in history]
    model.train()
    private, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                                     poisson_sampling=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_fn(private(x), y).backward()
            optimizer.step()
    epsilon = float(engine.get_epsilon(delta))
    module = private._module
    private._close()  # remove Opacus's hooks so the plain module can be trained, averaged or saved again
    return module, epsilon, [list(h) for h in engine.accountant.history]


def site_round(request: "RecordDict", train_dir: str | Path, site_name: str, state: "RecordDict | None") -> "RecordDict":
    """One DP round at a site (the ``train`` message): weights in, weights + examples + epsilon out."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    import torch

    from pixcell_fed.training.data import labelled_folder, load_arrays
    from pixcell_fed.training.models import build_model

    weights, spec = P.records_to_model(request)
    dp = request[P.KEY_REQUEST]
    items = [(p, lab) for p, lab in labelled_folder(train_dir) if lab in spec["classes"]]
    if not items:
        raise FederationError(f"site {site_name}: none of the tiles in {train_dir} has a label the model knows",
                              hint=f"the model's classes are {spec['classes']}")
    model = build_model({**spec, "pretrained_file": None})
    model.load_state_dict(weights)
    index = {c: i for i, c in enumerate(spec["classes"])}
    images = load_arrays(items, spec)
    labels = torch.tensor([index[lab] for _, lab in items], dtype=torch.long)
    history = None
    if state is not None and ACCOUNTANT_KEY in state:
        history = json.loads(str(state[ACCOUNTANT_KEY]["history"]))
    trained, epsilon, history = local_dp_train(
        model, images, labels, noise_multiplier=float(dp["noise-multiplier"]), max_grad_norm=float(dp["max-grad-norm"]),
        delta=float(dp["delta"]), epochs=int(dp["local-epochs"]), batch_size=int(dp["batch-size"]), lr=float(dp["lr"]),
        history=history, seed=int(dp.get("round", 0)))
    if state is not None:
        state[ACCOUNTANT_KEY] = ConfigRecord({"history": json.dumps(history)})
    content = RecordDict({P.KEY_METRICS: MetricRecord({"n": float(len(items)), "epsilon": epsilon, "delta": float(dp["delta"])}),
                          P.KEY_INFO: ConfigRecord({"site-name": site_name})})
    P.model_to_records({k: v.detach().cpu() for k, v in trained.state_dict().items()}, spec, content)
    return content


def fedavg(states: list[dict], weights: list[float]) -> dict:
    """Weighted mean of state dicts (floating tensors); other tensors are taken from the first."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key].double() * (w / total) for s, w in zip(states, weights)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def federated_dp_finetune(transport: Any, nodes: Mapping[str, int], model, spec: dict, cfg: Any) -> dict[str, Any]:
    """Rounds of site DP-SGD + FedAvg from ``model``; evaluates the result at every site. Returns the report part."""
    from pixcell_fed.federation.workflow import evaluate_at_sites, pooled_metrics
    from pixcell_fed.training.models import save_checkpoint, state_dict_of

    check_dp_compatible(model)
    global_state = state_dict_of(model)
    privacy: dict[str, dict[str, float]] = {}
    rounds = []
    for rnd in range(1, cfg.dp_rounds + 1):
        requests = {}
        for node in nodes.values():
            content = P.request_record(**{"round": rnd, "noise-multiplier": cfg.dp_noise_multiplier,
                                          "max-grad-norm": cfg.dp_max_grad_norm, "delta": cfg.dp_delta,
                                          "local-epochs": cfg.dp_local_epochs, "batch-size": cfg.dp_batch_size,
                                          "lr": cfg.dp_lr})
            P.model_to_records(global_state, spec, content)
            requests[node] = (P.MSG_TRAIN, content)
        replies = transport.exchange(requests, timeout=cfg.reply_timeout_s)
        states, weights, took_part = [], [], []
        for site, node in sorted(nodes.items()):
            reply = replies.get(node)
            if reply is None or reply.content is None:
                log.warning("DP round %d: site %s did not answer: %s", rnd, site, reply.error if reply else "no reply")
                continue
            metrics = reply.content[P.KEY_METRICS]
            state, _ = P.records_to_model(reply.content)
            states.append(state)
            weights.append(float(metrics["n"]))
            took_part.append(site)
            earlier = privacy.get(site, {})
            privacy[site] = {"epsilon": float(metrics["epsilon"]), "delta": float(metrics["delta"]), "n": int(metrics["n"]),
                             "rounds": earlier.get("rounds", 0) + 1,
                             "epsilon_by_round": [*earlier.get("epsilon_by_round", []), float(metrics["epsilon"])]}
        if not states:
            raise FederationError(f"DP round {rnd}: no site answered", hint="check that the sites are connected and have a train-dir")
        global_state = fedavg(states, weights)
        rounds.append({"round": rnd, "sites": took_part})
    model.load_state_dict(global_state)
    out_dir = Path(cfg.work_dir) / "dp_model"
    save_checkpoint(model, spec, out_dir, extra={"recipe": "dp_finetune", "privacy": privacy, "rounds": rounds})
    evaluation = evaluate_at_sites(transport, dict(nodes), global_state, spec, timeout=cfg.reply_timeout_s)
    return {"privacy": privacy, "rounds": rounds, "checkpoint": str(out_dir), "evaluation": evaluation,
            "pooled_evaluation": pooled_metrics(evaluation),
            "settings": {"noise_multiplier": cfg.dp_noise_multiplier, "max_grad_norm": cfg.dp_max_grad_norm,
                         "delta": cfg.dp_delta, "local_epochs": cfg.dp_local_epochs}}


RECIPES.register("dp_finetune", federated_dp_finetune)
