"""What the pool is worth to each site: the opt-in local fine-tune round (message ``evaluate.augmentation``).

The coordinator sends the model it trained on the pool. A site that allows it (``federation.allow_local_training``
in its site.yaml) fine-tunes a small classifier twice on its own labelled real tiles (``federation.train_dir``),
with the same recipe and budget: once from the pool's model, once from the same backbone's generic start (the
site's own copy of generic weights, ``local_training.generic_weights``, else a random initialisation). Both are
evaluated on the site's real held-out tiles (its evaluation folder, never trained on). Only the two sets of
metrics and their difference with a paired bootstrap interval go back; no weights trained on real data leave.

The site decides: the recipe (optimiser, learning rate, batch size, mode), the budget (``epochs``, ``max_tiles``:
a request can only lower them), which models it trains (architectures, keyword arguments within bounds, input
size, weights size: ``federation.local_training``). A site that does not allow it answers ``not-allowed`` and
runs nothing. A refusal carries one generic code (:data:`REFUSAL_CODES`); the detail stays in the site's log.
Every answer that leaves is first written to the site's audit trail (``augmentation-value``).

Who could abuse the message, and what stops them (tests in ``tests/test_federation_augmentation.py``):

* a coordinator asking for more training than the site allows (CPU, time): the budget is the site's, the
  request can only lower it, and the reply says what was used;
* a crafted model (an unlisted or huge architecture, keyword arguments outside the site's bounds, a weights file
  to open, weights of other names, shapes or non-finite values, an oversized payload): refused before any tile
  is read;
* a coordinator hoping to receive weights trained on real tiles, or more than metrics: the reply is built from a
  fixed set of numbers; nothing else is put in it;
* training on the held-out tiles (which would inflate both figures): the site refuses when its training and
  evaluation folders overlap, by path or by content;
* repeated requests as an oracle on the held-out set: each answer is the same few aggregate metrics as the
  ``evaluate`` message; the evaluation query budget should count these requests too (see the report to the lead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pixcell_fed.errors import FederationError, PixcellFedError
from pixcell_fed.federation import protocol as P
from pixcell_fed.runlog import get_logger
from pixcell_fed.training.local_finetune import METRICS

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from pixcell_fed.config.schema import LocalTrainingConfig
    from pixcell_fed.training.models import ModelSpec

log = get_logger(__name__)

STATUS_DONE = "done"
STATUS_NOT_ALLOWED = "not-allowed"
STATUS_REFUSED = "refused"
#: generic refusal codes (the same words as the evaluation lockdown's); the reason stays in the site's log
REFUSAL_CODES = ("bad-request", "unavailable", "refused-model", "refused-weights", "internal")
#: where the comparison run starts: the site's generic weights for the backbone, or a random initialisation
BASELINES = ("site-weights", "random-init")
TRAIL_EVENT = "augmentation-value"
ROLES = ("pool", "generic")
MAX_EVAL_TILES = 10_000_000


class Refused(FederationError):
    """The site will not answer this request; only :attr:`code` travels back."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(detail, hint=f"the coordinator is told only {code!r}")
        self.code = code


# ------------------------------------------------------------------------------------------------- the wire

@dataclass(frozen=True)
class AugmentationRequest:
    """What the coordinator may ask: less than the site's budget (``None``: the site's own)."""

    epochs: int | None = None
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "max_tiles"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"augmentation request: {name} must be a whole number >= 1 or None (got {value!r})")

    def to_record(self, state: dict, spec: "ModelSpec") -> "RecordDict":
        values = {k: v for k, v in (("epochs", self.epochs), ("max-tiles", self.max_tiles)) if v is not None}
        content = P.request_record(**values)
        P.model_to_records(state, spec, content)
        return content

    @classmethod
    def from_record(cls, content: "RecordDict") -> "AugmentationRequest":
        if P.KEY_REQUEST not in content:
            raise Refused("bad-request", "the request carries no request record")
        raw = content[P.KEY_REQUEST]
        try:
            return cls(epochs=raw.get("epochs"), max_tiles=raw.get("max-tiles"))
        except ValueError as exc:
            raise Refused("bad-request", str(exc)) from exc

    def budget(self, site: "LocalTrainingConfig") -> tuple[int, int]:
        """(epochs, max_tiles): the site's, lowered (never raised) by the request."""
        return (min(site.epochs, self.epochs or site.epochs), min(site.max_tiles, self.max_tiles or site.max_tiles))


