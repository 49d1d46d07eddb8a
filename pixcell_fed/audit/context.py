"""Everything the audit's tests read, computed once per audit: :class:`AuditContext`.

Per-tile results (nearest real tile, copy confirmation, distance ratio, paired check, identifiers) do not depend on
the rest of S, and neither do the neighbour structures of the feature spaces (:mod:`pixcell_fed.audit.spaces`), so
they are computed here once; each round then runs the registered tests on the tiles that survive (``active``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import region_copy as rc
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.identifiers import Finding, scan_for_identifiers
from pixcell_fed.audit.roles import DataRoles
from pixcell_fed.audit.search import TopK
from pixcell_fed.audit.spaces import DescriptorSpace, EmbeddingSpace, Neighbours
from pixcell_fed.config.schema import AuditConfig

#: reasons that make a tile FAIL (copies and identifying content); the others make it suspicious
FAIL_REASONS = ("copy", "paired_copy", "identifier")


@dataclass(frozen=True)
class PerTile:
    """Per-tile copy results of a query set against T (S, or H as the null)."""

    top: TopK
    pixel: np.ndarray  # best pixel-space score of a confirmed candidate (NaN: no candidate)
    pixel_match: np.ndarray  # index in T of that candidate (-1: none)
    ratio: np.ndarray  # nearest / second-nearest distance ratio
    copy: np.ndarray  # bool: a whole-tile copy (pixel score reaches audit.copy_pixel_confirm) or a region copy
    region: rc.RegionCopies | None = None  # region-level copies (None: audit.region_copy off)

    @property
    def nn_sim(self) -> np.ndarray:
        return self.top.sims[:, 0]

    @classmethod
    def compute(
        cls, queries: F.TileSet, t: F.TileSet, cfg: AuditConfig, region_index: rc.RealIndex | None = None
    ) -> PerTile:
        """Nearest real tiles, whole-tile copies confirmed in pixel space and, with ``region_index`` (T's
        :class:`~pixcell_fed.audit.region_copy.RealIndex`), region copies confirmed geometrically and in pixels."""
        top = F.search_real(queries, t, cfg.top_k, device=cfg.device)
        pixel, match = F.confirm_candidates(queries, t, top, cfg.copy_similarity)
        copy = np.nan_to_num(pixel, nan=-1.0) >= cfg.copy_pixel_confirm
        region = (
            None
            if region_index is None
            else rc.find_region_copies(
                queries.work_images(),
                region_index,
                candidates=cfg.region_copy_candidates,
                min_inliers=cfg.region_copy_min_inliers,
                correlation=cfg.region_copy_correlation,
                device=cfg.device,
            )
        )
        if region is not None:
            copy = copy | region.flagged(cfg.region_copy_min_fraction)
        return cls(top, pixel, match, st.nn_distance_ratio(top.sims), copy, region)

    def region_flagged(self, cfg: AuditConfig) -> np.ndarray:
        """Tiles flagged for a copied region (all False when region copies were not sought)."""
        if self.region is None:
            return np.zeros(len(self.copy), bool)
        return self.region.flagged(cfg.region_copy_min_fraction)

    @classmethod
    def without_copy_detection(cls, top: TopK) -> PerTile:
        """Nearest neighbours only (the simulation harness: no pixels to confirm)."""
        n = len(top.sims)
        return cls(
            top,
            np.full(n, np.nan, np.float32),
            np.full(n, -1, np.int64),
            st.nn_distance_ratio(top.sims),
            np.zeros(n, bool),
        )


@dataclass(frozen=True)
class Paired:
    """Each synthetic tile (row of S) against its own source t(s): similarity, pixel score, copy."""

    rows: np.ndarray
    sims: np.ndarray
    pixel: np.ndarray
    copy: np.ndarray

    @classmethod
    def compute(cls, roles: DataRoles, s_set: F.TileSet, t_set: F.TileSet, cfg: AuditConfig) -> Paired | None:
        if not roles.has_mapping:
            return None
        rows_s, rows_t = _pairs(roles)
        sims = F.pair_similarity(s_set, rows_s, t_set, rows_t)
        pixel = F.confirm_given_pairs(s_set, rows_s, t_set, rows_t, sims, cfg.copy_similarity)
        return cls(rows_s, sims, pixel, np.nan_to_num(pixel, nan=-1.0) >= cfg.copy_pixel_confirm)

    def among(self, active: np.ndarray) -> np.ndarray:
        """Mask over the pairs whose synthetic tile is in ``active``."""
        return np.isin(self.rows, active)


def _pairs(roles: DataRoles) -> tuple[np.ndarray, np.ndarray]:
    rows_s = np.array(sorted(roles.source_index), dtype=np.int64)
    return rows_s, np.array([roles.source_index[i] for i in rows_s], dtype=np.int64)


@dataclass(frozen=True)
class AuditContext:
    """The inputs of every test, built once by :func:`build_context` (or :func:`context_from_features`).

    ``spaces``: the neighbour structure of each privacy feature space, the copy descriptor's first; per-space tests
    see the one named ``space``. ``split_unit``: how T and H were split ("patient", "slide", or None: unknown).
    """

    cfg: AuditConfig
    roles: DataRoles
    s_tile: PerTile
    h_tile: PerTile
    paired: Paired | None
    findings: list[Finding]
    finding_rows: dict[int, list[str]]
    reasons: list[list[str]]  # per synthetic tile: why it is flagged (empty: not flagged)
    spaces: dict[str, Neighbours]
    split_unit: str | None = None
    space: str = ""
    family_size: int = 1  # dataset-level tests in the Holm family, for each test's power calculation

    @property
    def neighbours(self) -> Neighbours:
        """The space a per-space test is run in (the copy descriptor's for all other tests)."""
        return self.spaces[self.space] if self.space else next(iter(self.spaces.values()))

    @property
    def primary(self) -> bool:
        return not self.space or self.space == next(iter(self.spaces))

    def in_space(self, name: str) -> AuditContext:
        return dataclasses.replace(self, space=name)

    @property
    def h_flagged(self) -> np.ndarray:
        return self.h_tile.copy | (self.h_tile.ratio < self.cfg.nn_ratio)

    def flagged(self, active: np.ndarray) -> list[int]:
        return [int(i) for i in active if self.reasons[i]]

    @property
    def n_synthetic(self) -> int:
        return len(self.roles.synthetic)


def _finding_rows(roles: DataRoles, findings: Sequence[Finding]) -> dict[int, list[str]]:
    index_of = {str(p): i for i, p in enumerate(roles.synthetic)}
    rows: dict[int, list[str]] = {}
    for f in findings:
        rows.setdefault(index_of[f.path], []).append(f"{f.kind}: {f.detail}")
    return rows


def _reasons(
    s_tile: PerTile, h_tile: PerTile, paired: Paired | None, finding_rows: dict[int, list[str]], cfg: AuditConfig
) -> list[list[str]]:
    """Why each synthetic tile is flagged: copy, paired_copy, identifier (FAIL); and, only where the whole set shows
    more of them than the held-out null allows (exact test at ``audit.alpha``: the multiplicity budget), tiles
    closer to T than every held-out tile is (exceeds_null), closer to their own source than that (
    paired_exceeds_null), or much closer to one real tile than to any other (nn_ratio). A clean set expects about
    |S| / (|H| + 1) tiles above every held-out tile by chance; those are not singled out."""
    from pixcell_fed.audit import exact

    reasons: list[list[str]] = [[] for _ in range(len(s_tile.nn_sim))]
    copied = s_tile.copy.copy()
    if paired is not None:
        copied[paired.rows[paired.copy]] = True
    rest, h_nn = ~copied, h_tile.nn_sim  # copies are judged as copies; the budget is about the other tiles
    top = float(h_nn.max()) if h_nn.size else np.inf
    suspicious = [
        ("exceeds_null", s_tile.nn_sim > top, exact.top_run(s_tile.nn_sim[rest], h_nn).p_value),
        (
            "nn_ratio",
            s_tile.ratio < cfg.nn_ratio,
            exact.flag_count(s_tile.ratio[rest] < cfg.nn_ratio, h_tile.ratio < cfg.nn_ratio).p_value,
        ),
    ]
    if paired is not None:
        close = np.zeros(len(reasons), bool)
        close[paired.rows] = paired.sims > top
        suspicious.append(("paired_exceeds_null", close, exact.top_run(paired.sims[rest[paired.rows]], h_nn).p_value))
        for n in np.flatnonzero(paired.copy):
            reasons[paired.rows[n]].append("paired_copy")
    for i in np.flatnonzero(s_tile.copy):
        reasons[i].append("copy")
    for name, mask, p_value in suspicious:
        if p_value <= cfg.alpha:
            for i in np.flatnonzero(mask):
                reasons[i].append(name)
    for row in finding_rows:
        reasons[row].append("identifier")
    return reasons


def space_name(name: str) -> str:
    """A feature space's name as it may appear in a test name (letters, digits, space, '.', '_', ':', '+', '-')."""
    return re.sub(r"[^A-Za-z0-9_.:+\- ]", "-", name)[:48]


def _family_size(n_spaces: int) -> int:
    from pixcell_fed.audit.gate import SET
    from pixcell_fed.audit.registry import registered_tests

    return sum(n_spaces if t.all_spaces else 1 for t in registered_tests() if t.level == SET)


def _assemble(
    cfg: AuditConfig,
    roles: DataRoles,
    s_tile: PerTile,
    h_tile: PerTile,
    paired: Paired | None,
    findings: list[Finding],
    spaces: dict[str, Neighbours],
    split_unit: str | None,
) -> AuditContext:
    rows = _finding_rows(roles, findings)
    return AuditContext(
        cfg,
        roles,
        s_tile,
        h_tile,
        paired,
        findings,
        rows,
        _reasons(s_tile, h_tile, paired, rows, cfg),
        spaces,
        split_unit,
        family_size=_family_size(len(spaces)),
    )


def build_context(
    roles: DataRoles,
    cfg: AuditConfig,
    *,
    forbidden_strings: Sequence[str] = (),
    embeddings: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    split_unit: str | None = None,
) -> AuditContext:
    """Describe the three roles' tiles, search, confirm candidates, scan for identifiers and compute every privacy
    space's neighbours: once per audit. ``embeddings``: encoder name -> {"S", "T", "H"} -> (N, D)."""
    work_side = rc.kp.WORK_SIDE if cfg.region_copy else None
    sets = {
        "S": F.TileSet.from_files(roles.synthetic, "synthetic", work_side=work_side),
        "T": F.TileSet.from_files(roles.reference, "reference", work_side=work_side),
        "H": F.TileSet.from_files(roles.holdout, "holdout", work_side=work_side),
    }
    region_index = rc.RealIndex.build(sets["T"].work_images()) if cfg.region_copy else None
    h_tile = PerTile.compute(sets["H"], sets["T"], cfg, region_index)  # the null: H against T, as if synthetic
    s_tile = PerTile.compute(sets["S"], sets["T"], cfg, region_index)
    descriptor = DescriptorSpace(sets, cfg.device)
    spaces = {descriptor.name: Neighbours.compute(descriptor, cfg.top_k, s_to_t=s_tile.top, h_to_t=h_tile.top)}
    for name, emb in (embeddings or {}).items():
        spaces[space_name(name)] = Neighbours.compute(
            EmbeddingSpace(space_name(name), dict(emb), cfg.device), cfg.top_k
        )
    paired = Paired.compute(roles, sets["S"], sets["T"], cfg)
    findings = scan_for_identifiers(roles.synthetic, forbidden_strings)
    return _assemble(cfg, roles, s_tile, h_tile, paired, findings, spaces, split_unit)


def context_from_features(
    s: np.ndarray,
    t: np.ndarray,
    h: np.ndarray,
    cfg: AuditConfig,
    *,
    source_of: Mapping[int, int] | None = None,
    name: str = "simulated descriptor",
    split_unit: str | None = "patient",
) -> AuditContext:
    """A context from feature vectors alone (the simulation harness): plain cosine, no pixels, so no copy
    detection and no identifier scan; ``source_of`` maps rows of ``s`` to rows of ``t``."""
    space = EmbeddingSpace(name, {"S": s, "T": t, "H": h}, cfg.device)
    nb = Neighbours.compute(space, cfg.top_k)
    s_paths, t_paths, h_paths = (
        tuple(Path(f"{role}{i:06d}") for i in range(len(x))) for role, x in (("s", s), ("t", t), ("h", h))
    )
    roles = DataRoles(s_paths, t_paths, h_paths, dict(source_of or {}))
    paired = None
    if roles.has_mapping:
        rows_s, rows_t = _pairs(roles)
        sims = np.einsum("nd,nd->n", _unit(s[rows_s]), _unit(t[rows_t]))
        paired = Paired(rows_s, sims, np.full(len(rows_s), np.nan, np.float32), np.zeros(len(rows_s), bool))
    return _assemble(
        cfg,
        roles,
        PerTile.without_copy_detection(nb.s_to_t),
        PerTile.without_copy_detection(nb.h_to_t),
        paired,
        [],
        {name: nb},
        split_unit,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def describe(ctx: AuditContext) -> dict[str, Any]:
    """The null's numbers for the report: held-out tiles against T, as if they were synthetic."""
    h_nn = ctx.h_tile.nn_sim
    return {
        "h_size": len(h_nn),
        "h_flagged": int(ctx.h_flagged.sum()),
        "h_copies": int(ctx.h_tile.copy.sum()),
        "h_nn_median": float(np.median(h_nn)) if h_nn.size else None,
        "h_nn_max": float(h_nn.max()) if h_nn.size else None,
    }
