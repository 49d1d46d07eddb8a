"""The encoder interface: :class:`Encoder` wraps a feature network and its fixed preprocessing (uint8 NHWC RGB tiles
in, float32 ``(N, D)`` embeddings out); :class:`EncoderFolder` is what checking a weight folder found.

The encoders themselves are in :mod:`~pixcell_fed.encoders.uni` and :mod:`~pixcell_fed.encoders.timm_models`; the
registry by name is :mod:`~pixcell_fed.encoders.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcell_fed.errors import UsageError, WeightsError
from pixcell_fed.weights import format_bytes

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors")


def find_weights_file(weights_dir: Path | None, what: str, source: str) -> Path:
    """The weight file in ``weights_dir`` (or ``weights_dir`` itself when it is a file)."""
    if weights_dir is None:
        raise WeightsError(f"no weights folder given for {what}", hint=f"set models.encoder_dir; {source}")
    if weights_dir.is_file():
        return weights_dir
    if not weights_dir.is_dir():
        raise WeightsError(f"{what} weights folder not found: {weights_dir}", hint=source)
    for name in _WEIGHT_NAMES:
        if (weights_dir / name).is_file():
            return weights_dir / name
    candidates = sorted(p for p in weights_dir.iterdir() if p.suffix in (".bin", ".safetensors", ".pth", ".pt"))
    if len(candidates) == 1:
        return candidates[0]
    raise WeightsError(
        f"{what} weights not found: {weights_dir} has no pytorch_model.bin or model.safetensors", hint=source
    )


@dataclass(frozen=True)
class EncoderFolder:
    """A checked encoder weight file (nothing loaded): its tensors match the architecture, which gives ``dim``.
    ``weights_file`` is None only for a network built in memory (benchmarks)."""

    name: str
    weights_file: Path | None
    architecture: str
    dim: int
    twin: bool = False
    #: How people call it ("UNI2-h"); the registered name when empty
    title: str = ""

    def describe(self) -> str:
        size = format_bytes(self.weights_file.stat().st_size) if self.weights_file is not None else "in memory"
        return f"{self.title or self.name} at {self.weights_file} ({self.dim}-dim embeddings, {size})"


@dataclass(frozen=True)
class Preprocess:
    """Resize(shorter side) -> [0, 1] -> Normalize(mean, std): the fixed transform an encoder was trained with."""

    resize: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def of(cls, resize: int, mean: Sequence[float], std: Sequence[float]) -> Preprocess:
        return cls(int(resize), tuple(float(m) for m in mean), tuple(float(v) for v in std))


class Encoder:
    """A feature network (``found``: what it is and which file it came from) plus its preprocessing."""

    def __init__(
        self,
        model: torch.nn.Module,
        found: EncoderFolder,
        *,
        preprocess: Preprocess = Preprocess(),
        weights_sha256: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = found.name
        self.architecture = found.architecture
        self.dim = int(found.dim)
        self.weights_file = found.weights_file
        self._sha256 = weights_sha256
        self.twin = found.twin
        self.resize, self.mean, self.std = preprocess.resize, preprocess.mean, preprocess.std
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 16)

    @property
    def weights_sha256(self) -> str | None:
        if self._sha256 is None and self.weights_file is not None:
            from pixcell_fed.weights import sha256_file

            self._sha256 = sha256_file(self.weights_file)
        return self._sha256

    @property
    def identity(self) -> dict[str, Any]:
        """Name, architecture, output dim, weight sha256, dtype and twin flag (never any data-dependent value)."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "twin": self.twin,
            "dtype": str(self.dtype).removeprefix("torch."),
            "label": "untrained twin" if self.twin else self.name,
            "transform": f"Resize({self.resize}) -> ToTensor -> Normalize(mean={self.mean}, std={self.std})",
        }

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> normalised float ``[N, 3, h, w]`` on the encoder's device and dtype."""
        import torch
        from torchvision.transforms.v2 import functional as TF

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        # Resize the uint8 image like torchvision's Resize on a PIL image (bilinear, antialiased), then ToTensor.
        x = TF.resize(x, self.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed uint8 RGB tiles ``[N, H, W, 3]`` (or one ``[H, W, 3]``) -> float32 ``(N, dim)``."""
        import torch

        if not isinstance(images, np.ndarray):
            raise UsageError(
                f"images must be a numpy array, got {type(images).__name__}", hint="pass uint8 [N, H, W, 3] RGB tiles"
            )
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UsageError(
                f"images must be uint8 [N, H, W, 3] RGB, got {images.dtype} {list(images.shape)}",
                hint="convert tiles with np.asarray(PIL.Image.open(p).convert('RGB'))",
            )
        out = np.empty((images.shape[0], self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start : start + self.batch_size]
                feats = self.model(self.preprocess(chunk))
                out[start : start + len(chunk)] = feats.float().cpu().numpy()
        return out