def _metric_keys() -> list[str]:
    keys = [f"{role}-{m}" for role in ROLES for m in METRICS]
    keys += [f"difference-{m}{end}" for m in METRICS for end in ("", "-low", "-high")]
    return keys + ["n", "epochs"]


def done_reply(measured: Mapping[str, Any], *, epochs: int, baseline: str) -> "RecordDict":
    """A site's answer: the fixed set of numbers of :func:`_metric_keys` and the baseline; nothing else."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    values: dict[str, float] = {"n": float(measured["n"]), "epochs": float(epochs)}
    for m in METRICS:
        values[f"pool-{m}"] = float(measured["a"][m])
        values[f"generic-{m}"] = float(measured["b"][m])
        diff = measured["difference"][m]
        values[f"difference-{m}"], values[f"difference-{m}-low"], values[f"difference-{m}-high"] = (
            float(diff["value"]), float(diff["low"]), float(diff["high"]))
    return RecordDict({P.KEY_METRICS: MetricRecord(values),
                       P.KEY_INFO: ConfigRecord({"status": STATUS_DONE, "baseline": baseline})})


def status_reply(status: str, code: str | None = None) -> "RecordDict":
    from flwr.app import ConfigRecord, RecordDict

    info = {"status": status} if code is None else {"status": status, "code": code}
    return RecordDict({P.KEY_INFO: ConfigRecord(info)})


@dataclass(frozen=True)
class AugmentationReply:
    """A site's answer as the coordinator reads it: every value checked before it reaches the report."""

    status: str
    code: str | None = None
    baseline: str | None = None
    metrics: Mapping[str, float] | None = None

    @classmethod
    def from_record(cls, content: "RecordDict", *, max_epochs: int | None) -> "AugmentationReply":
        info = content[P.KEY_INFO] if P.KEY_INFO in content else {}
        status = info.get("status")
        if status in (STATUS_NOT_ALLOWED, STATUS_REFUSED):
            code = info.get("code") if status == STATUS_REFUSED else None
            if status == STATUS_REFUSED and code not in REFUSAL_CODES:
                raise FederationError("augmentation reply with an unknown refusal code")
            return cls(status=status, code=code)
        if status != STATUS_DONE:
            raise FederationError("augmentation reply with an unknown status")
        baseline = info.get("baseline")
        if baseline not in BASELINES:
            raise FederationError("augmentation reply with an unknown baseline")
        metrics = content[P.KEY_METRICS] if P.KEY_METRICS in content else {}
        if set(metrics.keys()) != set(_metric_keys()):
            raise FederationError("augmentation reply without exactly the expected metrics")
        values = {k: metrics[k] for k in _metric_keys()}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FederationError(f"augmentation reply value {key} is not a finite number")
        for m in METRICS:
            if not all(0.0 <= values[f"{role}-{m}"] <= 1.0 for role in ROLES):
                raise FederationError(f"augmentation reply: {m} outside [0, 1]")
            low, value, high = (values[f"difference-{m}{end}"] for end in ("-low", "", "-high"))
            if not -1.0 <= low <= high <= 1.0 or abs(value - (values[f"pool-{m}"] - values[f"generic-{m}"])) > 1e-6:
                raise FederationError(f"augmentation reply: the difference of {m} does not add up")
        if values["n"] != int(values["n"]) or not 1 <= values["n"] <= MAX_EVAL_TILES:
            raise FederationError("augmentation reply: n is not a count of tiles")
        if values["epochs"] != int(values["epochs"]) or values["epochs"] < 1 or \
                (max_epochs is not None and values["epochs"] > max_epochs):
            raise FederationError("augmentation reply: more epochs than were asked for")
        return cls(status=status, baseline=str(baseline), metrics=values)

    def row(self) -> dict[str, Any]:
        """The report's row for this site."""
        if self.status != STATUS_DONE or self.metrics is None:
            return {"status": self.status, **({"code": self.code} if self.code else {})}
        v = self.metrics
        return {"status": self.status, "baseline": self.baseline, "n": int(v["n"]), "epochs": int(v["epochs"]),
                "pool": {m: v[f"pool-{m}"] for m in METRICS}, "generic": {m: v[f"generic-{m}"] for m in METRICS},
                "difference": {m: {"value": v[f"difference-{m}"], "low": v[f"difference-{m}-low"],
                                   "high": v[f"difference-{m}-high"]} for m in METRICS}}


