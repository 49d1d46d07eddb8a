"""The federated DP fine-tune on the sites' REAL tiles: the coordinator's rounds and each site's answer.

Each round the coordinator sends the current weights and a :class:`DPRequest` (noise, clipping, epochs, batch
size, learning rate); every site trains with Opacus DP-SGD (:mod:`pixcell_fed.training.dp`) on its own labelled
tiles and answers with the new weights and its privacy spent, or refuses: the reason is written to the site's
audit trail and log, and only the generic code ``refused-dp`` reaches the coordinator (the site's answer
boundary, :func:`pixcell_fed.federation.site_server.answer`). The coordinator averages the weights (FedAvg).

The site decides everything that bears on privacy (:class:`~pixcell_fed.config.DPPolicy` in its site.yaml): a
request below its noise floor, above its clipping, epoch or batch-size bounds, giving no finite epsilon, or
exceeding its budget is refused before any training. Each spend is written to the audit trail and the privacy
ledger (:mod:`pixcell_fed.federation.dp_ledger`) before training; epsilon always comes from the whole ledger. The
training set is every labelled tile of the site's ``train-dir`` (the site's labels decide, not a class list from
the coordinator); the reply carries the weights, the site's cumulative epsilon, its delta, the budget left and,
if the site allows it, the number of tiles rounded to its granularity. Nothing else computed from real data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.errors import DPRefused, FederationError, PixcellFedError, UsageError
from pixcell_fed.federation import protocol as P
from pixcell_fed.runlog import get_logger
from pixcell_fed.training.dp import DPSettings

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from pixcell_fed.config import DPPolicy
    from pixcell_fed.training.models import ModelSpec

log = get_logger(__name__)

STATUS_TRAINED = "trained"
STATUS_REFUSED = "refused"


# ------------------------------------------------------------------------------------------ the wire

_REQUEST_INTS = {"round": "round", "local-epochs": "epochs", "batch-size": "batch_size"}
_REQUEST_FLOATS = {"noise-multiplier": "noise_multiplier", "max-grad-norm": "max_grad_norm", "lr": "lr"}


@dataclass(frozen=True)
class DPRequest:
    """What the coordinator asks of a site for one round."""

    round: int
    settings: DPSettings

    def to_record(self, state: dict, spec: ModelSpec) -> RecordDict:
        values: dict[str, Any] = {"round": self.round}
        for wire, name in {**_REQUEST_INTS, **_REQUEST_FLOATS}.items():
            if name != "round":
                values[wire] = getattr(self.settings, name)
        content = P.request_record(**values)
        P.model_to_records(state, spec, content)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> DPRequest:
        """Validated request; :class:`DPRefused` names what is wrong."""
        if P.KEY_REQUEST not in content:
            raise DPRefused("the request carries no DP settings")
        raw = content[P.KEY_REQUEST]
        values: dict[str, Any] = {}
        for wire, name in _REQUEST_INTS.items():
            value = raw.get(wire)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DPRefused(f"request field {wire!r} must be an integer (got {value!r})")
            values[name] = value
        for wire, name in _REQUEST_FLOATS.items():
            value = raw.get(wire)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise DPRefused(f"request field {wire!r} must be a number (got {value!r})")
            values[name] = float(value)
        round_no = values.pop("round")
        if round_no < 1:
            raise DPRefused(f"request round must be >= 1 (got {round_no})")
        try:
            return cls(round=round_no, settings=DPSettings(**values))
        except ValueError as exc:
            raise DPRefused(f"request refused: {exc}") from exc


@dataclass(frozen=True)
class DPReply:
    """A site's answer as the coordinator reads it (every value checked); a refusal carries its generic code only."""

    status: str
    reason: str = ""
    epsilon: float | None = None
    epsilon_remaining: float | None = None
    delta: float | None = None
    examples: int | None = None
    state: dict | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, content: RecordDict, reference: Mapping[str, Any]) -> DPReply:
        """Parse a trained reply; weights must have the keys, shapes and dtypes of ``reference`` and be finite."""
        info: Mapping[str, Any] = content.get(P.KEY_INFO, {})
        status = info.get("status")
        if status != STATUS_TRAINED:
            raise FederationError(f"DP reply with unknown status {status!r}")
        metrics: Mapping[str, Any] = content.get(P.KEY_METRICS, {})
        numbers: dict[str, Any] = {}
        for key, name, low, high in (
            ("epsilon", "epsilon", 0.0, math.inf),
            ("epsilon-remaining", "epsilon_remaining", 0.0, math.inf),
            ("delta", "delta", 0.0, 1.0),
            ("examples", "examples", 0.0, 1e12),
        ):
            value = metrics.get(key)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not low <= value < high
            ):
                raise FederationError(f"DP reply value {key}={value!r} is out of range")
            numbers[name] = int(value) if name == "examples" else float(value)
        if "epsilon" not in numbers or "delta" not in numbers:
            raise FederationError("DP reply without epsilon and delta")
        return cls(status=status, state=_checked_state(content, reference), **numbers)

    @classmethod
    def refused(cls, code: str) -> DPReply:
        """A site's refusal as the coordinator sees it: the generic code (the reason stays at the site)."""
        return cls(status=STATUS_REFUSED, reason=code)


