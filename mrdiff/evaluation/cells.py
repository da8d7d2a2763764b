"""Generating a cell: one row (a model and how it is sampled) at one resolution, from fixed seeds.

Sample i is drawn from seed i in every row and at every size, so rows are paired by seed. Under
torch.distributed each rank samples seeds[rank::world] and `gather` puts the images back in seed order, so a
cell's images (and every number computed from them) do not depend on the number of GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mrdiff.baselines import method
from mrdiff.data.synthetic import render_canvas, sample_scene
from mrdiff.diffusion.samplers import Progress, SamplingSettings, TimeCond
from mrdiff.metrics.fid import rank_and_world
from mrdiff.noiseshift.search import SearchSettings, calibrate
from mrdiff.noiseshift.time_cond import AnalyticShift, InterpolatedTimeCond
from mrdiff.pipeline import DiffusionPipeline, SamplingMethod

HELD_OUT_SEED = 10**7  # scenes for references and calibration: never in a training set (seeds < 10^6)
Kind = Literal["plain", "noiseshift", "noiseshift_per_timestep", "noiseshift_argmin", "analytic", "upsample",
               "scaled_attention", "redilation", "window_fusion", "redenoise"]
NOISESHIFT_RULES = {"noiseshift": "pooled", "noiseshift_per_timestep": "per_timestep", "noiseshift_argmin": "argmin"}
TRAINING_FREE = ("scaled_attention", "redilation", "window_fusion", "redenoise")  # rows above the training size only


@dataclass(frozen=True)
class Variant:
    """A row of a table: how a model's cells are sampled.

    plain: t itself; noiseshift: a NoiseShift table (`noiseshift`, a path), or, without one, a calibration made
    at each size on held-out renders (the evidence report's); analytic: the SD3 / simple-diffusion shift;
    upsample: the plain samples at the training size, bicubic-upsampled (the trivial baseline above R);
    scaled_attention, redilation, window_fusion, redenoise: the training-free baselines (mrdiff.baselines,
    `training_free`).
    """

    label: str  # row name, e.g. "mrdiff + NoiseShift"
    slug: str = ""  # suffix of logged keys: "" for the plain model
    kind: Kind = "plain"
    noiseshift: str | None = None

    @classmethod
    def of(cls, name: str, kind: Kind, noiseshift: str | None = None) -> Variant:
        """The row of model `name` sampled as `kind`: 'name', 'name + noiseshift', …"""
        return cls(name if kind == "plain" else f"{name} + {kind}", "" if kind == "plain" else kind, kind, noiseshift)


def references(height: int, width: int, num: int, first: int = 0) -> Tensor:
    """Held-out renders HELD_OUT_SEED + first … + first + num − 1 (a ground-truth row uses others than the
    reference set, so its distances are the metric's floor, not zero by construction)."""
    return torch.stack([render_canvas(sample_scene(HELD_OUT_SEED + first + i), height, width) for i in range(num)])


def gather(images: Tensor) -> Tensor:
    """Every rank's shard (seeds[rank::world]) back in seed order, on every rank (identity without DDP)."""
    rank, world = rank_and_world()
    if world == 1:
        return images
    parts: list[Tensor | None] = [None] * world
    dist.all_gather_object(parts, images.cpu())
    out = torch.empty((sum(len(p) for p in parts), *images.shape[1:]), dtype=images.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def default_context(pipeline: DiffusionPipeline) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU, full precision on the CPU (where the reports' numbers were measured)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=pipeline.device.type == "cuda")


@torch.no_grad()
def generate(
    pipeline: DiffusionPipeline, seeds: Sequence[int], height: int, width: int, *,
    sampling: SamplingSettings, time_cond: TimeCond | None = None, batch_size: int = 64,
    context: Callable[[], contextlib.AbstractContextManager] | None = None, progress: Progress = False,
    method: SamplingMethod | None = None,
) -> Tensor:
    """This rank's share of the seeds (seeds[rank::world]) sampled in batches: float [n, C, H, W] on the CPU."""
    rank, world = rank_and_world()
    mine = list(seeds)[rank::world]
    context = context or (lambda: default_context(pipeline))
    out = []
    for start in range(0, len(mine), batch_size):
        with context():
            images = pipeline.sample(mine[start:start + batch_size], height, width, sampling=sampling,
                                     time_cond=time_cond, progress=progress, method=method)
        out.append(images.float().cpu())
    return torch.cat(out) if out else torch.empty(0, pipeline.in_channels, height, width)


def above_training_size(pipeline: DiffusionPipeline, height: int, width: int) -> bool:
    """Where the baselines (upsampling, the training-free methods) have something to fix: more pixels than R²."""
    return height * width > pipeline.train_resolution**2


def training_free(kind: str, sampling: SamplingSettings,
                  args: dict[str, object] | None = None) -> tuple[SamplingSettings, SamplingMethod | None]:
    """How a row of `kind` samples: for a training-free one the settings with scaled attention on, or a method of
    mrdiff.baselines with its defaults, some overridden by `args` (field → value); any other, as `sampling` says."""
    if kind not in TRAINING_FREE:
        return sampling, None
    if kind == "scaled_attention":
        return replace(sampling, attention_scaling=True), None
    return sampling, method(kind, **(args or {}))


def held_out_noiseshift(pipeline: DiffusionPipeline, height: int, width: int, sampling: SamplingSettings,
                        num_images: int, rule: str = "pooled") -> tuple[InterpolatedTimeCond, dict]:
    """NoiseShift calibrated at (height, width) on held-out renders by `rule` (the evidence report's
    "+ noiseshift…" rows); returns the time conditioning and the calibration as a dict."""
    images = references(height, width, num_images).to(pipeline.device)
    search = SearchSettings(num_images=num_images, coarse_stride=0.02, fine_window=0.02, fine_stride=0.004,
                            max_batch=1024, rule=rule)
    with torch.no_grad(), default_context(pipeline):
        calibration = calibrate(pipeline.canvas_eps(height, width), pipeline.schedule, images,
                                sampling.timesteps(pipeline.schedule), search, progress=False)
    cond = InterpolatedTimeCond(np.array(calibration.t), np.array(calibration.t_hat), pipeline.schedule.num_timesteps)
    return cond, calibration.to_dict()


def analytic_shift(pipeline: DiffusionPipeline, height: int, width: int) -> AnalyticShift:
    """The SD3 / simple-diffusion log-SNR shift from the training size to height × width."""
    return AnalyticShift(pipeline.schedule, train_pixels=pipeline.train_resolution**2, sample_pixels=height * width)
