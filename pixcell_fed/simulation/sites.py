"""Simulated hospital sites for the tests and the demo consortium: slides from real H&E, twins, keys, labels.

A simulated site is made with the same code a real site uses (``site-agent init``'s library function, a normal
``site.yaml``); only its slides (written from the real CMU slide with a site-specific stain) and its models (tiny
untrained twins) differ from a real deployment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcell_fed.simulation.slide_writer import StainVariation

__all__ = ["SlideSpec", "TwinModels", "make_site", "write_local_training_set", "write_twin_models"]


@dataclass(frozen=True)
class TwinModels:
    """Folders of the tiny untrained twins, in the published layouts."""

    pixcell_dir: Path
    vae_dir: Path
    encoder_dir: Path
    encoder: str = "uni2-h-twin"


def write_twin_models(folder: str | Path, *, pixcell_variant: int = 256) -> TwinModels:
    """Write (or reuse) the tiny PixCell-256 (or -1024), VAE and UNI2-h twins under ``folder``.

    The PixCell-1024 twin generates full 1024 px tiles (latent 128), as the published model does.
    """
    from pixcell_fed.simulation.twins import save_tiny_pixcell, save_tiny_uni, save_tiny_vae

    folder = Path(folder)
    models = TwinModels(folder / f"pixcell-{pixcell_variant}-twin", folder / "sd35-vae-twin", folder / "uni2-h-twin")
    if not (models.pixcell_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        save_tiny_pixcell(
            models.pixcell_dir, variant=pixcell_variant, sample_size=128 if pixcell_variant == 1024 else None
        )
    if not (models.vae_dir / "diffusion_pytorch_model.safetensors").is_file():
        save_tiny_vae(models.vae_dir)
    if not any(models.encoder_dir.glob("pytorch_model.bin")):
        save_tiny_uni(models.encoder_dir)
    return models


@dataclass(frozen=True)
class SlideSpec:
    """One simulated slide: its file name, label, stain and the identifiers a real slide would carry."""

    file_name: str
    label: str | None = None
    seed: int = 0
    size: tuple[int, int] = (2048, 1536)
    mpp: float = 0.5
    description_fields: Mapping[str, str] | None = None
    label_text: str = "S-00-0000"
    macro_text: str | None = None


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def make_site(
    folder: str | Path,
    *,
    name: str,
    models: TwinModels,
    slides: Sequence[SlideSpec],
    stain: StainVariation | None = None,
    config: Mapping[str, Any] | None = None,
    source: str | Path | None = None,
) -> Path:
    """Create a site folder (keys and config as ``site-agent init`` makes them) with slides; return site.yaml.

    Slides are Aperio-like SVS files whose tissue is real H&E from the CMU slide (``source``, default: the cached
    copy), in this site's ``stain``. ``config`` overrides keys of the generated site.yaml (nested mapping of sections).
    """
    import yaml

    from pixcell_fed.simulation.slide_writer import Identifiers, he_canvas, write_aperio_like
    from pixcell_fed.site_init import init_site

    folder = Path(folder)
    site_yaml = folder / "site.yaml"
    if not site_yaml.is_file():
        init_site(folder, name=name)
    slides_dir = folder / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    for spec in slides:
        path = slides_dir / spec.file_name
        if not path.is_file():
            pixels = he_canvas(spec.size, spec.mpp, seed=spec.seed, stain=stain, full=True, source=source)
            write_aperio_like(
                path,
                pixels=pixels,
                mpp=spec.mpp,
                app_mag=int(round(10 / spec.mpp)),
                identifiers=Identifiers(spec.description_fields, spec.label_text, spec.macro_text),
            )
    labels = {s.file_name: s.label for s in slides if s.label is not None}
    settings: dict[str, Any] = {
        "site": {"name": name, "slides_dir": "slides", "work_dir": "work"},
        "models": {
            "pixcell_dir": str(models.pixcell_dir),
            "vae_dir": str(models.vae_dir),
            "encoder": models.encoder,
            "encoder_dir": str(models.encoder_dir),
            "device": "cpu",
        },
        # every simulated slide is cut from the same real slide, so there are no patients to hold out
        "split": {"unit": "slide"},
    }
    if labels:
        (folder / "labels.csv").write_text("slide,label\n" + "".join(f"{k},{v}\n" for k, v in sorted(labels.items())))
        settings["site"]["labels_csv"] = "labels.csv"
    data = yaml.safe_load(site_yaml.read_text()) or {}
    _merge(data, settings)
    _merge(data, dict(config or {}))
    site_yaml.write_text(
        "# generated by pixcell_fed.simulation.sites (simulated site with untrained twin models)\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return site_yaml


def write_local_training_set(run_dir: str | Path, labels_csv: str | Path, folder: str | Path) -> Path:
    """A simulated site's labelled real training tiles for local fine-tunes (``federation.train_dir``): the
    quality-passed tiles of a synthesize run's conditioning slides, as ``folder/<label>/<tile>.png`` (hard links).

    A real site brings its own labelled tiles; this stands in for them. The run's held-out slides (its ``eval/``
    folder, where fine-tuned models are evaluated) are left out, so training and held-out tiles never meet.
    """
    import json

    import pandas as pd

    from pixcell_fed.pipeline.labelled_tiles import link_tiles_by_label
    from pixcell_fed.pipeline.labels import load_slide_labels
    from pixcell_fed.pipeline.run_layout import RunLayout

    layout = RunLayout(Path(run_dir))
    conditioning = set(json.loads(layout.split_file.read_text())["conditioning"])
    labels = load_slide_labels(labels_csv)
    tiles = pd.read_parquet(layout.tiles_table)
    tiles = tiles[tiles["slide_key"].isin(conditioning) & (tiles["qc"] == "pass") & tiles["slide_file"].isin(labels)]
    return link_tiles_by_label(layout.tiles_dir, tiles["tile_file"], tiles["slide_file"], labels, Path(folder))
