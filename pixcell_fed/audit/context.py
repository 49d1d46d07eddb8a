"""Everything the audit's tests read, computed once per audit: :class:`AuditContext`.

Per-tile results (nearest real tile, copy confirmation, z-score, distance ratio, paired check, identifiers) do not
depend on the rest of S, so they are computed here once; each round then runs the registered tests on the tiles
that survive (``active``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.identifiers import Finding, scan_for_identifiers
from pixcell_fed.audit.roles import DataRoles
from pixcell_fed.audit.search import TopK
from pixcell_fed.config.schema import AuditConfig


@dataclass(frozen=True)
class PerTile:
    """Per-tile results of a query set against T (S, or H as the null)."""

    top: TopK
    pixel: np.ndarray
    pixel_match: np.ndarray
    z: np.ndarray
    ratio: np.ndarray
    copy: np.ndarray  # bool: pixel score reaches audit.copy_pixel_confirm

    @property
    def nn_sim(self) -> np.ndarray:
        return self.top.sims[:, 0]

    @classmethod
    def compute(cls, queries: F.TileSet, t: F.TileSet, cfg: AuditConfig, null: st.NullModel,
                top: TopK | None = None) -> "PerTile":
        top = F.search_real(queries, t, cfg.top_k, device=cfg.device) if top is None else top
        pixel, match = F.confirm_candidates(queries, t, top, cfg.copy_similarity)
        return cls(top, pixel, match, null.z(top.sims[:, 0]), st.nn_distance_ratio(top.sims),
                   np.nan_to_num(pixel, nan=-1.0) >= cfg.copy_pixel_confirm)


@dataclass(frozen=True)
class Paired:
    """Each synthetic tile (row of S) against its own source t(s): descriptor similarity, pixel score, z."""

    rows: np.ndarray
    sims: np.ndarray
    pixel: np.ndarray
    z: np.ndarray
    copy: np.ndarray

    @classmethod
    def compute(cls, roles: DataRoles, s_set: F.TileSet, t_set: F.TileSet, cfg: AuditConfig,
                null: st.NullModel) -> "Paired | None":
        if not roles.has_mapping:
            return None
        rows_s = np.array(sorted(roles.source_index), dtype=np.int64)
        rows_t = np.array([roles.source_index[i] for i in rows_s], dtype=np.int64)
        sims = F.pair_similarity(s_set, rows_s, t_set, rows_t)
        pixel = F.confirm_given_pairs(s_set, rows_s, t_set, rows_t, sims, cfg.copy_similarity)
        return cls(rows_s, sims, pixel, null.z(sims), np.nan_to_num(pixel, nan=-1.0) >= cfg.copy_pixel_confirm)

    def among(self, active: np.ndarray) -> np.ndarray:
        """Mask over the pairs whose synthetic tile is in ``active``."""
        return np.isin(self.rows, active)


@dataclass(frozen=True)
class HoldoutSplit:
    """The seeded second split of H: non-members of the membership attack, and the DCR reference (each with an
    equally large random subset of T)."""

    t_mia: np.ndarray
    h_mia: np.ndarray
    n_dcr: int
    s_to_tdcr: np.ndarray  # nearest similarity of each synthetic tile to the DCR subset of T
    s_to_hdcr: np.ndarray  # ... and to the DCR half of H

    @classmethod
    def draw(cls, s_set: F.TileSet, t_set: F.TileSet, h_set: F.TileSet, cfg: AuditConfig) -> "HoldoutSplit":
        rng = np.random.default_rng(cfg.seed)
        h_perm = rng.permutation(len(h_set))
        h_mia, h_dcr = np.sort(h_perm[: len(h_set) // 2]), np.sort(h_perm[len(h_set) // 2:])
        t_mia = np.sort(rng.choice(len(t_set), size=min(len(t_set), len(h_mia)), replace=False))
        t_dcr = np.sort(rng.choice(len(t_set), size=min(len(t_set), len(h_dcr)), replace=False))
        s_to_t = F.search_real(s_set, t_set.subset(t_dcr), 1, device=cfg.device).sims[:, 0]
        s_to_h = F.search_real(s_set, h_set.subset(h_dcr), 1, device=cfg.device).sims[:, 0]
        return cls(t_mia, h_mia, len(h_dcr), s_to_t, s_to_h)


@dataclass(frozen=True)
class AuditContext:
    """The inputs of every test, built once by :func:`build_context`."""

    cfg: AuditConfig
    roles: DataRoles
    s_set: F.TileSet
    t_set: F.TileSet
    h_set: F.TileSet
    null: st.NullModel
    s_tile: PerTile
    h_tile: PerTile
    paired: Paired | None
    findings: list[Finding]
    finding_rows: dict[int, list[str]]
    reasons: list[list[str]]  # per synthetic tile: why it is flagged (empty: not flagged)
    t_self_dist: np.ndarray   # each T tile's distance to its nearest other T tile
    split: HoldoutSplit

    @property
    def h_flagged(self) -> np.ndarray:
        h = self.h_tile
        return h.copy | (h.z > self.cfg.zscore) | (h.ratio < self.cfg.nn_ratio)

    @property
    def h_authentic_share(self) -> float:
        h = self.h_tile
        return float(st.authentic_mask(1 - h.nn_sim, h.top.idx[:, 0], self.t_self_dist).mean())

    def flagged(self, active: np.ndarray) -> list[int]:
        return [int(i) for i in active if self.reasons[i]]


def _finding_rows(roles: DataRoles, findings: Sequence[Finding]) -> dict[int, list[str]]:
    index_of = {str(p): i for i, p in enumerate(roles.synthetic)}
    rows: dict[int, list[str]] = {}
    for f in findings:
        rows.setdefault(index_of[f.path], []).append(f"{f.kind}: {f.detail}")
    return rows


def _reasons(n_s: int, s_tile: PerTile, paired: Paired | None, finding_rows: dict[int, list[str]],
             cfg: AuditConfig) -> list[list[str]]:
    """Why each synthetic tile is flagged: copy, zscore, nn_ratio, paired_copy, paired_zscore, identifier."""
    reasons: list[list[str]] = [[] for _ in range(n_s)]
    for i in np.flatnonzero(s_tile.copy):
        reasons[i].append("copy")
    for i in np.flatnonzero(s_tile.z > cfg.zscore):
        reasons[i].append("zscore")
    for i in np.flatnonzero(s_tile.ratio < cfg.nn_ratio):
        reasons[i].append("nn_ratio")
    if paired is not None:
        for n, i in enumerate(paired.rows):
            if paired.copy[n]:
                reasons[i].append("paired_copy")
            if paired.z[n] > cfg.zscore:
                reasons[i].append("paired_zscore")
    for i in finding_rows:
        reasons[i].append("identifier")
    return reasons


def build_context(roles: DataRoles, cfg: AuditConfig, forbidden_strings: Sequence[str] = ()) -> AuditContext:
    """Describe the three roles' tiles, search, confirm candidates and scan for identifiers: once per audit."""
    s_set = F.TileSet.from_files(roles.synthetic, "synthetic")
    t_set = F.TileSet.from_files(roles.reference, "reference")
    h_set = F.TileSet.from_files(roles.holdout, "holdout")
    h_top = F.search_real(h_set, t_set, cfg.top_k, device=cfg.device)  # the null: H against T, as if synthetic
    null = st.NullModel.fit(h_top.sims[:, 0])
    h_tile = PerTile.compute(h_set, t_set, cfg, null, top=h_top)
    s_tile = PerTile.compute(s_set, t_set, cfg, null)
    t_self = F.search_real(t_set, t_set, 1, device=cfg.device, exclude_self=True)
    t_self_dist = 1.0 - t_self.sims[:, 0] if t_self.sims.shape[1] else np.ones(len(t_set))
    split = HoldoutSplit.draw(s_set, t_set, h_set, cfg)
    paired = Paired.compute(roles, s_set, t_set, cfg, null)
    findings = scan_for_identifiers(roles.synthetic, forbidden_strings)
    finding_rows = _finding_rows(roles, findings)
    reasons = _reasons(len(s_set), s_tile, paired, finding_rows, cfg)
    return AuditContext(cfg, roles, s_set, t_set, h_set, null, s_tile, h_tile, paired, findings, finding_rows,
                        reasons, t_self_dist, split)


def describe(ctx: AuditContext) -> dict[str, Any]:
    """The null's numbers for the report."""
    return {"mean": ctx.null.mean, "std": ctx.null.std, "h_flagged": int(ctx.h_flagged.sum()),
            "h_size": len(ctx.h_set), "h_copies": int(ctx.h_tile.copy.sum())}
