"""GPU checks of the real loader and sampler on tiny twins (opt-in: ``pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixcell_fed.encoders import load_encoder
from pixcell_fed.generation import load_pixcell
from pixcell_fed.testing.twins import save_tiny_pixcell, save_tiny_uni, save_tiny_vae

pytestmark = pytest.mark.gpu


def test_bf16_on_cuda_is_reproducible_and_decodes_in_bf16(tmp_path):
    pipe = load_pixcell(save_tiny_pixcell(tmp_path / "p", 256), save_tiny_vae(tmp_path / "v"), device="cuda")
    if torch.cuda.is_bf16_supported():  # auto dtype: bf16 transformer, and the VAE decodes in bf16 too
        assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    else:  # fp16 transformer; the SD3.5 VAE is unstable in fp16, so it decodes in fp32
        assert pipe.transformer.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    assert pipe.identity["vae_dtype"] == str(pipe.vae.dtype).removeprefix("torch.")
    assert pipe.auto_batch_size() >= 1
    encoder = load_encoder("uni2-h", save_tiny_uni(tmp_path / "u"), device="cuda")
    assert encoder.device.type == "cuda" and encoder.dtype == torch.float32  # PixCell's conditioning: float32
    rng = np.random.default_rng(0)
    cond = encoder.embed(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))[:, None, :]
    a = pipe.generate(cond, seeds=[1, 2, 3, 4], steps=4)
    b = pipe.generate(cond, seeds=[1, 2, 3, 4], steps=4)
    assert np.array_equal(a, b)
    alone = pipe.generate(cond[2:3], seeds=[3], steps=4)
    assert np.abs(alone[0].astype(int) - a[2].astype(int)).mean() < 1.0
