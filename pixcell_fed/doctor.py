"""``site-agent doctor``: check that this machine and a site's set-up can run the pipeline, and say how to fix it.

Each check is a small function registered in :data:`CHECKS` (in the order they run, :data:`CHECK_ORDER`) that
returns a :class:`CheckResult` (``OK``, ``WARN`` or ``FAIL`` with one line of detail and one line of fix), or
``None`` when it does not apply (e.g. the trust file when none is given). Checks never load model weights: the
safetensors headers and memory-mapped state dicts give tensor names and shapes, which are compared with the model
built on the meta device from the folder's own config, and the configs are compared with the published PixCell
and Stable Diffusion 3.5 VAE configs. A check that breaks reports FAIL and the next check still runs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from pixcell_fed.errors import ConfigError, ExitCode, PixcellFedError, WeightsError
from pixcell_fed.generation.published import PUBLISHED_PIXCELL, SD35_VAE_REQUIRED, VARIANT_BY_TOKENS
from pixcell_fed.registry import Registry

if TYPE_CHECKING:
    from pixcell_fed.config import SiteConfig

Status = Literal["OK", "WARN", "FAIL"]
STATUSES: tuple[Status, ...] = ("OK", "WARN", "FAIL")

#: Free space (GB) under which the work-folder check warns.
DEFAULT_MIN_FREE_GB = 20.0

#: Keys a tiny twin shrinks; every other published key must hold its published value in a twin too.
TWIN_SIZE_KEYS = frozenset({"num_layers", "num_attention_heads", "attention_head_dim", "cross_attention_dim",
                            "sample_size", "caption_channels"})

#: What PixCell needs of the SD3.5 VAE (facts of the published model).
VAE_REQUIRED = SD35_VAE_REQUIRED
VAE_PARAMS = 83.8e6

REQUIRED_DISTRIBUTIONS = ("torch", "diffusers", "timm", "safetensors", "cryptography", "pyyaml", "pandas", "pyarrow",
                          "openslide-python", "flwr")


@dataclass(frozen=True)
class CheckResult:
    """One line of the doctor's report: what was checked, how it went, and what to do about it."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class DoctorContext:
    """What the checks look at: the site config (None = only this machine), the trust file, thresholds."""

    config: "SiteConfig | None" = None
    config_path: Path | None = None
    trust_path: Path | None = None
    min_free_gb: float = DEFAULT_MIN_FREE_GB
    #: Facts one check leaves for a later one (e.g. the PixCell config for the encoder's dimension check).
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorReport:
    """All check results; FAIL anywhere makes the exit code 1."""

    results: tuple[CheckResult, ...]

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        return self.count("FAIL") == 0

    @property
    def exit_code(self) -> int:
        return int(ExitCode.OK if self.ok else ExitCode.FAILURE)

    def summary(self) -> str:
        return f"{self.count('OK')} OK, {self.count('WARN')} WARN, {self.count('FAIL')} FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": {s: self.count(s) for s in STATUSES},
                "checks": [r.to_dict() for r in self.results]}

    def render_text(self) -> str:
        width = max((len(r.name) for r in self.results), default=0)
        lines = []
        for r in self.results:
            lines.append(f"{r.status:<4}  {r.name:<{width}}  {r.detail}")
            if r.fix:
                lines.append(f"{'':<4}  {'':<{width}}  fix: {r.fix}")
        lines.append(f"summary: {self.summary()}")
        return "\n".join(lines)


Check = Callable[[DoctorContext], "CheckResult | None"]
#: Checks by name; :data:`CHECK_ORDER` is the order they run in.
CHECKS: Registry[Check] = Registry("doctor check")
CHECK_ORDER: list[str] = []


def register_check(name: str) -> Callable[[Check], Check]:
    """Register a check under ``name``; checks run in registration order."""

    def add(fn: Check) -> Check:
        CHECKS.register(name, fn)
        CHECK_ORDER.append(name)
        return fn

    return add


