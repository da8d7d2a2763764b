"""Pooled NoiseShift (`SearchSettings(rule="pooled")`, the default): one smooth, monotone t̂(t) for all the
sampler's timesteps, fitted to all their paired losses at once and accepted against the identity by one test.

The per-timestep rule (`noiseshift.decide`) asks every timestep for its own evidence, so a small, smooth, real
shift, a few standard errors in total but a fraction of one at each t, never moves. Here the evidence is pooled.

Model of the curve, in log-SNR λ(t) = log(ᾱ_t / (1 − ᾱ_t)):

    (P1)  λ̂(t) = λ(t) + a + b·u(t),   u(t) = (λ(t) − λ̄) / s_λ,   t̂(t) = λ⁻¹(λ̂(t)),

λ̄, s_λ the mean and s.d. of λ over the calibrated timesteps (u centres and scales, so a and b are about
uncorrelated and of one scale). t̂ is monotone in t iff dλ̂/dλ = 1 + b/s_λ > 0; b is bounded to |b| ≤ s_λ/2, so
dλ̂/dλ ∈ [1/2, 3/2]: a few images cannot tilt the curve far at the flat, uninformative ends it extrapolates to.
The family holds the identity (a = b = 0) and the analytic resolution shift λ + log(n/m) (b = 0;
`time_cond.AnalyticShift`, after simple diffusion and SD3), and a first-order correction around it. For the
Gaussian ε-oracle that learned data variance 1 and meets data variance s², the optimum solves
1 + e^λ̂ = (1 + s² e^λ)² / (1 + e^λ): to first order in 1 − s², the constant shift a = log(2s² − 1).

(a, b) minimise the loss summed over timesteps, with common random numbers (the same x_0, ε at every c):

    (P2)  L(a, b) = Σ_t (1/N) Σ_i ℓ_i(t, λ̂(t)),  ℓ_i(t, c) = mean_px (ε_θ(√ᾱ_t x_0,i + √(1−ᾱ_t) ε_t,i, c) − ε_t,i)²,

ℓ_i(t, ·) scored on the coarse grid (σ_rf(t) ± coarse_window by coarse_stride, and t) and interpolated by a
cubic spline in λ (exact at the grid, smooth between; ℓ is smooth in c because x_t and ε are fixed). The fine
grid of the per-timestep rule is not needed: the curve is continuous. Each timestep weighs in with the
curvature its own data show, so flat, uninformative high-t steps neither move the curve nor add noise to it:
two coefficients from T·N paired losses instead of T argmins from N each. An isotonic fit of per-timestep
argmins would need a standard error for each argmin, which the flat objective at high t makes unreliable.

    (P3)  band(t) = t̂_fit(t) ± k · s.d._boot(t̂(t)), widened to contain t̂,

the s.d. over a bootstrap of images (each carrying its ε draws): B refits of (P2) with resampled weights.

    (P4)  d_i = Σ_t ℓ_i(t, t) − ℓ_i(t, t̂_other(t)),   accept when mean(d) − t_{0.95, N−1} · s.e.(d) > 0,

a two-fold cross-fit: the images are split at random into halves, (P2) is fitted on each and scored exactly
(a forward pass at the curve) on the other, so no image scores a curve fitted to it. Fitting and testing on
the same images would favour the fit (it chases their noise); held out, a curve fitted to noise loses to
the identity on average, so when t itself is optimal the test accepts less than 5% of the time (the exact
oracle of tests/test_noiseshift_pooled.py, 8×8×3 images: 2 of 100 seeds with 8 images, 0 of 100 with 32 and
with 128). Accepted:
t̂ is (P1) refitted on all images; rejected: t̂ = t and `Calibration.pooled["accepted"]` is False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.interpolate
import scipy.optimize
import scipy.stats
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mrdiff.diffusion.samplers import EpsFn
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.settings import Calibration, SearchSettings
from mrdiff.noiseshift.steps import _ROUND, _candidates, _StepSearch, paired_se

BOOTSTRAP = 200  # resamples of the images behind the band (P3)
LEVEL = 0.95  # one-sided level of the acceptance test (P4)
_B_RANGE = 0.5  # |b| ≤ s_λ/2: dλ̂/dλ in [1/2, 3/2], t̂ strictly increasing in t


@dataclass
class PooledFit:
    """The curve (P1) fitted on all images and the held-out test (P4) that accepted or rejected it."""

    a: float
    b: float
    lambda_mean: float  # λ̄ of (P1)
    lambda_sd: float  # s_λ of (P1)
    gain: float  # mean over images of d_i (P4): held-out loss, identity minus fitted, summed over t
    gain_se: float  # its standard error
    gain_lower: float  # gain − t_{LEVEL, N−1} · gain_se
    accepted: bool  # gain_lower > 0; False: the table is the identity
    level: float = LEVEL
    bootstrap: int = BOOTSTRAP


@dataclass
class LossSplines:
    """Per-image ℓ_i(t, ·) as cubic splines in λ, padded to one array: knots [T, K] (ascending λ, the last
    knot repeated past `size`), coefs [T, 4, K−1, N] (scipy's highest power first), size [T] knots per t."""

    knots: np.ndarray
    coefs: np.ndarray
    size: np.ndarray

    @classmethod
    def build(cls, lams: Sequence[np.ndarray], losses: Sequence[np.ndarray]) -> LossSplines:
        """From each timestep's grid λ (ascending) and losses [K_t, N]; one knot gives a constant."""
        width, n = max(len(lam) for lam in lams), losses[0].shape[1]
        knots = np.zeros((len(lams), width))
        coefs = np.zeros((len(lams), 4, max(width - 1, 1), n))
        for row, (lam, loss) in enumerate(zip(lams, losses, strict=True)):
            knots[row] = np.concatenate([lam, np.full(width - len(lam), lam[-1])])
            if len(lam) == 1:
                coefs[row, 3, 0] = loss[0]
            else:
                spline = scipy.interpolate.CubicSpline(lam, loss, axis=0)
                coefs[row, :, : len(lam) - 1] = spline.c
        return cls(knots, coefs, np.array([len(lam) for lam in lams]))

    def mean(self, weights: np.ndarray) -> np.ndarray:
        """[T, 4, K−1] coefficients of the weighted mean over images (splines are linear in the data)."""
        return np.einsum("tcsn,n->tcs", self.coefs, weights) / weights.sum()

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest scored λ per timestep: the curve is clipped to them."""
        return self.knots[:, 0], self.knots[np.arange(len(self.size)), self.size - 1]

    def evaluate(self, coefs: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Value and slope d/dλ of each timestep's spline at x [T]; flat (slope 0) outside the scored range."""
        lo, hi = self.bounds()
        xc = np.clip(x, lo, hi)
        rows = np.arange(len(x))
        seg = np.clip((self.knots <= xc[:, None]).sum(axis=1) - 1, 0, np.maximum(self.size - 2, 0))
        dx = xc - self.knots[rows, seg]
        c = coefs[rows, :, seg]  # [T, 4]
        value = ((c[:, 0] * dx + c[:, 1]) * dx + c[:, 2]) * dx + c[:, 3]
        slope = (3 * c[:, 0] * dx + 2 * c[:, 1]) * dx + c[:, 2]
        return value, np.where(xc == x, slope, 0.0)


def fit_curve(splines: LossSplines, coefs: np.ndarray, u: np.ndarray, lam: np.ndarray,
              start: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """(a, b) minimising (P2) for the mean-loss splines `coefs`, by L-BFGS-B with the splines' slopes."""
    sd = float(np.std(lam))

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, slope = splines.evaluate(coefs, lam + theta[0] + theta[1] * u)
        return float(value.sum()), np.array([slope.sum(), (slope * u).sum()])

    span = float(splines.knots.max() - splines.knots.min()) + 1.0
    bounds = [(-span, span), (-_B_RANGE * sd, _B_RANGE * sd)]
    start = np.clip(np.asarray(start, dtype=np.float64), [lo for lo, _ in bounds], [hi for _, hi in bounds])
    result = scipy.optimize.minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds,
                                     options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 500})
    return np.asarray(result.x, dtype=np.float64)