def _checked_state(content: RecordDict, reference: Mapping[str, Any]) -> dict:
    import torch

    state, _ = P.records_to_model(content)
    if set(state) != set(reference):
        raise FederationError("DP reply weights do not have the model's parameter names")
    for key, value in state.items():
        ref = reference[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise FederationError(
                f"DP reply weight {key} has shape {tuple(value.shape)}/{value.dtype}, expected "
                f"{tuple(ref.shape)}/{ref.dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FederationError(f"DP reply weight {key} is not finite")
    return state


def trained_reply(
    state: dict, spec: ModelSpec, *, epsilon: float, remaining: float, delta: float, examples: int | None
) -> RecordDict:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    metrics = {"epsilon": float(epsilon), "epsilon-remaining": float(remaining), "delta": float(delta)}
    if examples is not None:
        metrics["examples"] = float(examples)
    content = RecordDict(
        {P.KEY_METRICS: MetricRecord(dict(metrics)), P.KEY_INFO: ConfigRecord({"status": STATUS_TRAINED})}
    )
    P.model_to_records(state, spec, content)
    return content


# ------------------------------------------------------------------------------------------ the site


@dataclass(frozen=True)
class SiteDP:
    """What a site's DP round needs: its name, its training tiles, its work folder (trail, ledger), its policy."""

    site_name: str
    train_dir: Path | None
    work_dir: Path
    policy: DPPolicy


def policy_refusals(policy: DPPolicy, settings: DPSettings) -> list[str]:
    """Why ``settings`` fall outside the site's policy (empty when they are within it)."""
    reasons = []
    if settings.noise_multiplier < policy.min_noise_multiplier:
        reasons.append(
            f"noise multiplier {settings.noise_multiplier:g} is below this site's floor {policy.min_noise_multiplier:g}"
        )
    if settings.max_grad_norm > policy.max_grad_norm:
        reasons.append(
            f"clipping norm {settings.max_grad_norm:g} is above this site's maximum {policy.max_grad_norm:g}"
        )
    if settings.epochs > policy.max_local_epochs:
        reasons.append(f"{settings.epochs} local epochs exceed this site's maximum of {policy.max_local_epochs}")
    if not policy.min_batch_size <= settings.batch_size <= policy.max_batch_size:
        reasons.append(
            f"batch size {settings.batch_size} is outside this site's bounds "
            f"[{policy.min_batch_size}, {policy.max_batch_size}]"
        )
    return reasons


def site_delta(policy: DPPolicy, n_examples: int) -> float:
    """The site's delta for a training set of ``n_examples`` tiles: its own setting, at most 1/(10 N)."""
    from pixcell_fed.training.dp_accounting import default_delta

    if policy.delta is None:
        return default_delta(n_examples)
    if policy.delta > 1.0 / (10 * n_examples):
        log.error(
            "federation.dp.delta %g is above 1/(10 N) = %g for this site's %d training tiles",
            policy.delta,
            1.0 / (10 * n_examples),
            n_examples,
        )
        raise DPRefused("this site's delta setting is too large for its training set (see the site's log)")
    return float(policy.delta)


def rounded_count(n: int, granularity: int) -> int | None:
    """``n`` rounded to a multiple of ``granularity`` (at least one multiple); ``None`` when counts are withheld."""
    if granularity <= 0:
        return None
    return max(granularity, int(round(n / granularity)) * granularity)


def train_set_sha256(items: list[tuple[Path, str]]) -> str:
    """Identity of a training set: its labels, file names and file contents (kept at the site)."""
    from pixcell_fed.hashing import sha256_bytes, sha256_file

    lines = sorted(f"{label}/{path.name}:{sha256_file(path)}" for path, label in items)
    return sha256_bytes("\n".join(lines).encode("utf-8"))


def _training_items(ctx: SiteDP, spec: ModelSpec) -> list[tuple[Path, str]]:
    from pixcell_fed.training.data import labelled_folder

    if ctx.train_dir is None:
        raise DPRefused("this site takes no part in the DP fine-tune (no train-dir)")
    if spec.kind != "classifier" or not spec.classes:
        raise DPRefused("the DP fine-tune needs a classifier model")
    try:
        items = labelled_folder(ctx.train_dir)
    except UsageError as exc:
        log.error("DP round refused: %s", exc.message)
        raise DPRefused("this site's training tiles are not available (see the site's log)") from exc
    unknown = sorted({lab for _, lab in items} - set(spec.classes))
    if unknown:
        log.error("DP round refused: labels %s of %s are not among the model's classes", unknown, ctx.train_dir)
        raise DPRefused("the model's classes do not cover this site's labels (see the site's log)")
    return items


def _site_model(weights: dict, spec: ModelSpec):
    from pixcell_fed.training.dp import check_dp_compatible
    from pixcell_fed.training.models import build_model

    model = build_model(spec.without_local_weights())
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise DPRefused("the weights sent do not fit the model spec sent") from exc
    check_dp_compatible(model, img_size=spec.img_size, num_classes=spec.num_classes)
    return model


def _train_round(request: RecordDict, ctx: SiteDP) -> RecordDict:
    import torch

    from pixcell_fed.federation.dp_ledger import StepRecord, locked_ledger, record_round
    from pixcell_fed.training.data import load_arrays
    from pixcell_fed.training.dp import local_dp_train, planned_steps

    req = DPRequest.from_record(request)
    try:
        weights, spec = P.records_to_model(request)
    except FederationError as exc:
        raise DPRefused(f"the request's model is malformed: {exc.message}") from exc
    refusals = policy_refusals(ctx.policy, req.settings)
    if refusals:
        raise DPRefused("; ".join(refusals))
    items = _training_items(ctx, spec)
    delta = site_delta(ctx.policy, len(items))
    model = _site_model(weights, spec)
    index = {c: i for i, c in enumerate(spec.classes)}
    images = load_arrays(items, spec)  # before spending: a tile that cannot be read costs no privacy
    labels = torch.tensor([index[lab] for _, lab in items], dtype=torch.long)
    planned = planned_steps(len(items), req.settings)
    record = StepRecord(
        round=req.round,
        noise_multiplier=planned.noise_multiplier,
        sample_rate=planned.sample_rate,
        steps=planned.steps,
        delta=delta,
        train_set_sha256=train_set_sha256(items),
    )
    budget = ctx.policy.epsilon_budget
    with locked_ledger(ctx.work_dir) as ledger:
        spent, after = ledger.epsilon(delta), ledger.epsilon(delta, record)
        if not 0 < after < math.inf:
            raise DPRefused(f"these settings give no finite privacy guarantee (epsilon {after:g})")
        if after > budget:
            raise DPRefused(
                f"this round would bring the site's epsilon from {spent:.3f} to {after:.3f}, over its "
                f"budget of {budget:g}: {max(budget - spent, 0.0):.3f} left",
                hint="the site's budget is federation.dp.epsilon_budget in its site.yaml",
            )
        record_round(
            ledger,
            record,
            epsilon=after,
            epsilon_budget=budget,
            epsilon_remaining=budget - after,
            arch=spec.arch,
            max_grad_norm=req.settings.max_grad_norm,
            local_epochs=req.settings.epochs,
            batch_size=req.settings.batch_size,
            lr=req.settings.lr,
        )
    trained, _ = local_dp_train(model, images, labels, req.settings)
    log.info(
        "DP round %d: trained on %d tiles; epsilon %.3f of %g at delta %g", req.round, len(items), after, budget, delta
    )
    state = {k: v.detach().cpu() for k, v in trained.state_dict().items()}
    return trained_reply(
        state,
        spec,
        epsilon=after,
        remaining=budget - after,
        delta=ledger.accounting_delta(delta),
        examples=rounded_count(len(items), ctx.policy.count_granularity),
    )


def site_round(request: RecordDict, ctx: SiteDP) -> RecordDict:
    """One DP round at a site (the ``train`` message): weights and privacy spent back. A request the site will not
    train is recorded in its audit trail and refused with :class:`~pixcell_fed.federation.protocol.Refusal`
    ``refused-dp``: the reason (which may name site files) stays in the trail and the site's log."""
    from pixcell_fed.federation.dp_ledger import record_refusal

    try:
        return _train_round(request, ctx)
    except DPRefused as exc:
        round_no = request[P.KEY_REQUEST].get("round") if P.KEY_REQUEST in request else None
        record_refusal(ctx.work_dir, exc.message, round=round_no if isinstance(round_no, int) else None)
        raise P.Refusal("refused-dp", exc.message) from exc


# ------------------------------------------------------------------------------------------ the coordinator


def _site_privacy(earlier: dict[str, Any], reply: DPReply | None, error: str | None) -> dict[str, Any]:
    """One site's privacy row after a round (what the report shows)."""
    row = dict(earlier) or {"rounds": 0, "epsilon_by_round": []}
    if reply is None:
        return {**row, "status": "no answer", "reason": error or "no reply"}
    row.update(status=reply.status, reason=reply.reason)
    for key in ("epsilon", "epsilon_remaining", "delta", "examples"):
        if getattr(reply, key) is not None:
            row[key] = getattr(reply, key)
    if reply.status == STATUS_TRAINED:
        row["rounds"] += 1
        row["epsilon_by_round"] = [*row["epsilon_by_round"], reply.epsilon]
    return row


def federated_dp_finetune(
    transport: Any,
    nodes: Mapping[str, int],
    model,
    spec: ModelSpec,
    settings: DPSettings,
    *,
    rounds: int,
    out_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    """``rounds`` rounds of site DP-SGD + FedAvg from ``model``; writes the model to ``out_dir``. Returns the
    report part (privacy per site, rounds, checkpoint) and leaves the averaged weights in ``model``."""
    from pixcell_fed.training.dp import check_dp_compatible, fedavg
    from pixcell_fed.training.models import save_checkpoint, state_dict_of

    check_dp_compatible(model, img_size=spec.img_size, num_classes=spec.num_classes)
    global_state = state_dict_of(model)
    privacy: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        request = DPRequest(round=rnd, settings=settings)
        replies = transport.exchange(
            {node: (P.MSG_TRAIN, request.to_record(global_state, spec)) for node in nodes.values()}, timeout=timeout
        )
        states, weights, took_part = [], [], []
        for site, node in sorted(nodes.items()):
            reply, error = replies.get(node), None
            parsed = None
            if reply is not None and reply.content is not None:
                try:
                    parsed = DPReply.from_record(reply.content, global_state)
                except (FederationError, KeyError, TypeError, ValueError) as exc:
                    error = f"invalid reply: {exc}"
            elif reply is not None and reply.code is not None:
                parsed = DPReply.refused(reply.code)
            else:
                error = reply.error if reply is not None else "no reply"
            privacy[site] = _site_privacy(privacy.get(site, {}), parsed, error)
            if parsed is not None and parsed.status == STATUS_TRAINED and parsed.state is not None:
                states.append(parsed.state)
                weights.append(float(parsed.examples or 1))
                took_part.append(site)
            else:
                log.warning("DP round %d: site %s did not train: %s", rnd, site, privacy[site]["reason"])
        if not states:
            log.warning("DP round %d: no site trained; the DP fine-tune stops here", rnd)
            break
        global_state = fedavg(states, weights)
        done.append({"round": rnd, "sites": took_part})
    model.load_state_dict(global_state)
    report = {
        "privacy": privacy,
        "rounds": done,
        "rounds_asked": rounds,
        "checkpoint": str(out_dir),
        "settings": {
            "noise_multiplier": settings.noise_multiplier,
            "max_grad_norm": settings.max_grad_norm,
            "local_epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
        },
    }
    save_checkpoint(model, spec.without_local_weights(), out_dir, extra={"recipe": "dp_finetune", **report})
    return report


def site_dp_context(
    site_name: str, train_dir: Path | None, bundle_dir: Path | None, config_file: Path | None
) -> SiteDP:
    """The site's DP context from its SuperNode settings: policy and work folder from its own site.yaml when the
    node names one (``site-agent serve`` does), else the default policy and the work folder holding the bundle."""
    from pixcell_fed.bundle.state import work_dir_of_bundle
    from pixcell_fed.config import DPPolicy, load_site_config

    if config_file is not None:
        cfg = load_site_config(config_file)
        return SiteDP(
            site_name=site_name,
            train_dir=train_dir or cfg.federation.train_dir,
            work_dir=cfg.site.work_dir,
            policy=cfg.federation.dp,
        )
    work = work_dir_of_bundle(bundle_dir) if bundle_dir is not None else None
    if work is None:
        raise PixcellFedError(
            f"site {site_name}: no work folder for the privacy ledger",
            hint="start the SuperNode with 'site-agent serve --config site.yaml'",
        )
    return SiteDP(site_name=site_name, train_dir=train_dir, work_dir=work, policy=DPPolicy())