def run_doctor(
    config_path: str | Path | None = None,
    *,
    trust_path: str | Path | None = None,
    min_free_gb: float = DEFAULT_MIN_FREE_GB,
    checks: list[str] | None = None,
) -> DoctorReport:
    """Run every check (or the named ``checks``) and return the report.

    A config that cannot be loaded raises :class:`~pixcell_fed.errors.ConfigError` (exit code 2 at the CLI);
    everything else becomes a check result.
    """
    from pixcell_fed.config import load_site_config

    cfg = load_site_config(config_path) if config_path is not None else None
    ctx = DoctorContext(config=cfg, config_path=Path(config_path) if config_path is not None else None,
                        trust_path=Path(trust_path) if trust_path is not None else None, min_free_gb=min_free_gb)
    results = []
    for name in checks if checks is not None else CHECK_ORDER:
        result = _run_one(name, CHECKS.get(name), ctx)
        if result is not None:
            results.append(result)
    return DoctorReport(tuple(results))


def _run_one(name: str, fn: Check, ctx: DoctorContext) -> CheckResult | None:
    try:
        return fn(ctx)
    except PixcellFedError as exc:
        return CheckResult(name, "FAIL", exc.message, exc.hint or "")
    # A doctor must report a broken check and go on to the next, whatever broke it.
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as exc:
        return CheckResult(name, "FAIL", f"the check itself failed: {type(exc).__name__}: {exc}",
                           "rerun with -v and report this as a bug in pixcell-fed if the cause is not clear")


# ---------------------------------------------------------------------------------------------------------------
# Weight files: headers and shapes, never the weights themselves


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
        total = 0
        for _, shape in self.tensors.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def dtypes(self) -> list[str]:
        return sorted({dtype for dtype, _ in self.tensors.values()})


