"""Exact top-k cosine nearest-neighbour search in chunks (torch matmul + topk, CPU or GPU).

The keys stay resident; queries go through in row chunks sized so that one (chunk x keys) similarity block fits
in ``block_bytes``. Each block is one float32 GEMM written into a reused buffer, followed by ``torch.topk``:
no Python work per row, no heap per query. On CPU the GEMM is numpy's (OpenBLAS) writing into the buffer, which
``torch.topk`` then reads without a copy; on GPU both are torch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TopK:
    """Similarities (N, k), descending, and key indices (N, k) of the k nearest keys of each query.

    ``recomputed_rows``: rows the certified bf16 pass could not certify and recomputed in float32.
    """

    sims: np.ndarray
    idx: np.ndarray
    recomputed_rows: int = 0


def _device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-12)


def topk_cosine(queries: np.ndarray, keys: np.ndarray, k: int, *, normalize: bool = True, exclude_self: bool = False,
                device: str | None = "cpu", block_bytes: int = 256 * 2**20) -> TopK:
    """Exact top-``k`` cosine neighbours of each query among ``keys``.

    ``queries`` is (N, D), or (G, N, D) for a group of G variants per query; ``keys`` is (M, D), or (V, M, D) for V
    variants per key. The score of a (query, key) pair is the maximum over all variant pairs. ``exclude_self``
    (queries are the keys, row i is key i) skips each row's own index. Returns a :class:`TopK`.
    """
    import torch

    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 2:
        q = q[None]
    if q.ndim != 3:
        raise ValueError(f"queries must be (N, D) or (G, N, D), got shape {np.shape(queries)}")
    keys = np.asarray(keys, dtype=np.float32)
    if keys.ndim == 2:
        keys = keys[None]
    groups, n, dim = q.shape
    if keys.ndim != 3 or keys.shape[2] != dim:
        raise ValueError(f"keys must be (M, {dim}) or (V, M, {dim}), got shape {keys.shape}")
    kvar, m = keys.shape[0], keys.shape[1]
    k_eff = min(k, m - (1 if exclude_self else 0))
    if n == 0 or k_eff <= 0:
        return TopK(np.zeros((n, max(k_eff, 0)), np.float32), np.zeros((n, max(k_eff, 0)), np.int64))
    if normalize:
        q = l2_normalize(q)
        keys = l2_normalize(keys)
    dev = _device(device)
    if dev.type == "cpu" and groups == 1 and kvar == 1 and _bf16_gemm_pays(n, m, dim, k_eff):
        return _topk_bf16_certified(q[0], keys[0], k_eff, exclude_self=exclude_self, block_bytes=block_bytes)
    keys_flat = np.ascontiguousarray(keys.reshape(kvar * m, dim))
    chunk = max(1, min(n, block_bytes // (4 * m * kvar * groups)))
    on_cpu = dev.type == "cpu"
    if on_cpu:
        buf_np = np.empty((groups * chunk, kvar * m), dtype=np.float32)
        buf = torch.from_numpy(buf_np)
    else:
        key_t = torch.from_numpy(keys_flat).to(dev)
        buf = torch.empty((groups * chunk, kvar * m), dtype=torch.float32, device=dev)
    out_s = np.empty((n, k_eff), dtype=np.float32)
    out_i = np.empty((n, k_eff), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = stop - start
            block_q = q[:, start:stop].reshape(groups * rows, dim)
            if on_cpu:
                np.matmul(block_q, keys_flat.T, out=buf_np[: groups * rows])
                sims = buf[: groups * rows]
            else:
                sims = torch.mm(torch.from_numpy(np.ascontiguousarray(block_q)).to(dev), key_t.T,
                                out=buf[: groups * rows])
            if kvar > 1:
                sims = sims.view(groups * rows, kvar, m).amax(dim=1)
            if groups > 1:
                sims = sims.view(groups, rows, m).amax(dim=0)
            if exclude_self:
                ar = torch.arange(rows, device=dev)
                sims[ar, ar + start] = float("-inf")
            top = torch.topk(sims, k_eff, dim=1, largest=True, sorted=True)
            out_s[start:stop] = top.values.cpu().numpy()
            out_i[start:stop] = top.indices.cpu().numpy()
    return TopK(out_s, out_i)


#: extra candidates kept from the bf16 pass for exact rescoring (k' = k + _EXTRA; enough that the bound certifies nearly every row)
_EXTRA = 59
_U_BF16 = 2.0 ** -8     # unit roundoff of bfloat16 (8 significant bits, round to nearest)


def _bf16_gemm_pays(n: int, m: int, dim: int, k: int) -> bool:
    """Use the bf16 first pass for large searches on CPUs with native bf16 dot products (AVX512-BF16/AMX)."""
    import torch

    if n * m * dim < 2e10 or m < 4 * (k + _EXTRA):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and _cpu_has_bf16()
    except AttributeError:
        return False


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _topk_bf16_certified(q: np.ndarray, keys: np.ndarray, k: int, *, exclude_self: bool, block_bytes: int) -> TopK:
    """Exact top-``k`` inner products: a bf16 GEMM proposes ``k + 59`` candidates per query, fp32 rescores them, and
    a rigorous error bound certifies that no other key can enter the top ``k``; rows it cannot certify are
    recomputed in fp32 in full. The result equals the fp32 search (up to fp32 rounding of the scores).

    Bound for a key j outside the candidates, whose bf16 score ``b_j`` is at most the last candidate's ``b*``:
    ``q.k_j <= max(b*, 0) / (1 - u) + |q_b| max|k - k_b| + |q - q_b| max|k| + g_D |q_b| max|k_b|`` with ``u`` the bf16
    unit roundoff (the GEMM's output is rounded to bf16), ``q_b``/``k_b`` the bf16 vectors, and ``g_D`` the fp32
    accumulation error of a length-D dot product (oneDNN accumulates bf16 products in fp32).
    """
    import torch

    qt = torch.from_numpy(np.ascontiguousarray(q))
    kt = torch.from_numpy(np.ascontiguousarray(keys))
    n, m, dim = qt.shape[0], kt.shape[0], kt.shape[1]
    qb, kb = qt.bfloat16(), kt.bfloat16()
    k_res = (kt - kb.float()).norm(dim=1).max().item()
    k_norm = kt.norm(dim=1).max().item()
    kb_norm = kb.float().norm(dim=1).max().item()
    gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    kp = min(m - (1 if exclude_self else 0), k + _EXTRA)
    chunk = max(1, min(n, block_bytes // (2 * m)))
    out_s = np.empty((n, k), dtype=np.float32)
    out_i = np.empty((n, k), dtype=np.int64)
    recomputed = 0
    with torch.inference_mode():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = stop - start
            approx = torch.mm(qb[start:stop], kb.T)
            if exclude_self:
                ar = torch.arange(rows)
                approx[ar, ar + start] = float("-inf")
            cand_v, cand_i = torch.topk(approx, kp, dim=1, largest=True, sorted=True)
            del approx
            exact = torch.cat([torch.einsum("rd,rkd->rk", qt[start + a:start + min(a + 256, rows)], kt[cand_i[a:a + 256]])
                               for a in range(0, rows, 256)])  # gathered candidates in slices: bounded memory
            top_v, pos = torch.topk(exact, k, dim=1, largest=True, sorted=True)
            top_i = torch.gather(cand_i, 1, pos)
            q_b = qb[start:stop].float()
            bound = (q_b.norm(dim=1) * k_res + (qt[start:stop] - q_b).norm(dim=1) * k_norm
                     + gamma * q_b.norm(dim=1) * kb_norm)
            ceiling = cand_v[:, -1].float().clamp(min=0) / (1 - _U_BF16) + bound
            if kp == m - (1 if exclude_self else 0):
                ceiling = torch.full_like(ceiling, float("-inf"))  # every key was a candidate
            uncertain = torch.nonzero(top_v[:, -1] <= ceiling).flatten()
            if len(uncertain):
                recomputed += len(uncertain)
                full = torch.mm(qt[start:stop][uncertain], kt.T)
                if exclude_self:
                    full[torch.arange(len(uncertain)), uncertain + start] = float("-inf")
                fv, fi = torch.topk(full, k, dim=1, largest=True, sorted=True)
                top_v[uncertain], top_i[uncertain] = fv, fi
            out_s[start:stop] = top_v.numpy()
            out_i[start:stop] = top_i.numpy()
    return TopK(out_s, out_i, recomputed_rows=recomputed)


def numpy_topk_cosine(queries: np.ndarray, keys: np.ndarray, k: int, *, chunk: int = 1024) -> TopK:
    """Plain numpy chunked product + argpartition: the reference implementation (tests, benchmark baseline)."""
    q = l2_normalize(queries)
    keys = l2_normalize(keys)
    n = len(q)
    k = min(k, len(keys))
    out_s = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    for start in range(0, n, chunk):
        sims = q[start:start + chunk] @ keys.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        out_i[start:start + chunk] = np.take_along_axis(part, order, axis=1)
        out_s[start:start + chunk] = np.take_along_axis(vals, order, axis=1)
    return TopK(out_s, out_i)
