"""DINO (Caron et al. 2021) self-distillation on a timm backbone, from lightly's components: the ``ssl`` recipe's
``method: dino`` (:mod:`pixcell_fed.training.ssl`).

A student (backbone + :class:`lightly.models.modules.DINOProjectionHead`) learns to match a teacher of the same
shape on multi-crop views (:class:`lightly.transforms.DINOTransform`: two global crops at the model's input size
plus ``dino_local_views`` smaller local crops); the teacher sees only the global crops, gets no gradient, and
after every optimiser step becomes an exponential moving average of the student
(:func:`lightly.models.utils.update_momentum`, momentum on lightly's cosine schedule from
``dino_teacher_momentum`` to 1). The loss is lightly's :class:`~lightly.loss.DINOLoss` (centred, sharpened
teacher). Pathology tiles have no up or down: views are flipped both ways and rotated by 90 degrees.

The checkpoint is the TEACHER backbone (the DINO paper evaluates the teacher), saved with the recipe's plain
spec. ViT-family backbones train with timm's ``dynamic_img_size`` so that local crops can be small; that switch
changes no weight, so the spec that travels to the sites does not carry it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from pixcell_fed.errors import UsageError, WeightsError
from pixcell_fed.runlog import get_logger

if TYPE_CHECKING:
    import torch
    from lightly.models.modules import DINOProjectionHead

    from pixcell_fed.training.models import ModelSpec

log = get_logger(__name__)

#: DINO's local crops are 96 px for 224 px global crops
LOCAL_CROP_SHARE = 96 / 224


def _lightly() -> SimpleNamespace:
    """lightly's DINO components (imported on first use)."""
    try:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.transforms import DINOTransform
        from lightly.utils.scheduler import cosine_schedule
    except ImportError as exc:
        raise UsageError(
            "the 'ssl' recipe's DINO method needs lightly", hint="pip install lightly (a dependency of pixcell-fed)"
        ) from exc
    return SimpleNamespace(
        DINOLoss=DINOLoss,
        DINOProjectionHead=DINOProjectionHead,
        update_momentum=update_momentum,
        deactivate_requires_grad=deactivate_requires_grad,
        DINOTransform=DINOTransform,
        cosine_schedule=cosine_schedule,
    )


def local_crop_size(img_size: int) -> int:
    """The local crops' side: DINO's 96/224 of the global size, a multiple of 8, at least 8."""
    return max(8, int(round(img_size * LOCAL_CROP_SHARE / 8)) * 8)


def _training_backbone(spec: ModelSpec, local: int):
    """The backbone the student trains (ViTs with ``dynamic_img_size``) and the local crop size it accepts (the
    global size when the backbone cannot take smaller inputs)."""
    import torch

    from pixcell_fed.training.models import build_model

    try:
        backbone = build_model(replace(spec, kwargs={**spec.kwargs, "dynamic_img_size": True}))
    except WeightsError:  # not a ViT: convolutional backbones take any size as they are
        backbone = build_model(spec)
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, 3, local, local))
    except (RuntimeError, AssertionError, ValueError):
        log.warning(
            "backbone %s does not accept %d px local crops; they are taken at %d px", spec.arch, local, spec.img_size
        )
        local = spec.img_size
    return backbone, local


@dataclass
class DinoModel:
    """Student and teacher, each a backbone plus a DINO projection head, and the loss (with its centre)."""

    student_backbone: torch.nn.Module
    student_head: DINOProjectionHead
    teacher_backbone: torch.nn.Module
    teacher_head: DINOProjectionHead
    loss: torch.nn.Module

    @classmethod
    def build(cls, backbone, prototypes: int) -> DinoModel:
        lightly = _lightly()
        head = lightly.DINOProjectionHead(backbone.num_features, output_dim=prototypes, freeze_last_layer=1)
        # the teacher starts as the student (a weight-normed head cannot be deep-copied: its weight is computed)
        teacher_backbone = copy.deepcopy(backbone)
        teacher_head = lightly.DINOProjectionHead(backbone.num_features, output_dim=prototypes)
        teacher_head.load_state_dict(head.state_dict())
        lightly.deactivate_requires_grad(teacher_backbone)
        lightly.deactivate_requires_grad(teacher_head)
        return cls(backbone, head, teacher_backbone, teacher_head, lightly.DINOLoss(output_dim=prototypes))

    def trainable(self) -> list:
        return [*self.student_backbone.parameters(), *self.student_head.parameters()]

    def state(self) -> dict[str, Any]:
        return {
            name: getattr(self, name).state_dict()
            for name in ("student_backbone", "student_head", "teacher_backbone", "teacher_head", "loss")
        }

    def load(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)

    def train(self) -> None:
        self.student_backbone.train()
        self.student_head.train()
        self.teacher_backbone.eval()
        self.teacher_head.eval()


