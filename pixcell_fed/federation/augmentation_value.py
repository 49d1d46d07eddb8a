"""What the pool is worth to each site: the opt-in local fine-tune round (message ``evaluate.augmentation``).

The coordinator sends the model it trained on the pool. A site that allows it (``federation.allow_local_training``
in its site.yaml) fine-tunes a small classifier twice on its own labelled real tiles (``federation.train_dir``),
with the same recipe and budget: once from the pool's model, once from the same backbone's generic start (the
site's own copy of generic weights, ``local_training.generic_weights``, else a random initialisation). Both are
evaluated on the site's real held-out tiles (its evaluation folder, never trained on). Only the two sets of
metrics and their difference with a paired bootstrap interval go back, rounded like an evaluation answer; no
weights trained on real data leave.

The site decides everything. Its recipe and budget are ``federation.local_training`` (a request can only lower
``epochs`` and ``max_tiles``). Which models it accepts, how large, how many queries it answers and how its
answers are rounded are its evaluation limits (``federation.evaluation``), applied by the same code as an
``evaluate`` request (:mod:`~pixcell_fed.federation.evaluation_policy`, :mod:`~pixcell_fed.federation.query_budget`:
each answered request is charged as one evaluation query). The handler sits behind the site's one boundary,
:func:`pixcell_fed.federation.site_server.answer`: a site that does not allow it refuses with ``not-allowed`` and
runs nothing; every other refusal is one generic code; the detail stays in the site's log. Every answer is written
to the site's audit trail (``augmentation-value``) before it leaves.

Who could abuse the message, and what stops them (tests in ``tests/test_federation_augmentation.py``):

* a coordinator asking for more training than the site allows (CPU, time): the budget is the site's, the
  request can only lower it, and the reply says what was used;
* a crafted model (an unlisted or huge architecture, keyword arguments outside the site's bounds, a weights file
  to open, weights of other names or shapes or non-finite values, an oversized payload): refused by the
  evaluation policy before any tile is read;
* a coordinator hoping to receive weights trained on real tiles, or more than metrics: the reply is built from a
  fixed set of rounded numbers; nothing else is put in it;
* training on the held-out tiles (which would inflate both figures): the site refuses when its training and
  evaluation folders overlap, by path or by content;
* repeated requests as an oracle on the held-out set: each answer costs one query of the site's evaluation budget
  (per coordinator run and per day), like an ``evaluate`` request;
* a site forging its answer (values out of range, a difference that does not add up, more epochs than asked,
  extra fields): the coordinator checks every value (:meth:`AugmentationReply.from_record`) before the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.errors import FederationError, PixcellFedError
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation.validation import ReplyRejected
from pixcell_fed.runlog import get_logger
from pixcell_fed.training.local_finetune import METRICS

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from pixcell_fed.config.schema import FederationEvaluationConfig, LocalTrainingConfig
    from pixcell_fed.training.models import ModelSpec

log = get_logger(__name__)

STATUS_DONE = "done"
#: the site's refusal when it does not take part
#: (a generic code of :data:`~pixcell_fed.federation.protocol.ERROR_CODES`)
NOT_ALLOWED = "not-allowed"
#: where the comparison run starts: the site's generic weights for the backbone, or a random initialisation
BASELINES = ("site-weights", "random-init")
TRAIL_EVENT = "augmentation-value"
ROLES = ("pool", "generic")
MAX_EVAL_TILES = 10_000_000


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

    def to_record(self, state: dict, spec: ModelSpec) -> RecordDict:
        values = {k: v for k, v in (("epochs", self.epochs), ("max-tiles", self.max_tiles)) if v is not None}
        content = P.request_record(**values)
        P.model_to_records(state, spec, content)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> AugmentationRequest:
        """The budget a request asks for; :class:`~pixcell_fed.federation.protocol.Refusal` ``bad-request`` when a
        value is not a whole number >= 1."""
        asked = P.config_values(content[P.KEY_REQUEST], {"epochs": int, "max-tiles": int})
        try:
            return cls(epochs=asked.get("epochs"), max_tiles=asked.get("max-tiles"))
        except ValueError as exc:
            raise P.Refusal("bad-request", str(exc)) from exc

    def budget(self, site: LocalTrainingConfig) -> tuple[int, int]:
        """(epochs, max_tiles): the site's, lowered (never raised) by the request."""
        return (min(site.epochs, self.epochs or site.epochs), min(site.max_tiles, self.max_tiles or site.max_tiles))


