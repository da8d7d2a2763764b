"""Scoring a cell: structure, detail, FID and KID, each with its 95% interval where it is a statistic.

- structure (synthetic scenes, which have one sun): the one-sun and stacked-horizon rates with Wilson
  intervals, suns per image and the sun radius error with bootstrap intervals;
- detail (any data): power-spectrum distance, neighbour difference and sky colour against reference images
  of the same size (mrdiff.metrics.detail), with bootstrap intervals;
- Inception: FID (with its N: never compare FIDs across N) and KID, whose mean over subsets carries a
  ±1.96·s.d. band (torchmetrics' estimate of its spread; KID is unbiased at small N, FID is not).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.kid import KernelInceptionDistance

from mrdiff.metrics.detail import (
    bootstrap_interval,
    detail_report,
    radial_power_spectrum,
    sky_colour,
    spectrum_distance,
    wilson_interval,
)
from mrdiff.metrics.fid import FID, rank_and_world, to_uint8
from mrdiff.metrics.structure import ImageScan, scan, structure_score


def rate(flags: Sequence[bool], name: str) -> dict[str, float]:
    """{name, name_lo, name_hi}: the share of True with its Wilson 95% interval."""
    hits, n = int(sum(bool(f) for f in flags)), len(flags)
    lo, hi = wilson_interval(hits, n)
    return {name: hits / n if n else float("nan"), f"{name}_lo": lo, f"{name}_hi": hi}


def radius_error_interval(found: ImageScan, radii: Sequence[float]) -> tuple[float, float]:
    """Bootstrap 95% interval of the radius error |mean sun radius − mean reference radius| / mean reference
    radius, resampling images (each with all its suns); the reference mean (of 1000 scenes) is held fixed."""
    ref = float(np.mean(np.asarray(radii, dtype=np.float64)))
    per_image = np.array([[sum(sun.radius for sun in suns), len(suns)] for suns in found.suns], dtype=np.float64)

    def error(sample: np.ndarray) -> float:
        total, count = sample.sum(0)
        return abs(total / count - ref) / ref if count else math.nan

    return bootstrap_interval(per_image, error) if per_image[:, 1].sum() else (math.nan, math.nan)


def structure_metrics(found: ImageScan, radii: Sequence[float], key: str) -> dict[str, float]:
    """One-sun and stacked-horizon rates (Wilson), suns per image and the radius error (bootstrap)."""
    counts = found.counts.astype(float)
    score = structure_score(found, reference_radii=radii, resolution=key)
    n_lo, n_hi = bootstrap_interval(counts)
    r_lo, r_hi = radius_error_interval(found, radii)
    return {**rate(counts == 1, "one_sun_rate"),
            "mean_num_suns": float(counts.mean()), "mean_num_suns_lo": n_lo, "mean_num_suns_hi": n_hi,
            **rate(found.stacked, "stacked_horizon_rate"),
            "radius_error": score.radius_error, "radius_error_lo": r_lo, "radius_error_hi": r_hi}


class SharedFeatures(torch.nn.Module):
    """The extractor behind both FID and KID, run once per batch: the second metric to ask for the same uint8
    batch gets the features the first one computed (keyed by the batch's bytes), halving the Inception passes."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = getattr(extractor, "num_features", None)
        self._key: bytes | None = None
        self._features: Tensor | None = None

    def forward(self, images: Tensor) -> Tensor:
        key = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).digest() + str(images.shape).encode()
        if key != self._key:
            self._key, self._features = key, self.extractor(images)
        return self._features


class InceptionScores:
    """FID and KID of fakes against one resolution's reference images, on one feature extractor.

    The reference features are extracted once and kept across every row scored against them. Give `fid` to
    reuse a FID metric whose real statistics are already in (e.g. from the on-disk cache of `mrdiff test`).
    Under DDP each rank updates with its own fakes and its share of the reals, and torchmetrics gathers the
    features on compute.
    """

    @torch.no_grad()
    def __init__(self, reference: Tensor, extractor: torch.nn.Module, num_fakes: int, fid: FID | None = None,
                 batch_size: int = 200) -> None:
        device = next(extractor.parameters(), torch.empty(0)).device
        self.batch_size = batch_size
        extractor = SharedFeatures(extractor) if fid is None else extractor  # a given FID keeps its own
        subset = min(num_fakes, len(reference), 100)
        # every subset would be both whole sets: the subsets' spread is zero and says nothing, so no band then
        self.banded = not subset == num_fakes == len(reference)
        self.kid = KernelInceptionDistance(feature=extractor, subset_size=subset, subsets=50, normalize=False,
                                           reset_real_features=False).to(device)
        self.fid = fid if fid is not None else FID(extractor).to(device)
        rank, world = rank_and_world()
        for batch in reference[rank::world].split(batch_size):  # each real once across ranks (synced on compute)
            if fid is None:
                self.fid.update_images(batch.to(device), real=True)
            self.kid.update(to_uint8(batch).to(device), real=True)

    @torch.no_grad()
    def __call__(self, fakes: Tensor) -> dict[str, float]:
        """{fid, kid, kid_lo, kid_hi} of this rank's fakes (all ranks' on compute)."""
        self.fid.reset()  # the fakes only: both metrics keep their real features
        self.kid.reset()
        device = self.kid.device
        for batch in fakes.split(self.batch_size):
            self.fid.update_images(batch.to(device), real=False)
            self.kid.update(to_uint8(batch).to(device), real=False)
        kid_mean, kid_std = (float(v) for v in self.kid.compute())
        half = 1.96 * kid_std if self.banded else math.nan
        return {"fid": float(self.fid.compute()), "kid": kid_mean, "kid_lo": kid_mean - half, "kid_hi": kid_mean + half}


def score_cell(images: Tensor, reference: Tensor | None, key: str, *, radii: Sequence[float] | None = None,
               inception: InceptionScores | None = None, local: Tensor | None = None) -> dict[str, float]:
    """Every metric of one cell: structure when `radii` are given (synthetic scenes), detail against
    `reference`, FID and KID when `inception` is given (fed `local`, this rank's shard, or `images`)."""
    out: dict[str, float] = {}
    if radii is not None:
        out.update(structure_metrics(scan(images), radii, key))
    if reference is not None:
        out.update(detail_report(images, reference))
    if inception is not None:
        out.update(inception(images if local is None else local), fid_n=float(len(images)))
    return out


def paired_differences(images: Tensor, base: Tensor, reference: Tensor, seed: int = 0) -> dict[str, float]:
    """Each metric of `images` minus that of `base` sampled from the same seeds (sample i against sample i),
    with a 95% bootstrap interval over the seeds: one-sun rate, spectrum distance to `reference`, sky red."""
    ones = [found.counts == 1 for found in (scan(images), scan(base))]
    ref = radial_power_spectrum(reference)
    spectra = [radial_power_spectrum(x, bins=ref.shape[1]) for x in (images, base)]
    reds = [sky_colour(x)[:, 0] for x in (images, base)]
    seeds = np.arange(len(images))
    stats = {
        "one_sun_rate": lambda i: ones[0][i].mean() - ones[1][i].mean(),
        "spectrum_distance": lambda i: spectrum_distance(spectra[0][i], ref) - spectrum_distance(spectra[1][i], ref),
        "sky_red": lambda i: reds[0][i].mean() - reds[1][i].mean(),
    }
    out = {}
    for name, statistic in stats.items():
        lo, hi = bootstrap_interval(seeds, statistic, seed=seed)
        out.update({name: float(statistic(seeds)), f"{name}_lo": lo, f"{name}_hi": hi})
    return out