# ------------------------------------------------------------------------------------------------- the site

@dataclass(frozen=True)
class SiteLocalTraining:
    """What the site's answer needs: whether it allows it, its folders, its work folder (trail) and its rules."""

    site_name: str
    allowed: bool
    train_dir: Path | None
    eval_dir: Path | None
    work_dir: Path | None
    rules: "LocalTrainingConfig"

    @classmethod
    def of(cls, site_name: str, config_file: Path | None, *, train_dir: Path | None = None,
           eval_dir: Path | None = None) -> "SiteLocalTraining":
        """From the SuperNode's settings (folders it names win) and the site's own site.yaml; no site.yaml: not
        allowed (fail closed)."""
        from pixcell_fed.config import load_site_config
        from pixcell_fed.config.schema import LocalTrainingConfig

        if config_file is None:
            return cls(site_name, False, None, eval_dir, None, LocalTrainingConfig())
        cfg = load_site_config(config_file)
        fed = cfg.federation
        return cls(site_name, fed.allow_local_training, train_dir or fed.train_dir, eval_dir or fed.eval_dir,
                   cfg.site.work_dir, fed.local_training)


def _refuse_model(detail: str) -> Refused:
    return Refused("refused-model", detail[:300])


def check_model_spec(spec: "ModelSpec", rules: "LocalTrainingConfig") -> None:
    """The model the coordinator sent must be one the site trains: listed architecture, keyword arguments from the
    allow-list within their bounds (numbers only), a bounded input size, no local weights file."""
    if spec.arch not in rules.architectures:
        raise _refuse_model(f"architecture {spec.arch!r} is not in federation.local_training.architectures")
    if spec.pretrained_file is not None:
        raise _refuse_model("a model spec may not name a weights file")
    if spec.img_size > rules.max_img_size:
        raise _refuse_model(f"input size {spec.img_size} exceeds federation.local_training.max_img_size")
    for key, value in spec.kwargs.items():
        if key not in rules.model_kwargs:
            raise _refuse_model(f"keyword argument {key!r} is not in federation.local_training.model_kwargs")
        low, high = rules.model_kwargs[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise _refuse_model(f"keyword argument {key}={value!r} is outside [{low:g}, {high:g}]")


def check_weights(state: Mapping[str, Any], model: Any, rules: "LocalTrainingConfig") -> None:
    """Plain finite arrays of exactly the model's names and shapes, within the site's size limit."""
    import torch

    size = sum(int(t.numel()) * t.element_size() for t in state.values())
    if size > rules.max_weights_mb * (1 << 20):
        raise Refused("refused-weights", f"{size} bytes of weights exceed federation.local_training.max_weights_mb")
    own = model.state_dict()
    if set(state) != set(own):
        raise Refused("refused-weights", f"the weights name {len(set(state) ^ set(own))} tensor(s) the model does not "
                                         "have (or miss some it has)")
    for name, tensor in own.items():
        sent = state[name]
        if tuple(sent.shape) != tuple(tensor.shape) or sent.dtype != tensor.dtype:
            raise Refused("refused-weights", f"weight {name} is {tuple(sent.shape)}/{sent.dtype}, the model's "
                                             f"{tuple(tensor.shape)}/{tensor.dtype}")
        if sent.is_floating_point() and not bool(torch.isfinite(sent).all()):
            raise Refused("refused-weights", f"weight {name} is not finite")


def _labelled(folder: Path | None, what: str) -> list[tuple[Path, str]]:
    from pixcell_fed.training.data import labelled_folder

    if folder is None:
        raise Refused("unavailable", f"no {what} folder is configured")
    try:
        return labelled_folder(folder)
    except PixcellFedError as exc:
        raise Refused("unavailable", exc.message) from exc


def _check_disjoint(train: list[tuple[Path, str]], held_out: list[tuple[Path, str]], ctx: SiteLocalTraining) -> None:
    """The training tiles must not be the held-out tiles: different folders, no file in common by content."""
    from pixcell_fed.hashing import sha256_file

    a, b = Path(ctx.train_dir).resolve(), Path(ctx.eval_dir).resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise Refused("unavailable", f"the training folder {a} and the held-out folder {b} overlap")
    shared = {sha256_file(p) for p, _ in train} & {sha256_file(p) for p, _ in held_out}
    if shared:
        raise Refused("unavailable", f"{len(shared)} tile(s) of the training folder are also held-out tiles")


def _received_model(spec: "ModelSpec", state: dict, rules: "LocalTrainingConfig"):
    """The model the coordinator sent, built and loaded after its weights passed :func:`check_weights`."""
    from pixcell_fed.training.models import build_model

    try:
        model = build_model(spec.without_local_weights())
    except (PixcellFedError, AssertionError) as exc:  # timm checks some arguments with assert
        raise _refuse_model(f"the site cannot build the model: {exc}") from exc
    check_weights(state, model, rules)
    model.load_state_dict(state)
    return model


def _generic_start(spec: "ModelSpec", classes: list[str], rules: "LocalTrainingConfig"):
    """(the same backbone's generic start with a head for the site's classes, baseline name)."""
    from dataclasses import replace

    import torch

    from pixcell_fed.training.models import build_model

    generic_file = rules.generic_weights.get(spec.arch)
    torch.manual_seed(rules.seed)
    model = build_model(replace(spec.without_local_weights(), kind="classifier", classes=tuple(classes),
                                pretrained_file=str(generic_file) if generic_file else None))
    return model, "site-weights" if generic_file else "random-init"


def measure(request: "RecordDict", ctx: SiteLocalTraining) -> tuple[dict[str, Any], int, str]:
    """The two fine-tunes and their comparison: (measured, epochs used, baseline). Refuses before any tile is
    read when the request or its model is not acceptable."""
    from dataclasses import replace

    import torch

    from pixcell_fed.training.local_finetune import (FinetuneRecipe, finetune, paired_difference, predict,
                                                     stratified_sample, with_head)

    asked = AugmentationRequest.from_record(request)
    epochs, max_tiles = asked.budget(ctx.rules)
    try:
        state, spec = P.records_to_model(request)
    except FederationError as exc:
        raise Refused("bad-request", exc.message) from exc
    check_model_spec(spec, ctx.rules)
    pool_model = _received_model(spec, state, ctx.rules)
    # the request and its model are acceptable: only now are the site's tiles read
    train = _labelled(ctx.train_dir, "training (federation.train_dir)")
    held_out = _labelled(ctx.eval_dir, "held-out evaluation")
    _check_disjoint(train, held_out, ctx)
    classes = sorted({label for _, label in train})
    if len(classes) < 2:
        raise Refused("unavailable", f"the training folder has {len(classes)} class(es); a classifier needs two")
    train = stratified_sample(train, max_tiles, ctx.rules.seed)
    if not (spec.kind == "classifier" and list(spec.classes) == classes):
        torch.manual_seed(ctx.rules.seed)
        with_head(pool_model, len(classes))  # the site's own classes: a fresh head on the pool's backbone
    generic, baseline = _generic_start(spec, classes, ctx.rules)
    recipe = FinetuneRecipe(epochs=epochs, batch_size=ctx.rules.batch_size, lr=ctx.rules.lr,
                            weight_decay=ctx.rules.weight_decay, mode=ctx.rules.mode, seed=ctx.rules.seed)
    site_spec = replace(spec.without_local_weights(), kind="classifier", classes=tuple(classes))
    index = {c: i for i, c in enumerate(classes)}
    truth = [index.get(label, -1) for _, label in held_out]
    known = [i for i, t in enumerate(truth) if t >= 0]
    if len(known) < len(truth):  # a held-out class the site has no training tiles of: it cannot be predicted
        log.warning("local fine-tune: %d held-out tile(s) of classes without training tiles are left out",
                    len(truth) - len(known))
    held_out = [held_out[i] for i in known]
    if not held_out:
        raise Refused("unavailable", "no held-out tile of a class the site trains on")
    predictions = []
    for model in (pool_model, generic):
        torch.manual_seed(ctx.rules.seed)
        finetune(model, train, classes, site_spec, recipe)
        predictions.append(predict(model, held_out, site_spec))
    measured = paired_difference([truth[i] for i in known], predictions[0], predictions[1], len(classes),
                                 bootstrap=ctx.rules.bootstrap, seed=ctx.rules.seed)
    log.info("local fine-tune on %d tiles, %d epoch(s), evaluated on %d held-out tiles: pool %s, generic %s",
             len(train), epochs, len(held_out), measured["a"], measured["b"])
    return measured, epochs, baseline


def _record(ctx: SiteLocalTraining, **fields: Any) -> None:
    """The answer, in the site's audit trail before it leaves (fail closed: no trail, no answer)."""
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import append_event

    append_event(trail_path(ctx.work_dir), TRAIL_EVENT, **fields)


def site_augmentation(request: "RecordDict", ctx: SiteLocalTraining) -> "RecordDict":
    """The site's answer to ``evaluate.augmentation``: ``not-allowed``, the metrics, or a refusal code."""
    if not ctx.allowed:
        log.info("site %s does not allow local training (federation.allow_local_training); nothing was run",
                 ctx.site_name)
        return status_reply(STATUS_NOT_ALLOWED)
    try:
        if ctx.work_dir is None:  # checked first: an answer the trail cannot record is never computed
            raise Refused("unavailable", "no work folder whose audit trail could record the answer")
        measured, epochs, baseline = measure(request, ctx)
        reply = done_reply(measured, epochs=epochs, baseline=baseline)
        _record(ctx, sent=dict(reply[P.KEY_METRICS]), baseline=baseline)
        return reply
    except Refused as exc:
        log.warning("site %s refused a local fine-tune request (%s): %s", ctx.site_name, exc.code, exc.message)
        return status_reply(STATUS_REFUSED, exc.code)
    except Exception:  # noqa: BLE001 - nothing of an error text may reach the coordinator
        log.exception("site %s failed a local fine-tune request", ctx.site_name)
        return status_reply(STATUS_REFUSED, "internal")


# ------------------------------------------------------------------------------------------ the coordinator

def augmentation_round(transport: Any, nodes: Mapping[str, int], state: dict, spec: "ModelSpec",
                       request: AugmentationRequest, *, timeout: float) -> dict[str, dict[str, Any]]:
    """Ask every site what the pool adds; returns site -> report row (status, and the figures when done)."""
    replies = transport.exchange({node: (P.MSG_AUGMENTATION, request.to_record(state, spec)) for node in nodes.values()},
                                 timeout=timeout)
    rows: dict[str, dict[str, Any]] = {}
    for site, node in sorted(nodes.items()):
        reply = replies.get(node)
        if reply is None or reply.content is None:
            rows[site] = {"status": "no answer", "reason": str(reply.error if reply else "no reply")[:200]}
            continue
        try:
            rows[site] = AugmentationReply.from_record(reply.content, max_epochs=request.epochs).row()
        except (FederationError, KeyError, TypeError, ValueError) as exc:
            rows[site] = {"status": "invalid reply", "reason": str(exc)[:200]}
        log.info("what the pool adds at %s: %s", site, rows[site].get("status"))
    return rows
