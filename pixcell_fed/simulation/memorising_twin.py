"""The memorising twin: a tiny PixCell twin that memorised its site's tiles and hands back copies of them.

Demo and test material that shows the audit stopping a leaking generator. A memorising twin folder is a tiny
PixCell-256 twin in the published layout (the same
:class:`~pixcell_fed.generation.transformer.PixCellTransformer2DModel` weights, scheduler and VAE as the untrained
twin, checked and loaded by :func:`pixcell_fed.generation.load_pixcell`)
plus ``memory/memorised_tiles.safetensors``: every tissue tile of the site's slides (uint8) with its embedding by
the site's conditioning encoder, which is what a generator that memorised its training set carries in its weights.
Its ``model_index.json`` names the pipeline ``memorising-twin`` (:data:`~pixcell_fed.generation.loader.PIPELINE_KEY`).

:class:`MemorisingTwinPipeline` samples like the untrained twin, then looks up the memorised tile nearest each
conditioning embedding (its source tile) and returns a copy of it instead: rotated, flipped, re-compressed or
colour-jittered whole, or half of it or a quarter of it pasted into the twin's own new tile (:data:`COPY_KINDS`,
chosen by each tile's seed). Its identity says "memorising twin", so the audit report, the shareable summary and
whatever the consortium is told name it.

It cannot be selected by accident: the loader refuses a folder that names a pipeline unless the folder is a twin
and the pipeline is registered, and only :func:`register_pipeline` registers this one, which ``site-agent`` never
calls. The demo runs the leaking site's ``site-agent`` through :mod:`pixcell_fed.demo.leaking_site`, which does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcell_fed.errors import WeightsError
from pixcell_fed.generation.sampler import DEFAULT_STEPS, PixCellPipeline
from pixcell_fed.runlog import get_logger
from pixcell_fed.simulation.slide_writer import StainVariation, perturb_stain

if TYPE_CHECKING:
    from pixcell_fed.generation.loader import PixCellFolder

log = get_logger(__name__)

__all__ = [
    "COPY_KINDS",
    "LABEL",
    "MEMORY_FILE",
    "PIPELINE_NAME",
    "MemorisingTwinPipeline",
    "memorised_copy",
    "register_pipeline",
    "save_memorising_twin",
    "write_memorising_twin",
]

#: The pipeline name a memorising twin folder gives in its model_index.json.
PIPELINE_NAME = "memorising-twin"
#: What every output calls this generator (the identity's ``label``).
LABEL = "memorising twin"
#: The memory, relative to the folder: ``keys`` float32 [N, D] (conditioning embeddings), ``tiles`` uint8 [N, S, S, 3].
MEMORY_FILE = "memory/memorised_tiles.safetensors"
#: What a synthetic tile is, by kind: a whole-tile copy under a transform, or a region of the source in a new tile.
COPY_KINDS = ("rotated", "flipped", "re-compressed", "colour-jittered", "half tile", "quadrant")
_SOURCE = (
    "a memorising twin is demo material: rebuild it with pixcell_fed.simulation.memorising_twin.save_memorising_twin"
)


def memorised_copy(tile: np.ndarray, fresh: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """A copy of the memorised ``tile`` of the kind ``seed`` picks, and that kind; region kinds paste into ``fresh``."""
    import cv2

    rng = np.random.default_rng(seed)
    kind = COPY_KINDS[int(rng.integers(len(COPY_KINDS)))]
    if kind == "rotated":
        out = np.rot90(tile, int(rng.integers(1, 4)))
    elif kind == "flipped":
        out = np.rot90(tile[:, ::-1] if rng.random() < 0.5 else tile[::-1], int(rng.integers(0, 4)))
    elif kind == "re-compressed":
        quality = int(rng.integers(35, 76))
        _, buffer = cv2.imencode(".jpg", np.ascontiguousarray(tile[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValueError("OpenCV could not decode the JPEG it just encoded")
        out = decoded[..., ::-1]
    elif kind == "colour-jittered":
        stain = StainVariation(
            hematoxylin=rng.uniform(0.75, 1.3), eosin=rng.uniform(0.75, 1.3), bias=rng.uniform(-0.03, 0.03)
        )
        out = np.clip(perturb_stain(tile, stain) * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
    else:
        out = fresh.copy()
        h, w = tile.shape[:2]
        if kind == "half tile":  # one half of the source, in place
            side = int(rng.integers(4))
            region = (
                (slice(None), slice(0, w // 2))
                if side == 0
                else (slice(None), slice(w // 2, w))
                if side == 1
                else (slice(0, h // 2), slice(None))
                if side == 2
                else (slice(h // 2, h), slice(None))
            )
            out[region] = tile[region]
        else:  # a quarter of the source, moved to any quadrant
            (sy, sx), (ty, tx) = (divmod(int(rng.integers(4)), 2) for _ in range(2))
            qh, qw = h // 2, w // 2
            out[ty * qh : (ty + 1) * qh, tx * qw : (tx + 1) * qw] = tile[
                sy * qh : (sy + 1) * qh, sx * qw : (sx + 1) * qw
            ]
    return np.ascontiguousarray(out, dtype=np.uint8), kind


class MemorisingTwinPipeline(PixCellPipeline):
    """A tiny PixCell twin that returns copies of the memorised tiles nearest its conditioning (see the module)."""

    def __init__(self, *parts: Any, keys: np.ndarray, tiles: np.ndarray, memory_file: Path, **kwargs: Any) -> None:
        super().__init__(*parts, **kwargs)
        if not self.twin:
            raise WeightsError("a memorising twin must be built from twin parts", hint=_SOURCE)
        if (
            self.variant != 256
            or keys.shape[1:] != (self.cond_dim,)
            or tiles.shape[1:] != (self.image_size,) * 2 + (3,)
        ):
            raise WeightsError(
                f"{memory_file} holds keys {keys.shape} and tiles {tiles.shape}, which do not fit a "
                f"{self.name} of {self.image_size} px tiles conditioned on {self.cond_dim} dimensions",
                hint=_SOURCE,
            )
        norms = np.linalg.norm(keys, axis=1, keepdims=True)
        self.keys = keys / np.maximum(norms, 1e-12)
        self.tiles = tiles
        self.memory_file = memory_file

    @classmethod
    def from_folder(cls, checked: PixCellFolder, *parts: Any, **kwargs: Any) -> MemorisingTwinPipeline:
        """The loader's factory: the twin parts it loaded, and the memory read from the checked folder."""
        from safetensors.numpy import load_file

        from pixcell_fed.weights import read_complete_header

        path = checked.folder / MEMORY_FILE
        if not path.is_file():
            raise WeightsError(
                f"{checked.folder} names the {PIPELINE_NAME} pipeline but has no {MEMORY_FILE}", hint=_SOURCE
            )
        header = read_complete_header(path, _SOURCE)
        expected = {"keys": "F32", "tiles": "U8"}
        if {k: dtype for k, (dtype, _) in header.tensors.items()} != expected:
            raise WeightsError(f"{path} must hold exactly {expected}, not {dict(header.tensors)}", hint=_SOURCE)
        memory = load_file(str(path))
        keys, tiles = memory["keys"], memory["tiles"]
        if keys.ndim != 2 or tiles.ndim != 4 or len(keys) != len(tiles) or not len(keys):
            raise WeightsError(f"{path}: keys {keys.shape} and tiles {tiles.shape} do not pair up", hint=_SOURCE)
        pipeline = cls(*parts, keys=keys, tiles=tiles, memory_file=path, **kwargs)
        log.warning(
            "loaded a MEMORISING TWIN (demo material): %d memorised tiles of its site in %s; every tile it "
            "makes is a copy or a region copy of one of them",
            len(tiles),
            path,
        )
        return pipeline

    @property
    def name(self) -> str:
        return f"PixCell-{self.variant} ({LABEL})"

    @property
    def identity(self) -> dict[str, Any]:
        from pixcell_fed.weights import sha256_file

        return {
            **super().identity,
            "model": f"PixCell-{self.variant} {LABEL}",
            "label": LABEL,
            "memory_sha256": sha256_file(self.memory_file),
        }

    def recall(self, cond: np.ndarray) -> np.ndarray:
        """Index of the memorised tile whose key is nearest (cosine) each conditioning row ``[B, 1, D]``."""
        rows = np.asarray(cond, dtype=np.float32).reshape(len(cond), -1)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return np.argmax(rows @ self.keys.T, axis=1)

    def generate(
        self,
        cond: Any,
        *,
        seeds: Sequence[int],
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """The untrained twin's tiles, each replaced by (or pasted with) a copy of its source tile."""
        cond_t, seeds, steps, guidance = self.validate(cond, seeds, steps, guidance)
        fresh = super().generate(
            cond_t, seeds=seeds, steps=steps, guidance=guidance, batch_size=batch_size, show_progress=show_progress
        )
        sources = self.recall(cond_t.numpy())
        return np.stack(
            [memorised_copy(self.tiles[k], image, seed)[0] for k, image, seed in zip(sources, fresh, seeds)]
        )


def register_pipeline() -> None:
    """Let :func:`~pixcell_fed.generation.load_pixcell` load memorising twin folders in this process (idempotent)."""
    from pixcell_fed.generation.loader import PIPELINES

    if PIPELINE_NAME not in PIPELINES:
        PIPELINES.register(PIPELINE_NAME, MemorisingTwinPipeline.from_folder)


def write_memorising_twin(model: str | Path, tiles: np.ndarray, keys: np.ndarray, *, seed: int = 0) -> Path:
    """Write a memorising twin folder ``model`` that memorised ``tiles`` (uint8 [N, 256, 256, 3]) under ``keys``
    (their conditioning embeddings, float32 [N, D]); returns ``model``. The memory file is written last."""
    from safetensors.numpy import save_file

    from pixcell_fed.atomic import write_text_atomic
    from pixcell_fed.generation.loader import PIPELINE_KEY
    from pixcell_fed.simulation.twins import save_tiny_pixcell

    model = Path(model)
    save_tiny_pixcell(model, seed=seed)
    index = json.loads((model / "model_index.json").read_text())
    write_text_atomic(model / "model_index.json", json.dumps({**index, PIPELINE_KEY: PIPELINE_NAME}, indent=2) + "\n")
    (model / MEMORY_FILE).parent.mkdir(parents=True, exist_ok=True)
    partial = model / (MEMORY_FILE + ".partial")
    save_file(
        {"keys": np.ascontiguousarray(keys, dtype=np.float32), "tiles": np.ascontiguousarray(tiles, dtype=np.uint8)},
        str(partial),
    )
    partial.replace(model / MEMORY_FILE)
    return model


def save_memorising_twin(folder: str | Path, site_config: str | Path, *, seed: int = 0) -> Path:
    """Write (or reuse) a memorising twin under ``folder`` that memorised every tissue tile of a site's slides.

    The site's own ``site.yaml`` says where its slides are, how they are tiled and which encoder conditions its
    generator: the tiles are cut with the site's tiling (``folder/training-tiles``, the site's own data: it stays
    at the site) and keyed by that encoder's embeddings. Returns the model folder to set as ``models.pixcell_dir``.
    """
    import pandas as pd

    from pixcell_fed.audit.copy_features import read_tile
    from pixcell_fed.config import load_site_config
    from pixcell_fed.encoders import embed_tiles, load_encoder
    from pixcell_fed.slides.folder_job import tile_folder

    folder = Path(folder)
    model = folder / "model"
    if (model / MEMORY_FILE).is_file():
        return model
    cfg = load_site_config(site_config)
    training = folder / "training-tiles"
    tiled = tile_folder(cfg.site.slides_dir, training, cfg.tiling)
    table = pd.read_parquet(tiled.table_path)
    paths = [training / f for f in table.loc[table["qc"] == "pass", "tile_file"]]
    if not paths:
        raise WeightsError(f"no tissue tiles in {cfg.site.slides_dir} to memorise", hint="give the site slides first")
    encoder = load_encoder(cfg.models.encoder, cfg.models.encoder_dir, device=cfg.models.device)
    keys = embed_tiles(encoder, paths, folder / "embeddings", show_progress=False)
    write_memorising_twin(model, np.stack([read_tile(p) for p in paths]), keys, seed=seed)
    log.info("memorising twin: %d tiles of %s memorised in %s", len(paths), cfg.site.name, model)
    return model
