"""Exact top-k cosine search against brute force, and the exactness of the descriptor's group actions."""

from __future__ import annotations

import numpy as np

from pixcell_fed.audit import copy_features as cf
from pixcell_fed.audit.pixel_confirm import confirm_score, dihedral_images
from pixcell_fed.audit.search import numpy_topk_cosine, topk_cosine
from pixcell_fed.testing.audit_tiles import region_tiles


def _brute(q, k, topn):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    sims = qn @ kn.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :topn]
    return np.take_along_axis(sims, idx, 1), idx


def test_topk_matches_brute_force_with_small_blocks():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(301, 37)).astype(np.float32), rng.normal(size=(523, 37)).astype(np.float32)
    want_s, want_i = _brute(q, k, 7)
    got = topk_cosine(q, k, 7, block_bytes=40_000)  # forces many chunks
    np.testing.assert_allclose(got.sims, want_s, atol=1e-5)
    assert (got.idx == want_i).mean() > 0.999  # ties at float precision aside
    ref = numpy_topk_cosine(q, k, 7, chunk=50)
    np.testing.assert_allclose(ref.sims, want_s, atol=1e-5)


def test_group_and_key_variants_take_the_maximum_and_exclude_self_skips_the_diagonal():
    rng = np.random.default_rng(1)
    qg = rng.normal(size=(3, 50, 16)).astype(np.float32)
    kv = rng.normal(size=(2, 80, 16)).astype(np.float32)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    sims = np.einsum("gnd,vmd->gvnm", norm(qg), norm(kv)).max(axis=(0, 1))
    got = topk_cosine(qg, kv, 3, block_bytes=10_000)
    np.testing.assert_allclose(got.sims, -np.sort(-sims, axis=1)[:, :3], atol=1e-5)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    own = topk_cosine(x, x, 1, exclude_self=True)
    assert not (own.idx[:, 0] == np.arange(40)).any()
    full = norm(x) @ norm(x).T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_allclose(own.sims[:, 0], full.max(1), atol=1e-5)


def test_descriptor_dihedral_variants_equal_descriptors_of_transformed_real_tiles():
    tiles, _ = region_tiles(1400, 2967, stride=512)
    thumbs, desc = cf.describe_images(tiles[:4])
    variants = cf.dihedral_variants(desc)
    for n, thumb in enumerate(thumbs):
        for g, image in enumerate(dihedral_images(thumb)):
            np.testing.assert_allclose(cf.descriptor_from_thumb(image[None])[0], variants[g, n], atol=1e-5)
    # a rotated tile matches its original exactly, in descriptor and in pixel space
    rotated = cf.describe_images([np.rot90(tiles[0])])[1]
    assert topk_cosine(cf.dihedral_variants(rotated), desc, 1).sims[0, 0] > 0.9999
    assert confirm_score(cf.to_gray_thumb(np.rot90(tiles[0])), thumbs[0]) > 0.999
    assert confirm_score(thumbs[1], thumbs[2]) < 0.6



def _clustered(rng, n, dim=96, centers=None):
    centers = rng.standard_normal((12, dim)).astype(np.float32) if centers is None else centers
    return (centers[rng.integers(0, len(centers), n)] * 0.8 + rng.standard_normal((n, dim)).astype(np.float32)), centers


def test_certified_bf16_first_pass_is_exact(monkeypatch):
    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(3)
    keys, centers = _clustered(rng, 900)
    queries, _ = _clustered(rng, 300, centers=centers)
    q, k = S.l2_normalize(queries), S.l2_normalize(keys)
    got = S.topk_cosine(q, k, 5, normalize=False, block_bytes=1 << 16)
    ref = S.numpy_topk_cosine(q, k, 5)
    assert got.recomputed_rows == 0 and got.widened_rows == 0  # the first tier certified every row on its own
    assert np.array_equal(got.idx, ref.idx)
    assert np.abs(got.sims - ref.sims).max() < 1e-5
    self_got = S.topk_cosine(k, k, 4, normalize=False, exclude_self=True)
    full = k @ k.T
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(self_got.idx, np.argsort(-full, axis=1, kind="stable")[:, :4])


def test_rows_the_bound_cannot_certify_are_recomputed_exactly(monkeypatch):
    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(4)
    base = S.l2_normalize(rng.standard_normal((1, 64)).astype(np.float32))
    # 200 keys that differ from one another by far less than bf16 can resolve: no row can be certified
    keys = S.l2_normalize(base + 2e-3 * rng.standard_normal((200, 64)).astype(np.float32))
    queries = S.l2_normalize(base + 2e-3 * rng.standard_normal((20, 64)).astype(np.float32))
    got = S.topk_cosine(queries, keys, 3, normalize=False)
    assert got.recomputed_rows == 20
    exact = queries @ keys.T
    best = -np.sort(-exact, axis=1)[:, :3]
    assert np.allclose(got.sims, best, atol=1e-6)  # values, not indices: near-ties may order either way
    assert np.allclose(np.take_along_axis(exact, got.idx, axis=1), best, atol=1e-6)


def _exact_order(queries, keys, k):
    exact = queries.astype(np.float64) @ keys.astype(np.float64).T
    return np.argsort(-exact, axis=1, kind="stable")[:, :k]


