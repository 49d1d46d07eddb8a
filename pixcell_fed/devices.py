"""Which torch device and dtype a setting such as ``models.device: auto`` means on this machine.

Shared by the PixCell loader, the encoders and ``site-agent doctor``. Nothing here touches the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pixcell_fed.errors import UsageError

if TYPE_CHECKING:
    import torch

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def resolve_device(device: str | torch.device | None) -> torch.device:
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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