def _metric_keys() -> list[str]:
    keys = [f"{role}-{m}" for role in ROLES for m in METRICS]
    keys += [f"difference-{m}{end}" for m in METRICS for end in ("", "-low", "-high")]
    return keys + ["n", "epochs"]


def answer_values(measured: Mapping[str, Any], *, epochs: int, digits: int) -> dict[str, float]:
    """The fixed set of numbers of :func:`_metric_keys`, rounded to the site's ``round_digits`` (the difference is
    that of the rounded metrics, so that the coordinator can check that it adds up)."""
    values: dict[str, float] = {"n": float(measured["n"]), "epochs": float(epochs)}
    for m in METRICS:
        pool, generic = round(float(measured["a"][m]), digits), round(float(measured["b"][m]), digits)
        diff = measured["difference"][m]
        values[f"pool-{m}"], values[f"generic-{m}"] = pool, generic
        values[f"difference-{m}"] = round(pool - generic, digits + 2)
        values[f"difference-{m}-low"] = round(float(diff["low"]), digits)
        values[f"difference-{m}-high"] = round(float(diff["high"]), digits)
    return values


def answer_record(values: Mapping[str, float], baseline: str) -> RecordDict:
    """A site's answer: the numbers of :func:`answer_values` and the baseline's name; nothing else."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    return RecordDict(
        {
            P.KEY_METRICS: MetricRecord(dict(values)),
            P.KEY_INFO: ConfigRecord({"status": STATUS_DONE, "baseline": baseline}),
        }
    )


@dataclass(frozen=True)
class AugmentationReply:
    """A site's answer as the coordinator reads it: every value checked before it reaches the report."""

    status: str
    code: str | None = None
    baseline: str | None = None
    metrics: Mapping[str, float] | None = None

    @classmethod
    def from_record(cls, content: RecordDict, *, max_epochs: int | None) -> AugmentationReply:
        """A site's answer (refusals arrive as generic codes, :meth:`refused`); :class:`ReplyRejected` when any
        value is not what an honest site sends."""
        info: Mapping[str, Any] = content.get(P.KEY_INFO, {})
        if (
            set(content.keys()) != {P.KEY_METRICS, P.KEY_INFO}
            or set(info.keys()) != {"status", "baseline"}
            or info.get("status") != STATUS_DONE
        ):
            raise ReplyRejected("augmentation reply is not exactly a status, a baseline and the metrics")
        baseline = info.get("baseline")
        if baseline not in BASELINES:
            raise ReplyRejected("augmentation reply with an unknown baseline")
        metrics = content[P.KEY_METRICS]
        if set(metrics.keys()) != set(_metric_keys()):
            raise ReplyRejected("augmentation reply without exactly the expected metrics")
        values: dict[str, float] = {}
        for key in _metric_keys():
            value = metrics[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ReplyRejected(f"augmentation reply value {key} is not a finite number")
            values[key] = value
        for m in METRICS:
            if not all(0.0 <= values[f"{role}-{m}"] <= 1.0 for role in ROLES):
                raise ReplyRejected(f"augmentation reply: {m} outside [0, 1]")
            low, value, high = (values[f"difference-{m}{end}"] for end in ("-low", "", "-high"))
            if not -1.0 <= low <= high <= 1.0 or abs(value - (values[f"pool-{m}"] - values[f"generic-{m}"])) > 1e-6:
                raise ReplyRejected(f"augmentation reply: the difference of {m} does not add up")
        if values["n"] != int(values["n"]) or not 1 <= values["n"] <= MAX_EVAL_TILES:
            raise ReplyRejected("augmentation reply: n is not a count of tiles")
        if (
            values["epochs"] != int(values["epochs"])
            or values["epochs"] < 1
            or (max_epochs is not None and values["epochs"] > max_epochs)
        ):
            raise ReplyRejected("augmentation reply: more epochs than were asked for")
        return cls(status=STATUS_DONE, baseline=str(baseline), metrics=values)

    @classmethod
    def refused(cls, code: str) -> AugmentationReply:
        """A site's refusal (its generic code, already checked by the transport): ``not-allowed`` or ``refused``."""
        return cls(status=NOT_ALLOWED) if code == NOT_ALLOWED else cls(status="refused", code=code)

    def row(self) -> dict[str, Any]:
        """The report's row for this site."""
        if self.status != STATUS_DONE or self.metrics is None:
            return {"status": self.status, **({"code": self.code} if self.code else {})}
        v = self.metrics
        return {
            "status": self.status,
            "baseline": self.baseline,
            "n": int(v["n"]),
            "epochs": int(v["epochs"]),
            "pool": {m: v[f"pool-{m}"] for m in METRICS},
            "generic": {m: v[f"generic-{m}"] for m in METRICS},
            "difference": {
                m: {"value": v[f"difference-{m}"], "low": v[f"difference-{m}-low"], "high": v[f"difference-{m}-high"]}
                for m in METRICS
            },
        }


# ------------------------------------------------------------------------------------------------- the site


@dataclass(frozen=True)
class SiteLocalTraining:
    """What the site's answer needs, all from the site's own settings: whether it allows it, its folders, its work
    folder (query budget, trail), its recipe and budget, and its evaluation limits."""

    site_name: str
    allowed: bool
    train_dir: Path | None
    eval_dir: Path | None
    work_dir: Path | None
    rules: LocalTrainingConfig
    limits: FederationEvaluationConfig


def _labelled(folder: Path | None, what: str) -> tuple[Path, list[tuple[Path, str]]]:
    """The configured ``folder`` and its labelled tiles."""
    from pixcell_fed.training.data import labelled_folder

    if folder is None:
        raise P.Refusal("unavailable", f"no {what} folder is configured")
    try:
        return folder, labelled_folder(folder)
    except PixcellFedError as exc:
        raise P.Refusal("unavailable", exc.message) from exc


def _check_disjoint(
    train: list[tuple[Path, str]], held_out: list[tuple[Path, str]], train_dir: Path, eval_dir: Path
) -> None:
    """The training tiles must not be the held-out tiles: different folders, no file in common by content."""
    from pixcell_fed.hashing import sha256_file

    a, b = Path(train_dir).resolve(), Path(eval_dir).resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise P.Refusal("unavailable", f"the training folder {a} and the held-out folder {b} overlap")
    shared = {sha256_file(p) for p, _ in train} & {sha256_file(p) for p, _ in held_out}
    if shared:
        raise P.Refusal("unavailable", f"{len(shared)} tile(s) of the training folder are also held-out tiles")


def _received_model(spec: ModelSpec, state: dict):
    """The model the coordinator sent (its spec already checked), built and loaded after its weights passed the
    evaluation policy's checks."""
    from pixcell_fed.federation.evaluation_policy import check_weights
    from pixcell_fed.training.models import build_model

    try:
        model = build_model(spec)
    except (PixcellFedError, AssertionError) as exc:  # timm checks some arguments with assert
        raise P.Refusal("refused-model", f"the site cannot build the model: {exc}") from exc
    check_weights(state, model)
    model.load_state_dict(state)
    return model


def _generic_start(spec: ModelSpec, classes: list[str], rules: LocalTrainingConfig):
    """(the same backbone's generic start with a head for the site's classes, baseline name)."""
    from dataclasses import replace

    import torch

    from pixcell_fed.training.models import build_model

    generic_file = rules.generic_weights.get(spec.arch)
    torch.manual_seed(rules.seed)
    model = build_model(
        replace(
            spec.without_local_weights(),
            kind="classifier",
            classes=tuple(classes),
            pretrained_file=str(generic_file) if generic_file else None,
        )
    )
    return model, "site-weights" if generic_file else "random-init"


def measure(request: RecordDict, ctx: SiteLocalTraining, flower_run: int | str) -> tuple[dict[str, float], str]:
    """The two fine-tunes and their comparison: (the answer's rounded numbers, baseline). Refuses (``not-allowed``,
    or the evaluation policy's codes) before any tile is read when the site does not take part or the request or
    its model is not acceptable; charges the site's evaluation query budget before reading its tiles."""
    from dataclasses import replace

    import numpy as np
    import torch

    from pixcell_fed.federation import evaluation_policy as policy
    from pixcell_fed.federation.query_budget import charge_query
    from pixcell_fed.training.local_finetune import (
        FinetuneRecipe,
        finetune,
        paired_difference,
        predict,
        stratified_sample,
        with_head,
    )

    if not ctx.allowed:
        raise P.Refusal(
            NOT_ALLOWED,
            f"site {ctx.site_name} does not allow local training (federation.allow_local_training); nothing was run",
        )
    if ctx.work_dir is None:  # checked first: an answer the budget and the trail cannot record is never computed
        raise P.Refusal("unavailable", "no work folder for the query budget and the audit trail")
    asked = AugmentationRequest.from_record(request)
    epochs, max_tiles = asked.budget(ctx.rules)
    limits = policy.effective_limits(ctx.limits, request[P.KEY_REQUEST])
    state, sent = P.records_to_model(request, max_bytes=int(limits.max_weights_mb * (1 << 20)))
    spec = policy.check_model_spec(sent, limits)
    pool_model = _received_model(spec, state)
    charge_query(ctx.work_dir, flower_run, per_run=limits.max_queries_per_run, per_day=limits.max_queries_per_day)
    # the request and its model are acceptable and paid for: only now are the site's tiles read
    train_dir, train = _labelled(ctx.train_dir, "training (federation.train_dir)")
    eval_dir, held_out = _labelled(ctx.eval_dir, "held-out evaluation")
    _check_disjoint(train, held_out, train_dir, eval_dir)
    policy.check_tiles_per_class([label for _, label in held_out], limits)
    classes = sorted({label for _, label in train})
    if len(classes) < 2:
        raise P.Refusal("unavailable", f"the training folder has {len(classes)} class(es); a classifier needs two")
    train = stratified_sample(train, max_tiles, ctx.rules.seed)
    if not (spec.kind == "classifier" and list(spec.classes) == classes):
        torch.manual_seed(ctx.rules.seed)
        with_head(pool_model, len(classes))  # the site's own classes: a fresh head on the pool's backbone
    generic, baseline = _generic_start(spec, classes, ctx.rules)
    recipe = FinetuneRecipe(
        epochs=epochs,
        batch_size=ctx.rules.batch_size,
        lr=ctx.rules.lr,
        weight_decay=ctx.rules.weight_decay,
        mode=ctx.rules.mode,
        seed=ctx.rules.seed,
    )
    site_spec = replace(spec.without_local_weights(), kind="classifier", classes=tuple(classes))
    index = {c: i for i, c in enumerate(classes)}
    truth = [index.get(label, -1) for _, label in held_out]
    known = [i for i, t in enumerate(truth) if t >= 0]
    if len(known) < len(truth):  # a held-out class the site has no training tiles of: it cannot be predicted
        log.warning(
            "local fine-tune: %d held-out tile(s) of classes without training tiles are left out",
            len(truth) - len(known),
        )
    held_out = [held_out[i] for i in known]
    if not held_out:
        raise P.Refusal("unavailable", "no held-out tile of a class the site trains on")
    predictions = []
    for model in (pool_model, generic):
        torch.manual_seed(ctx.rules.seed)
        finetune(model, train, classes, site_spec, recipe)
        predictions.append(predict(model, held_out, site_spec))
    measured = paired_difference(
        np.asarray([truth[i] for i in known], np.int64),
        predictions[0],
        predictions[1],
        len(classes),
        bootstrap=ctx.rules.bootstrap,
        seed=ctx.rules.seed,
    )
    log.info(
        "local fine-tune on %d tiles, %d epoch(s), evaluated on %d held-out tiles: pool %s, generic %s",
        len(train),
        epochs,
        len(held_out),
        measured["a"],
        measured["b"],
    )
    return answer_values(measured, epochs=epochs, digits=limits.round_digits), baseline


# ------------------------------------------------------------------------------------------ the coordinator


def augmentation_round(
    transport: Any,
    nodes: Mapping[str, int],
    state: dict,
    spec: ModelSpec,
    request: AugmentationRequest,
    *,
    timeout: float,
) -> dict[str, dict[str, Any]]:
    """Ask every site what the pool adds; returns site -> report row (status, and the figures when done)."""
    replies = transport.exchange(
        {node: (P.MSG_AUGMENTATION, request.to_record(state, spec)) for node in nodes.values()}, timeout=timeout
    )
    rows: dict[str, dict[str, Any]] = {}
    for site, node in sorted(nodes.items()):
        reply = replies.get(node)
        if reply is not None and reply.code is not None:
            rows[site] = AugmentationReply.refused(reply.code).row()
        elif reply is None or reply.content is None:
            rows[site] = {"status": "no answer", "reason": str(reply.error if reply else "no reply")[:200]}
        else:
            try:
                rows[site] = AugmentationReply.from_record(reply.content, max_epochs=request.epochs).row()
            except (FederationError, KeyError, TypeError, ValueError) as exc:
                log.warning("what the pool adds: the reply of %s was refused: %s", site, exc)
                rows[site] = {"status": "invalid reply"}
        log.info("what the pool adds at %s: %s", site, rows[site].get("status"))
    return rows
