"""Schedules, q_sample and the samplers against closed forms and an analytic ε oracle."""

import math

import numpy as np
import pytest
import torch

from mrdiff.diffusion.loss import simple_loss
from mrdiff.diffusion.samplers import PerSampleNoise, ddim_sample, ddim_timesteps, ddpm_sample
from mrdiff.diffusion.schedule import NoiseSchedule


def test_linear_schedule_closed_forms():
    s = NoiseSchedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    assert s.betas.dtype == np.float64
    for t in (0, 1, 10, 500, 999):
        assert s.alphas_cumprod[t] == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    t = 300
    expected = betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    assert s.posterior_variance[t] == pytest.approx(expected, rel=1e-12)
    assert s.posterior_variance[0] == 0.0  # β̃_0 = β_0 (1 − ᾱ_{−1}) / (1 − ᾱ_0) with ᾱ_{−1} = 1


def test_cosine_schedule_matches_its_definition():
    s = NoiseSchedule(kind="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        NoiseSchedule(beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        NoiseSchedule(kind="sigmoid")


def test_fractional_maps_are_inverse_and_exact_at_integers():
    s = NoiseSchedule()
    t = torch.tensor([0.0, 12.5, 499.75, 998.0])
    assert torch.allclose(s.t_from_sigma_rf(s.sigma_rf_at(t)), t.double(), atol=1e-6)
    assert torch.allclose(s.t_from_log_snr(s.log_snr_at(t)), t.double(), atol=1e-6)
    ab = s.alphas_cumprod_at(torch.tensor([3.0, 700.0]))
    assert torch.allclose(ab, torch.tensor(s.alphas_cumprod[[3, 700]]), rtol=1e-12)


def test_q_sample_moments():
    s = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.5, dtype=torch.float64)
    t = torch.full((200_000,), 400)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    ab = s.alphas_cumprod[400]
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=4 * math.sqrt((1 - ab) / 200_000))
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.01)


