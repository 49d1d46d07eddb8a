"""The coordinator's whole cycle: wait for sites -> pool -> train -> evaluate at every site -> report.

Plain functions over a pooling :class:`~pixcell_fed.federation.pooling.Transport`, so the ServerApp is a thin
wrapper and the cycle runs the same against a live Grid or an in-memory fake.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pixcell_fed.federation import protocol as P
from pixcell_fed.federation.config import CoordinatorConfig
from pixcell_fed.federation.evaluation import METRIC_NAMES
from pixcell_fed.federation.node_identity import identify_nodes
from pixcell_fed.federation.pooling import PoolReport, TrustVerifier, pool_bundles, trust_verifier
from pixcell_fed.federation.transport import Transport
from pixcell_fed.runlog import get_logger

if TYPE_CHECKING:
    from pixcell_fed.training.models import ModelSpec

log = get_logger(__name__)


def wait_for_sites(transport: Transport, cfg: CoordinatorConfig, verify: TrustVerifier) -> dict[str, int]:
    """Trusted sites (by key) once ``max(min_sites, len(expected_sites))`` are connected or ``wait_for_sites_s``
    passed; nodes whose key is no trusted site's do not count."""
    want = max(cfg.min_sites, len(cfg.expected_sites))
    deadline = time.monotonic() + cfg.wait_for_sites_s
    sites = identify_nodes(transport.nodes(), verify.trust).sites
    while len(sites) < want and time.monotonic() < deadline:
        time.sleep(1.0)
        sites = identify_nodes(transport.nodes(), verify.trust).sites
    log.info("%d of %d wanted site(s) connected", len(sites), want)
    return sites


def training_config(cfg: CoordinatorConfig, config_class: type):
    """The recipe's own config (``config_class``, from its registry entry) built from the coordinator's: every
    coordinator setting the recipe's config has a field for."""
    import dataclasses

    offered = {
        "arch": cfg.arch,
        "kwargs": dict(cfg.model_kwargs or {}),
        "img_size": cfg.img_size,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "pretrained_file": cfg.pretrained_file,
        "mode": cfg.mode,
        "method": cfg.ssl_method,
    }
    fields = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in offered.items() if k in fields})


def evaluate_at_sites(
    transport: Transport, nodes_by_site: dict[str, int], state: dict, spec: ModelSpec, *, timeout: float
) -> dict[str, dict[str, Any]]:
    """Send the model to every site; returns site -> metrics (validated) or {"error": reason}."""
    from pixcell_fed.errors import FederationError
    from pixcell_fed.federation.validation import metrics

    requests = {}
    for node in nodes_by_site.values():
        content = P.request_record()
        P.model_to_records(state, spec, content)
        requests[node] = (P.MSG_EVALUATE, content)
    replies = transport.exchange(requests, timeout=timeout)
    out: dict[str, dict[str, Any]] = {}
    for site, node in sorted(nodes_by_site.items()):
        reply = replies.get(node)
        if reply is None or reply.content is None:
            out[site] = {"error": reply.error if reply else "no reply"}
            continue
        try:
            if P.KEY_METRICS not in reply.content:
                raise FederationError("the reply carries no metrics")
            out[site] = metrics(reply.content[P.KEY_METRICS], METRIC_NAMES, f"evaluation reply of site {site}")
        except FederationError as exc:
            log.warning("evaluation: the reply of %s was refused: %s", site, exc.message)
            out[site] = {"error": "malformed reply"}
    return out


def pooled_metrics(per_site: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Across sites, weighted by each site's number of evaluated tiles (only metrics ever left the sites)."""
    ok = {s: m for s, m in per_site.items() if "error" not in m and m.get("n", 0) > 0}
    total = sum(m["n"] for m in ok.values())
    if not total:
        return {}
    weighted = {name: sum(m[name] * m["n"] for m in ok.values()) / total for name in METRIC_NAMES}
    return weighted | {"n": float(total), "sites": float(len(ok))}


def run_consortium(
    transport: Transport, cfg: CoordinatorConfig, *, verify: TrustVerifier | None = None
) -> dict[str, Any]:
    """Pool, train, evaluate and report; returns the report as a dict (also written to ``work_dir/report``)."""
    from pixcell_fed.bundle.refusal import read_refusal_notices
    from pixcell_fed.config import to_plain
    from pixcell_fed.federation.montage import site_montages
    from pixcell_fed.federation.report import write_report
    from pixcell_fed.federation.site_fidelity import pooled_fidelity
    from pixcell_fed.training import get_recipe
    from pixcell_fed.training.models import load_checkpoint, state_dict_of

    started = time.monotonic()
    verify = verify or trust_verifier(cfg.trust_file)
    wait_for_sites(transport, cfg, verify)
    pool: PoolReport = pool_bundles(transport, cfg.pool_dir, verify, cfg.pool_settings)
    result: dict[str, Any] = {
        "config": to_plain(cfg),
        "pool": pool.to_dict(),
        "training": None,
        "evaluation": {},
        "pooled_evaluation": {},
        "dp": None,
    }
    # what the sites chose to share: their pooled tiles at a glance, and the refusal notices of their own audits
    result["montage"] = site_montages(cfg.pool_dir)
    result["refusals"] = read_refusal_notices(cfg.refusals_dir, verify.trust).to_report()
    result["fidelity"] = pooled_fidelity(cfg.pool_dir, result["pool"]["sites"])  # from each site's signed audit
    if pool.n_pooled:
        recipe = get_recipe(cfg.recipe)
        trained = recipe(cfg.pool_dir, cfg.model_dir, training_config(cfg, recipe.config_class))
        result["training"] = {
            "recipe": cfg.recipe,
            "checkpoint": str(trained.checkpoint),
            "history": trained.history,
            "spec": trained.spec.to_dict(),
        }
        if cfg.evaluate:
            model, spec = load_checkpoint(cfg.model_dir)
            nodes = {s: n for s, n in pool.nodes.items() if pool.sites[s].status != "missing"}
            result["evaluation"] = evaluate_at_sites(
                transport, nodes, state_dict_of(model), spec, timeout=cfg.reply_timeout_s
            )
            result["pooled_evaluation"] = pooled_metrics(result["evaluation"])
            if cfg.augmentation_value:
                from pixcell_fed.federation.augmentation_value import augmentation_round

                result["augmentation"] = augmentation_round(
                    transport, nodes, state_dict_of(model), spec, cfg.augmentation_request, timeout=cfg.reply_timeout_s
                )
            if cfg.dp_rounds > 0 and spec.kind == "classifier":
                from pixcell_fed.federation.dp_rounds import federated_dp_finetune

                dp = federated_dp_finetune(
                    transport,
                    nodes,
                    model,
                    spec,
                    cfg.dp_settings,
                    rounds=cfg.dp_rounds,
                    out_dir=cfg.work_dir / "dp_model",
                    timeout=cfg.reply_timeout_s,
                )
                dp["evaluation"] = evaluate_at_sites(
                    transport, nodes, state_dict_of(model), spec, timeout=cfg.reply_timeout_s
                )
                dp["pooled_evaluation"] = pooled_metrics(dp["evaluation"])
                result["dp"] = dp
    result["seconds"] = round(time.monotonic() - started, 2)
    write_report(result, cfg.report_dir)
    return result
