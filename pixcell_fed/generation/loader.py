"""Load PixCell and the SD3.5 VAE from the local folders a hospital downloaded by hand.

Offline only: nothing here contacts the network (``local_files_only``), and the ``pixcell_transformer_2d.py`` shipped
inside the published ``transformer/`` folder is never imported or executed; our own
:class:`~pixcell_fed.generation.transformer.PixCellTransformer2DModel` reads the same checkpoint. Every missing or
mismatching file raises :class:`~pixcell_fed.errors.WeightsError` naming the file and where to get it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.errors import WeightsError
from pixcell_fed.runlog import get_logger
from pixcell_fed.generation.weights import (
    PIXCELL_SOURCE,
    VAE_SOURCE,
    require_file,
    resolve_device,
    resolve_dtype,
    vae_dtype_for,
)

if TYPE_CHECKING:
    import torch

    from pixcell_fed.generation.sampler import PixCellPipeline
    from pixcell_fed.generation.transformer import PixCellTransformer2DModel

log = get_logger(__name__)

TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
#: Marker key written by pixcell_fed.testing.twins into every twin config: outputs are labelled "untrained twin".
TWIN_MARKER = "_pixcell_fed_twin"

#: The trained noise schedule, used when a folder has no scheduler/scheduler_config.json.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}


def _read_json(path: Path, what: str, source: str) -> dict[str, Any]:
    require_file(path, what, source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{what} {path} is not valid JSON: {exc}", hint=f"the download is damaged; {source}") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{what} {path} does not hold a JSON object", hint=f"the download is damaged; {source}")
    return data


def _variant_of(config: dict[str, Any], path: Path) -> int:
    """256 or 1024 from a transformer config; a config of another model or variant is refused."""
    from pixcell_fed.generation.published import VARIANT_BY_TOKENS

    class_name = config.get("_class_name", "PixCellTransformer2DModel")
    if class_name != "PixCellTransformer2DModel":
        raise WeightsError(
            f"{path} describes a {class_name}, not a PixCellTransformer2DModel",
            hint=f"point models.pixcell_dir at a PixCell-256 or PixCell-1024 folder; {PIXCELL_SOURCE}",
        )
    tokens = config.get("caption_num_tokens", 1)
    if tokens not in VARIANT_BY_TOKENS:
        raise WeightsError(f"{path} has caption_num_tokens = {tokens!r}, which is neither PixCell-256 (1) nor "
                           "PixCell-1024 (16)", hint=f"re-download the config; {PIXCELL_SOURCE}")
    return VARIANT_BY_TOKENS[tokens]


def read_pixcell_variant(pixcell_dir: str | Path) -> int:
    """The variant (256 or 1024: the tile size it is conditioned on) of a PixCell folder, without loading weights."""
    path = Path(pixcell_dir) / "transformer" / "config.json"
    return _variant_of(_read_json(path, "PixCell transformer config", PIXCELL_SOURCE), path)


def load_transformer(
    folder: str | Path, *, device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None
) -> "tuple[PixCellTransformer2DModel, dict[str, Any]]":
    """Build :class:`PixCellTransformer2DModel` from a published ``transformer/`` folder; strict on keys and shapes.

    The model is built on the meta device and the safetensors tensors are assigned into it, so the 2.4 GB
    checkpoint is never doubled by a random initialisation. Only ``y_pos_embed.y_pos_embed`` may be missing (some
    PixCell-1024 files lack it); it is rebuilt deterministically. Returns the model and facts about the files.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pixcell_fed.generation.transformer import UNCOND_KEY, Y_POS_KEY, PixCellTransformer2DModel

    folder = Path(folder)
    config = _read_json(folder / "config.json", "PixCell transformer config", PIXCELL_SOURCE)
    weights = require_file(
        folder / TRANSFORMER_WEIGHTS, "PixCell transformer weights", PIXCELL_SOURCE + " (the file is about 2.4 GB: check the copy finished)"
    )
    _variant_of(config, folder / "config.json")
    try:
        with torch.device("meta"):
            model = PixCellTransformer2DModel.from_config(config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{folder / 'config.json'} is not a valid PixCell config: {exc}", hint=PIXCELL_SOURCE) from exc
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {weights}: {exc}", hint=f"the file is damaged or incomplete; {PIXCELL_SOURCE}") from exc

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    rebuild_y_pos = Y_POS_KEY in missing
    missing = [k for k in missing if k != Y_POS_KEY]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
            if items:
                shown = "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        hint = "the weights do not match transformer/config.json; re-download both from the same repository"
        if UNCOND_KEY in missing:
            hint += " (the null embedding caption_projection.uncond_embedding must be in the file)"
        raise WeightsError(f"{weights} does not match its config ({' | '.join(parts)})", hint=f"{hint}; {PIXCELL_SOURCE}")

    model.load_state_dict(state, strict=False, assign=True)
    model.rebuild_fixed_buffers(include_y_pos=rebuild_y_pos, device="cpu")
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules whenever a dtype is given; we have none.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    info = {
        "weights_file": weights,
        "twin": bool(config.get(TWIN_MARKER, False)),
        "y_pos_embed_rebuilt": rebuild_y_pos,
    }
    return model, info


def resolve_vae_dir(vae_dir: str | Path | None, pixcell_dir: Path) -> Path:
    """The folder holding the VAE's config.json: ``vae_dir`` itself, its ``vae/`` subfolder, or ``pixcell_dir/vae``."""
    if vae_dir is None:
        folder = pixcell_dir / "vae"
        if not (folder / TRANSFORMER_WEIGHTS).is_file():
            raise WeightsError(
                f"no VAE weights given and {folder} holds only a config (the PixCell repositories ship no VAE weights)",
                hint=VAE_SOURCE,
            )
        return folder
    folder = Path(vae_dir)
    if not folder.is_dir():
        raise WeightsError(f"VAE folder not found: {folder}", hint=VAE_SOURCE)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    return folder


def load_vae(folder: Path, *, device: "torch.device", dtype: "torch.dtype", latent_channels: int) -> tuple[Any, dict[str, Any]]:
    """Load the SD3.5 ``AutoencoderKL`` from a local folder (no network) and check it fits the transformer."""
    from diffusers import AutoencoderKL

    config = _read_json(folder / "config.json", "VAE config", VAE_SOURCE)
    weights = require_file(folder / TRANSFORMER_WEIGHTS, "VAE weights", VAE_SOURCE)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(f"{folder / 'config.json'} describes a {config.get('_class_name')}, not an AutoencoderKL", hint=VAE_SOURCE)
    if config.get("latent_channels") != latent_channels:
        raise WeightsError(
            f"the VAE in {folder} has {config.get('latent_channels')} latent channels, PixCell needs {latent_channels}",
            hint=f"this is not the SD3.5 VAE; {VAE_SOURCE}",
        )
    try:
        vae = AutoencoderKL.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load the VAE from {folder}: {exc}", hint=f"the folder is damaged or not the SD3.5 VAE; {VAE_SOURCE}") from exc
    vae.to(device=device).eval().requires_grad_(False)
    return vae, {"weights_file": weights, "twin": bool(config.get(TWIN_MARKER, False))}


def read_scheduler_config(pixcell_dir: Path) -> tuple[dict[str, Any], str]:
    """The site's ``scheduler/scheduler_config.json`` when present, else the trained schedule; and which was used."""
    path = pixcell_dir / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return _read_json(path, "scheduler config", PIXCELL_SOURCE), str(path.relative_to(pixcell_dir))
    return dict(DEFAULT_SCHEDULER_CONFIG), "built-in defaults"


def load_pixcell(
    pixcell_dir: str | Path,
    vae_dir: str | Path | None = None,
    *,
    device: "str | torch.device" = "cpu",
    dtype: "str | torch.dtype | None" = None,
) -> "PixCellPipeline":
    """Load PixCell-256 or PixCell-1024 and the SD3.5 VAE from local folders into a ready pipeline.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``. ``dtype`` of the transformer: None/``"auto"``
    (bf16 on a GPU, fp32 on CPU), or ``"float32"``/``"bfloat16"``/``"float16"``. The VAE decodes in bf16 or fp32,
    never fp16.
    """
    from pixcell_fed.generation.sampler import PixCellPipeline

    pixcell_dir = Path(pixcell_dir)
    if not pixcell_dir.is_dir():
        raise WeightsError(f"PixCell folder not found: {pixcell_dir}", hint=PIXCELL_SOURCE)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    transformer, t_info = load_transformer(pixcell_dir / "transformer", device=torch_device, dtype=torch_dtype)
    vae_folder = resolve_vae_dir(vae_dir, pixcell_dir)
    vae, v_info = load_vae(
        vae_folder,
        device=torch_device,
        dtype=vae_dtype_for(torch_dtype, torch_device),
        latent_channels=transformer.config.in_channels,
    )
    scheduler_config, scheduler_source = read_scheduler_config(pixcell_dir)
    index = pixcell_dir / "model_index.json"
    twin = t_info["twin"] or v_info["twin"]
    if index.is_file():
        twin = twin or bool(_read_json(index, "model index", PIXCELL_SOURCE).get(TWIN_MARKER, False))
    log.info(
        "loaded %s transformer from %s%s, VAE from %s, scheduler from %s, on %s (%s, VAE %s)",
        "a tiny untrained twin" if twin else "the",
        pixcell_dir,
        " (y_pos_embed rebuilt)" if t_info["y_pos_embed_rebuilt"] else "",
        vae_folder,
        scheduler_source,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        str(vae.dtype).removeprefix("torch."),
    )
    return PixCellPipeline(
        transformer,
        vae,
        scheduler_config,
        transformer_file=t_info["weights_file"],
        vae_file=v_info["weights_file"],
        twin=twin,
        scheduler_source=scheduler_source,
        y_pos_embed_rebuilt=t_info["y_pos_embed_rebuilt"],
    )
