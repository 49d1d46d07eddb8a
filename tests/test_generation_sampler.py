"""The sampler equals a plain DPM-Solver++ + CFG loop written here with diffusers' scheduler, step by step.

Conditioning comes from real H&E pixels (the CMU slide) embedded with the twin UNI2-h through the real encoder code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from pixcell_fed.encoders import load_encoder
from pixcell_fed.errors import UsageError
from pixcell_fed.generation import load_pixcell
from pixcell_fed.generation.sampler import cut_grid, seeds_for
from pixcell_fed.testing.real_slide import real_slide_path
from pixcell_fed.testing.twins import save_tiny_pixcell, save_tiny_uni, save_tiny_vae


@pytest.fixture(scope="module")
def real_tiles():
    import openslide

    with openslide.OpenSlide(str(real_slide_path())) as slide:
        spots = [(600, 700), (1100, 1300), (1500, 1800), (800, 2200)]
        return np.stack([np.asarray(slide.read_region(xy, 0, (256, 256)).convert("RGB")) for xy in spots])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_tiles):
    root = tmp_path_factory.mktemp("sampler")
    vae = save_tiny_vae(root / "vae")
    encoder = load_encoder("uni2-h", save_tiny_uni(root / "uni"))
    return {
        "p256": load_pixcell(save_tiny_pixcell(root / "p256", 256, sample_size=8), vae),  # 64 px tiles: fast
        "p1024": load_pixcell(save_tiny_pixcell(root / "p1024", 1024, with_y_pos_embed=False, sample_size=8), vae),
        "cond": encoder.embed(real_tiles)[:, None, :],
        "encoder": encoder,
    }


def reference_loop(pipe, cond, seeds, steps, guidance):
    """Textbook sampling: per-seed N(0, I) noise, DPM-Solver++ (order 2), CFG against the saved null embedding only
    when the weight is above 1 (PixArt's rule: ``do_classifier_free_guidance = guidance_scale > 1.0``)."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
    )
    scheduler.set_timesteps(steps)
    model = pipe.transformer
    c = model.config.in_channels
    n = model.config.sample_size
    latents = torch.stack([torch.randn(c, n, n, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents * scheduler.init_noise_sigma
    cond = torch.as_tensor(cond, dtype=torch.float32)
    null = model.caption_projection.uncond_embedding.expand(len(seeds), -1, -1)
    trajectory = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            ts = torch.full((len(seeds),), int(t))
            eps_c = model(latents, encoder_hidden_states=cond, timestep=ts).sample[:, :c]
            if guidance > 1.0:
                eps_u = model(latents, encoder_hidden_states=null, timestep=ts).sample[:, :c]
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = eps_c
            latents = scheduler.step(eps, t, latents).prev_sample
            trajectory.append(latents.clone())
        vae = pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    image = ((image.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return trajectory, image


@pytest.mark.parametrize("variant,guidance", [("p256", 2.0), ("p256", 1.0), ("p256", 0.5), ("p256", 0.0), ("p1024", 1.2)])
def test_sampler_matches_reference_loop_step_by_step(setup, variant, guidance):
    pipe = setup[variant]
    if variant == "p256":
        cond = setup["cond"][:3]
    else:
        cond = np.stack([np.roll(setup["cond"][:, 0], k, axis=0).repeat(4, axis=0) for k in range(2)])  # [2, 16, 48]
    seeds = [11, 22, 33][: len(cond)]
    steps = 6
    ref_traj, ref_image = reference_loop(pipe, cond, seeds, steps, guidance)
    ours = []
    cond_t, seeds_v, steps_v, w = pipe.validate(cond, seeds, steps, guidance)
    latents = pipe.sample_latents(cond_t, seeds_v, steps_v, w, on_step=lambda i, t, x: ours.append(x.clone()))
    assert len(ours) == steps
    for i, (a, b) in enumerate(zip(ours, ref_traj)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {i}")
    image = pipe.generate(cond, seeds=seeds, steps=steps, guidance=guidance)
    assert image.dtype == np.uint8 and image.shape == ref_image.shape
    assert np.abs(image.astype(int) - ref_image.astype(int)).max() <= 1
    assert np.array_equal(pipe.decode(latents), image)


@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0])
def test_guidance_at_or_below_one_runs_only_the_conditional_branch(setup, guidance, monkeypatch):
    """PixArt samples the conditional prediction alone when w <= 1: one transformer pass of batch B per step, never
    the null embedding, and the same tile for every such w."""
    pipe = setup["p256"]
    cond, seeds = setup["cond"][:2], [3, 4]
    seen = []
    forward = pipe.transformer.forward

    def spy(hidden_states, encoder_hidden_states=None, **kwargs):
        seen.append(encoder_hidden_states.detach().clone())
        return forward(hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    image = pipe.generate(cond, seeds=seeds, steps=3, guidance=guidance)
    assert len(seen) == 3 and all(t.shape[0] == len(cond) for t in seen)
    null = pipe.null_conditioning(1)[0]
    assert not any(torch.equal(row, null) for t in seen for row in t)
    monkeypatch.undo()
    assert np.array_equal(image, pipe.generate(cond, seeds=seeds, steps=3, guidance=1.0))


def test_defaults_are_20_steps_and_paper_guidance(setup):
    import inspect

    pipe = setup["p256"]
    params = inspect.signature(pipe.generate).parameters
    assert params["steps"].default == 20 and params["guidance"].default is None
    assert setup["p256"].default_guidance == 2.0 and setup["p1024"].default_guidance == 1.2
    cond = setup["cond"][:1]
    assert np.array_equal(pipe.generate(cond, seeds=[5], steps=3), pipe.generate(cond, seeds=[5], steps=3, guidance=2.0))


def test_seeds_reproducible_and_independent_of_batching(setup):
    pipe = setup["p256"]
    cond = np.repeat(setup["cond"][:2], 2, axis=0)  # N = 2 samples per conditioning tile
    seeds = seeds_for(7, 4)
    a = pipe.generate(cond, seeds=seeds, steps=4)
    b = pipe.generate(cond, seeds=seeds, steps=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # same tile, different seeds, different samples
    c = pipe.generate(cond, seeds=seeds_for(8, 4), steps=4)
    assert not np.array_equal(a, c)
    # A sample does not depend on its batch neighbours or the batch size.
    alone = pipe.generate(cond[2:3], seeds=seeds[2:3], steps=4)
    assert np.abs(alone[0].astype(int) - a[2].astype(int)).max() <= 1
    small_batches = pipe.generate(cond, seeds=seeds, steps=4, batch_size=1)
    assert np.abs(small_batches.astype(int) - a.astype(int)).max() <= 1


def test_seeds_for_is_deterministic():
    assert seeds_for(3, 5) == seeds_for(3, 5)
    assert seeds_for(3, 5) != seeds_for(4, 5)
    assert all(0 <= s < 2**63 for s in seeds_for(3, 100)) and len(set(seeds_for(3, 100))) == 100


def test_cut_grid_is_row_major(setup):
    image = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    for k in range(16):
        r, c = divmod(k, 4)
        image[0, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = k
    tiles = cut_grid(image)
    assert tiles.shape == (16, 16, 16, 3)
    assert [int(t[0, 0, 0]) for t in tiles] == list(range(16))
    with pytest.raises(UsageError, match="4x4 grid"):
        cut_grid(np.zeros((1, 30, 30, 3), dtype=np.uint8))


def test_1024_grid_conditioning_from_real_pixels(setup, real_tiles):
    big = np.concatenate([np.concatenate(list(real_tiles), axis=1)] * 4, axis=0)[None]  # one 1024 px image
    cond = setup["encoder"].embed(cut_grid(big)).reshape(1, 16, -1)
    out = setup["p1024"].generate(cond, seeds=[1], steps=2)
    assert out.shape == (1, setup["p1024"].image_size, setup["p1024"].image_size, 3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cond": np.zeros((2, 1, 48), np.float32), "seeds": [1]}, "2 conditioning rows"),
        ({"cond": np.zeros((1, 16, 48), np.float32), "seeds": [1]}, r"\[B, 1, 48\]"),
        ({"cond": np.zeros((1, 1, 1536), np.float32), "seeds": [1]}, r"\[B, 1, 48\]"),
        ({"cond": np.zeros((1, 1, 48), np.int64), "seeds": [1]}, "floating point"),
        ({"cond": np.full((1, 1, 48), np.nan, np.float32), "seeds": [1]}, "NaN"),
        ({"cond": np.zeros((1, 1, 48), np.float32), "seeds": [-1]}, "seed"),
        ({"cond": np.zeros((1, 1, 48), np.float32), "seeds": [1], "steps": 0}, "steps"),
        ({"cond": np.zeros((1, 1, 48), np.float32), "seeds": [1], "guidance": -1.0}, "guidance"),
        ({"cond": np.zeros((1, 1, 48), np.float32), "seeds": [1], "batch_size": 0}, "batch_size"),
        ({"cond": np.zeros((0, 1, 48), np.float32), "seeds": []}, "no conditioning"),
        ({"cond": [[0.0] * 48], "seeds": [1]}, "numpy array or torch tensor"),
    ],
)
def test_inputs_validated_before_compute(setup, kwargs, message, monkeypatch):
    pipe = setup["p256"]
    monkeypatch.setattr(pipe, "sample_latents", lambda *a, **k: pytest.fail("compute started before validation"))
    with pytest.raises(UsageError, match=message) as err:
        pipe.generate(**kwargs)
    assert err.value.hint


def test_1024_error_explains_the_grid(setup):
    with pytest.raises(UsageError) as err:
        setup["p1024"].generate(np.zeros((1, 1, 48), np.float32), seeds=[0])
    assert "[B, 16, 48]" in str(err.value) and "4x4 grid" in err.value.hint and "row-major" in err.value.hint


def test_auto_batch_size_on_cpu_is_modest(setup):
    assert 1 <= setup["p256"].auto_batch_size() <= 8


def test_vae_decodes_in_chunks_with_the_same_result(setup, monkeypatch):
    pipe = setup["p256"]
    cond_t, seeds, steps, w = pipe.validate(setup["cond"][:3], [1, 2, 3], 2, None)
    latents = pipe.sample_latents(cond_t, seeds, steps, w)
    whole = pipe.decode(latents)
    monkeypatch.setattr(pipe, "decode_batch_size", lambda: 1)
    assert np.abs(pipe.decode(latents).astype(int) - whole.astype(int)).max() <= 1


def test_sde_solver_noise_is_per_sample_and_reproducible(setup):
    import copy

    pipe = copy.copy(setup["p256"])
    pipe.scheduler_config = {**pipe.scheduler_config, "algorithm_type": "sde-dpmsolver++"}
    cond = setup["cond"][:3]
    a = pipe.generate(cond, seeds=[4, 5, 6], steps=3, batch_size=3)
    assert np.array_equal(a, pipe.generate(cond, seeds=[4, 5, 6], steps=3, batch_size=3))
    alone = pipe.generate(cond[1:2], seeds=[5], steps=3)
    assert np.abs(alone[0].astype(int) - a[1].astype(int)).max() <= 1
    ode = setup["p256"].generate(cond, seeds=[4, 5, 6], steps=3, batch_size=3)
    assert not np.array_equal(a, ode)
