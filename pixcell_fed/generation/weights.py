"""Where a hospital gets each weight folder, how files are hashed, and how device/dtype names are resolved.

Shared by the PixCell loader and the encoders. Nothing here touches the network.
"""

from __future__ import annotations


from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_fed import hashing
from pixcell_fed.errors import UsageError, WeightsError

if TYPE_CHECKING:
    import torch

PIXCELL_SOURCE = (
    "download it on a machine with internet access from the Hugging Face Hub repository StonyBrook-CVLab/PixCell-256 "
    "or StonyBrook-CVLab/PixCell-1024 (licence CC BY-NC 4.0: non-commercial use), e.g. "
    "'hf download StonyBrook-CVLab/PixCell-256 --local-dir PixCell-256', and copy the whole folder to the site"
)
VAE_SOURCE = (
    "PixCell uses the Stable Diffusion 3.5 VAE, which is not inside the PixCell repositories: get the 'vae' folder "
    "(config.json + diffusion_pytorch_model.safetensors) of stabilityai/stable-diffusion-3.5-large (Stability AI "
    "Community License, gated: accept it on the Hub) or of StonyBrook-CVLab/PixCell-256-Cell-ControlNet, and pass "
    "that folder as the VAE folder (models.vae_dir)"
)
UNI_SOURCE = (
    "request access to MahmoodLab/UNI2-h on the Hugging Face Hub (gated; licence CC BY-NC-ND 4.0: non-commercial, "
    "no redistribution), download pytorch_model.bin into one folder and pass that folder as models.encoder_dir"
)

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, cached per process by (path, size, mtime) so multi-GB weights are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hashing.sha256_file(path)
    return _SHA_CACHE[key]


def require_file(path: Path, what: str, source: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`WeightsError` naming it and where to get it."""
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path} does not exist", hint=source)
    return path


def resolve_device(device: "str | torch.device | None") -> "torch.device":
    """``"auto"``/None -> cuda if available, else cpu; any other torch device name is taken as given."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}", hint="use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {device!r} asked for, but this machine has no usable CUDA GPU",
            hint="set models.device to 'cpu' (slow but supported) or 'auto'",
        )
    return resolved


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: "str | torch.dtype | None", device: "torch.device") -> "torch.dtype":
    """None/``"auto"`` -> bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU; names or dtypes otherwise."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use one of auto, float32, bfloat16, float16")
    return getattr(torch, name)


def vae_dtype_for(transformer_dtype: "torch.dtype", device: "torch.device") -> "torch.dtype":
    """The SD3.5 VAE is unstable in fp16: decode in bf16 when the transformer runs in reduced precision, else fp32."""
    import torch

    if transformer_dtype in (torch.float16, torch.bfloat16) and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
