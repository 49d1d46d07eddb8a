"""The audit's feature computations on whole sets: descriptors with their group variants, searches, pixel
confirmation of candidates, and optional encoder spaces (fidelity)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.audit import copy_features, pixel_confirm
from pixcell_fed.audit.search import TopK, topk_cosine


@dataclass
class TileSet:
    """Grayscale thumbnails, descriptors and (for real sets) crop-variant descriptors of one role's tiles, and the
    working images of region-level copy detection when asked for."""

    paths: tuple[Path, ...]
    thumbs: np.ndarray
    desc: np.ndarray
    crops: np.ndarray  # (10, N, D): the tile and its nine 90 % crops resized back
    work: np.ndarray | None = None  # (N, side, side) uint8, see pixcell_fed.audit.keypoints.work_image

    @classmethod
    def from_files(cls, paths: Sequence[Path], role: str, *, work_side: int | None = None) -> TileSet:
        thumbs, desc, work = copy_features.describe_files(
            list(paths), desc=f"describing {role} tiles", work_side=work_side
        )
        return cls(tuple(paths), thumbs, desc, copy_features.crop_variants(thumbs), work)

    def subset(self, rows: np.ndarray) -> TileSet:
        rows = np.asarray(rows, dtype=np.int64)
        return TileSet(
            tuple(self.paths[i] for i in rows),
            self.thumbs[rows],
            self.desc[rows],
            self.crops[:, rows],
            None if self.work is None else self.work[rows],
        )

    def work_images(self) -> np.ndarray:
        """The working images of region-level copy detection (the set must be described with ``work_side``)."""
        if self.work is None:
            raise ValueError("this tile set was described without working images (from_files(work_side=...))")
        return self.work

    def __len__(self) -> int:
        return len(self.paths)


def search_real(queries: TileSet, keys: TileSet, k: int, *, device: str, exclude_self: bool = False) -> TopK:
    """Top-k of each query tile among real key tiles: max over the query's 8 rotations/flips and the key's crops."""
    return topk_cosine(
        copy_features.dihedral_variants(queries.desc),
        keys.crops,
        k,
        normalize=False,
        exclude_self=exclude_self,
        device=device,
    )


def search_from_real(reals: TileSet, synthetic_desc: np.ndarray, k: int, *, device: str) -> TopK:
    """Top-k synthetic tiles of each real tile (max over the real tile's rotations, flips and crops)."""
    q = np.concatenate([copy_features.dihedral_variants(v) for v in reals.crops])  # (80, N, D)
    return topk_cosine(q, synthetic_desc, k, normalize=False, device=device)


def pair_similarity(a: TileSet, rows_a: np.ndarray, b: TileSet, rows_b: np.ndarray) -> np.ndarray:
    """Descriptor similarity of given pairs (max over a's rotations/flips and b's crops)."""
    if len(rows_a) == 0:
        return np.zeros(0, np.float32)
    qa = copy_features.dihedral_variants(a.desc[rows_a])  # (8, P, D)
    kb = b.crops[:, rows_b]  # (10, P, D)
    return np.einsum("gpd,vpd->gvp", qa, kb).max(axis=(0, 1)).astype(np.float32)


DIHEDRAL_CANDIDATES = 2
"""Rotations/flips tried in pixel space per pair: the best ones by descriptor similarity."""


def _best_variants(a: TileSet, i: int, b: TileSet, j: int) -> list[int]:
    sims = np.einsum("gd,vd->gv", copy_features.dihedral_variants(a.desc[i : i + 1])[:, 0], b.crops[:, j]).max(axis=1)
    return [int(g) for g in np.argsort(-sims)[:DIHEDRAL_CANDIDATES]]


class _Prepared:
    """Pixel-confirmation inputs, prepared once per tile and reused across pairs."""

    def __init__(self, tiles: TileSet, real: bool) -> None:
        self.tiles, self.real = tiles, real
        self.cache: dict[int, list[np.ndarray]] = {}

    def __getitem__(self, i: int):
        if i not in self.cache:
            thumb = self.tiles.thumbs[i]
            self.cache[i] = pixel_confirm.prepare_real(thumb) if self.real else pixel_confirm.prepare_synthetic(thumb)
        return self.cache[i]


def confirm_candidates(queries: TileSet, keys: TileSet, top: TopK, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Best pixel score over each query's top-k candidates with similarity >= ``cutoff`` (NaN when none), and the
    key index of that best candidate (-1 when none)."""
    best = np.full(len(queries), np.nan, np.float32)
    which = np.full(len(queries), -1, np.int64)
    reals = _Prepared(keys, real=True)
    for i in range(len(queries)):
        templates = None
        for sim, j in zip(top.sims[i], top.idx[i]):
            if sim < cutoff:
                break
            templates = templates or pixel_confirm.prepare_synthetic(queries.thumbs[i])
            score = pixel_confirm.score_prepared(templates, reals[int(j)], _best_variants(queries, i, keys, int(j)))
            if not score <= best[i]:  # also replaces NaN
                best[i], which[i] = score, j
    return best, which


def confirm_given_pairs(
    a: TileSet, rows_a: np.ndarray, b: TileSet, rows_b: np.ndarray, sims: np.ndarray, cutoff: float
) -> np.ndarray:
    """Pixel scores of given pairs whose descriptor similarity reaches ``cutoff`` (NaN for the others)."""
    out = np.full(len(rows_a), np.nan, np.float32)
    for n, (i, j) in enumerate(zip(rows_a, rows_b)):
        if sims[n] >= cutoff:
            out[n] = pixel_confirm.score_prepared(
                pixel_confirm.prepare_synthetic(a.thumbs[i]),
                pixel_confirm.prepare_real(b.thumbs[j]),
                _best_variants(a, int(i), b, int(j)),
            )
    return out


EmbedFn = Callable[[np.ndarray], np.ndarray]


def as_embed_fn(space: Any) -> EmbedFn:
    """An encoder (with ``.embed``) or a callable mapping uint8 NHWC images to (N, D) features."""
    if hasattr(space, "embed"):
        return space.embed
    if callable(space):
        return space
    raise TypeError(f"a feature space must be callable or have .embed, got {type(space).__name__}")


def embed_files(fn: EmbedFn, paths: Sequence[Path], batch: int = 32) -> np.ndarray:
    out = []
    for start in range(0, len(paths), batch):
        images = np.stack([copy_features.read_tile(p) for p in paths[start : start + batch]])
        out.append(np.asarray(fn(images), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