def read_safetensors_header(path: str | Path, source: str) -> SafetensorsHeader:
    """Read the JSON header of a safetensors file (8-byte length + JSON); no tensor data is read.

    Raises :class:`WeightsError` (with ``source`` as the hint) when the file is not a safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    damaged = f"the file is damaged or not a safetensors file: copy it again; {source}"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is empty or cut short ({size} bytes)", hint=damaged)
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024 * 1024):
            raise WeightsError(f"{path} has no valid safetensors header (header length {n}, file {size} bytes)", hint=damaged)
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


def compare_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                   *, optional: frozenset[str] = frozenset()) -> list[str]:
    """Problems between the shapes a model expects and those a file holds: missing, unexpected, wrong shape."""
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} is {tuple(found[k])} in the file, {tuple(v)} in the model" for k, v in expected.items()
             if k in found and tuple(found[k]) != tuple(v)]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = "; ".join(items[:4]) + (f"; ... ({len(items)} in all)" if len(items) > 4 else "")
            problems.append(f"{label}: {shown}")
    return problems


def _meta_shapes(build: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model ``build()`` makes on the meta device (no memory, no random init)."""
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _gb(n: float) -> str:
    """A byte count for people: GB, MB or kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _config_mismatches(config: Mapping[str, Any], expected: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> list[str]:
    wrong = []
    for key, want in expected.items():
        if key in skip:
            continue
        if key not in config:
            wrong.append(f"{key} missing (published {want!r})")
        elif config[key] != want and not (isinstance(want, float) and isinstance(config[key], (int, float))
                                          and abs(float(config[key]) - want) <= 1e-9 * max(1.0, abs(want))):
            wrong.append(f"{key} = {config[key]!r} (published {want!r})")
    return wrong


def _read_json(path: Path, what: str, source: str) -> dict[str, Any]:
    from pixcell_fed.generation.loader import _read_json as read

    return read(path, what, source)


# ---------------------------------------------------------------------------------------------------------------
# The checks, in the order they run


@register_check("python")
def check_python(ctx: DoctorContext) -> CheckResult:
    """Python and the installed versions of the libraries the pipeline needs."""
    from importlib import metadata

    from pixcell_fed import __version__

    found, missing = [], []
    for dist in REQUIRED_DISTRIBUTIONS:
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            missing.append(dist)
    py = ".".join(str(v) for v in sys.version_info[:3])
    if missing:
        return CheckResult("python", "FAIL", f"Python {py}, pixcell-fed {__version__}; not installed: {', '.join(missing)}",
                           "reinstall the package with its dependencies: pip install -e . (from the pixcell-fed folder)")
    return CheckResult("python", "OK", f"Python {py}, pixcell-fed {__version__}; " + ", ".join(found[:3]))


@register_check("openslide")
def check_openslide(ctx: DoctorContext) -> CheckResult:
    """The OpenSlide library loads (the slides themselves are not opened)."""
    try:
        import openslide
    except (ImportError, OSError) as exc:
        return CheckResult("openslide", "FAIL", f"OpenSlide cannot be loaded: {exc}",
                           "pip install openslide-python openslide-bin "
                           "(or install the system library: apt install libopenslide0)")
    lib = getattr(openslide, "__library_version__", "unknown")
    return CheckResult("openslide", "OK", f"OpenSlide library {lib} (openslide-python {openslide.__version__})")


@register_check("config")
def check_config(ctx: DoctorContext) -> CheckResult:
    """Whether a site config was given (it was loaded and validated before the checks ran)."""
    if ctx.config is None:
        return CheckResult("config", "WARN", "no site config given: only this machine was checked",
                           "run 'site-agent doctor --config site.yaml' to check the site's folders, models and keys")
    return CheckResult("config", "OK", f"{ctx.config_path} is valid (site {ctx.config.site.name})")


@register_check("slides")
def check_slides(ctx: DoctorContext) -> CheckResult | None:
    """The slides folder exists and holds candidate slide files (they are not opened)."""
    if ctx.config is None:
        return None
    from pixcell_fed.slides.reader import list_slide_files

    folder = ctx.config.site.slides_dir
    if not folder.is_dir():
        return CheckResult("slides", "FAIL", f"slides folder not found: {folder}",
                           f"create {folder} and copy the whole-slide images into it, or set site.slides_dir")
    files = list_slide_files(folder)
    if not files:
        return CheckResult("slides", "WARN", f"the slides folder {folder} holds no slide files yet",
                           f"copy the whole-slide images (any format OpenSlide reads) into {folder}")
    return CheckResult("slides", "OK", f"{len(files)} slide file(s) in {folder}")


@register_check("work folder")
def check_work_folder(ctx: DoctorContext) -> CheckResult:
    """The work folder (or the current folder without a config) is writable and has free space."""
    folder = ctx.config.site.work_dir if ctx.config is not None else Path.cwd()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return CheckResult("work folder", "FAIL", f"{probe} is not writable by this user",
                           f"give this user write access to {probe}, or set site.work_dir to a writable folder")
    free = shutil.disk_usage(probe).free
    where = f"{folder}" + ("" if probe == folder else f" (to be created; {probe} exists)")
    detail = f"{where}: {_gb(free)} free"
    if free < ctx.min_free_gb * 1e9:
        return CheckResult("work folder", "WARN", f"{detail}, under the {ctx.min_free_gb:g} GB threshold",
                           "free space on that disk or set site.work_dir to a larger one (threshold: --min-free-gb)")
    return CheckResult("work folder", "OK", detail)


@register_check("pixcell model")
def check_pixcell(ctx: DoctorContext) -> CheckResult | None:
    """The PixCell folder: every file there, config equal to the published one, tensors as the model expects."""
    if ctx.config is None:
        return None
    from pixcell_fed.generation.loader import TRANSFORMER_WEIGHTS, TWIN_MARKER
    from pixcell_fed.generation.transformer import LEGACY_CONFIG_KEYS, Y_POS_KEY, PixCellTransformer2DModel
    from pixcell_fed.generation.weights import PIXCELL_SOURCE
    from pixcell_fed.pipeline.synthesize import check_tile_size_fits_model

    name = "pixcell model"
    folder = ctx.config.models.pixcell_dir
    redownload = "re-download the folder: " + PIXCELL_SOURCE
    if folder is None:
        return CheckResult(name, "FAIL", "models.pixcell_dir is not set",
                           "set models.pixcell_dir in site.yaml to the local PixCell-256 or PixCell-1024 folder; "
                           + PIXCELL_SOURCE)
    if not folder.is_dir():
        return CheckResult(name, "FAIL", f"PixCell folder not found: {folder}", "fix models.pixcell_dir, or " + PIXCELL_SOURCE)
    required = ["transformer/config.json", f"transformer/{TRANSFORMER_WEIGHTS}"]
    missing = [rel for rel in required if not (folder / rel).is_file()]
    if missing:
        return CheckResult(name, "FAIL", f"{folder} is incomplete: missing {', '.join(missing)}", redownload)
    config = _read_json(folder / "transformer" / "config.json", "PixCell transformer config", PIXCELL_SOURCE)
    ctx.facts["pixcell_config"] = config
    index = folder / "model_index.json"
    twin = bool(config.get(TWIN_MARKER)) or (
        index.is_file() and bool(_read_json(index, "model index", PIXCELL_SOURCE).get(TWIN_MARKER)))
    ctx.facts["pixcell_twin"] = twin
    class_name = config.get("_class_name", "PixCellTransformer2DModel")
    if class_name != "PixCellTransformer2DModel":
        return CheckResult(name, "FAIL", f"{folder / 'transformer/config.json'} describes a {class_name}, not PixCell",
                           redownload)
    variant = VARIANT_BY_TOKENS.get(config.get("caption_num_tokens"))  # type: ignore[arg-type]
    if variant is None:
        return CheckResult(name, "FAIL", "transformer/config.json has caption_num_tokens = "
                           f"{config.get('caption_num_tokens')!r}, "
                           "which is neither PixCell-256 (1) nor PixCell-1024 (16)", redownload)
    ctx.facts["pixcell_variant"] = variant
    try:
        check_tile_size_fits_model(ctx.config.tiling.tile_size, variant)
    except ConfigError as exc:
        return CheckResult(name, "FAIL", exc.message, exc.hint or "")
    known = set(PUBLISHED_PIXCELL[variant]) | set(LEGACY_CONFIG_KEYS)
    problems = _config_mismatches(config, PUBLISHED_PIXCELL[variant], TWIN_SIZE_KEYS if twin else frozenset())
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        problems.append(f"keys not in the published config: {', '.join(unknown)}")
    if problems:
        return CheckResult(name, "FAIL", f"transformer/config.json differs from the published PixCell-{variant} config: "
                           + "; ".join(problems), redownload)
    header = read_safetensors_header(folder / "transformer" / TRANSFORMER_WEIGHTS, PIXCELL_SOURCE)
    if not header.complete:
        return CheckResult(name, "FAIL", f"{header.path} is cut short ({header.file_bytes} of "
                           f"{8 + header.header_bytes + header.data_bytes} bytes)", "the copy did not finish: " + redownload)
    try:
        expected = _meta_shapes(lambda: PixCellTransformer2DModel.from_config(config))
    except (TypeError, ValueError) as exc:
        return CheckResult(name, "FAIL", f"transformer/config.json is not a valid PixCell config: {exc}", redownload)
    problems = compare_shapes(expected, header.shapes, optional=frozenset({Y_POS_KEY}))
    if problems:
        return CheckResult(name, "FAIL", f"{header.path.name} does not match transformer/config.json: " + "; ".join(problems),
                           "the weights and the config come from different models: " + redownload)
    notes = [f"{len(header.tensors)} tensors", f"{header.n_params / 1e6:.3g} M values", "/".join(header.dtypes),
             _gb(header.file_bytes)]
    if variant == 1024 and Y_POS_KEY not in header.tensors:
        notes.append("y_pos_embed absent: rebuilt when loaded")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        notes.append("no scheduler/scheduler_config.json: the trained schedule is used")
    detail = f"PixCell-{variant} at {folder} ({', '.join(notes)})"
    if twin:
        return CheckResult(name, "WARN", f"untrained twin: {detail}; tiny random weights, outputs are noise",
                           "for real synthesis set models.pixcell_dir to a downloaded PixCell folder; " + PIXCELL_SOURCE)
    return CheckResult(name, "OK", f"{detail}, published architecture")


@register_check("vae")
def check_vae(ctx: DoctorContext) -> CheckResult | None:
    """The SD3.5 VAE folder: config (16 latent channels, scaling and shift factors) and weights matching it."""
    if ctx.config is None:
        return None
    from pixcell_fed.generation.loader import TRANSFORMER_WEIGHTS, TWIN_MARKER, resolve_vae_dir
    from pixcell_fed.generation.weights import VAE_SOURCE

    name = "vae"
    models = ctx.config.models
    if models.vae_dir is None and models.pixcell_dir is None:
        return CheckResult(name, "FAIL", "models.vae_dir is not set", "set models.vae_dir in site.yaml; " + VAE_SOURCE)
    folder = resolve_vae_dir(models.vae_dir, models.pixcell_dir or Path("."))
    missing = [rel for rel in ("config.json", TRANSFORMER_WEIGHTS) if not (folder / rel).is_file()]
    if missing:
        return CheckResult(name, "FAIL", f"{folder} is incomplete: missing {', '.join(missing)}", VAE_SOURCE)
    config = _read_json(folder / "config.json", "VAE config", VAE_SOURCE)
    twin = bool(config.get(TWIN_MARKER))
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        return CheckResult(name, "FAIL", f"{folder / 'config.json'} describes a {class_name}, not an AutoencoderKL", VAE_SOURCE)
    problems = _config_mismatches(config, VAE_REQUIRED)
    in_channels = (ctx.facts.get("pixcell_config") or {}).get("in_channels")
    if in_channels is not None and config.get("latent_channels") != in_channels:
        problems.append(f"latent_channels {config.get('latent_channels')!r} but PixCell's in_channels is {in_channels}")
    if problems:
        return CheckResult(name, "FAIL", f"{folder / 'config.json'} is not the SD3.5 VAE PixCell needs: " + "; ".join(problems),
                           VAE_SOURCE)
    header = read_safetensors_header(folder / TRANSFORMER_WEIGHTS, VAE_SOURCE)
    if not header.complete:
        return CheckResult(name, "FAIL", f"{header.path} is cut short ({header.file_bytes} of "
                           f"{8 + header.header_bytes + header.data_bytes} bytes)", "the copy did not finish; " + VAE_SOURCE)
    from diffusers import AutoencoderKL

    try:
        expected = _meta_shapes(lambda: AutoencoderKL.from_config(config))
    except (TypeError, ValueError) as exc:
        return CheckResult(name, "FAIL", f"{folder / 'config.json'} is not a valid AutoencoderKL config: {exc}", VAE_SOURCE)
    problems = compare_shapes(expected, header.shapes)
    if problems:
        return CheckResult(name, "FAIL", f"{header.path.name} does not match config.json: " + "; ".join(problems),
                           "the weights and the config come from different models; " + VAE_SOURCE)
    detail = (f"AutoencoderKL at {folder} (16 latent channels, scaling 1.5305, shift 0.0609; {len(header.tensors)} tensors, "
              f"{header.n_params / 1e6:.3g} M values, {_gb(header.file_bytes)})")
    if twin:
        return CheckResult(name, "WARN", f"untrained twin: {detail}; tiny random weights",
                           "for real synthesis set models.vae_dir to the SD3.5 VAE folder; " + VAE_SOURCE)
    if abs(header.n_params - VAE_PARAMS) > 0.02 * VAE_PARAMS:
        return CheckResult(name, "WARN", f"{detail}: the SD3.5 VAE has about 83.8 M parameters",
                           "check this is the SD3.5 VAE; " + VAE_SOURCE)
    return CheckResult(name, "OK", detail)


def _state_shapes(path: Path, source: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weight file: the safetensors header, or a memory-mapped ``weights_only`` state dict."""
    if path.suffix == ".safetensors":
        header = read_safetensors_header(path, source)
        if not header.complete:
            raise WeightsError(f"{path} is cut short", hint=f"the copy did not finish; {source}")
        return header.shapes
    from pixcell_fed.encoders.uni import read_state_dict

    return {k: tuple(v.shape) for k, v in read_state_dict(path, source).items()}


