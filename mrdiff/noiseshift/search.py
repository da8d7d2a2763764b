"""NoiseShift (He et al. 2025) for DDPM: training-free, per-resolution recalibration of noise conditioning.

A network trained at one resolution misjudges the noise level of images at another: the same σ removes
more or less of the visible signal depending on the pixel count. For each timestep t the sampler will
visit, NoiseShift looks for the conditioning value that minimises the one-step denoising error

    t̂_r(t) = argmin_c  E_{x_0 at r, ε} ‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, c) − ε‖²,

searching coarse-to-fine in σ_rf = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)) units. Every candidate c at a given t is scored
on the same (x_0, ε) pairs (common random numbers), so the per-image differences ℓ_i(c) − ℓ_i(c') give a
paired standard error for every comparison. At high t the objective is nearly flat in c and its argmin is
mostly Monte-Carlo noise, so t̂ stays at t unless the best candidate beats t by more than k standard errors
(`decide`). The search runs from high to low t and keeps t̂ monotone. That is `rule="per_timestep"`;
`rule="argmin"` is the same search with k = 0. The default, `rule="pooled"`, fits one smooth monotone curve
t̂(t) to all timesteps' paired losses at once and accepts it against the identity by one held-out test
(`mrdiff.noiseshift.pooled`).

The settings and the result are `mrdiff.noiseshift.settings`, the per-timestep search `mrdiff.noiseshift.steps`.
The result is stored per resolution in a `NoiseShiftTable` (JSON; `mrdiff.noiseshift.table`), with ℓ(t̂) − ℓ(t),
its standard error and the band of candidates tied with the best. Its `time_cond` plugs into the samplers:
the network sees t̂ while the update coefficients stay at the nominal t. The interpolating callable and the closed-form
baseline (`AnalyticShift`) live in `mrdiff.noiseshift.time_cond`; resolution keys in `mrdiff/resolution.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mrdiff.diffusion.samplers import EpsFn
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.pooled import calibrate_pooled
from mrdiff.noiseshift.settings import RULES, Calibration, Rule, SearchSettings
from mrdiff.noiseshift.steps import _timesteps_descending, calibrate_per_timestep, critical_value, decide

__all__ = ["RULES", "Calibration", "Rule", "SearchSettings", "calibrate", "critical_value", "decide"]


def calibrate(
    eps: EpsFn,
    schedule: NoiseSchedule,
    images: Tensor,
    timesteps: Sequence[int],
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> Calibration:
    """t̂(t) for each of `timesteps` minimising the one-step loss ℓ(c) = E‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, c) − ε‖²,
    by settings.rule: one pooled curve (default, `pooled.calibrate_pooled`), or per timestep
    (`steps.calibrate_per_timestep`).

    `images` are clean x_0 ([N, C, H, W], N ≥ 2, model data range) at the target resolution; `eps` is called
    on their device. The cap t̂(t) ≤ t̂(t') for t < t' may exclude c = t itself, whose loss is still reported.
    """
    steps = _timesteps_descending(timesteps, schedule.num_timesteps)
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"NoiseShift needs a batch of at least 2 images [N, C, H, W] to estimate standard "
                         f"errors, got shape {tuple(images.shape)}")
    x0 = images[: settings.num_images]
    if settings.rule == "pooled":
        return calibrate_pooled(eps, schedule, x0, steps, settings, progress=progress)
    return calibrate_per_timestep(eps, schedule, x0, steps, settings, progress=progress)
