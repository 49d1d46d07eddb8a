"""Load PixCell and the SD3.5 VAE from the local folders a hospital downloaded by hand.

Offline only: nothing here contacts the network (``local_files_only``), and the ``pixcell_transformer_2d.py`` shipped
inside the published ``transformer/`` folder is never imported or executed; our own
:class:`~pixcell_fed.generation.transformer.PixCellTransformer2DModel` reads the same checkpoint. :func:`check_folder`
is the one check of a PixCell folder (files, config equal to the published one, tensor names and shapes from the
safetensors header): the loader runs it before reading any weight and ``site-agent doctor`` reports it. Every
missing or mismatching file raises :class:`~pixcell_fed.errors.WeightsError` naming the file and where to get it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.devices import dtype_name, resolve_device, resolve_dtype
from pixcell_fed.errors import ConfigError, WeightsError
from pixcell_fed.generation.published import (
    PIXCELL_SOURCE,
    PUBLISHED_PIXCELL,
    TWIN_MARKER,
    TWIN_SIZE_KEYS,
    VARIANT_BY_TOKENS,
    WEIGHTS_FILE,
)
from pixcell_fed.registry import Registry
from pixcell_fed.runlog import get_logger
from pixcell_fed.weights import (
    SafetensorsHeader,
    compare_shapes,
    config_mismatches,
    meta_shapes,
    read_complete_header,
    read_json,
)

if TYPE_CHECKING:
    import torch

    from pixcell_fed.generation.sampler import PixCellPipeline
    from pixcell_fed.generation.transformer import PixCellTransformer2DModel

log = get_logger(__name__)

_REDOWNLOAD = "re-download the folder: " + PIXCELL_SOURCE

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


#: The ``model_index.json`` key by which a tiny twin's folder names another pipeline to wrap its parts in. A
#: published folder never carries it, and the loader refuses it anywhere but in a twin folder.
PIPELINE_KEY = "_pixcell_fed_pipeline"
#: Pipelines other than PixCell's own, by the name a twin folder gives under :data:`PIPELINE_KEY`:
#: ``factory(checked_folder, transformer, vae, scheduler_config, **pipeline_kwargs) -> PixCellPipeline``. Nothing is
#: registered here: demo material (:mod:`pixcell_fed.simulation.memorising_twin`) registers itself when a process
#: imports it, which ``site-agent`` never does, so a site cannot load such a pipeline by pointing at a folder.
PIPELINES: Registry[Callable[..., PixCellPipeline]] = Registry("generator pipeline")


@dataclass(frozen=True)
class PixCellFolder:
    """A checked PixCell folder (nothing loaded): transformer config, variant, weight file header, twin flag."""

    folder: Path
    config: Mapping[str, Any]
    variant: int
    twin: bool
    weights: SafetensorsHeader

    @property
    def y_pos_embed_absent(self) -> bool:
        """Some PixCell-1024 files lack the fixed UNI-token position table; the loader rebuilds it exactly."""
        from pixcell_fed.generation.transformer import Y_POS_KEY

        return self.variant == 1024 and Y_POS_KEY not in self.weights.tensors

    @property
    def has_scheduler_config(self) -> bool:
        return (self.folder / "scheduler" / "scheduler_config.json").is_file()

    def describe(self) -> str:
        notes = [self.weights.summary()]
        if self.y_pos_embed_absent:
            notes.append("y_pos_embed absent: rebuilt when loaded")
        if not self.has_scheduler_config:
            notes.append("no scheduler/scheduler_config.json: the trained schedule is used")
        return f"PixCell-{self.variant} at {self.folder} ({', '.join(notes)})"


def _variant_of(config: Mapping[str, Any], path: Path) -> int:
    """256 or 1024 from a transformer config; a config of another model or variant is refused."""
    class_name = config.get("_class_name", "PixCellTransformer2DModel")
    if class_name != "PixCellTransformer2DModel":
        raise WeightsError(
            f"{path} describes a {class_name}, not a PixCellTransformer2DModel",
            hint=f"point models.pixcell_dir at a PixCell-256 or PixCell-1024 folder; {PIXCELL_SOURCE}",
        )
    tokens = config.get("caption_num_tokens", 1)
    if tokens not in VARIANT_BY_TOKENS:
        raise WeightsError(
            f"{path} has caption_num_tokens = {tokens!r}, which is neither PixCell-256 (1) nor PixCell-1024 (16)",
            hint=_REDOWNLOAD,
        )
    return VARIANT_BY_TOKENS[tokens]


def _is_twin(folder: Path, config: Mapping[str, Any]) -> bool:
    index = folder / "model_index.json"
    return bool(config.get(TWIN_MARKER)) or (
        index.is_file() and bool(read_json(index, "model index", PIXCELL_SOURCE).get(TWIN_MARKER))
    )


def _check_published_config(config: Mapping[str, Any], variant: int, twin: bool, path: Path) -> None:
    """Every key of the published config holds its value (a twin may shrink its sizes); no key is unknown."""
    from pixcell_fed.generation.transformer import LEGACY_CONFIG_KEYS

    published = PUBLISHED_PIXCELL[variant]
    problems = config_mismatches(config, published, TWIN_SIZE_KEYS if twin else frozenset())
    known = set(published) | set(LEGACY_CONFIG_KEYS)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        problems.append(f"keys not in the published config: {', '.join(unknown)}")
    if problems:
        raise WeightsError(
            f"{path} differs from the published PixCell-{variant} config: " + "; ".join(problems), hint=_REDOWNLOAD
        )


def check_folder(pixcell_dir: str | Path) -> PixCellFolder:
    """Check a PixCell-256 or PixCell-1024 folder without loading its weights.

    The transformer config must be a PixCell config equal to the published one of its variant (a tiny twin may
    shrink the sizes only), and the safetensors header must be complete, with exactly the tensor names and shapes
    of the model the config builds (only ``y_pos_embed.y_pos_embed`` may be absent); a folder may name another
    pipeline (:data:`PIPELINE_KEY`) only if it is a twin and that pipeline is registered. Raises :class:`WeightsError`.
    """
    from pixcell_fed.generation.transformer import UNCOND_KEY, Y_POS_KEY, PixCellTransformer2DModel

    folder = Path(pixcell_dir)
    if not folder.is_dir():
        raise WeightsError(f"PixCell folder not found: {folder}", hint="fix models.pixcell_dir, or " + PIXCELL_SOURCE)
    missing = [
        rel for rel in ("transformer/config.json", f"transformer/{WEIGHTS_FILE}") if not (folder / rel).is_file()
    ]
    if missing:
        raise WeightsError(
            f"{folder} is incomplete: missing {', '.join(missing)}",
            hint=_REDOWNLOAD + " (the weight file is about 2.4 GB: check the copy finished)",
        )
    config_path = folder / "transformer" / "config.json"
    config = read_json(config_path, "PixCell transformer config", PIXCELL_SOURCE)
    variant = _variant_of(config, config_path)
    twin = _is_twin(folder, config)
    _check_published_config(config, variant, twin, config_path)
    header = read_complete_header(folder / "transformer" / WEIGHTS_FILE, PIXCELL_SOURCE)
    try:
        expected = meta_shapes(lambda: PixCellTransformer2DModel.from_config(dict(config)))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{config_path} is not a valid PixCell config: {exc}", hint=_REDOWNLOAD) from exc
    problems = compare_shapes(expected, header.shapes, optional=frozenset({Y_POS_KEY}))
    if problems:
        hint = "the weights and the config come from different models: " + _REDOWNLOAD
        if UNCOND_KEY not in header.tensors:
            hint += f" (the null embedding {UNCOND_KEY} must be in the file)"
        raise WeightsError(f"{header.path} does not match {config_path.name}: " + "; ".join(problems), hint=hint)
    checked = PixCellFolder(folder=folder, config=config, variant=variant, twin=twin, weights=header)
    pipeline_factory(checked)  # a folder naming a pipeline this program does not load is refused here too (doctor)
    return checked


def pipeline_factory(checked: PixCellFolder) -> Callable[..., PixCellPipeline] | None:
    """The registered pipeline a twin folder names under :data:`PIPELINE_KEY`, or None for PixCell's own."""
    index = checked.folder / "model_index.json"
    name = read_json(index, "model index", PIXCELL_SOURCE).get(PIPELINE_KEY) if index.is_file() else None
    if name is None:
        return None
    if not checked.twin:
        raise WeightsError(
            f"{index} names the pipeline {name!r}, which only a tiny twin folder may do", hint=_REDOWNLOAD
        )
    if not isinstance(name, str) or name not in PIPELINES:
        raise WeightsError(
            f"{index} names the pipeline {name!r}: demo or test material this program does not load",
            hint="point models.pixcell_dir at a PixCell-256 or PixCell-1024 folder; " + PIXCELL_SOURCE,
        )
    return PIPELINES.get(name)


