"""L_simple, the DDPM training loss, as a pure function over an ε-prediction callable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mrdiff.diffusion.schedule import NoiseSchedule

LossWeighting = Literal["uniform", "min_snr"]


def simple_loss(
    eps: Callable[[Tensor, Tensor], Tensor],  # ε_θ(x_t, t) with t a float tensor [B]
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    weighting: LossWeighting = "uniform",
    snr_gamma: float = 5.0,  # γ of min_snr
    generator: torch.Generator | None = None,  # draws t and ε (None: the global RNG)
) -> Tensor:
    """L_simple = E‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖², t ~ U{0, …, T−1} (DDPM eq. 14).

    With weighting="min_snr", sample i's term is weighted by min(SNR_t, γ)/SNR_t (Min-SNR-γ for
    ε-prediction, Hang et al. 2023): low-noise steps, whose ε is nearly unpredictable and whose errors
    barely move x̂_0, stop dominating the gradient.
    """
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    prediction = eps(schedule.q_sample(x0, t, noise), t.float()).float()
    if weighting == "uniform":
        return F.mse_loss(prediction, noise.float())
    per_sample = (prediction - noise.float()).pow(2).flatten(1).mean(1)
    snr = schedule.gather(schedule.alphas_cumprod, t, per_sample).float()
    snr = snr / (1 - snr)
    return (per_sample * snr.clamp(max=snr_gamma) / snr).mean()
