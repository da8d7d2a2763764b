"""Noise schedules of DDPM (Ho et al. 2020) and the maps between timestep, σ_rf and log-SNR.

Timesteps are indices t ∈ {0, …, T−1} with ᾱ_t = ∏_{s≤t} (1 − β_s). Tables are float64; coefficients
are cast to the data's dtype only when they are gathered. The network's conditioning value may be a
fractional t (NoiseShift, resolution shift): the maps below interpolate between integer timesteps.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ScheduleKind = Literal["linear", "cosine"]


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """β_t linear from beta_start to beta_end (DDPM, §4: 1e-4 → 0.02 over T = 1000)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """β_t from ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2) (Nichol & Dhariwal 2021, eq. 17), clipped at max_beta."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0.0, max_beta)


class NoiseSchedule:
    """β / ᾱ tables in float64 with q_sample, the DDPM posterior and the t ↔ σ_rf ↔ log-SNR maps."""

    def __init__(
        self,
        *,
        kind: ScheduleKind = "linear",  # "linear" (DDPM) or "cosine" (improved DDPM)
        num_timesteps: int = 1000,  # T
        beta_start: float = 1e-4,  # linear schedule only
        beta_end: float = 0.02,  # linear schedule only
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        if kind == "linear":
            if not 0 < beta_start < beta_end < 1:
                raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(num_timesteps)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}: use 'linear' or 'cosine'")
        self.kind, self.num_timesteps = kind, num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)  (DDPM eq. 7)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.log_snr = np.log(self.alphas_cumprod) - np.log1p(-self.alphas_cumprod)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1 - self.alphas_cumprod)
        self.sigma_rf = self.sqrt_one_minus_alphas_cumprod / (
            self.sqrt_alphas_cumprod + self.sqrt_one_minus_alphas_cumprod)
        self._on_device: dict[tuple[int, torch.device], Tensor] = {}

    # -- description -------------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        """What identifies this schedule (stored with NoiseShift tables and checked on load)."""
        return {
            "kind": self.kind,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "fingerprint": hashlib.sha256(self.betas.tobytes()).hexdigest()[:16],
        }

    def as_options(self) -> str:
        """The settings that define this schedule, as mrdiff's command line spells them."""
        text = f"--model.schedule={self.kind} --model.num_timesteps={self.num_timesteps}"
        return text + (f" --model.beta_start={self.beta_start:g} --model.beta_end={self.beta_end:g}"
                       if self.kind == "linear" else "")

    def require_same(self, trained: NoiseSchedule, source: str) -> None:
        """An error when the schedule a model was trained with (from `source`) has other β_t than this one."""
        if trained.num_timesteps != self.num_timesteps or not np.allclose(trained.betas, self.betas, rtol=1e-9):
            raise ValueError(f"{source} has the schedule {trained.as_options()} but mrdiff's model settings say "
                             f"{self.as_options()}: set the model's schedule settings to the scheduler config's")

    # -- training ------------------------------------------------------------------------------------
    def gather(self, table: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """table[t] for integer t of shape [B], broadcastable against `like` ([B, ...])."""
        key = (id(table), t.device)
        if key not in self._on_device:  # copied to each device once, not at every step
            self._on_device[key] = torch.as_tensor(table, device=t.device)
        return self._on_device[key][t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (DDPM eq. 4)."""
        sqrt_ab = self.gather(self.sqrt_alphas_cumprod, t, x0)
        sqrt_1mab = self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return sqrt_ab * x0 + sqrt_1mab * noise

    def sample_timesteps(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """t ~ U{0, …, T−1}."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device)

    # -- continuous maps (fractional t) ------------------------------------------------------------
    def _interp(self, x: Tensor | np.ndarray | float, xp: np.ndarray, fp: np.ndarray) -> Tensor:
        """Piecewise-linear interpolation with xp increasing; returns float64 tensor on x's device."""
        values = torch.as_tensor(x, dtype=torch.float64)
        out = np.interp(values.detach().cpu().numpy(), xp, fp)
        device = x.device if isinstance(x, Tensor) else "cpu"
        return torch.as_tensor(out, dtype=torch.float64, device=device)

    def sigma_rf_at(self, t: Tensor | np.ndarray | float) -> Tensor:
        """σ_rf = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)) at fractional t, linear between integer timesteps."""
        return self._interp(t, np.arange(self.num_timesteps, dtype=np.float64), self.sigma_rf)

    def t_from_sigma_rf(self, sigma: Tensor | np.ndarray | float) -> Tensor:
        """Inverse of sigma_rf_at, clamped to [0, T − 1]."""
        return self._interp(sigma, self.sigma_rf, np.arange(self.num_timesteps, dtype=np.float64))

    def log_snr_at(self, t: Tensor | np.ndarray | float) -> Tensor:
        """log(ᾱ/(1−ᾱ)) at fractional t, linear between integer timesteps."""
        return self._interp(t, np.arange(self.num_timesteps, dtype=np.float64), self.log_snr)

    def t_from_log_snr(self, log_snr: Tensor | np.ndarray | float) -> Tensor:
        """Inverse of log_snr_at (log-SNR decreases with t), clamped to [0, T − 1]."""
        steps = np.arange(self.num_timesteps, dtype=np.float64)
        return self._interp(log_snr, self.log_snr[::-1].copy(), steps[::-1].copy())

    def alphas_cumprod_at(self, t: Tensor | np.ndarray | float) -> Tensor:
        """ᾱ at fractional t: sigmoid of the interpolated log-SNR (exact at integer t)."""
        return torch.sigmoid(self.log_snr_at(t))