def gaussian_oracle(schedule: NoiseSchedule, data_var: float):
    """Bayes-optimal ε for x_0 ~ N(0, v): ε*(x_t) = √(1−ᾱ_t) x_t / (ᾱ_t v + 1 − ᾱ_t)."""

    def eps(x, t):
        ab = schedule.alphas_cumprod_at(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return (1 - ab).sqrt() * x / (ab * data_var + 1 - ab)

    return eps


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_with_exact_eps_reproduces_data_variance(variance):
    s, v = NoiseSchedule(), 0.25
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(20_000, 1, 2, 2, generator=gen, dtype=torch.float64)
    x0 = ddpm_sample(gaussian_oracle(s, v), s, x_T, variance=variance, noise=gen)
    assert x0.var().item() == pytest.approx(v, rel=0.03)
    assert abs(x0.mean().item()) < 0.01


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_exact_eps_reproduces_data_variance(eta):
    s, v = NoiseSchedule(), 0.25
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(20_000, 1, 2, 2, generator=gen, dtype=torch.float64)
    x0 = ddim_sample(gaussian_oracle(s, v), s, x_T, steps=500, eta=eta, noise=gen)
    assert x0.var().item() == pytest.approx(v, rel=0.03)


def test_ddim_error_shrinks_with_steps():
    """DDIM is a first-order solver: with an exact ε its variance error falls as steps grow."""
    s, v = NoiseSchedule(), 0.25
    x_T = torch.ones(1, 1, 1, 1, dtype=torch.float64)  # the samplers are linear in x_T for this oracle
    errors = [abs(ddim_sample(gaussian_oracle(s, v), s, x_T, steps=n).item() ** 2 - v) for n in (25, 100, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 * v


def test_ddim_timesteps_span_the_schedule():
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_samplers_feed_time_cond_and_keep_nominal_coefficients():
    s = NoiseSchedule()
    seen = []

    def eps(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x_T = torch.ones(2, 1, 1, 1)
    plain = ddim_sample(eps, s, x_T, steps=5)
    shifted = ddim_sample(eps, s, x_T, steps=5, time_cond=lambda t: t * 0.5)
    assert torch.equal(plain, shifted)  # ε = 0: coefficients alone decide, and they stay at the nominal t
    assert [float(t[0]) for t in seen[5:]] == [0.5 * float(t[0]) for t in seen[:5]]


def test_per_sample_noise_does_not_depend_on_batch_composition():
    s = NoiseSchedule(num_timesteps=50)
    eps = gaussian_oracle(s, 0.5)
    seeds = [3, 4, 5, 6]
    together = PerSampleNoise(seeds)
    x_T = together.randn((1, 4, 4))
    full = ddpm_sample(eps, s, x_T, noise=together)
    alone = PerSampleNoise(seeds[2:3])
    part = ddpm_sample(eps, s, alone.randn((1, 4, 4)), noise=alone)
    assert torch.allclose(full[2:3], part, atol=1e-6)


def test_min_snr_weighting_downweights_only_low_noise_steps():
    """Min-SNR-γ: weight min(SNR, γ)/SNR per sample; with a constant-error ε the loss is the mean weight."""
    from mrdiff.module import DiffusionModule

    class Zero(torch.nn.Module):  # ε̂ = 0: every sample's squared error is E[ε²] ≈ 1
        stem = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, t, grid=None, scale=None, prepared=None):
            return torch.zeros_like(x)

    batch = {"image": torch.zeros(4096, 3, 4, 4)}
    uniform = DiffusionModule(Zero(), warmup_steps=1)
    weighted = DiffusionModule(Zero(), warmup_steps=1, loss_weighting="min_snr", snr_gamma=5.0)
    a = uniform.diffusion_loss(batch, torch.Generator().manual_seed(0))
    b = weighted.diffusion_loss(batch, torch.Generator().manual_seed(0))
    alphas_cumprod = uniform.schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    expected_weight = float(np.mean(np.minimum(snr, 5.0) / snr))  # t uniform over the schedule
    assert float(a) == pytest.approx(1.0, abs=0.02)
    assert float(b) == pytest.approx(expected_weight, rel=0.05)
    assert 0.85 < expected_weight < 0.95  # linear schedule: SNR > 5 for about the first 13% of timesteps
    huge = DiffusionModule(Zero(), warmup_steps=1, loss_weighting="min_snr", snr_gamma=1e9)
    assert float(huge.diffusion_loss(batch, torch.Generator().manual_seed(0))) == pytest.approx(float(a), rel=1e-6)


# -- L_simple (diffusion/loss.py), time_cond and clipping in the samplers -----------------------------------

HALF = NoiseSchedule(num_timesteps=2, beta_start=0.5, beta_end=2 / 3)  # ᾱ = [1/2, 1/6]: SNR 1 and 1/5


def test_simple_loss_goes_through_q_sample_and_weights_min_snr_by_hand():
    x0 = torch.rand(64, 3, 4, 4, dtype=torch.float64) * 2 - 1
    seen = []

    def oracle(x_t, t, offset=0.0):  # ε recovered from x_t = √ᾱ x0 + √(1−ᾱ) ε, plus an offset
        seen.append(t.long())
        ab = torch.tensor([1 / 2, 1 / 6], dtype=torch.float64)[t.long()].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt() + offset

    assert float(simple_loss(oracle, HALF, x0)) == pytest.approx(0.0, abs=1e-20)
    off = lambda x_t, t: oracle(x_t, t, 1.0)  # noqa: E731
    assert float(simple_loss(off, HALF, x0)) == pytest.approx(1.0)
    assert float(simple_loss(off, HALF, x0, weighting="min_snr", snr_gamma=5.0)) == pytest.approx(1.0)
    loss = simple_loss(off, HALF, x0, weighting="min_snr", snr_gamma=0.2, generator=torch.Generator().manual_seed(0))
    t = seen[-1]
    assert 0 < int(t.sum()) < 64  # both timesteps drawn
    weights = torch.where(t == 0, 0.2, 1.0)  # min(SNR, 0.2)/SNR for SNR 1 and 1/5
    assert float(loss) == pytest.approx(float(weights.double().mean()))


def test_ddpm_feeds_time_cond_to_the_network_and_keeps_coefficients_at_nominal_t():
    schedule, fed = NoiseSchedule(num_timesteps=10), []

    def eps(x, t):
        fed.append(t[0].item())
        return 0.1 * x  # ignores t: only the coefficients can tell two runs apart

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = ddpm_sample(eps, schedule, x_T, noise=torch.Generator().manual_seed(1))
    shifted = ddpm_sample(eps, schedule, x_T, noise=torch.Generator().manual_seed(1), time_cond=lambda t: t / 2 + 3)
    assert fed[:10] == [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert fed[10:] == [7.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0]  # t/2 + 3
    assert torch.equal(plain, shifted)


def test_clip_denoised_bounds_x0_in_ddim_and_ddpm():
    x_T = torch.full((1, 1, 2, 2), 5.0)
    x_T[..., 0, 0] = -5.0

    def zero(x, t):
        return torch.zeros_like(x)

    # DDIM with one step returns x̂_0 = x_T/√ᾱ_{T−1} (ᾱ_prev = 1): 5·√6 unclipped, ±1 clipped
    assert ddim_sample(zero, HALF, x_T, steps=1).flatten().tolist() == pytest.approx([-12.247449, *[12.247449] * 3])
    assert ddim_sample(zero, HALF, x_T, steps=1, clip_denoised=True).flatten().tolist() == [-1.0, 1.0, 1.0, 1.0]
    # DDPM's last step returns x̂_0 itself (coefficient 1 on x̂_0, 0 on x_t)
    clipped = ddpm_sample(zero, HALF, x_T, noise=torch.Generator().manual_seed(0), clip_denoised=True)
    free = ddpm_sample(zero, HALF, x_T, noise=torch.Generator().manual_seed(0))
    assert clipped.abs().max() == 1.0 and free.abs().max() > 5
