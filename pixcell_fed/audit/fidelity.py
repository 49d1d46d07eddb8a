"""Fidelity in encoder spaces (the conditioning encoder, extra encoders): reported beside the privacy tests, never
gating unless the site asks (``audit.fidelity_warn_fd_ratio``).

S is generated to match T in the conditioning encoder's space, so nearest-neighbour cosine S->T against H->T and
s against t(s) there measure how faithful the synthetic tiles are, with the figures PixCell reports
(:mod:`pixcell_fed.audit.fidelity_metrics`: Fréchet distance against the H->T floor, precision/recall,
density/coverage, bootstrap intervals). The privacy question in those spaces (can an attacker tell which real tiles
conditioned S?) is the membership test's, run in each space on the same embeddings. The ``fidelity`` audit test
(registered here) warns when an FD ratio is significantly above the site's threshold; it is N/A and never gates
when no threshold is set. The figures are rendered by :mod:`pixcell_fed.audit.fidelity_report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcell_fed.audit import features as F
from pixcell_fed.audit import statistics as st
from pixcell_fed.audit.fidelity_metrics import CONFIDENCE, fd_ratio_status, fidelity_figures
from pixcell_fed.audit.fidelity_report import interval_text
from pixcell_fed.audit.gate import NA, PASS, WARN, TestResult
from pixcell_fed.audit.registry import audit_test
from pixcell_fed.audit.roles import DataRoles

if TYPE_CHECKING:
    from pixcell_fed.audit.context import AuditContext

ROLES = ("S", "T", "H")


def embed_roles(spaces: Mapping[str, Any], roles: DataRoles) -> dict[str, dict[str, np.ndarray]]:
    """Embeddings of every tile of S, T and H in each encoder space: name -> role -> (N, D)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, space in spaces.items():
        fn = F.as_embed_fn(space)
        out[name] = {
            role: F.embed_files(fn, list(paths))
            for role, paths in zip(ROLES, (roles.synthetic, roles.reference, roles.holdout))
        }
    return out


def fidelity(
    embeddings: Mapping[str, Mapping[str, np.ndarray]], roles: DataRoles, active: np.ndarray, *, device: str = "cpu"
) -> dict[str, Any]:
    """Per encoder space: NN cosine percentiles S->T (kept tiles) and H->T, s against t(s) when mapped, and the
    figures of :func:`~pixcell_fed.audit.fidelity_metrics.fidelity_figures` (kept tiles against T, H as the floor)."""
    from pixcell_fed.audit.search import topk_cosine

    out: dict[str, Any] = {}
    for name, emb in embeddings.items():
        s, t, h = emb["S"][active], emb["T"], emb["H"]
        s_nn = topk_cosine(s, t, 1, device=device).sims[:, 0] if len(s) else np.zeros(0)
        entry: dict[str, Any] = {
            "dim": int(t.shape[1]),
            "S->T": st.percentiles(s_nn),
            "H->T": st.percentiles(topk_cosine(h, t, 1, device=device).sims[:, 0]),
        }
        pos = {int(i): n for n, i in enumerate(active)}
        pairs = [(pos[i], j) for i, j in roles.source_index.items() if i in pos]
        if pairs:
            a = np.stack([s[i] for i, _ in pairs])
            b = np.stack([t[j] for _, j in pairs])
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
            entry["paired"] = st.percentiles(cos)
        entry.update(fidelity_figures(s, t, h))
        out[name] = entry
    return out


@audit_test("fidelity")
def fidelity_test(ctx: AuditContext, active: np.ndarray) -> TestResult:
    """WARN when some encoder space's FD(S, T) / FD(H, T) on the audited tiles is significantly above
    ``audit.fidelity_warn_fd_ratio`` (its interval's lower end is); N/A, not gating, when the site set no threshold."""
    from pixcell_fed.audit.spaces import EmbeddingSpace

    title, warn = "Fidelity: Fréchet distance against the held-out floor", ctx.cfg.fidelity_warn_fd_ratio
    if warn is None:
        return TestResult(
            "fidelity",
            title,
            NA,
            {},
            {},
            "Fidelity does not gate this audit "
            "(audit.fidelity_warn_fd_ratio is not set); its figures are in the fidelity section.",
            gates=False,
        )
    ratios, statuses, parts = {}, {}, []
    for name, neighbours in ctx.spaces.items():
        if not isinstance(neighbours.space, EmbeddingSpace):
            continue  # the copy descriptor is not an encoder space
        emb = neighbours.space.embeddings
        ratio = (fidelity_figures(emb["S"][active], emb["T"], emb["H"]).get("fd") or {}).get("ratio") or {}
        ratios[name], statuses[name] = ratio.get("value"), fd_ratio_status({"fd": {"ratio": ratio}}, warn)
        if ratio.get("value") is not None:
            parts.append(f"{name}: {interval_text(ratio)}")
    status = WARN if WARN in statuses.values() else PASS if PASS in statuses.values() else NA
    sentence = (
        f"FD(S, T) / FD(H, T) {'; '.join(parts) if parts else 'could not be computed (no encoder space)'}; "
        f"warns when a ratio's {CONFIDENCE:.0%} interval lies wholly above {warn:g} "
        "(1 = as close to the conditioning tiles as new real tissue of this site)."
    )
    return TestResult(
        "fidelity",
        title,
        status,
        {"fd_ratio": ratios, "statuses": statuses},
        {"fidelity_warn_fd_ratio": warn},
        sentence,
        gates=status != NA,
    )
