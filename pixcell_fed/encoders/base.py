"""The encoder interface and the registry of encoders by name.

An :class:`Encoder` wraps a feature network and its fixed preprocessing: uint8 NHWC RGB tiles in, float32 ``(N, D)``
embeddings out. Factories are registered by name in :data:`ENCODERS`; ``timm:<arch>`` names go to the generic
``timm`` factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pixcell_fed.errors import UsageError
from pixcell_fed.registry import Registry

if TYPE_CHECKING:
    import torch

#: Factories ``(weights_dir, device, dtype, arch) -> Encoder``, by encoder name.
ENCODERS: Registry[Callable[..., "Encoder"]] = Registry("encoder")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder:
    """A feature network plus its preprocessing (Resize(shorter side) -> [0, 1] -> Normalize(mean, std))."""

    def __init__(
        self,
        model: "torch.nn.Module",
        *,
        name: str,
        architecture: str,
        dim: int,
        weights_file: Path | None,
        weights_sha256: str | None = None,
        twin: bool = False,
        resize: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.architecture = architecture
        self.dim = int(dim)
        self.weights_file = weights_file
        self._sha256 = weights_sha256
        self.twin = twin
        self.resize = int(resize)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 16)

    @property
    def weights_sha256(self) -> str | None:
        if self._sha256 is None and self.weights_file is not None:
            from pixcell_fed.generation.weights import sha256_file

            self._sha256 = sha256_file(self.weights_file)
        return self._sha256

    @property
    def identity(self) -> dict[str, Any]:
        """Name, architecture, output dim, weight sha256 and twin flag (never any data-dependent value)."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "twin": self.twin,
            "label": "untrained twin" if self.twin else self.name,
            "transform": f"Resize({self.resize}) -> ToTensor -> Normalize(mean={self.mean}, std={self.std})",
        }

    def preprocess(self, images: np.ndarray) -> "torch.Tensor":
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
            raise UsageError(f"images must be a numpy array, got {type(images).__name__}", hint="pass uint8 [N, H, W, 3] RGB tiles")
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


def encoder_names() -> list[str]:
    """Registered encoder names (``timm`` stands for ``timm:<arch>``)."""
    import pixcell_fed.encoders.uni  # noqa: F401 - registers the built-in encoders

    return ENCODERS.names()


def load_encoder(
    name: str,
    weights_dir: str | Path | None = None,
    device: "str | torch.device" = "cpu",
    dtype: "str | torch.dtype | None" = None,
) -> Encoder:
    """Build encoder ``name`` from a local weights folder (or file) on ``device``; ``dtype`` None = fp32 on CPU,
    bf16 on a GPU. Names: ``uni2-h``, ``uni2-h-twin``, ``timm:<arch>``."""
    import pixcell_fed.encoders.uni  # noqa: F401 - registers the built-in encoders
    from pixcell_fed.generation.weights import resolve_device, resolve_dtype

    arch = None
    key = name
    if name.startswith("timm:"):
        key, arch = "timm", name[len("timm:") :]
        if not arch:
            raise UsageError("encoder name 'timm:' lacks an architecture", hint="write timm:<arch>, e.g. timm:vit_base_patch16_224")
    factory = ENCODERS.get(key)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    return factory(Path(weights_dir) if weights_dir is not None else None, torch_device, torch_dtype, arch)