def read_pixcell_variant(pixcell_dir: str | Path) -> int:
    """The variant (256 or 1024: the tile size it is conditioned on) of a PixCell folder, without loading weights."""
    path = Path(pixcell_dir) / "transformer" / "config.json"
    return _variant_of(read_json(path, "PixCell transformer config", PIXCELL_SOURCE), path)


def check_tile_size_fits_model(tile_size: int, variant: int) -> None:
    """PixCell-256 is conditioned on 256 px tiles and PixCell-1024 on 1024 px tiles (a 4x4 grid of 256 px UNI
    embeddings); tiles of the other size would condition it on the wrong magnification or grid."""
    if tile_size != variant:
        raise ConfigError(
            f"models.pixcell_dir holds PixCell-{variant}, which is conditioned on {variant} px tiles, "
            f"but tiling.tile_size is {tile_size}",
            hint=f"set tiling.tile_size: {variant}, or point models.pixcell_dir at PixCell-{tile_size}",
        )


def load_transformer(
    checked: PixCellFolder, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PixCellTransformer2DModel:
    """Build :class:`PixCellTransformer2DModel` from a checked folder and assign its safetensors tensors into it.

    The model is built on the meta device, so the 2.4 GB checkpoint is never doubled by a random initialisation.
    A missing ``y_pos_embed.y_pos_embed`` (some PixCell-1024 files) is rebuilt deterministically.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pixcell_fed.generation.transformer import PixCellTransformer2DModel

    weights = checked.weights.path
    with torch.device("meta"):
        model = PixCellTransformer2DModel.from_config(dict(checked.config))
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot read {weights}: {exc}", hint=f"the file is damaged or incomplete; {PIXCELL_SOURCE}"
        ) from exc
    model.load_state_dict(state, strict=False, assign=True)
    model.rebuild_fixed_buffers(include_y_pos=checked.y_pos_embed_absent, device="cpu")
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules whenever a dtype is given; we have none.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def read_scheduler_config(pixcell_dir: Path) -> tuple[dict[str, Any], str]:
    """The site's ``scheduler/scheduler_config.json`` when present, else the trained schedule; and which was used."""
    path = pixcell_dir / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return read_json(path, "scheduler config", PIXCELL_SOURCE), str(path.relative_to(pixcell_dir))
    return dict(DEFAULT_SCHEDULER_CONFIG), "built-in defaults"


def load_pixcell(
    pixcell_dir: str | Path,
    vae_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> PixCellPipeline:
    """Load PixCell-256 or PixCell-1024 and the SD3.5 VAE from local folders into a ready pipeline.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``. ``dtype`` of the transformer: None/``"auto"``
    (bf16 on a GPU, fp32 on CPU), or ``"float32"``/``"bfloat16"``/``"float16"``. The VAE decodes in bf16 or fp32,
    never fp16. Both folders are checked (:func:`check_folder`, :func:`~pixcell_fed.generation.vae.check_folder`)
    before any weight is read.
    """
    from pixcell_fed.generation.sampler import PixCellPipeline
    from pixcell_fed.generation.vae import load_vae, resolve_vae_dir, vae_dtype_for

    pixcell_dir = Path(pixcell_dir)
    checked = check_folder(pixcell_dir)
    factory = pipeline_factory(checked) or (lambda _checked, *parts, **kwargs: PixCellPipeline(*parts, **kwargs))
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    transformer = load_transformer(checked, device=torch_device, dtype=torch_dtype)
    vae_folder = resolve_vae_dir(vae_dir, pixcell_dir)
    vae, vae_checked = load_vae(
        vae_folder,
        device=torch_device,
        dtype=vae_dtype_for(torch_dtype, torch_device),
        latent_channels=transformer.config["in_channels"],
    )
    scheduler_config, scheduler_source = read_scheduler_config(pixcell_dir)
    twin = checked.twin or vae_checked.twin
    log.info(
        "loaded %s transformer from %s%s, VAE from %s, scheduler from %s, on %s (%s, VAE %s)",
        "a tiny untrained twin" if twin else "the",
        pixcell_dir,
        " (y_pos_embed rebuilt)" if checked.y_pos_embed_absent else "",
        vae_folder,
        scheduler_source,
        torch_device,
        dtype_name(torch_dtype),
        dtype_name(vae.dtype),
    )
    return factory(
        checked,
        transformer,
        vae,
        scheduler_config,
        transformer_file=checked.weights.path,
        vae_file=vae_checked.weights.path,
        twin=twin,
        scheduler_source=scheduler_source,
        y_pos_embed_rebuilt=checked.y_pos_embed_absent,
    )