def curve_t_hat(schedule: NoiseSchedule, splines: LossSplines, theta: np.ndarray, lam: np.ndarray,
                u: np.ndarray) -> np.ndarray:
    """t̂ of (P1) at each timestep, clipped to its scored range and rounded like the search's candidates."""
    lo, hi = splines.bounds()
    lam_hat = np.clip(lam + theta[0] + theta[1] * u, lo, hi)
    t_hat = schedule.t_from_log_snr(lam_hat).numpy()
    return np.round(np.clip(t_hat, 0.0, schedule.num_timesteps - 1.0), _ROUND)


def bootstrap_sd(schedule: NoiseSchedule, splines: LossSplines, theta: np.ndarray, lam: np.ndarray,
                 u: np.ndarray, seed: int) -> np.ndarray:
    """[T] s.d. of t̂(t) over BOOTSTRAP refits of (P2) on images drawn with replacement (P3)."""
    n = splines.coefs.shape[-1]
    rng = np.random.default_rng([seed, 32])
    curves = []
    for _ in range(BOOTSTRAP):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        refit = fit_curve(splines, splines.mean(weights), u, lam, start=theta)
        curves.append(curve_t_hat(schedule, splines, refit, lam, u))
    return np.std(np.stack(curves), axis=0, ddof=1)


