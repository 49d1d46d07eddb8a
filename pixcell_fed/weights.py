"""Weight files on disk, read without loading a model: JSON configs, safetensors headers, state-dict shapes,
comparisons with an architecture built on the meta device, and cached sha256 identities.

Shared by every loader's ``check_folder`` (PixCell, the VAE, the encoders), the loaders themselves and
``site-agent doctor``. Every problem raises :class:`~pixcell_fed.errors.WeightsError` naming the file, with the
caller's ``source`` (where to get the file again) in the hint. Nothing here touches the network.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed import hashing
from pixcell_fed.errors import WeightsError

if TYPE_CHECKING:
    import torch

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
#: Largest safetensors JSON header accepted (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


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


def read_json(path: Path, what: str, source: str) -> dict[str, Any]:
    """A JSON object from a weight folder (config, index, marker); missing or damaged files raise WeightsError."""
    require_file(path, what, source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"{what} {path} is not valid JSON: {exc}", hint=f"the download is damaged; {source}"
        ) from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{what} {path} does not hold a JSON object", hint=f"the download is damaged; {source}")
    return data


def format_bytes(n: float) -> str:
    """A byte count for people: GB, MB or kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


@dataclass(frozen=True)
class SafetensorsHeader:
    """Tensor names, dtypes and shapes of a safetensors file, and whether its data is all there."""

    path: Path
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]
    data_bytes: int
    file_bytes: int
    header_bytes: int

    @property
    def complete(self) -> bool:
        return self.file_bytes >= 8 + self.header_bytes + self.data_bytes

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (_, shape) in self.tensors.items()}

    @property
    def n_params(self) -> int:
        return count_values(self.shapes)

    @property
    def dtypes(self) -> list[str]:
        return sorted({dtype for dtype, _ in self.tensors.values()})

    def summary(self) -> str:
        """``"604 tensors, 604 M values, F32, 2.42 GB"``."""
        return (
            f"{len(self.tensors)} tensors, {self.n_params / 1e6:.3g} M values, {'/'.join(self.dtypes)}, "
            f"{format_bytes(self.file_bytes)}"
        )


def count_values(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Number of values in tensors of these shapes."""
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def read_safetensors_header(path: str | Path, source: str) -> SafetensorsHeader:
    """Read the JSON header of a safetensors file (8-byte length + JSON); no tensor data is read.

    Raises :class:`WeightsError` when the file is not a safetensors file. A header whose data goes past the end
    of the file is returned with ``complete`` False (see :func:`read_complete_header`).
    """
    path = Path(path)
    size = path.stat().st_size
    damaged = f"the file is damaged or not a safetensors file: copy it again; {source}"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is empty or cut short ({size} bytes)", hint=damaged)
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise WeightsError(
                f"{path} has no valid safetensors header (header length {n}, file {size} bytes)", hint=damaged
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path} has an unreadable safetensors header: {exc}", hint=damaged) from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path} has no valid safetensors header", hint=damaged)
    header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    try:
        for name, info in header.items():
            tensors[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise WeightsError(f"{path}: malformed tensor entry in the safetensors header ({exc})", hint=damaged) from exc
    return SafetensorsHeader(path=path, tensors=tensors, data_bytes=end, file_bytes=size, header_bytes=n)


def read_complete_header(path: str | Path, source: str) -> SafetensorsHeader:
    """:func:`read_safetensors_header`, refusing a file whose tensor data is cut short (an unfinished copy)."""
    header = read_safetensors_header(path, source)
    if not header.complete:
        raise WeightsError(
            f"{header.path} is cut short ({header.file_bytes} of {8 + header.header_bytes + header.data_bytes} bytes)",
            hint=f"the copy did not finish: copy it again; {source}",
        )
    return header


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a ``torch.save`` pickle read with ``weights_only=True`` (no code runs)."""
    import pickle

    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(
            f"cannot read weights {path}: {exc}", hint=f"the file is damaged or not a plain state dict; {source}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors", hint=source)
    return state


def state_shapes(path: Path, source: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weight file: the safetensors header, or a memory-mapped ``weights_only`` state dict."""
    if path.suffix == ".safetensors":
        return read_complete_header(path, source).shapes
    return {k: tuple(v.shape) for k, v in read_state_dict(path, source).items()}


def meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model ``build()`` makes on the meta device (no memory, no random init)."""
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    optional: frozenset[str] = frozenset(),
) -> list[str]:
    """Problems between the shapes a model expects and those a file holds: missing, unexpected, wrong shape."""
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: file {tuple(found[k])}, model {tuple(v)}"
        for k, v in expected.items()
        if k in found and tuple(found[k]) != tuple(v)
    ]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = "; ".join(items[:6]) + (f"; ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    return problems


def config_mismatches(
    config: Mapping[str, Any], expected: Mapping[str, Any], skip: frozenset[str] = frozenset()
) -> list[str]:
    """Keys of ``config`` that differ from ``expected`` (floats within 1e-9 relative), as ``key = v (published w)``."""
    wrong = []
    for key, want in expected.items():
        if key in skip:
            continue
        if key not in config:
            wrong.append(f"{key} missing (published {want!r})")
        elif config[key] != want and not (
            isinstance(want, float)
            and isinstance(config[key], (int, float))
            and abs(float(config[key]) - want) <= 1e-9 * max(1.0, abs(want))
        ):
            wrong.append(f"{key} = {config[key]!r} (published {want!r})")
    return wrong