def test_rows_with_crowded_neighbours_are_certified_by_the_second_tier(monkeypatch):
    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(5)
    dim, group = 256, 30
    queries = S.l2_normalize(rng.standard_normal((20, dim)).astype(np.float32))
    keys = []
    for q in queries:  # 30 keys per query within 0.002 of cosine 0.9: more than the first tier rescores
        perp = rng.standard_normal((group, dim)).astype(np.float32)
        perp = S.l2_normalize(perp - (perp @ q)[:, None] * q)
        a = rng.uniform(0.899, 0.901, group).astype(np.float32)[:, None]
        keys.append(a * q + np.sqrt(1 - a ** 2) * perp)
    keys = np.concatenate(keys + [S.l2_normalize(rng.standard_normal((400, dim)).astype(np.float32))])
    got = S.topk_cosine(queries, keys, 5, normalize=False)
    assert got.widened_rows == 20 and got.recomputed_rows == 0
    assert np.array_equal(got.idx, _exact_order(queries, keys, 5))


def test_certified_pass_is_exact_for_unnormalised_inner_products(monkeypatch):
    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(6)
    keys, centers = _clustered(rng, 1200, dim=384)
    queries, _ = _clustered(rng, 200, dim=384, centers=centers)
    keys *= rng.uniform(0.2, 8.0, (len(keys), 1)).astype(np.float32)  # inner products, not cosines: norms vary
    queries *= -rng.uniform(0.2, 8.0, (len(queries), 1)).astype(np.float32)
    got = S.topk_cosine(queries, keys, 4, normalize=False)
    assert got.recomputed_rows < len(queries)
    assert np.array_equal(got.idx, _exact_order(queries, keys, 4))


def test_certified_pass_with_fewer_keys_than_candidates_rescores_them_all(monkeypatch):
    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(7)
    keys = S.l2_normalize(rng.standard_normal((30, 64)).astype(np.float32))
    queries = S.l2_normalize(rng.standard_normal((10, 64)).astype(np.float32))
    got = S.topk_cosine(queries, keys, 5, normalize=False)
    assert got.recomputed_rows == 0 and got.widened_rows == 0
    assert np.array_equal(got.idx, _exact_order(queries, keys, 5))
    own = S.topk_cosine(keys, keys, 29, normalize=False, exclude_self=True)  # every other key is a candidate
    exact = keys.astype(np.float64) @ keys.astype(np.float64).T
    np.fill_diagonal(exact, -np.inf)
    assert own.recomputed_rows == 0
    assert np.array_equal(own.idx, np.argsort(-exact, axis=1, kind="stable")[:, :29])


def _exact_variant_order(q_variants, key_variants, k, exclude_self=False):
    """float64 top-k of the max over every (query variant, key variant) pair."""
    exact = np.einsum("gnd,vmd->gvnm", q_variants.astype(np.float64), key_variants.astype(np.float64)).max(axis=(0, 1))
    if exclude_self:
        np.fill_diagonal(exact, -np.inf)
    return np.argsort(-exact, axis=1, kind="stable")[:, :k], exact


def _descriptor_like(rng, n, variants, dim=143):
    """Unit vectors in clusters, each with `variants` slightly perturbed versions (like rotations and crops)."""
    base, _ = _clustered(rng, n, dim=dim)
    out = base[None] + 0.3 * rng.standard_normal((variants, n, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def test_certified_pass_over_query_and_key_variants_matches_float64(monkeypatch):
    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(8)
    queries, keys = _descriptor_like(rng, 150, 8), _descriptor_like(rng, 700, 10)
    got = S.topk_cosine(queries, keys, 5, normalize=False, block_bytes=1 << 20)  # many chunks
    want, exact = _exact_variant_order(queries, keys, 5)
    assert got.recomputed_rows <= queries.shape[1] // 10
    assert np.array_equal(got.idx, want)
    assert np.abs(got.sims - np.take_along_axis(exact, want, 1)).max() < 1e-5
    # queries that are the keys, each row's own key left out (the audit's T -> T search)
    own = S.topk_cosine(keys[:8], keys, 3, normalize=False, exclude_self=True)
    assert np.array_equal(own.idx, _exact_variant_order(keys[:8], keys, 3, exclude_self=True)[0])


def test_search_is_ieee_float32_whatever_the_process_matmul_precision(monkeypatch):
    import torch

    from pixcell_fed.audit import search as S

    monkeypatch.setattr(S, "_bf16_gemm_pays", lambda *a, **kw: True)
    rng = np.random.default_rng(9)
    keys, centers = _clustered(rng, 800, dim=128)
    queries, _ = _clustered(rng, 100, dim=128, centers=centers)
    q, k = S.l2_normalize(queries), S.l2_normalize(keys)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # lets oneDNN (and cuBLAS: TF32) compute float32 products in bf16
    try:
        got = S.topk_cosine(q, k, 5, normalize=False)
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the search
    finally:
        torch.set_float32_matmul_precision(saved)
    assert np.array_equal(got.idx, _exact_order(q, k, 5))


def test_audit_device_setting_is_checked_and_auto_falls_back_to_the_cpu():
    import pytest
    import torch

    from pixcell_fed.audit.search import search_device
    from pixcell_fed.config.schema import AuditConfig

    assert AuditConfig().device == "auto"
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        AuditConfig(device=good)
    with pytest.raises(ValueError, match="audit.device"):
        AuditConfig(device="gpu0")
    assert search_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
