"""Local DP-SGD (Opacus) on real tiles: secret noise and sampling, epsilon against independent computations,
settings that give no privacy refused, FedAvg.

The replay tests are the curious coordinator's attack of issue 19: it knows the weights it sent, every setting,
the round number and the size of the training set, and replays the round. On the code before this change
(``torch.manual_seed(round)`` and Opacus's default generators) the replay gave the site's noise bit for bit and
subtracting it left noiseless clipped SGD to about 1e-7.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles
from pixcell_fed.training import dp as D
from pixcell_fed.training.dp_accounting import default_delta, epsilon_spent
from pixcell_fed.training.models import ModelSpec, build_model

# a ViT of about 7,000 parameters: DP-SGD's per-sample gradients are costly on a shared 2-core machine
SPEC = ModelSpec(arch=TINY_VIT["arch"], classes=("dense", "sparse"), img_size=32,
                 kwargs={"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2})


def _data(n=24, seed=3):
    from pixcell_fed.training.data import to_tensor

    tiles = real_labelled_tiles(n, size=32, seed=seed)
    x = to_tensor(np.stack([t for t, _ in tiles]), SPEC)
    y = torch.tensor([0 if lab == "dense" else 1 for _, lab in tiles])
    return x, y


def _model():
    torch.manual_seed(0)
    return build_model(SPEC)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


def test_dp_step_trains_and_reports_exactly_its_planned_steps():
    x, y = _data()
    model = _model()
    before = copy.deepcopy(model.state_dict())
    settings = D.DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, epochs=2, batch_size=8, lr=0.05)
    trained, steps = D.local_dp_train(model, x, y, settings)
    assert set(trained.state_dict()) == set(before)  # plain timm keys, ready for FedAvg and evaluation
    assert any(not torch.equal(trained.state_dict()[k], before[k]) for k in before)
    # 24 tiles, batch 8: Opacus samples with rate 1/3 and takes 3 steps per epoch
    assert steps == D.DPSteps(noise_multiplier=1.0, sample_rate=1 / 3, steps=6) == D.planned_steps(24, settings)


@pytest.mark.parametrize("bad", [dict(noise_multiplier=0.0), dict(noise_multiplier=-1.0), dict(noise_multiplier=math.nan),
                                 dict(noise_multiplier=math.inf), dict(max_grad_norm=0.0), dict(epochs=0),
                                 dict(batch_size=0), dict(lr=math.inf)])
def test_settings_without_privacy_or_sense_are_refused(bad):
    with pytest.raises(ValueError):
        D.DPSettings(**{**dict(noise_multiplier=1.0, max_grad_norm=1.0, epochs=1, batch_size=8, lr=0.1), **bad})


def _record_noise(monkeypatch) -> list[torch.Tensor]:
    """Capture every noise tensor Opacus draws (what the coordinator's replay collects)."""
    import opacus.optimizers.optimizer as O

    drawn: list[torch.Tensor] = []
    real = O._generate_noise

    def spy(*args, **kwargs):
        noise = real(*args, **kwargs)
        drawn.append(noise.detach().clone())
        return noise

    monkeypatch.setattr(O, "_generate_noise", spy)
    return drawn


def _noiseless_clipped_sgd(model, x, y, *, clip: float, lr: float) -> dict:
    """One full-batch clipped SGD step, computed independently of Opacus with a per-example loop."""
    params = dict(model.named_parameters())
    per_example = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_example.append({k: p.grad.detach().clone() for k, p in params.items()})
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for grads in per_example:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for k, g in grads.items():
            total[k] += g * factor
    return {k: (p.detach() - lr * total[k] / len(x)) for k, p in params.items()}


def _replay_attack(monkeypatch, *, round_no=1, lr=0.5):
    """Site round and coordinator replay of one full-batch step; returns (residual, noise size) of the denoised
    site weights against noiseless clipped SGD."""
    x, y = _data(n=8, seed=11)
    settings = D.DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, epochs=1, batch_size=8, lr=lr)  # q = 1: one step
    model0 = _model()
    torch.manual_seed(round_no)  # what the site's process state would be if derived from the coordinator's round
    site, _ = D.local_dp_train(copy.deepcopy(model0), x, y, settings)
    # the coordinator: same weights, settings and round, fake data of the reported size, noise recorded
    drawn = _record_noise(monkeypatch)
    torch.manual_seed(round_no)
    D.local_dp_train(copy.deepcopy(model0), torch.zeros_like(x), torch.zeros_like(y), settings)
    names = [k for k, p in model0.named_parameters() if p.requires_grad]
    assert len(drawn) == len(names)  # one noise tensor per parameter for the one step
    replayed = {k: lr * n / len(x) for k, n in zip(names, drawn)}
    clean = _noiseless_clipped_sgd(copy.deepcopy(model0), x, y, clip=1.0, lr=lr)
    denoised = {k: site.state_dict()[k].double() + replayed[k].double() for k in names}
    residual = float((_flat(denoised) - _flat({k: clean[k] for k in names})).norm())
    return residual, float(_flat(replayed).norm())


