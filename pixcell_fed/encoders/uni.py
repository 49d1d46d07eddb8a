"""UNI2-h (PixCell's conditioning encoder) and its tiny twin.

UNI2-h is built offline as timm's ``vit_giant_patch14_224`` with the published overrides and ``pretrained=False``,
then the site's ``pytorch_model.bin`` is loaded strictly (``torch.load(weights_only=True)``; safetensors accepted).
Its preprocessing is the hard-coded ImageNet transform: a locally built timm model would otherwise resolve timm's
default 0.5/0.5 statistics. It runs in float32 on every device unless a dtype is asked for: PixCell was trained on
UNI2-h embeddings extracted in float32, and bf16 embeddings differ from them by more than the audit's margins.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.devices import resolve_dtype
from pixcell_fed.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderFolder, Preprocess, find_weights_file
from pixcell_fed.errors import WeightsError
from pixcell_fed.weights import compare_shapes, meta_shapes, read_state_dict, state_shapes

if TYPE_CHECKING:
    import torch

UNI_SOURCE = (
    "request access to MahmoodLab/UNI2-h on the Hugging Face Hub (gated; licence CC BY-NC-ND 4.0: non-commercial, "
    "no redistribution), download pytorch_model.bin into one folder and pass that folder as models.encoder_dir"
)
UNI_ARCH = "vit_giant_patch14_224"
UNI_DIM = 1536
UNI_PARAMS = 681_394_176
#: File that marks a folder written by the twin writer (save_tiny_uni).
TWIN_MARKER_FILE = "pixcell_fed_twin.json"
_TWIN_SOURCE = "re-create the twin with save_tiny_uni(folder)"


def uni2h_kwargs(**overrides: Any) -> dict[str, Any]:
    """timm overrides that turn ``vit_giant_patch14_224`` into UNI2-h."""
    import timm
    import torch

    kwargs = {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }
    kwargs.update(overrides)
    return kwargs


def uni_twin_kwargs(dim: int = 48) -> dict[str, Any]:
    """The same timm class and options at tiny size: 2 blocks, 2 heads, ``dim`` features, 16 px patches.

    ``dim * mlp_ratio`` must round to an even width for SwiGLU: 48, 96 or 1536 work; 64 does not.
    """
    return uni2h_kwargs(depth=2, num_heads=2, embed_dim=dim, patch_size=16)


def build_uni(kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """UNI2-h's architecture (random weights), or a variant of it with ``kwargs``; honours a torch device context."""
    import timm

    return timm.create_model(UNI_ARCH, pretrained=False, **(kwargs or uni2h_kwargs()))


def build_uni_twin(kwargs: dict[str, Any]) -> torch.nn.Module:
    return build_uni(kwargs)


def _twin_kwargs(weights_dir: Path) -> dict[str, Any] | None:
    """The twin's timm options when ``weights_dir`` holds the twin marker, else None."""
    marker = (weights_dir if weights_dir.is_dir() else weights_dir.parent) / TWIN_MARKER_FILE
    if not marker.is_file():
        return None
    try:
        return uni_twin_kwargs(int(json.loads(marker.read_text(encoding="utf-8"))["embed_dim"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{marker} is damaged ({exc})", hint=_TWIN_SOURCE) from exc


def _check(weights_dir: Path | None, *, twin_only: bool) -> tuple[EncoderFolder, dict[str, Any] | None]:
    twin_kwargs = _twin_kwargs(weights_dir) if weights_dir is not None else None
    if twin_only and twin_kwargs is None:
        raise WeightsError(
            f"{weights_dir} is not a uni2-h twin folder (no {TWIN_MARKER_FILE})",
            hint="set models.encoder to uni2-h for real UNI2-h weights, or write a twin with save_tiny_uni",
        )
    twin = twin_kwargs is not None
    source = _TWIN_SOURCE if twin else UNI_SOURCE
    path = find_weights_file(weights_dir, "uni2-h-twin" if twin else "UNI2-h", source)
    problems = compare_shapes(meta_shapes(lambda: build_uni(twin_kwargs)), state_shapes(path, source))
    if problems:
        raise WeightsError(
            f"{path} is not UNI2-h{' (twin)' if twin else ''}: " + "; ".join(problems),
            hint=f"re-download pytorch_model.bin; {source}",
        )
    dim = int(twin_kwargs["embed_dim"]) if twin_kwargs is not None else UNI_DIM
    folder = EncoderFolder(
        name="uni2-h-twin" if twin else "uni2-h",
        weights_file=path,
        dim=dim,
        twin=twin,
        architecture=f"{UNI_ARCH} (UNI2-h options{', tiny' if twin else ''})",
        title="UNI2-h architecture" if twin else "UNI2-h",
    )
    return folder, twin_kwargs


def check_folder(weights_dir: Path | None, arch: str | None = None) -> EncoderFolder:
    """Check a UNI2-h folder (a twin folder is recognised by its marker) without loading it: the weight file's
    tensor names and shapes must be exactly UNI2-h's. Raises :class:`WeightsError`."""
    return _check(weights_dir, twin_only=False)[0]


def check_twin_folder(weights_dir: Path | None, arch: str | None = None) -> EncoderFolder:
    """:func:`check_folder` for the ``uni2-h-twin`` name: the folder must be a twin."""
    return _check(weights_dir, twin_only=True)[0]


def compute_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype UNI2-h runs in: float32 on every device unless another dtype is asked for by name.

    PixCell's conditioning embeddings were extracted from UNI2-h in float32; the generic ``auto`` (bf16 on a GPU)
    would condition it on embeddings it was never trained on.
    """
    import torch

    return torch.float32 if dtype is None or dtype == "auto" else resolve_dtype(dtype, device)


def _load(weights_dir: Path | None, device: torch.device, dtype: torch.dtype | None, *, twin_only: bool) -> Encoder:
    import torch

    checked, twin_kwargs = _check(weights_dir, twin_only=twin_only)
    with torch.device("meta"):
        model = build_uni(twin_kwargs)
    assert checked.weights_file is not None  # _check always names the file it checked
    model.load_state_dict(read_state_dict(checked.weights_file, UNI_SOURCE), strict=True, assign=True)
    model = model.to(device=device, dtype=compute_dtype(dtype, device))
    return Encoder(model, checked, preprocess=Preprocess(224, IMAGENET_MEAN, IMAGENET_STD))


def load_uni2h(
    weights_dir: Path | None, device: torch.device, dtype: torch.dtype | None = None, arch: str | None = None
) -> Encoder:
    """UNI2-h from the site's folder holding ``pytorch_model.bin`` (a twin folder is recognised by its marker);
    float32 unless ``dtype`` is given."""
    return _load(weights_dir, device, dtype, twin_only=False)


def load_uni2h_twin(
    weights_dir: Path | None, device: torch.device, dtype: torch.dtype | None = None, arch: str | None = None
) -> Encoder:
    """The tiny random twin written by ``save_tiny_uni``: same timm class and options, tiny dims."""
    return _load(weights_dir, device, dtype, twin_only=True)