@register_check("encoder")
def check_encoder(ctx: DoctorContext) -> CheckResult | None:
    """The conditioning encoder: a registered name, its weight file, tensors matching its architecture, its output
    dimension equal to PixCell's conditioning width."""
    if ctx.config is None:
        return None
    from pixcell_fed.encoders.base import encoder_names
    from pixcell_fed.encoders.uni import (
        TWIN_MARKER_FILE,
        UNI_DIM,
        _weights_file,
        build_uni,
        build_uni_twin,
        uni_twin_kwargs,
    )
    from pixcell_fed.generation.weights import UNI_SOURCE

    name = "encoder"
    models = ctx.config.models
    key = "timm" if models.encoder.startswith("timm:") else models.encoder
    if key not in encoder_names():
        return CheckResult(name, "FAIL", f"unknown encoder {models.encoder!r}",
                           "set models.encoder to one of: "
                           + ", ".join(n if n != "timm" else "timm:<arch>" for n in encoder_names()))
    source = UNI_SOURCE if key != "timm" else f"put the weight file of timm model {models.encoder[5:]!r} in models.encoder_dir"
    if models.encoder_dir is None:
        return CheckResult(name, "FAIL", f"models.encoder_dir is not set (encoder {models.encoder})",
                           f"set models.encoder_dir in site.yaml; {source}")
    path = _weights_file(models.encoder_dir, models.encoder, source)
    size = path.stat().st_size
    if key == "timm":
        _state_shapes(path, source)
        return CheckResult(name, "OK", f"{models.encoder} weights {path} ({_gb(size)}; architecture checked when loaded)")
    marker = (path.parent / TWIN_MARKER_FILE)
    twin = marker.is_file()
    if key == "uni2-h-twin" and not twin:
        return CheckResult(name, "FAIL", f"{models.encoder_dir} is not a uni2-h twin folder (no {TWIN_MARKER_FILE})",
                           "set models.encoder to uni2-h for real UNI2-h weights")
    if twin:
        try:
            dim = int(json.loads(marker.read_text(encoding="utf-8"))["embed_dim"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return CheckResult(name, "FAIL", f"{marker} is damaged ({exc})", "re-create the twin with save_tiny_uni")
        expected = _meta_shapes(lambda: build_uni_twin(uni_twin_kwargs(dim)))
    else:
        dim = UNI_DIM
        expected = _meta_shapes(build_uni)
    problems = compare_shapes(expected, _state_shapes(path, source))
    if problems:
        return CheckResult(name, "FAIL", f"{path} is not UNI2-h{' (twin)' if twin else ''}: " + "; ".join(problems),
                           f"re-download pytorch_model.bin; {source}")
    wanted = (ctx.facts.get("pixcell_config") or {}).get("caption_channels")
    if wanted is not None and wanted != dim:
        return CheckResult(name, "FAIL", f"the encoder gives {dim}-dim embeddings, PixCell is conditioned on {wanted}-dim ones",
                           "use the encoder PixCell was trained with (uni2-h) and the matching PixCell folder")
    detail = f"{'UNI2-h' if not twin else 'UNI2-h architecture'} at {path} ({dim}-dim embeddings, {_gb(size)})"
    if twin:
        return CheckResult(name, "WARN", f"untrained twin: {detail}; tiny random weights",
                           "for real synthesis set models.encoder_dir to the UNI2-h folder; " + UNI_SOURCE)
    return CheckResult(name, "OK", detail)


@register_check("device")
def check_device(ctx: DoctorContext) -> CheckResult:
    """Which device and dtype ``models.device``/``models.dtype`` resolve to on this machine."""
    import torch

    from pixcell_fed.generation.weights import resolve_device, resolve_dtype

    wanted = ctx.config.models.device if ctx.config is not None else "auto"
    device = resolve_device(wanted)
    dtype = resolve_dtype(ctx.config.models.dtype if ctx.config is not None else None, device)
    dtype_name = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return CheckResult("device", "OK", f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB; "
                           f"{torch.cuda.device_count()} GPU(s)), {dtype_name}, torch {torch.__version__}")
    detail = (f"cpu ({os.cpu_count()} cores; no usable CUDA GPU), {dtype_name}, torch {torch.__version__} "
              f"(models.device: {wanted})")
    if ctx.config is not None and ctx.facts.get("pixcell_twin") is False:
        return CheckResult("device", "WARN", detail + ": real PixCell runs, but slowly, on a CPU",
                           "run synthesis on a machine with an NVIDIA GPU (check the driver with nvidia-smi) for real models")
    return CheckResult("device", "OK", detail)


@register_check("site key")
def check_site_key(ctx: DoctorContext) -> CheckResult | None:
    """The site's signing key: present, mode 0600, owned by this user, loads (with the passphrase if configured)."""
    if ctx.config is None:
        return None
    from pixcell_fed.keys import (
        check_private_key_permissions,
        fingerprint,
        load_private_key,
        load_public_key,
        passphrase_from_env,
    )

    path = ctx.config.keys.site_private_key
    if not path.is_file():
        return CheckResult("site key", "FAIL", f"site signing key not found: {path}",
                           "create the site folder and its key with 'site-agent init DIR', or set keys.site_private_key")
    check_private_key_permissions(path)
    passphrase = passphrase_from_env(ctx.config.keys.passphrase_env)
    key = load_private_key(path, passphrase=passphrase)
    public = key.public_key()
    ctx.facts["site_public_key"] = public
    protection = "passphrase-protected" if passphrase else "no passphrase"
    detail = f"{path} (mode 0600, {protection}), fingerprint {fingerprint(public)}"
    pub_path = path.with_suffix(".pub")
    if pub_path.is_file():
        from pixcell_fed.keys import public_key_raw

        if public_key_raw(load_public_key(pub_path)) != public_key_raw(public):
            return CheckResult("site key", "WARN", f"{detail}; but {pub_path} holds another key",
                               f"the trust file must list the key of {path}: replace {pub_path} with that key's "
                               "public half")
    return CheckResult("site key", "OK", detail)


@register_check("trust file")
def check_trust(ctx: DoctorContext) -> CheckResult | None:
    """The consortium trust file (when given): valid, lists this site with this site's key and an officer key."""
    if ctx.trust_path is None:
        return None
    from pixcell_fed.bundle.trust import load_trust
    from pixcell_fed.keys import public_key_raw

    trust = load_trust(ctx.trust_path)
    detail = f"{ctx.trust_path}: {len(trust.sites)} site(s)"
    if ctx.config is None:
        return CheckResult("trust file", "OK", detail)
    name = ctx.config.site.name
    entry = trust.site(name)
    if entry is None:
        return CheckResult("trust file", "FAIL", f"{detail}, none named {name!r}",
                           f"send the consortium this site's name ({name}) and public key (keys/*.pub) for the trust file")
    public = ctx.facts.get("site_public_key")
    if public is not None and public_key_raw(entry.signing_key) != public_key_raw(public):
        return CheckResult("trust file", "FAIL", f"{detail}: the signing key listed for {name} is not this site's key",
                           "send the consortium this site's current public key (keys/*.pub) to replace the listed one")
    return CheckResult("trust file", "OK",
                       f"{detail}; {name} listed with this site's key and {len(entry.officers)} officer key(s)")


@register_check("federation files")
def check_federation(ctx: DoctorContext) -> CheckResult | None:
    """The TLS root certificate and the SuperNode authentication key, when configured."""
    if ctx.config is None:
        return None
    from pixcell_fed.keys import check_private_key_permissions

    fed = ctx.config.federation
    if fed.root_certificates is None and fed.auth_private_key is None:
        return None
    problems, fixes, found = [], [], []
    if fed.root_certificates is not None:
        if fed.root_certificates.is_file():
            found.append(f"root certificate {fed.root_certificates}")
        else:
            problems.append(f"root certificate not found: {fed.root_certificates}")
            fixes.append("copy the consortium's CA certificate there or fix federation.root_certificates")
    if fed.auth_private_key is not None:
        if fed.auth_private_key.is_file():
            try:
                check_private_key_permissions(fed.auth_private_key)
                found.append(f"authentication key {fed.auth_private_key}")
            except PixcellFedError as exc:
                problems.append(exc.message)
                fixes.append(exc.hint or "")
        else:
            problems.append(f"authentication key not found: {fed.auth_private_key}")
            fixes.append("put the site's registered EC key there or fix federation.auth_private_key")
    if problems:
        return CheckResult("federation files", "FAIL", "; ".join(problems), "; ".join(fixes))
    return CheckResult("federation files", "OK", ", ".join(found))


@register_check("lock")
def check_lock(ctx: DoctorContext) -> CheckResult:
    """The installed packages against the hashed lock shipped with the release (pixcell_fed/install_check.py)."""
    from pixcell_fed.install_check import check_installed_against_lock, describe_differences

    comparison = check_installed_against_lock("site")
    install = "pip install --require-hashes -r requirements/site.lock (docs/install.md)"
    if comparison is None:
        return CheckResult("lock", "WARN", "this installation carries no lock (pixcell_fed/locks/site.lock)",
                           "install pixcell-fed from its release folder: " + install)
    if not comparison.ok:
        return CheckResult("lock", "WARN", f"{len(comparison.differences)} of {comparison.n_pins} packages differ from "
                           f"{comparison.lock_name}, which this release was tested with: "
                           + describe_differences(comparison),
                           "to run what was tested: " + install + "; other versions are untested, not known to fail")
    return CheckResult("lock", "OK", f"all {comparison.n_pins} packages as pinned in {comparison.lock_name}")
