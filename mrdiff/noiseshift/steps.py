"""The one-step loss ℓ(c) = ‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, c) − ε‖² and NoiseShift's per-timestep search over it:
candidates in σ_rf units, losses on common random numbers, the k-standard-error decision, and the loop from
high to low t that keeps t̂ monotone (rules "per_timestep" and "argmin")."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mrdiff.diffusion.samplers import EpsFn
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.settings import Calibration, SearchSettings

_ROUND = 6  # candidates are rounded to 1e-6 timesteps so that near-identical values are scored once


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


def calibrate_per_timestep(eps: EpsFn, schedule: NoiseSchedule, x0: Tensor, steps: Sequence[int],
                           settings: SearchSettings, progress: bool = True) -> Calibration:
    """t̂(t) for each t (high to low, t̂ monotone) by the k-standard-error test (`decide`), or by the plain
    argmin (rule "argmin", k = 0: the tables before the rule existed)."""
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
