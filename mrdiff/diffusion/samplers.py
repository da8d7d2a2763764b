"""Samplers as pure functions over an ε-callable (k-diffusion / EDM style).

`eps(x, t)` returns the model's ε prediction for a batch `x` conditioned on the float tensor `t` of
shape [B]. The samplers never see the network: grid, scale and weights are closed over by the caller.
`time_cond` maps the nominal timestep to the value fed to the network (NoiseShift's t̂, or the
analytic resolution shift); every update coefficient stays at the nominal t.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mrdiff.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]
TimeCond = Callable[[Tensor], Tensor]
Progress = bool | tqdm  # a bar per sampling run (True), none (False), or a caller's bar to tick


def identity(t: Tensor) -> Tensor:
    """The default time conditioning: the nominal t, as a float tensor."""
    return t if t.is_floating_point() else t.float()


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


def _steps(timesteps: Sequence[int], progress: Progress, desc: str) -> Iterator[int]:
    """The timesteps, ticking a bar of their own (progress=True), a caller's shared bar, or none."""
    if isinstance(progress, bool):
        yield from tqdm(timesteps, desc=desc, leave=False, disable=not progress)
        return
    for t in timesteps:  # a bar over many sampling runs (an evaluation's): one tick per network call
        yield t
        progress.update(1)


def from_start(timesteps: Sequence[int], start: int | None) -> list[int]:
    """The timesteps at or below `start` (all for None): a sampler started at `start` (SDEdit) treats x_T as x at
    the first of them and visits only those."""
    return list(timesteps) if start is None else [t for t in timesteps if t <= start]


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
    progress: Progress = False,
    start: int | None = None,  # begin at this timestep (see from_start); None: at T − 1
) -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2, written through x̂_0 and the posterior mean (eq. 7).

    Without clipping this is exactly x_{t−1} = (x_t − β_t/√(1−ᾱ_t) ε)/√α_t + σ_t z.
    """
    time_cond = time_cond or identity
    s, x = schedule, x_T
    sigmas = np.sqrt(s.betas if variance == "beta" else s.posterior_variance)
    coef_x0 = s.betas * np.sqrt(s.alphas_cumprod_prev) / (1 - s.alphas_cumprod)
    coef_xt = (1 - s.alphas_cumprod_prev) * np.sqrt(s.alphas) / (1 - s.alphas_cumprod)
    for t in _steps(from_start(range(s.num_timesteps - 1, -1, -1), start), progress, "DDPM"):
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
    progress: Progress = False,
    start: int | None = None,  # begin at this timestep (see from_start); None: at T − 1
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over a subsequence of timesteps."""
    time_cond = time_cond or identity
    timesteps = from_start(ddim_timesteps(schedule.num_timesteps, steps), start)
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


LOG_SNR_MIN = -10.2  # DPM-Solver's clipping of λ = log-SNR / 2 at −5.1: a cosine schedule's last few t lie far below


def dpm_solver_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """The `steps` timesteps DPM-Solver++ evaluates ε at, descending from T − 1: uniform in log-SNR (DPM-Solver's
    "logSNR" spacing, Lu et al. 2022 §3.3) from max(log-SNR_{T−1}, LOG_SNR_MIN) to log-SNR_0, rounded to
    integers and kept distinct, without the last point, t = 0, which is where the final step lands."""
    T = schedule.num_timesteps
    if not 1 <= steps < T:
        raise ValueError(f"DPM-Solver++ steps must be in [1, {T - 1}], got {steps}")
    log_snr = np.linspace(max(schedule.log_snr[-1], LOG_SNR_MIN), schedule.log_snr[0], steps + 1)
    t = schedule.t_from_log_snr(log_snr).numpy().round().astype(np.int64)
    t[0], t[-1] = T - 1, 0
    for i in range(steps - 1, 0, -1):  # rounding can merge neighbours near t = 0: push them apart
        t[i] = min(max(t[i], t[i + 1] + 1), T - 1 - i)
    return [int(v) for v in t[:-1]]


