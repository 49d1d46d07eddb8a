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
    assert torch.cuda.is_available(), "run the gpu tests on a machine with a CUDA GPU"
    pipe = load_pixcell(save_tiny_pixcell(tmp_path / "p", 256), save_tiny_vae(tmp_path / "v"), device="cuda")
    assert pipe.transformer.dtype in (torch.bfloat16, torch.float16) and pipe.vae.dtype in (torch.bfloat16, torch.float32)
    assert pipe.auto_batch_size() >= 1
    encoder = load_encoder("uni2-h", save_tiny_uni(tmp_path / "u"), device="cuda")
    rng = np.random.default_rng(0)
    cond = encoder.embed(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))[:, None, :]
    a = pipe.generate(cond, seeds=[1, 2, 3, 4], steps=4)
    b = pipe.generate(cond, seeds=[1, 2, 3, 4], steps=4)
    assert np.array_equal(a, b)
    alone = pipe.generate(cond[2:3], seeds=[3], steps=4)
    assert np.abs(alone[0].astype(int) - a[2].astype(int)).mean() < 1.0
