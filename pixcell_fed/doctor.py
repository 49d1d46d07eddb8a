"""``site-agent doctor``: check that this machine and a site's set-up can run the pipeline, and say how to fix it.

Each check is a small function registered in :data:`CHECKS` (in the order they run, :data:`CHECK_ORDER`) that
returns a :class:`CheckResult` (``OK``, ``WARN`` or ``FAIL`` with one line of detail and one line of fix), or
``None`` when it does not apply (e.g. the trust file when none is given). The model checks wrap each loader's own
``check_folder`` (PixCell, the SD3.5 VAE, the encoders), the very check the loader runs before it reads any
weight: configs against the published ones, tensor names and shapes from the file headers against the architecture
built on the meta device; weights are never loaded. A check that breaks reports FAIL and the next check still runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pixcell_fed.errors import ExitCode, PixcellFedError
from pixcell_fed.registry import Registry
from pixcell_fed.weights import format_bytes

if TYPE_CHECKING:
    from pixcell_fed.config import SiteConfig

Status = Literal["OK", "WARN", "FAIL"]
STATUSES: tuple[Status, ...] = ("OK", "WARN", "FAIL")

#: Free space (GB) under which the work-folder check warns.
DEFAULT_MIN_FREE_GB = 20.0

REQUIRED_DISTRIBUTIONS = (
    "torch",
    "diffusers",
    "timm",
    "safetensors",
    "cryptography",
    "pyyaml",
    "pandas",
    "pyarrow",
    "openslide-python",
    "flwr",
)


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

    config: SiteConfig | None = None
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
        return {
            "ok": self.ok,
            "summary": {s: self.count(s) for s in STATUSES},
            "checks": [r.to_dict() for r in self.results],
        }

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
    ctx = DoctorContext(
        config=cfg,
        config_path=Path(config_path) if config_path is not None else None,
        trust_path=Path(trust_path) if trust_path is not None else None,
        min_free_gb=min_free_gb,
    )
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
        return CheckResult(
            name,
            "FAIL",
            f"the check itself failed: {type(exc).__name__}: {exc}",
            "rerun with -v and report this as a bug in pixcell-fed if the cause is not clear",
        )


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
        return CheckResult(
            "python",
            "FAIL",
            f"Python {py}, pixcell-fed {__version__}; not installed: {', '.join(missing)}",
            "reinstall the package with its dependencies: pip install -e . (from the pixcell-fed folder)",
        )
    return CheckResult("python", "OK", f"Python {py}, pixcell-fed {__version__}; " + ", ".join(found[:3]))


@register_check("openslide")
def check_openslide(ctx: DoctorContext) -> CheckResult:
    """The OpenSlide library loads (the slides themselves are not opened)."""
    try:
        import openslide
    except (ImportError, OSError) as exc:
        return CheckResult(
            "openslide",
            "FAIL",
            f"OpenSlide cannot be loaded: {exc}",
            "pip install openslide-python openslide-bin (or install the system library: apt install libopenslide0)",
        )
    lib = getattr(openslide, "__library_version__", "unknown")
    return CheckResult("openslide", "OK", f"OpenSlide library {lib} (openslide-python {openslide.__version__})")


@register_check("config")
def check_config(ctx: DoctorContext) -> CheckResult:
    """Whether a site config was given (it was loaded and validated before the checks ran)."""
    if ctx.config is None:
        return CheckResult(
            "config",
            "WARN",
            "no site config given: only this machine was checked",
            "run 'site-agent doctor --config site.yaml' to check the site's folders, models and keys",
        )
    return CheckResult("config", "OK", f"{ctx.config_path} is valid (site {ctx.config.site.name})")


@register_check("slides")
def check_slides(ctx: DoctorContext) -> CheckResult | None:
    """The slides folder exists and holds candidate slide files (they are not opened)."""
    if ctx.config is None:
        return None
    from pixcell_fed.slides.reader import list_slide_files

    folder = ctx.config.site.slides_dir
    if not folder.is_dir():
        return CheckResult(
            "slides",
            "FAIL",
            f"slides folder not found: {folder}",
            f"create {folder} and copy the whole-slide images into it, or set site.slides_dir",
        )
    files = list_slide_files(folder)
    if not files:
        return CheckResult(
            "slides",
            "WARN",
            f"the slides folder {folder} holds no slide files yet",
            f"copy the whole-slide images (any format OpenSlide reads) into {folder}",
        )
    return CheckResult("slides", "OK", f"{len(files)} slide file(s) in {folder}")


@register_check("slide table")
def check_slide_table(ctx: DoctorContext) -> CheckResult | None:
    """The slide table (``site.labels_csv``) as synthesize reads it: it loads, a patient split (``split.unit:
    patient``, the default) has its patient column, and every slide of the slides folder has its row."""
    if ctx.config is None:
        return None
    from pixcell_fed.errors import ConfigError
    from pixcell_fed.pipeline.labels import check_labels_cover, load_slide_table
    from pixcell_fed.pipeline.split import check_split_unit
    from pixcell_fed.slides.reader import list_slide_files

    name, site, unit = "slide table", ctx.config.site, ctx.config.split.unit
    slides = [p.name for p in list_slide_files(site.slides_dir)] if site.slides_dir.is_dir() else []
    try:  # the pipeline's own loader and checks, so that the doctor refuses with synthesize's words
        table = load_slide_table(site.labels_csv)
        check_split_unit(ctx.config.split, table, site.labels_csv)
        check_labels_cover(table.labels, slides, site.labels_csv)
        if unit == "patient":
            check_labels_cover(table.patients, slides, site.labels_csv, what="patient")
    except ConfigError as exc:
        return CheckResult(name, "FAIL", f"site-agent synthesize would refuse (exit 2): {exc.message}", exc.hint or "")
    if unit == "slide":
        return CheckResult(
            name,
            "OK",
            f"split.unit: slide, chosen in site.yaml: T and H are split by slide and the "
            f"audit report says so ({len(table.labels)} labelled slide(s))",
        )
    return CheckResult(
        name,
        "OK",
        f"{site.labels_csv}: {len(set(table.patients.values()))} patient(s) for "
        f"{len(table.patients)} slide(s), {len(table.labels)} labelled; T and H split by patient",
    )


@register_check("work folder")
def check_work_folder(ctx: DoctorContext) -> CheckResult:
    """The work folder (or the current folder without a config) is writable and has free space."""
    folder = ctx.config.site.work_dir if ctx.config is not None else Path.cwd()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return CheckResult(
            "work folder",
            "FAIL",
            f"{probe} is not writable by this user",
            f"give this user write access to {probe}, or set site.work_dir to a writable folder",
        )
    free = shutil.disk_usage(probe).free
    where = f"{folder}" + ("" if probe == folder else f" (to be created; {probe} exists)")
    detail = f"{where}: {format_bytes(free)} free"
    if free < ctx.min_free_gb * 1e9:
        return CheckResult(
            "work folder",
            "WARN",
            f"{detail}, under the {ctx.min_free_gb:g} GB threshold",
            "free space on that disk or set site.work_dir to a larger one (threshold: --min-free-gb)",
        )
    return CheckResult("work folder", "OK", detail)


def _untrained_twin(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "WARN", f"untrained twin: {detail}; tiny random weights, outputs are noise", fix)


@register_check("pixcell model")
def check_pixcell(ctx: DoctorContext) -> CheckResult | None:
    """The PixCell folder (the loader's own check) and that its variant fits the configured tile size."""
    if ctx.config is None:
        return None
    from pixcell_fed.generation.loader import check_folder, check_tile_size_fits_model
    from pixcell_fed.generation.published import PIXCELL_SOURCE

    name = "pixcell model"
    if ctx.config.models.pixcell_dir is None:
        return CheckResult(
            name,
            "FAIL",
            "models.pixcell_dir is not set",
            "set models.pixcell_dir in site.yaml to the local PixCell-256 or PixCell-1024 folder; " + PIXCELL_SOURCE,
        )
    found = check_folder(ctx.config.models.pixcell_dir)
    ctx.facts["pixcell"] = found
    check_tile_size_fits_model(ctx.config.tiling.tile_size, found.variant)
    if found.twin:
        return _untrained_twin(
            name,
            found.describe(),
            "for real synthesis set models.pixcell_dir to a downloaded PixCell folder; " + PIXCELL_SOURCE,
        )
    return CheckResult(name, "OK", f"{found.describe()}, published architecture")


@register_check("vae")
def check_vae(ctx: DoctorContext) -> CheckResult | None:
    """The SD3.5 VAE folder (the loader's own check), with PixCell's latent channels when its folder passed."""
    if ctx.config is None:
        return None
    from pixcell_fed.generation.published import VAE_SOURCE
    from pixcell_fed.generation.vae import check_folder, resolve_vae_dir

    name = "vae"
    models = ctx.config.models
    if models.vae_dir is None and models.pixcell_dir is None:
        return CheckResult(name, "FAIL", "models.vae_dir is not set", "set models.vae_dir in site.yaml; " + VAE_SOURCE)
    pixcell = ctx.facts.get("pixcell")
    found = check_folder(
        resolve_vae_dir(models.vae_dir, models.pixcell_dir or Path(".")),
        latent_channels=pixcell.config["in_channels"] if pixcell is not None else None,
    )
    if found.twin:
        return _untrained_twin(
            name, found.describe(), "for real synthesis set models.vae_dir to the SD3.5 VAE folder; " + VAE_SOURCE
        )
    if not found.published_size:
        return CheckResult(
            name,
            "WARN",
            f"{found.describe()}: the SD3.5 VAE has about 83.8 M parameters",
            "check this is the SD3.5 VAE; " + VAE_SOURCE,
        )
    return CheckResult(name, "OK", found.describe())


@register_check("encoder")
def check_encoder(ctx: DoctorContext) -> CheckResult | None:
    """The conditioning encoder (its registry entry's own check) and that its output dimension is PixCell's
    conditioning width."""
    if ctx.config is None:
        return None
    from pixcell_fed.encoders import check_folder
    from pixcell_fed.encoders.uni import UNI_SOURCE

    name = "encoder"
    models = ctx.config.models
    if models.encoder_dir is None:
        return CheckResult(
            name,
            "FAIL",
            f"models.encoder_dir is not set (encoder {models.encoder})",
            f"set models.encoder_dir in site.yaml to the folder of its weights; {UNI_SOURCE}",
        )
    found = check_folder(models.encoder, models.encoder_dir)
    pixcell = ctx.facts.get("pixcell")
    wanted = pixcell.config["caption_channels"] if pixcell is not None else None
    if wanted is not None and wanted != found.dim:
        return CheckResult(
            name,
            "FAIL",
            f"the encoder gives {found.dim}-dim embeddings, PixCell is conditioned on {wanted}-dim ones",
            "use the encoder PixCell was trained with (uni2-h) and the matching PixCell folder",
        )
    if found.twin:
        return _untrained_twin(
            name, found.describe(), "for real synthesis set models.encoder_dir to the UNI2-h folder; " + UNI_SOURCE
        )
    return CheckResult(name, "OK", found.describe())


@register_check("device")
def check_device(ctx: DoctorContext) -> CheckResult:
    """Which device and dtype ``models.device``/``models.dtype`` resolve to on this machine."""
    import torch

    from pixcell_fed.devices import dtype_name, resolve_device, resolve_dtype

    wanted = ctx.config.models.device if ctx.config is not None else "auto"
    device = resolve_device(wanted)
    dtype = resolve_dtype(ctx.config.models.dtype if ctx.config is not None else None, device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return CheckResult(
            "device",
            "OK",
            f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB; "
            f"{torch.cuda.device_count()} GPU(s)), {dtype_name(dtype)}, torch {torch.__version__}",
        )
    detail = (
        f"cpu ({os.cpu_count()} cores; no usable CUDA GPU), {dtype_name(dtype)}, torch {torch.__version__} "
        f"(models.device: {wanted})"
    )
    pixcell = ctx.facts.get("pixcell")
    if pixcell is not None and not pixcell.twin:
        return CheckResult(
            "device",
            "WARN",
            detail + ": real PixCell runs, but slowly, on a CPU",
            "run synthesis on a machine with an NVIDIA GPU (check the driver with nvidia-smi) for real models",
        )
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
        return CheckResult(
            "site key",
            "FAIL",
            f"site signing key not found: {path}",
            "create the site folder and its key with 'site-agent init DIR', or set keys.site_private_key",
        )
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
            return CheckResult(
                "site key",
                "WARN",
                f"{detail}; but {pub_path} holds another key",
                f"the trust file must list the key of {path}: replace {pub_path} with that key's public half",
            )
    return CheckResult("site key", "OK", detail)


@register_check("officers")
def check_officers(ctx: DoctorContext) -> CheckResult | None:
    """The privacy officers site.yaml lists (``keys.officers``): the only keys the approve gate and the privacy
    ledger reset accept."""
    if ctx.config is None:
        return None
    from pixcell_fed.bundle.approval import SiteAuthority
    from pixcell_fed.keys import fingerprint, public_key_raw

    officers = SiteAuthority.from_config(ctx.config).officers
    if not officers:
        return CheckResult(
            "officers",
            "WARN",
            "keys.officers in site.yaml lists no privacy officer: every approval "
            "(and privacy ledger reset) will be refused, so no bundle can leave the site",
            "the privacy officer runs 'site-agent officer-key --out DIR' on a machine of their own; "
            "add the line it prints ('- ed25519:...') under keys.officers in site.yaml",
        )
    public = ctx.facts.get("site_public_key")
    if public is not None and public_key_raw(public) in {public_key_raw(k) for k in officers}:
        return CheckResult(
            "officers",
            "WARN",
            "keys.officers lists the site's own signing key, which may never approve",
            "remove it from keys.officers; officers decide with keys of their own ('site-agent officer-key')",
        )
    return CheckResult(
        "officers", "OK", f"{len(officers)} privacy officer key(s): " + ", ".join(fingerprint(k) for k in officers)
    )


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
        return CheckResult(
            "trust file",
            "FAIL",
            f"{detail}, none named {name!r}",
            f"send the consortium this site's name ({name}) and public key (keys/*.pub) for the trust file",
        )
    public = ctx.facts.get("site_public_key")
    if public is not None and public_key_raw(entry.signing_key) != public_key_raw(public):
        return CheckResult(
            "trust file",
            "FAIL",
            f"{detail}: the signing key listed for {name} is not this site's key",
            "send the consortium this site's current public key (keys/*.pub) to replace the listed one",
        )
    return CheckResult(
        "trust file", "OK", f"{detail}; {name} listed with this site's key and {len(entry.officers)} officer key(s)"
    )


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
        return CheckResult(
            "lock",
            "WARN",
            "this installation carries no lock (pixcell_fed/locks/site.lock)",
            "install pixcell-fed from its release folder: " + install,
        )
    if not comparison.ok:
        return CheckResult(
            "lock",
            "WARN",
            f"{len(comparison.differences)} of {comparison.n_pins} packages differ from "
            f"{comparison.lock_name}, which this release was tested with: " + describe_differences(comparison),
            "to run what was tested: " + install + "; other versions are untested, not known to fail",
        )
    return CheckResult("lock", "OK", f"all {comparison.n_pins} packages as pinned in {comparison.lock_name}")
