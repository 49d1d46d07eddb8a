"""Feature spaces the dataset-level tests run in, and each space's neighbour structure, computed once per audit.

- the weight-free copy descriptor (:class:`DescriptorSpace`): similarity is the maximum over the synthetic tile's
  8 rotations and flips and the real tile's crops, as in the copy detector;
- any encoder space (:class:`EmbeddingSpace`): plain cosine of embeddings, e.g. the conditioning encoder's (UNI2-h)
  and every ``models.extra_audit_encoders`` space, and the simulated spaces of the test harness.

R is the real set, T then H. :class:`Neighbours` holds who is near whom among S, T and H; the tests read it, so
that a new space is one new :class:`FeatureSpace` and every test runs in it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit.search import TopK, topk_cosine

#: synthetic neighbours kept per real tile, so that later rounds find the nearest kept one without a new search
REAL_TO_SYNTHETIC_K = 10


class FeatureSpace(Protocol):
    """Top-k search between the roles "S", "T" and "H" of one feature space."""

    @property
    def name(self) -> str: ...

    def search(
        self,
        queries: str,
        keys: str,
        k: int,
        *,
        exclude_self: bool = False,
        key_rows: np.ndarray | None = None,
        query_rows: np.ndarray | None = None,
    ) -> TopK: ...


def _rows(n: int, rows: np.ndarray | None) -> np.ndarray:
    return np.arange(n) if rows is None else np.asarray(rows, np.int64)


def _take(tiles: F.TileSet, rows: np.ndarray | None) -> F.TileSet:
    return tiles if rows is None else tiles.subset(rows)


@dataclass(frozen=True)
class DescriptorSpace:
    """The copy descriptor's space (rotations, flips and crops taken into account)."""

    sets: dict[str, F.TileSet]
    device: str
    name: str = "copy descriptor"

    def search(
        self,
        queries: str,
        keys: str,
        k: int,
        *,
        exclude_self: bool = False,
        key_rows: np.ndarray | None = None,
        query_rows: np.ndarray | None = None,
    ) -> TopK:
        q = _take(self.sets[queries], query_rows)
        if keys == "S":
            s = self.sets["S"]
            return F.search_from_real(q, s.desc if key_rows is None else s.desc[key_rows], k, device=self.device)
        return F.search_real(q, _take(self.sets[keys], key_rows), k, device=self.device, exclude_self=exclude_self)


@dataclass(frozen=True)
class EmbeddingSpace:
    """An encoder's space: plain cosine between embeddings (N, D) of each role."""

    name: str
    embeddings: dict[str, np.ndarray]
    device: str = "cpu"

    def search(
        self,
        queries: str,
        keys: str,
        k: int,
        *,
        exclude_self: bool = False,
        key_rows: np.ndarray | None = None,
        query_rows: np.ndarray | None = None,
    ) -> TopK:
        q, kv = self.embeddings[queries], self.embeddings[keys]
        return topk_cosine(
            q[_rows(len(q), query_rows)], kv[_rows(len(kv), key_rows)], k, exclude_self=exclude_self, device=self.device
        )


@dataclass(frozen=True)
class Neighbours:
    """One space's neighbour structure: everything the dataset-level tests need, computed once."""

    space: FeatureSpace
    s_to_t: TopK  # each synthetic tile's nearest conditioning tiles (k >= 2)
    h_to_t: TopK  # each held-out tile's, as if it were synthetic: the null
    t_self: np.ndarray  # each conditioning tile's similarity to its nearest other conditioning tile
    s_real: np.ndarray  # index into R (T then H) of each synthetic tile's nearest real tile
    r_self: np.ndarray  # each real tile's similarity to its nearest other real tile
    r_to_s: TopK  # each real tile's nearest synthetic tiles among all of S

    @property
    def name(self) -> str:
        return self.space.name

    @property
    def n_t(self) -> int:
        return len(self.t_self)

    @classmethod
    def compute(
        cls, space: FeatureSpace, k: int, *, s_to_t: TopK | None = None, h_to_t: TopK | None = None
    ) -> Neighbours:
        """Search S, T and H against each other (``s_to_t``, ``h_to_t``: searches already done, reused)."""
        s_to_t = s_to_t if s_to_t is not None else space.search("S", "T", k)
        h_to_t = h_to_t if h_to_t is not None else space.search("H", "T", k)
        t_t = _first(space.search("T", "T", 1, exclude_self=True))
        h_h = _first(space.search("H", "H", 1, exclude_self=True))
        t_h = _first(space.search("T", "H", 1))
        s_h = _first(space.search("S", "H", 1))
        n_t = len(t_t[0])
        s_real = np.where(s_to_t.sims[:, 0] >= s_h[0], s_to_t.idx[:, 0], n_t + s_h[1])
        r_self = np.concatenate([np.maximum(t_t[0], t_h[0]), np.maximum(h_h[0], h_to_t.sims[:, 0])])
        n_s = len(s_to_t.sims)
        r_to_s = _stack(
            space.search("T", "S", min(REAL_TO_SYNTHETIC_K, n_s)), space.search("H", "S", min(REAL_TO_SYNTHETIC_K, n_s))
        )
        return cls(space, s_to_t, h_to_t, t_t[0], s_real.astype(np.int64), r_self, r_to_s)

    def nearest_synthetic(self, active: np.ndarray) -> np.ndarray:
        """Each real tile's similarity to its nearest synthetic tile among ``active`` (exact)."""
        active = np.asarray(active, np.int64)
        n_r = len(self.r_self)
        if active.size == 0:
            return np.full(n_r, -1.0)
        keep = np.isin(self.r_to_s.idx, active)
        found = keep.any(axis=1)
        sims = np.where(found, np.where(keep, self.r_to_s.sims, -np.inf).max(axis=1), -np.inf)
        missing = np.flatnonzero(~found)
        for role, rows in (("T", missing[missing < self.n_t]), ("H", missing[missing >= self.n_t] - self.n_t)):
            if rows.size:
                sims[rows + (0 if role == "T" else self.n_t)] = self.space.search(
                    role, "S", 1, key_rows=active, query_rows=rows
                ).sims[:, 0]
        return sims


def _first(top: TopK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest similarity and index per row; -1 and index 0 where there is no neighbour (a set of one)."""
    if top.sims.shape[1] == 0:
        n = top.sims.shape[0]
        return np.full(n, -1.0, np.float32), np.zeros(n, np.int64)
    return top.sims[:, 0], top.idx[:, 0]


def _stack(a: TopK, b: TopK) -> TopK:
    return TopK(np.concatenate([a.sims, b.sims]), np.concatenate([a.idx, b.idx]))
