"""What a sampler feeds the network instead of the nominal timestep t (its `time_cond` hook).

A NoiseShift table's interpolated t̂(t) for one resolution, and the analytic resolution shift (the identity,
t itself, is `mrdiff.diffusion.samplers.identity`). Each maps a float tensor of timesteps to another on the
same device; the samplers keep every update coefficient at the nominal t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mrdiff.diffusion.schedule import NoiseSchedule


@dataclass
class InterpolatedTimeCond:
    """t ↦ t̂ by linear interpolation in t; outside the calibrated range t̂ = t + (edge offset), clamped."""

    t: np.ndarray
    t_hat: np.ndarray
    num_timesteps: int
    key: str = field(default="")

    def __call__(self, t: Tensor) -> Tensor:
        """t̂ on t's device, in t's dtype (float32 for integer t)."""
        tv = t.detach().double().cpu().numpy()
        out = np.interp(tv, self.t, self.t_hat)
        out = np.where(tv < self.t[0], tv + (self.t_hat[0] - self.t[0]), out)
        out = np.where(tv > self.t[-1], tv + (self.t_hat[-1] - self.t[-1]), out)
        out = np.clip(out, 0.0, self.num_timesteps - 1.0)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return torch.as_tensor(out, dtype=dtype, device=t.device)


class AnalyticShift:
    """SD3 / simple-diffusion resolution shift: t̂ = t(λ(t) + log(n/m)), n, m = sample, train pixels."""

    def __init__(self, schedule: NoiseSchedule, *, train_pixels: int, sample_pixels: int) -> None:
        if train_pixels < 1 or sample_pixels < 1:
            raise ValueError(f"pixel counts must be positive: train={train_pixels}, sample={sample_pixels}")
        self.schedule = schedule
        self.train_pixels, self.sample_pixels = train_pixels, sample_pixels
        self.shift = math.log(sample_pixels / train_pixels)  # λ shifted by −log(m/n)

    def __call__(self, t: Tensor) -> Tensor:
        """t̂ = t_from_log_snr(log_snr_at(t) + log(n/m)), float32 on t's device, clamped to [0, T−1]."""
        if self.shift == 0.0:
            return t.to(torch.float32)
        lam = self.schedule.log_snr_at(t) + self.shift
        return self.schedule.t_from_log_snr(lam).to(device=t.device, dtype=torch.float32)
