"""Fidelity in encoder spaces (the conditioning encoder, extra encoders): reported beside the privacy tests, never
gating.

S is generated to match T in the conditioning encoder's space, so nearest-neighbour cosine S->T against H->T and
s against t(s) there measure how faithful the synthetic tiles are. The privacy question in those spaces (can an
attacker tell which real tiles conditioned S?) is the membership test's, run in each space on the same embeddings.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.roles import DataRoles

ROLES = ("S", "T", "H")


def embed_roles(spaces: Mapping[str, Any], roles: DataRoles) -> dict[str, dict[str, np.ndarray]]:
    """Embeddings of every tile of S, T and H in each encoder space: name -> role -> (N, D)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, space in spaces.items():
        fn = F.as_embed_fn(space)
        out[name] = {role: F.embed_files(fn, list(paths)) for role, paths in
                     zip(ROLES, (roles.synthetic, roles.reference, roles.holdout))}
    return out


def fidelity(embeddings: Mapping[str, Mapping[str, np.ndarray]], roles: DataRoles,
             active: np.ndarray, *, device: str = "cpu") -> dict[str, Any]:
    """Per encoder space: NN cosine percentiles S->T (kept tiles) and H->T, and s against t(s) when mapped."""
    from pixcell_fed.audit.search import topk_cosine

    out: dict[str, Any] = {}
    for name, emb in embeddings.items():
        s, t, h = emb["S"][active], emb["T"], emb["H"]
        s_nn = topk_cosine(s, t, 1, device=device).sims[:, 0] if len(s) else np.zeros(0)
        entry: dict[str, Any] = {"dim": int(t.shape[1]), "S->T": st.percentiles(s_nn),
                                 "H->T": st.percentiles(topk_cosine(h, t, 1, device=device).sims[:, 0])}
        pos = {int(i): n for n, i in enumerate(active)}
        pairs = [(pos[i], j) for i, j in roles.source_index.items() if i in pos]
        if pairs:
            a = np.stack([s[i] for i, _ in pairs])
            b = np.stack([t[j] for _, j in pairs])
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
            entry["paired"] = st.percentiles(cos)
        out[name] = entry
    return out
