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
(`noiseshift_pooled.py`).

The result is stored per resolution in a `NoiseShiftTable` (JSON; `noiseshift_table.py`), with ℓ(t̂) − ℓ(t),
its standard error and the band of candidates tied with the best. Its `time_cond` plugs into the samplers:
the network sees t̂ while the update coefficients stay at the nominal t. The interpolating callable and the closed-form
baseline (`AnalyticShift`) live in `diffusion/time_cond.py`; resolution keys in `mrdiff/resolution.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.stats
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mrdiff.diffusion.samplers import EpsFn
from mrdiff.diffusion.schedule import NoiseSchedule

_ROUND = 6  # candidates are rounded to 1e-6 timesteps so that near-identical values are scored once
Rule = Literal["pooled", "per_timestep", "argmin"]
RULES: tuple[str, ...] = ("pooled", "per_timestep", "argmin")


# -- search ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings:
    """Coarse-to-fine search in σ_rf units (defaults as in NoiseShift: ±0.1 by 0.01, then ±0.01 by 0.001).

    Args:
        coarse_window: Half-width of the coarse search around σ_rf(t), in σ_rf units.
        coarse_stride: Step of the coarse search.
        fine_window: Half-width of the fine search around the coarse choice.
        fine_stride: Step of the fine search.
        num_images: Held-out images per resolution, at least 2 (the README says how many a shift needs).
        max_batch: Candidates × images per forward pass.
        seed: Seed of the ε draws, common to all candidates (a second seed checks a table's bands).
        k: Move t̂ only when the best candidate beats t by more than k standard errors; 0: plain argmin.
            The pooled rule draws its band k bootstrap standard errors either side of the curve.
        rule: "pooled" (one curve for all timesteps, accepted against the identity by one held-out paired
            test; scores the coarse grid only), "per_timestep" (the k-standard-error test at each t) or
            "argmin" (per_timestep with k = 0).
    """

    coarse_window: float = 0.1
    coarse_stride: float = 0.01
    fine_window: float = 0.01
    fine_stride: float = 0.001
    num_images: int = 64
    max_batch: int = 256
    seed: int = 0
    k: float = 3.0
    rule: Rule = "pooled"

    def __post_init__(self) -> None:
        """Reject settings that cannot define a search grid or a decision."""
        for name in ("coarse_window", "fine_window", "k"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SearchSettings.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("coarse_stride", "fine_stride"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SearchSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.num_images < 2:
            raise ValueError(f"SearchSettings.num_images must be >= 2 (a standard error needs two images), "
                             f"got {self.num_images}")
        if self.max_batch < 1:
            raise ValueError(f"SearchSettings.max_batch must be >= 1, got {self.max_batch}")
        if self.rule not in RULES:
            raise ValueError(f"SearchSettings.rule must be one of {list(RULES)}, got {self.rule!r}")


_UNCERTAINTY = ("loss_diff", "loss_diff_se", "band_lo", "band_hi")
_COLUMNS = ("t", "t_hat", "loss_t", "loss_t_hat", *_UNCERTAINTY)


@dataclass
class Calibration:
    """One resolution's table, sorted by ascending t: t̂(t), the one-step losses at t and at t̂, and (tables
    from the noise-aware search) the paired loss difference ℓ(t̂) − ℓ(t), its standard error, and the band
    [band_lo, band_hi] of conditioning values the data cannot tell apart from the best one. `rule` names the
    rule that chose t̂ (tables without it are per_timestep); `pooled` holds the pooled rule's curve and its
    acceptance test (`noiseshift_pooled.PooledFit`; accepted False: the table is the identity).
    """

    t: list[float]
    t_hat: list[float]
    loss_t: list[float]
    loss_t_hat: list[float]
    loss_diff: list[float] | None = None  # mean over images of ℓ_i(t̂) − ℓ_i(t), same (x_0, ε) for both
    loss_diff_se: list[float] | None = None  # its standard error (sample s.d. of the differences / √N)
    band_lo: list[float] | None = None  # conditioning values in [band_lo, band_hi] are not ruled out
    band_hi: list[float] | None = None  # (`decide`): the band t̂ could lie in
    rule: str = "per_timestep"  # SearchSettings.rule of the search that made this table
    pooled: dict[str, Any] | None = None  # rule "pooled": coefficients and the held-out test

    def __post_init__(self) -> None:
        """Check lengths, finite values, strictly increasing t (np.interp in time_cond), monotone t̂, bands."""
        present = [name for name in _UNCERTAINTY if getattr(self, name) is not None]
        if present and len(present) != len(_UNCERTAINTY):
            raise ValueError(f"calibration holds {present} but not all of {list(_UNCERTAINTY)}")
        if self.rule not in RULES:
            raise ValueError(f"calibration rule must be one of {list(RULES)}, got {self.rule!r}")
        columns = {k: getattr(self, k) for k in _COLUMNS if getattr(self, k) is not None}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1 or not self.t:
            raise ValueError(f"calibration lists must be non-empty and equally long, got lengths {lengths}")
        for name, values in columns.items():
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"calibration {name} holds non-finite values (NaN/inf)")
        if any(b <= a for a, b in zip(self.t, self.t[1:], strict=False)):
            raise ValueError("calibration timesteps must be strictly increasing")
        if any(b < a for a, b in zip(self.t_hat, self.t_hat[1:], strict=False)):
            raise ValueError("calibration t_hat must be non-decreasing in t")
        if present:
            if min(self.loss_diff_se) < 0:
                raise ValueError("calibration loss_diff_se holds negative standard errors")
            rows = zip(self.band_lo, self.t_hat, self.band_hi, strict=True)
            if any(not lo - 1e-6 <= h <= hi + 1e-6 for lo, h, hi in rows):
                raise ValueError("calibration t_hat must lie within [band_lo, band_hi]")

    @property
    def has_uncertainty(self) -> bool:
        """True for tables from the noise-aware search (older tables hold t̂ and the losses only)."""
        return self.loss_diff is not None

    @property
    def moved(self) -> int:
        """Number of timesteps whose t̂ differs from t."""
        return sum(h != t for t, h in zip(self.t, self.t_hat, strict=True))

    def check_range(self, num_timesteps: int) -> None:
        """t, t̂ and the band must lie in [0, T−1] of the schedule the table was made for."""
        for name in ("t", "t_hat", "band_lo", "band_hi"):
            values = getattr(self, name)
            if values is not None and (min(values) < 0 or max(values) > num_timesteps - 1):
                raise ValueError(f"calibration {name} spans {min(values)}..{max(values)}, outside "
                                 f"[0, {num_timesteps - 1}]")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for JSON (the uncertainty fields only when present), the rule and the pooled fit."""
        out: dict[str, Any] = {k: [float(v) for v in getattr(self, k)] for k in _COLUMNS
                               if getattr(self, k) is not None}
        out["rule"] = self.rule
        if self.pooled is not None:
            out["pooled"] = dict(self.pooled)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of to_dict; raises ValueError on missing or non-numeric fields."""
        if not isinstance(data, dict):
            raise ValueError(f"calibration entry must be an object, got {type(data).__name__}")
        names = ("t", "t_hat", "loss_t", "loss_t_hat", *(k for k in _UNCERTAINTY if k in data))
        try:
            fields = {k: [float(v) for v in data[k]] for k in names}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration entry is malformed ({err!r})") from err
        pooled = data.get("pooled")
        if pooled is not None and not isinstance(pooled, dict):
            raise ValueError(f"calibration pooled must be an object, got {type(pooled).__name__}")
        return cls(**fields, rule=data.get("rule", "per_timestep"), pooled=pooled)  # no rule: before issue 32


def _timesteps_descending(timesteps: Sequence[int], num_timesteps: int) -> list[int]:
    """Unique integer timesteps in [0, T−1], sorted from high to low."""
    if any(float(t) != int(t) for t in timesteps):
        raise ValueError(f"timesteps must be integers, got {list(timesteps)}")
    steps = sorted({int(t) for t in timesteps}, reverse=True)
    if not steps:
        raise ValueError("calibrate needs at least one timestep")
    if steps[-1] < 0 or steps[0] > num_timesteps - 1:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {steps[-1]}..{steps[0]}")
    return steps


def _candidates(
    schedule: NoiseSchedule, center: float, window: float, stride: float, cap: float
) -> list[float]:
    """Fractional t at σ_rf(center) + k·stride, |k·stride| ≤ window, clamped to [0, min(T−1, cap)]."""
    half = int(math.floor(window / stride + 1e-9))
    sigma = float(schedule.sigma_rf_at(center)) + stride * np.arange(-half, half + 1, dtype=np.float64)
    t = np.round(schedule.t_from_sigma_rf(sigma).numpy(), _ROUND)
    return sorted({float(v) for v in np.clip(t, 0.0, min(schedule.num_timesteps - 1.0, cap))})


def _chunks(k: int, n: int, max_batch: int) -> Iterator[tuple[int, int, int, int]]:
    """(c0, c1, i0, i1): candidates [c0, c1) × images [i0, i1) per pass, at most max_batch pairs."""
    if max_batch >= n:
        group = max_batch // n
        for c0 in range(0, k, group):
            yield c0, min(c0 + group, k), 0, n
        return
    for c in range(k):
        for i0 in range(0, n, max_batch):
            yield c, c + 1, i0, min(i0 + max_batch, n)


def _losses(eps: EpsFn, x_t: Tensor, noise: Tensor, cands: Sequence[float], max_batch: int) -> np.ndarray:
    """[candidates, images] per-image mean of (ε_θ(x_t, c) − ε)² over elements, candidates × images batched."""
    n, k, device = x_t.shape[0], len(cands), x_t.device
    acc = torch.float32 if device.type == "mps" else torch.float64
    cand_t = torch.tensor(list(cands), dtype=torch.float32, device=device)
    losses = torch.zeros(k, n, dtype=acc, device=device)
    for c0, c1, i0, i1 in _chunks(k, n, max_batch):
        g, m, x = c1 - c0, i1 - i0, x_t[i0:i1]
        x = x if g == 1 else x.unsqueeze(0).expand(g, *x.shape).reshape(g * m, *x.shape[1:])
        pred = eps(x, cand_t[c0:c1].repeat_interleave(m))
        if pred.shape != x.shape:
            raise ValueError(f"eps returned shape {tuple(pred.shape)} for input {tuple(x.shape)}")
        diff = pred.reshape(g, m, -1).float() - noise[i0:i1].reshape(1, m, -1).float()
        losses[c0:c1, i0:i1] = diff.pow(2).to(acc).mean(-1)  # squares in float32, means in acc
    out = losses.cpu().double().numpy()
    if not np.all(np.isfinite(out)):
        raise ValueError(f"eps produced non-finite losses at candidates {list(cands)}")
    return out


def critical_value(k: float, num_images: int) -> float:
    """Multiple of a standard error that a paired difference must exceed to count as real.

    k is in normal-equivalent units: the threshold is the Student-t quantile with N − 1 degrees of freedom at
    the normal tail probability of k, since each standard error is itself estimated from N differences
    (k = 3 with N = 8 gives 4.8; with N = 256, 3.0). k = 0 gives 0: the plain argmin.
    """
    if k == 0:
        return 0.0
    return float(scipy.stats.t.ppf(scipy.stats.norm.cdf(k), num_images - 1))


@dataclass
class Decision:
    """The choice at one timestep: t̂, the band of candidates tied with the best, ℓ(t̂) − ℓ(t) and its s.e."""

    t_hat: float
    band_lo: float
    band_hi: float
    loss_diff: float
    loss_diff_se: float


def paired_se(differences: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the last axis: sample s.d. (N − 1) / √N."""
    return differences.std(axis=-1, ddof=1) / math.sqrt(differences.shape[-1])


def decide(
    reference: np.ndarray, cands: np.ndarray, losses: np.ndarray, distance: np.ndarray, threshold: float
) -> Decision:
    """Keep t unless the best candidate beats it by more than `threshold` paired standard errors.

    `losses` is [candidates, images] and `reference` [images] the losses at t, all on shared (x_0, ε);
    `distance` is each candidate's distance from t. The default is the candidate nearest t (t itself unless
    the monotone cap excludes it); t̂ is the default when mean_i(ℓ_i(default) − ℓ_i(best)) ≤ threshold · s.e.,
    else the best (the argmin). The band runs from the nearest candidate below the best that the same test
    excludes to the nearest one above (the outermost candidates where none is): the conditioning values
    the scored candidates cannot rule out, which hold t̂ whichever way the test goes.
    """
    best = int(np.lexsort((distance, losses.mean(axis=1)))[0])  # lowest mean; ties go to the nearest to t
    gap = losses - losses[best]
    tied = gap.mean(axis=1) <= threshold * paired_se(gap)
    tied[best] = True
    default = int(np.argmin(distance))
    choice = default if tied[default] else best
    lo, hi = cands[tied].min(), cands[tied].max()
    below, above = cands[~tied & (cands < lo)], cands[~tied & (cands > hi)]
    lo = below.max() if below.size else cands.min()
    hi = above.min() if above.size else cands.max()
    diff = losses[choice] - reference
    return Decision(float(cands[choice]), float(lo), float(hi), float(diff.mean()), float(paired_se(diff)))


class _StepSearch:
    """Coarse-to-fine search at one timestep t; per-image losses are cached so each candidate is run once."""

    def __init__(self, eps: EpsFn, schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: int) -> None:
        ab = float(schedule.alphas_cumprod[t])
        self.eps, self.schedule, self.t, self.noise = eps, schedule, float(t), noise
        self.x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise  # DDPM eq. 4, shared by all candidates (CRN)
        self.scores: dict[float, np.ndarray] = {}

    def score(self, cands: Sequence[float], max_batch: int) -> None:
        """Evaluate the candidates not scored yet."""
        new = [c for c in cands if c not in self.scores]
        if new:
            self.scores.update(zip(new, _losses(self.eps, self.x_t, self.noise, new, max_batch), strict=True))

    def decide(self, cap: float, threshold: float) -> Decision:
        """`decide` over the scored candidates ≤ cap, closeness to t measured in σ_rf."""
        cands = np.array(sorted(c for c in self.scores if c <= cap))
        distance = np.abs(self.schedule.sigma_rf_at(cands).numpy() - float(self.schedule.sigma_rf_at(self.t)))
        distance[cands == self.t] = 0.0
        losses = np.stack([self.scores[c] for c in cands])
        return decide(self.scores[self.t], cands, losses, distance, threshold)

    def run(self, s: SearchSettings, cap: float, threshold: float) -> tuple[Decision, float, float]:
        """(decision, loss at t, loss at t̂): coarse grid plus t, then the fine grid around the coarse choice
        (around t when the coarse grid gives no reason to move, so that small real shifts are still found)."""
        coarse = _candidates(self.schedule, self.t, s.coarse_window, s.coarse_stride, cap)
        self.score([*coarse, self.t], s.max_batch)
        choice = self.decide(cap, threshold).t_hat
        fine = _candidates(self.schedule, choice, s.fine_window, s.fine_stride, cap)
        self.score(fine, s.max_batch)
        decision = self.decide(cap, threshold)
        return decision, float(self.scores[self.t].mean()), float(self.scores[decision.t_hat].mean())


@torch.no_grad()
def calibrate(
    eps: EpsFn,
    schedule: NoiseSchedule,
    images: Tensor,
    timesteps: Sequence[int],
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> Calibration:
    """t̂(t) for each t by the k-standard-error test (`decide`) on the one-step loss
    ℓ(c) = E‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, c) − ε‖², from high to low t with t̂ monotone.

    `images` are clean x_0 ([N, C, H, W], N ≥ 2, model data range) at the target resolution; `eps` is called
    on their device. The cap t̂(t) ≤ t̂(t') for t < t' may exclude c = t itself, whose loss is still reported.
    With settings.k = 0 (or rule "argmin") this is the plain argmin of the tables before the rule existed.
    settings.rule "pooled" (the default) hands over to `noiseshift_pooled.calibrate_pooled`.
    """
    steps = _timesteps_descending(timesteps, schedule.num_timesteps)
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"NoiseShift needs a batch of at least 2 images [N, C, H, W] to estimate standard "
                         f"errors, got shape {tuple(images.shape)}")
    x0 = images[: settings.num_images]
    if settings.rule == "pooled":
        from mrdiff.diffusion.noiseshift_pooled import calibrate_pooled  # imports this module

        return calibrate_pooled(eps, schedule, x0, steps, settings, progress=progress)
    threshold = 0.0 if settings.rule == "argmin" else critical_value(settings.k, x0.shape[0])
    generator = torch.Generator().manual_seed(settings.seed)
    cap, rows = schedule.num_timesteps - 1.0, []
    bar = tqdm(steps, desc="NoiseShift", leave=False, disable=not progress)
    for t in bar:
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        d, loss_t, loss_hat = _StepSearch(eps, schedule, x0, noise, t).run(settings, cap, threshold)
        bar.set_postfix(t=t, t_hat=f"{d.t_hat:.2f}")
        cap = d.t_hat
        rows.append((float(t), d.t_hat, loss_t, loss_hat, d.loss_diff, d.loss_diff_se, d.band_lo, d.band_hi))
    rows.reverse()
    return Calibration(*(list(col) for col in zip(*rows, strict=True)), rule=settings.rule)
