"""The exact search on a CUDA GPU: the certified bf16 first pass gives the float64 top-k, as on the CPU
(opt-in: ``pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixcell_fed.audit import search as S

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    assert torch.cuda.is_available(), "run the gpu tests on a machine with a CUDA GPU"


def _clustered(rng, n, dim, centers=None):
    centers = rng.standard_normal((12, dim)).astype(np.float32) if centers is None else centers
    return centers[rng.integers(0, len(centers), n)] * 0.8 + rng.standard_normal((n, dim)).astype(np.float32), centers


def _exact(queries, keys, k, exclude_self=False):
    q, kk = queries.astype(np.float64), keys.astype(np.float64)
    q, kk = (q[None] if q.ndim == 2 else q), (kk[None] if kk.ndim == 2 else kk)
    scores = np.einsum("gnd,vmd->gvnm", q, kk).max(axis=(0, 1))
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], scores


def _assert_same_as_float64(got, queries, keys, k, exclude_self=False, tie=1e-6):
    want, scores = _exact(queries, keys, k, exclude_self)
    differ = got.idx != want
    # where the order differs, the float64 scores are a near-tie that float32 cannot order
    rows = np.nonzero(differ)[0]
    gaps = np.abs(np.take_along_axis(scores, got.idx, 1) - np.take_along_axis(scores, want, 1))[differ]
    scale = max(1.0, float(np.abs(np.take_along_axis(scores, want, 1)).max()))
    assert not len(rows) or gaps.max() < tie * scale, (len(rows), gaps.max())
    np.testing.assert_allclose(got.sims, np.take_along_axis(scores, want, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [143, 1536])
def test_certified_first_pass_on_the_gpu_is_exact(monkeypatch, dim):
    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(dim)
    keys, centers = _clustered(rng, 3000, dim)
    queries, _ = _clustered(rng, 500, dim, centers)
    q, k = S.l2_normalize(queries), S.l2_normalize(keys)
    got = S.topk_cosine(q, k, 5, normalize=False, device="cuda", block_bytes=1 << 22)
    assert got.recomputed_rows < len(q) // 5   # the bound certifies most rows on the GPU too
    _assert_same_as_float64(got, q, k, 5)
    full = S.topk_cosine(k, k, 4, normalize=False, exclude_self=True, device="cuda")
    _assert_same_as_float64(full, k, k, 4, exclude_self=True)


def test_certified_pass_on_the_gpu_with_variants_unnormalised_and_crowded(monkeypatch):
    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(11)
    base_q, centers = _clustered(rng, 300, 143)
    base_k, _ = _clustered(rng, 1500, 143, centers)
    qv = base_q[None] + 0.3 * rng.standard_normal((8, 300, 143)).astype(np.float32)
    kv = base_k[None] + 0.3 * rng.standard_normal((10, 1500, 143)).astype(np.float32)
    qv *= rng.uniform(0.2, 8.0, (1, 300, 1)).astype(np.float32)     # inner products: norms vary
    got = S.topk_cosine(qv, kv, 5, normalize=False, device="cuda", block_bytes=1 << 24)
    _assert_same_as_float64(got, qv, kv, 5)
    # 30 keys per query within 0.002 of cosine 0.9: more than the first tier rescores
    dim = 256
    queries = S.l2_normalize(rng.standard_normal((20, dim)).astype(np.float32))
    keys = []
    for q in queries:
        perp = rng.standard_normal((30, dim)).astype(np.float32)
        perp = S.l2_normalize(perp - (perp @ q)[:, None] * q)
        a = rng.uniform(0.899, 0.901, 30).astype(np.float32)[:, None]
        keys.append(a * q + np.sqrt(1 - a ** 2) * perp)
    keys = np.concatenate(keys + [S.l2_normalize(rng.standard_normal((400, dim)).astype(np.float32))])
    crowded = S.topk_cosine(queries, keys, 5, normalize=False, device="cuda")
    assert crowded.widened_rows + crowded.recomputed_rows == 20
    _assert_same_as_float64(crowded, queries, keys, 5)


def test_large_gpu_search_takes_the_certified_pass_and_agrees_with_the_cpu():
    rng = np.random.default_rng(12)
    keys, centers = _clustered(rng, 12_000, 1536)
    queries, _ = _clustered(rng, 2_000, 1536, centers)
    assert S._bf16_gemm_pays(torch.device("cuda"), 2_000 * 12_000 * 1536, 12_000, 5)
    torch.set_float32_matmul_precision("high")  # TF32 in the process: the search must not use it
    try:
        gpu = S.topk_cosine(queries, keys, 5, device="cuda")
    finally:
        torch.set_float32_matmul_precision("highest")
    cpu = S._topk_float32(S.l2_normalize(queries)[None], S.l2_normalize(keys)[None], 5, exclude_self=False,
                          block_bytes=1 << 28, dev=torch.device("cpu"))
    differ = np.nonzero(gpu.idx[:, 0] != cpu.idx[:, 0])[0]
    assert len(differ) <= 2 and np.abs(gpu.sims - cpu.sims).max() < 1e-5


def test_gpu_search_memory_is_linear_in_the_keys():
    rng = np.random.default_rng(13)
    keys = S.l2_normalize(rng.standard_normal((60_000, 143)).astype(np.float32))
    queries = S.l2_normalize(rng.standard_normal((8, 20_000, 143)).astype(np.float32))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    block = 64 * 2**20
    S.topk_cosine(queries, keys, 5, normalize=False, device="cuda", block_bytes=block)
    peak = torch.cuda.max_memory_allocated() - base
    resident = keys.nbytes * 2   # float32 and bf16 copies of the keys
    assert peak < resident + 4 * block, peak   # never a (queries x keys) matrix: 8 x 20k x 60k x 4 B = 38 GB
