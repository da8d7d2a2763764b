"""Samplers as pure functions over an ε-callable (k-diffusion / EDM style).

`eps(x, t)` returns the model's ε prediction for a batch `x` conditioned on the float tensor `t` of
shape [B]. The samplers never see the network: grid, scale and weights are closed over by the caller.
`time_cond` maps the nominal timestep to the value fed to the network (NoiseShift's t̂, or the
analytic resolution shift); every update coefficient stays at the nominal t.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mrdiff.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]
TimeCond = Callable[[Tensor], Tensor]


class PerSampleNoise:
    """Gaussian noise with one generator per sample, so results do not depend on batch split or GPU count."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """[len(seeds), *shape]: sample i drawn from generator i."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        """Noise shaped like x, whose leading dimension must equal the number of seeds."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} per-sample seeds")
        return self.randn(x.shape[1:], x.dtype)


Noise = PerSampleNoise | torch.Generator | None


def randn_like(x: Tensor, noise: Noise) -> Tensor:
    """Standard normal noise shaped like x from a per-sample source, a generator, or the global RNG."""
    if isinstance(noise, PerSampleNoise):
        return noise.randn_like(x)
    return torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)


def _identity(t: Tensor) -> Tensor:
    return t


def _steps(timesteps: Sequence[int], progress: bool, desc: str):
    return tqdm(timesteps, desc=desc, leave=False, disable=not progress)


def predict_x0(x: Tensor, eps: Tensor, alpha_bar: float, clip: bool) -> Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t  (DDPM eq. 4 solved for x_0), optionally clipped to [−1, 1]."""
    x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    return x0.clamp(-1, 1) if clip else x0


@torch.no_grad()
def ddpm_sample(
    eps: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    variance: Literal["beta", "beta_tilde"] = "beta",  # σ_t² = β_t or β̃_t (DDPM §3.2)
    noise: Noise = None,
    time_cond: TimeCond | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2, written through x̂_0 and the posterior mean (eq. 7).

    Without clipping this is exactly x_{t−1} = (x_t − β_t/√(1−ᾱ_t) ε)/√α_t + σ_t z.
    """
    time_cond = time_cond or _identity
    s, x = schedule, x_T
    sigmas = np.sqrt(s.betas if variance == "beta" else s.posterior_variance)
    coef_x0 = s.betas * np.sqrt(s.alphas_cumprod_prev) / (1 - s.alphas_cumprod)
    coef_xt = (1 - s.alphas_cumprod_prev) * np.sqrt(s.alphas) / (1 - s.alphas_cumprod)
    for t in _steps(range(s.num_timesteps - 1, -1, -1), progress, "DDPM"):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = predict_x0(x, eps(x, time_cond(t_batch)), s.alphas_cumprod[t], clip_denoised)
        x = coef_x0[t] * x0 + coef_xt[t] * x
        if t > 0:
            x = x + sigmas[t] * randn_like(x, noise)
    return x


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced over [0, T − 1], both ends included, descending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({int(round(v)) for v in np.linspace(0, num_timesteps - 1, steps)}, reverse=True)


@torch.no_grad()
def ddim_sample(
    eps: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,  # 0: deterministic DDIM; 1: DDPM-like stochasticity
    noise: Noise = None,
    time_cond: TimeCond | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over a subsequence of timesteps."""
    time_cond = time_cond or _identity
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    x = x_T
    for i, t in enumerate(_steps(timesteps, progress, f"DDIM-{steps}")):
        ab = float(schedule.alphas_cumprod[t])
        ab_prev = float(schedule.alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        e = eps(x, time_cond(t_batch))
        x0 = predict_x0(x, e, ab, clip_denoised)
        if clip_denoised:  # keep ε consistent with the clipped x̂_0
            e = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * e
        if sigma > 0:
            x = x + sigma * randn_like(x, noise)
    return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}