@torch.no_grad()
def dpm_solver_pp_2m_sample(
    eps: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    steps: int = 20,  # network calls
    noise: Noise = None,  # unused: the solver is deterministic (kept for one sampler signature)
    time_cond: TimeCond | None = None,
    clip_denoised: bool = False,
    progress: Progress = False,
    start: int | None = None,  # begin at this timestep (see from_start); None: at T − 1
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of the diffusion ODE
    in data prediction x̂_0, one network call per step.

    With α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = log(α_t/σ_t), h_i = λ_{t_i} − λ_{t_{i−1}} and r_i = h_{i−1}/h_i:
        x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i,
        D_i = (1 + 1/(2r_i)) x̂_0(t_{i−1}) − 1/(2r_i) x̂_0(t_{i−2}),
    and D_i = x̂_0(t_{i−1}) (first order, i.e. DDIM) on the first step and, below 15 steps, on the last one
    (diffusers' lower_order_final: with few, long steps the extrapolation overshoots there). The steps visit
    dpm_solver_timesteps, uniform in log-SNR, and land on t = 0 as DPM-Solver's own code does for
    discrete-time DDPMs: what is left there is noise of std √β_0 (0.01 for the linear schedule). The usual
    alternatives measured worse with the Gaussian ε oracle (data variance 0.25, 20 steps): evenly spaced t
    landing on t = 0 overshoots the variance by 50% (one long last step in log-SNR), and evenly spaced t with
    a last jump to σ = 0 (diffusers' default) returns a blurred posterior mean, 9% short; log-SNR spacing is
    2.6% over. This equals diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++",
    solver_order=2, final_sigmas_type="sigma_min" and these timesteps (tests/test_solvers.py).

    Written against NoiseSchedule rather than as an adapter over diffusers' scheduler: the update is the
    dozen lines above, needs no optional dependency, and keeps the float64 tables and the `time_cond`
    hook (the network is fed time_cond(t); every coefficient stays at the nominal t) in plain sight.
    """
    time_cond = time_cond or identity
    timesteps = from_start(dpm_solver_timesteps(schedule, steps), start)
    ends = [*timesteps[1:], 0]
    lam = 0.5 * schedule.log_snr  # λ_t = log(α_t/σ_t)
    x, x0_prev, h_prev = x_T, None, None
    for i, (t, t_next) in enumerate(zip(_steps(timesteps, progress, f"DPM-Solver++(2M)-{steps}"), ends)):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = predict_x0(x, eps(x, time_cond(t_batch)), schedule.alphas_cumprod[t], clip_denoised)
        h = float(lam[t_next] - lam[t])
        last_first_order = i == len(timesteps) - 1 and steps < 15
        if x0_prev is None or last_first_order:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        sigma_ratio = float(schedule.sqrt_one_minus_alphas_cumprod[t_next] / schedule.sqrt_one_minus_alphas_cumprod[t])
        x = sigma_ratio * x - float(schedule.sqrt_alphas_cumprod[t_next] * np.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return x


Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]


@dataclass(frozen=True)
class SamplingSettings:
    """How samples are drawn: the one settings object of `mrdiff sample`, `mrdiff calibrate` (which
    calibrates the timesteps these settings visit), SampleGrid, ResolutionEvaluation and NoiseShiftCalibration.

    Args:
        sampler: ddim, dpmpp_2m (DPM-Solver++(2M)) or ddpm (ancestral, all T steps).
        steps: Network calls of DDIM or DPM-Solver++; DDPM ignores it.
        eta: DDIM's η: 0 is deterministic, 1 re-noises as much as DDPM. Young models sample cleaner with 1
            (docs/samplers.md); the other samplers ignore it.
        attention_scaling: At a token count other than training's, rescale attention logits by
            log n / log n_train (entropy-preserving attention, Jin et al. 2023); off by default.
    """

    sampler: Sampler = "ddim"
    steps: int = 50
    eta: float = 0.0
    attention_scaling: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in get_args(Sampler):
            raise ValueError(f"unknown sampler {self.sampler!r}: use one of {', '.join(get_args(Sampler))}")
        if self.steps < 1:
            raise ValueError(f"sampling steps must be at least 1, got {self.steps}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"DDIM's eta must be in [0, 1], got {self.eta}")

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The timesteps at which the sampler calls the network, in order: all T for DDPM, the DDIM
        subsequence, or DPM-Solver++'s (which never evaluates t = 0)."""
        if self.sampler == "ddpm":
            return list(range(schedule.num_timesteps - 1, -1, -1))
        if self.sampler == "dpmpp_2m":
            return dpm_solver_timesteps(schedule, self.steps)
        return ddim_timesteps(schedule.num_timesteps, self.steps)

    def run(self, eps: EpsFn, schedule: NoiseSchedule, x_T: Tensor, **kwargs: object) -> Tensor:
        """The sampler over `eps` from x_T; kwargs are the samplers' shared ones (noise, time_cond, ...)."""
        if self.sampler == "ddim":
            return ddim_sample(eps, schedule, x_T, steps=self.steps, eta=self.eta, **kwargs)
        if self.sampler == "dpmpp_2m":
            return dpm_solver_pp_2m_sample(eps, schedule, x_T, steps=self.steps, **kwargs)
        return ddpm_sample(eps, schedule, x_T, **kwargs)

    def __str__(self) -> str:
        """'ddim-50', 'ddim-25 (η = 1)', 'dpmpp_2m-10' or 'ddpm', plus ', scaled attention' when on."""
        scaled = ", scaled attention" if self.attention_scaling else ""
        if self.sampler == "ddpm":
            return "ddpm" + scaled
        eta = f" (η = {self.eta:g})" if self.sampler == "ddim" and self.eta else ""
        return f"{self.sampler}-{self.steps}{eta}{scaled}"
