"""Detail and colour statistics of generated images against ground-truth renders, with 95% intervals.

The structure score (`mrdiff.metrics.structure`) measures layout. These measure what an upsampled or
noisy image cannot fake:

- `radial_power_spectrum`: the image's power at each spatial frequency (cycles per pixel), averaged over
  orientation. A bicubic upsample has almost no power above its source's Nyquist frequency; a speckled
  sample has too much at the highest frequencies.
- `spectrum_distance`: mean absolute difference of log10 power between two sets, over the frequency bins.
- `neighbour_difference`: mean absolute difference between vertically and horizontally adjacent pixels
  (the speckle statistic).
- `sky_colour`: mean RGB of the top quarter of the canvas (always sky in the synthetic scenes).

Intervals: `wilson_interval` for rates, `bootstrap_interval` for statistics of a set of images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (better than the normal interval near 0 and 1)."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of `statistic` over the first axis of `values`."""
    values = np.asarray(values)
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)]
    if np.isnan(stats).all():
        return math.nan, math.nan
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))  # nan: an empty resample


def _luminance(images: Tensor) -> Tensor:
    """[N, H, W] luminance of [N, 3, H, W] images in [−1, 1], float64."""
    x = images.double()
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def radial_power_spectrum(images: Tensor, bins: int | None = None) -> np.ndarray:
    """[N, bins] orientation-averaged power of each image's luminance at radial frequencies (0, 0.5] c/px.

    The mean is removed first; bin k covers radial frequency (k, k+1]·0.5/bins cycles per pixel, so sets
    at different resolutions share the same frequency axis in cycles per pixel.
    """
    lum = _luminance(images)
    lum = lum - lum.mean(dim=(-2, -1), keepdim=True)
    height, width = lum.shape[-2:]
    bins = bins or min(height, width) // 2
    power = torch.fft.fft2(lum).abs().pow(2) / (height * width)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fx**2 + fy**2)
    index = torch.ceil(radius / 0.5 * bins).long() - 1  # (0, 0.5/bins] → bin 0; DC → −1 (dropped)
    keep = (index >= 0) & (index < bins)
    flat_index = index[keep]
    counts = torch.bincount(flat_index, minlength=bins).double().clamp(min=1)
    out = torch.stack([torch.bincount(flat_index, weights=p[keep], minlength=bins) for p in power]) / counts
    return out.numpy()


def spectrum_distance(spectra: np.ndarray, reference: np.ndarray) -> float:
    """Mean over frequency bins of |log10 mean power − log10 mean reference power|."""
    eps = 1e-12
    return float(np.mean(np.abs(np.log10(spectra.mean(0) + eps) - np.log10(reference.mean(0) + eps))))


def neighbour_difference(images: Tensor) -> np.ndarray:
    """[N] mean absolute difference between adjacent pixels (both axes, all channels), images in [−1, 1]."""
    x = images.double()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return (0.5 * (dx + dy)).numpy()


def sky_colour(images: Tensor) -> np.ndarray:
    """[N, 3] mean RGB (in [−1, 1]) of each image's top quarter."""
    top = images.double()[:, :, : max(images.shape[-2] // 4, 1)]
    return top.mean(dim=(2, 3)).numpy()


def detail_report(samples: Tensor, reference: Tensor, seed: int = 0) -> dict[str, float]:
    """Spectrum distance, neighbour difference and sky red of `samples` with 95% bootstrap intervals.

    `reference` holds ground-truth renders at the same resolution (its spectrum is the target).
    """
    ref_spectra = radial_power_spectrum(reference)
    spectra = radial_power_spectrum(samples, bins=ref_spectra.shape[1])
    dist_lo, dist_hi = bootstrap_interval(spectra, lambda s: spectrum_distance(s, ref_spectra), seed=seed)
    nd = neighbour_difference(samples)
    nd_lo, nd_hi = bootstrap_interval(nd, seed=seed)
    red = sky_colour(samples)[:, 0]
    red_lo, red_hi = bootstrap_interval(red, seed=seed)
    return {"spectrum_distance": spectrum_distance(spectra, ref_spectra), "spectrum_distance_lo": dist_lo,
            "spectrum_distance_hi": dist_hi, "neighbour_difference": float(nd.mean()),
            "neighbour_difference_lo": nd_lo, "neighbour_difference_hi": nd_hi,
            "sky_red": float(red.mean()), "sky_red_lo": red_lo, "sky_red_hi": red_hi}