def dino_step(model: DinoModel, views: Sequence[torch.Tensor], optimizer, *, momentum: float, epoch: int) -> float:
    """One DINO step: teacher on the two global views, student on all, loss, student update, then the teacher
    becomes ``momentum * teacher + (1 - momentum) * student``. Returns the loss."""
    import torch

    update_momentum = _lightly().update_momentum
    with torch.no_grad():
        teacher_out = [model.teacher_head(model.teacher_backbone(v)) for v in views[:2]]
    student_out = [model.student_head(model.student_backbone(v)) for v in views]
    loss = model.loss(teacher_out, student_out)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
    optimizer.step()
    update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
    update_momentum(model.student_head, model.teacher_head, m=momentum)
    return float(loss.detach())


class _Views:
    """A data set of DINO multi-crop views (list of normalised tensors) of tiles read at the model's input size."""

    def __init__(self, items: Sequence[tuple[Path, str | None]], spec: ModelSpec, local: int, local_views: int):
        self.items, self.spec = list(items), spec
        self.transform = _lightly().DINOTransform(
            global_crop_size=spec.img_size,
            local_crop_size=local,
            n_local_views=local_views,
            hf_prob=0.5,
            vf_prob=0.5,
            rr_prob=0.5,
            normalize={"mean": list(spec.mean), "std": list(spec.std)},
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        from pixcell_fed.training.data import load_image

        return self.transform(Image.fromarray(load_image(self.items[i][0], self.spec.img_size)))


def train_dino(
    items: Sequence[tuple[Path, str | None]], out_dir: Path, cfg: Any, spec: ModelSpec, state_path: Path
) -> list[dict]:
    """DINO on the images of ``items`` with the ssl recipe's config ``cfg`` (an ``SSLConfig``); writes the teacher
    backbone to ``out_dir`` (resumable per epoch); returns the training curve."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pixcell_fed.atomic import atomic_path
    from pixcell_fed.training.models import save_checkpoint

    cosine_schedule = _lightly().cosine_schedule
    backbone, local = _training_backbone(spec, local_crop_size(spec.img_size))
    model = DinoModel.build(backbone, cfg.dino_prototypes)
    optimizer = torch.optim.AdamW(model.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    views = cast("Dataset[Any]", _Views(items, spec, local, cfg.dino_local_views))  # map-style: len and getitem
    loader: DataLoader = DataLoader(
        views,
        batch_size=min(cfg.batch_size, len(items)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total_steps = cfg.epochs * len(loader)
    history: list[dict] = []
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("arch") == cfg.arch and state.get("recipe") == "ssl" and state.get("method") == "dino":
            model.load(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = int(state["epoch"]) + 1, list(state["history"])
    for epoch in range(start, cfg.epochs):
        model.train()
        total, n = 0.0, 0
        for step, views in enumerate(loader, start=epoch * len(loader)):
            momentum = cosine_schedule(step, total_steps, cfg.dino_teacher_momentum, 1.0)
            total += dino_step(model, views, optimizer, momentum=momentum, epoch=epoch) * len(views[0])
            n += len(views[0])
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "samples": n})
        log.info("ssl (dino) epoch %d/%d: %s", epoch + 1, cfg.epochs, history[-1])
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "model": model.state(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "arch": cfg.arch,
                    "recipe": "ssl",
                    "method": "dino",
                },
                tmp,
            )
    save_checkpoint(
        model.teacher_backbone, spec, out_dir, extra={"recipe": "ssl", "method": "dino", "history": history}
    )
    return history
