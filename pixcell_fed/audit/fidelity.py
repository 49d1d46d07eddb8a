"""Fidelity in encoder spaces (the conditioning encoder, extra encoders): reported, never gating.

S is generated to match T in the conditioning encoder's space, so nearest-neighbour cosine S->T against H->T
and s against t(s) there measure how faithful the synthetic tiles are, not whether they leak.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.roles import DataRoles


def fidelity(spaces: Mapping[str, Any], roles: DataRoles, active: np.ndarray) -> dict[str, Any]:
    """Per feature space: NN cosine percentiles S->T and H->T, and of s against t(s) when the mapping is known."""
    from pixcell_fed.audit.search import topk_cosine

    out: dict[str, Any] = {}
    for name, space in spaces.items():
        fn = F.as_embed_fn(space)
        s = F.embed_files(fn, [roles.synthetic[i] for i in active])
        t = F.embed_files(fn, list(roles.reference))
        h = F.embed_files(fn, list(roles.holdout))
        s_nn = topk_cosine(s, t, 1).sims[:, 0] if len(s) else np.zeros(0)
        h_nn = topk_cosine(h, t, 1).sims[:, 0]
        entry: dict[str, Any] = {"dim": int(t.shape[1]), "S->T": st.percentiles(s_nn), "H->T": st.percentiles(h_nn)}
        if roles.has_mapping:
            pos = {int(i): n for n, i in enumerate(active)}
            pairs = [(pos[i], j) for i, j in roles.source_index.items() if i in pos]
            if pairs:
                a = np.stack([s[i] for i, _ in pairs])
                b = np.stack([t[j] for _, j in pairs])
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
                entry["paired"] = st.percentiles(cos)
        out[name] = entry
    return out