def test_coordinator_replay_cannot_remove_the_noise(monkeypatch):
    residual, noise = _replay_attack(monkeypatch)
    # with replayable noise the residual is ~1e-7 of the noise; with secret noise it is that of a second, independent
    # draw: about sqrt(2) times the noise
    assert residual > 0.5 * noise, (residual, noise)


def test_the_replay_attack_works_when_the_generators_are_replayable(monkeypatch):
    """Control: the same attack on generators the coordinator can reproduce recovers noiseless clipped SGD."""
    monkeypatch.setattr(D, "secret_generator", lambda: torch.Generator().manual_seed(1))
    residual, noise = _replay_attack(monkeypatch)
    assert residual < 1e-4 * noise, (residual, noise)


def _batch_recorder(monkeypatch):
    """Run a round and return the index sets its Poisson sampler drew."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    batches: list[list[int]] = []
    real = UniformWithReplacementSampler.__iter__

    def spy(self):
        for batch in real(self):
            batches.append(sorted(int(i) for i in batch))
            yield batch

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", spy)

    def run(x, y, settings) -> list[list[int]]:
        batches.clear()
        torch.manual_seed(1)
        D.local_dp_train(_model(), x, y, settings)
        return list(batches)

    return run


def test_poisson_batches_are_secret(monkeypatch):
    x, y = _data(n=24)
    settings = D.DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, epochs=2, batch_size=8, lr=0.05)
    run = _batch_recorder(monkeypatch)
    site, replay = run(x, y, settings), run(torch.zeros_like(x), torch.zeros_like(y), settings)
    assert len(site) == len(replay) == 6 and site != replay
    monkeypatch.setattr(D, "secret_generator", lambda: torch.Generator().manual_seed(1))  # control: replayable
    assert run(x, y, settings) == run(torch.zeros_like(x), torch.zeros_like(y), settings)


def test_opacus_secure_rng_warning_is_not_silenced_globally():
    from opacus import PrivacyEngine

    x, y = _data(n=8)
    D.local_dp_train(_model(), x, y, D.DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, lr=0.05))
    with pytest.warns(UserWarning, match="Secure RNG turned off"):
        PrivacyEngine()


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with GDP parameter mu (Dong, Roth, Su): composition of T full-batch
    steps with noise sigma is mu = sqrt(T) / sigma."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 500)


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 3, 1e-5), (2.0, 10, 1e-3), (0.8, 1, 1e-2)])
def test_epsilon_matches_the_closed_form_at_full_batch(sigma, steps, delta):
    exact = _gdp_epsilon(math.sqrt(steps) / sigma, delta)
    eps = epsilon_spent([D.DPSteps(sigma, 1.0, steps)], delta)
    assert exact <= eps <= exact + 0.05  # the PRV accountant's upper bound, within its error


def test_epsilon_of_subsampled_steps_against_the_rdp_accountant_run_separately():
    from opacus.accountants import RDPAccountant

    history = [D.DPSteps(1.0, 1 / 3, 6), D.DPSteps(1.2, 1 / 4, 8), D.DPSteps(1.0, 1 / 3, 3)]
    rdp = RDPAccountant()
    rdp.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    eps_rdp = rdp.get_epsilon(1e-3)
    eps = epsilon_spent(history, 1e-3)
    assert 0.6 * eps_rdp < eps <= eps_rdp  # PRV is tighter than RDP, never looser
    assert eps > epsilon_spent(history[:2], 1e-3) > epsilon_spent(history[:1], 1e-3) > 0  # composition only adds


def test_no_finite_epsilon_and_default_delta():
    assert epsilon_spent([], 1e-5) == 0.0
    assert epsilon_spent([D.DPSteps(0.01, 0.5, 100)], 1e-5) == math.inf
    for n in (3, 8, 10, 999, 10 ** 5):
        delta = default_delta(n)
        assert delta <= 1 / (10 * n) < 10 * delta and math.log10(delta) == round(math.log10(delta))


def test_fedavg_weighted():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(5)}
    out = D.fedavg([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([3.0, 2.0])) and int(out["n"]) == 3