def held_out_gain(searches: Sequence[_StepSearch], t_hat_by_image: np.ndarray, max_batch: int) -> np.ndarray:
    """[N] d_i of (P4): Σ_t ℓ_i(t, t) − ℓ_i(t, t̂_i(t)), t̂_i the curve of the fold that image i is held out
    of ([T, N] in `t_hat_by_image`), each ℓ from a forward pass at that conditioning."""
    gain = np.zeros(t_hat_by_image.shape[1])
    for row, search in enumerate(searches):
        search.score(sorted({float(c) for c in t_hat_by_image[row]}), max_batch)
        at_curve = np.array([search.scores[float(c)][i] for i, c in enumerate(t_hat_by_image[row])])
        gain += search.scores[search.t] - at_curve
    return gain


def cross_fit(schedule: NoiseSchedule, searches: Sequence[_StepSearch], splines: LossSplines, lam: np.ndarray,
              u: np.ndarray, settings: SearchSettings) -> tuple[float, float, float]:
    """(gain, s.e., lower bound) of (P4): fit on one random half of the images, score on the other, both ways."""
    n = splines.coefs.shape[-1]
    order = np.random.default_rng([settings.seed, 33]).permutation(n)
    t_hat_by_image = np.zeros((len(lam), n))
    for fit_on, held in ((order[: n // 2], order[n // 2:]), (order[n // 2:], order[: n // 2])):
        weights = np.zeros(n)
        weights[fit_on] = 1.0
        theta = fit_curve(splines, splines.mean(weights), u, lam)
        t_hat_by_image[:, held] = curve_t_hat(schedule, splines, theta, lam, u)[:, None]
    d = held_out_gain(searches, t_hat_by_image, settings.max_batch)
    se = float(paired_se(d))
    return float(d.mean()), se, float(d.mean() - scipy.stats.t.ppf(LEVEL, n - 1) * se)


def score_grids(eps: EpsFn, schedule: NoiseSchedule, x0: Tensor, steps: Sequence[int], settings: SearchSettings,
                progress: bool) -> list[_StepSearch]:
    """One `_StepSearch` per timestep (descending, ε drawn as the per-timestep search draws them), each with
    its coarse grid and t scored."""
    generator = torch.Generator().manual_seed(settings.seed)
    top, searches = schedule.num_timesteps - 1.0, []
    for t in tqdm(steps, desc="NoiseShift (pooled)", leave=False, disable=not progress):
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        search = _StepSearch(eps, schedule, x0, noise, t)
        grid = _candidates(schedule, t, settings.coarse_window, settings.coarse_stride, top)
        search.score([*(c for c in grid if abs(c - t) > 1e-3), float(t)], settings.max_batch)
        searches.append(search)
    return searches


def loss_splines(schedule: NoiseSchedule, searches: Sequence[_StepSearch]) -> LossSplines:
    """LossSplines of the scored grids, in λ ascending (t descending)."""
    lams, losses = [], []
    for search in searches:
        cands = np.array(sorted(search.scores, reverse=True))
        lams.append(schedule.log_snr_at(cands).numpy())
        losses.append(np.stack([search.scores[float(c)] for c in cands]))
    return LossSplines.build(lams, losses)


def calibrate_pooled(eps: EpsFn, schedule: NoiseSchedule, x0: Tensor, steps: Sequence[int],
                     settings: SearchSettings, progress: bool = True) -> Calibration:
    """The pooled rule for `noiseshift.calibrate` (steps descending, x0 [N ≥ 2, ...]): fit (P1)–(P2) on all
    images, band (P3), accept by (P4) or return the identity; the Calibration records which (`pooled`)."""
    searches = score_grids(eps, schedule, x0, steps, settings, progress)
    splines = loss_splines(schedule, searches)
    lam = np.array([float(schedule.log_snr_at(float(t))) for t in steps])
    sd = float(np.std(lam))
    u = (lam - lam.mean()) / sd if sd > 0 else np.zeros_like(lam)
    theta = fit_curve(splines, splines.mean(np.ones(len(x0))), u, lam)
    fitted = curve_t_hat(schedule, splines, theta, lam, u)
    gain, gain_se, lower = cross_fit(schedule, searches, splines, lam, u, settings)
    fit = PooledFit(float(theta[0]), float(theta[1]), float(lam.mean()), sd, gain, gain_se, lower, lower > 0)
    t = np.array(steps, dtype=np.float64)
    t_hat = fitted if fit.accepted else t
    spread = settings.k * bootstrap_sd(schedule, splines, theta, lam, u, settings.seed)
    top = schedule.num_timesteps - 1.0
    band_lo = np.minimum(np.clip(fitted - spread, 0.0, top), t_hat)
    band_hi = np.maximum(np.clip(fitted + spread, 0.0, top), t_hat)
    return _calibration(searches, t_hat, band_lo, band_hi, fit, settings.max_batch)


def _calibration(searches: Sequence[_StepSearch], t_hat: np.ndarray, band_lo: np.ndarray, band_hi: np.ndarray,
                 fit: PooledFit, max_batch: int) -> Calibration:
    """The Calibration (ascending t) with ℓ(t̂) − ℓ(t) and its paired s.e. from forward passes at t̂."""
    rows = []
    for search, h, lo, hi in zip(searches, t_hat, band_lo, band_hi, strict=True):
        search.score([float(h)], max_batch)
        diff = search.scores[float(h)] - search.scores[search.t]
        rows.append((search.t, float(h), float(search.scores[search.t].mean()),
                     float(search.scores[float(h)].mean()), float(diff.mean()), float(paired_se(diff)),
                     float(lo), float(hi)))
    rows.reverse()
    return Calibration(*(list(col) for col in zip(*rows, strict=True)), rule="pooled", pooled=asdict(fit))


def pooled_summary(calibration: Calibration) -> str:
    """One line on the pooled test: the curve, the held-out gain and whether the table is the identity."""
    fit = calibration.pooled
    if fit is None:
        return ""
    verdict = ("accepted" if fit["accepted"] else
               "rejected, so the table is the identity (t̂ = t)")
    return (f"pooled curve λ̂ = λ {fit['a']:+.4f} {fit['b']:+.4f}·u {verdict}: held-out loss gain "
            f"{fit['gain']:.3g} ± {fit['gain_se']:.2g} per image, {fit['level']:.0%} lower bound "
            f"{fit['gain_lower']:.3g}")

