"""The evidence matrix: every model × variant × resolution cell, plus ground truth and diagnostics.

The synthetic-scenes Table 1 of `mrdiff evidence report`. Cells are generated and scored by the same code as
`mrdiff test` (mrdiff.evaluation.cells and .scores); references are held-out renders at each size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mrdiff.baselines import upsample
from mrdiff.console import info
from mrdiff.data.synthetic import reference_radii
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evaluation.cells import (
    NOISESHIFT_RULES,
    TRAINING_FREE,
    Variant,
    above_training_size,
    analytic_shift,
    generate,
    held_out_noiseshift,
    references,
    training_free,
)
from mrdiff.evaluation.report import SAMPLER_NAMES, T_BUCKETS
from mrdiff.evaluation.scores import InceptionScores, paired_differences, score_cell
from mrdiff.exported import load
from mrdiff.pipeline import DiffusionPipeline
from mrdiff.resolution import resolution_key

DEFAULT_VARIANTS = ("plain", "noiseshift", "analytic")
VARIANTS = (*DEFAULT_VARIANTS, "noiseshift_per_timestep", "noiseshift_argmin",  # NoiseShift by its other rules
            *TRAINING_FREE)  # the training-free rows: above the training size only


@dataclass
class Settings:
    resolutions: list[tuple[int, int]]
    num_samples: int = 400
    first_seed: int = 0  # samples use seeds first_seed … first_seed + num_samples − 1 (tuning runs use others)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # the CPU report uses DDIM-25, η = 1
    batch_size: int = 400
    calibration_images: int = 32
    num_reference: int = 1000  # ground-truth renders per resolution (spectra, colours, FID/KID)
    figure_samples: int = 6
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    variant_args: dict[str, dict] = field(default_factory=dict)  # training-free method → parameters overridden
    shifted_at: list[tuple[int, int]] | None = None  # where the shifted rows are sampled; None: every resolution
    extractor: torch.nn.Module | None = None  # Inception (FID and KID per cell), when weights are available
    sampler_check: int = 0  # samples per sampler in the DDIM / DDPM / DPM-Solver++ comparison at R; 0: none
    upsample: tuple[str, ...] = ("fixed",)  # models whose samples at R, upsampled, make "<model> + upsample" rows
    training_free: tuple[str, ...] | None = None  # models that get the training-free variants; None: every model

    @property
    def seeds(self) -> range:
        """The seeds of every sampled cell: sample i of every row and size uses the same one."""
        return range(self.first_seed, self.first_seed + self.num_samples)


def eps_mse_by_bucket(pipeline: DiffusionPipeline, reference: Tensor, seed: int = 0) -> dict[str, dict[str, float]]:
    """ε-MSE and x̂0-MSE per timestep bucket on held-out renders (what separates undertraining from a defect)."""
    x0 = reference[:64].to(pipeline.device)
    eps, schedule = pipeline.canvas_eps(*x0.shape[-2:]), pipeline.schedule
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for lo, hi in T_BUCKETS:  # buckets of a 1000-step schedule, scaled to this one's T
            scale = schedule.num_timesteps / 1000
            t = torch.randint(int(lo * scale), max(int(hi * scale), int(lo * scale) + 1), (x0.shape[0],),
                              generator=gen).to(pipeline.device)
            noise = torch.randn(x0.shape, generator=gen).to(pipeline.device)
            x_t = schedule.q_sample(x0, t, noise)
            e = eps(x_t, t.float())
            ab = schedule.gather(schedule.alphas_cumprod, t, x0).float()
            x0_hat = (x_t - (1 - ab).sqrt() * e) / ab.sqrt()
            out[f"{lo}-{hi}"] = {"eps_mse": float((e - noise).pow(2).mean()),
                                 "x0_mse": float((x0_hat - x0).pow(2).mean())}
    return out


SAMPLER_CHECK = (SamplingSettings("ddim", 50), SamplingSettings("ddim", 50, eta=1.0), SamplingSettings("ddpm", 1000),
                 SamplingSettings("dpmpp_2m", 10))


def sampler_label(sampling: SamplingSettings) -> str:
    eta = f" (η = {sampling.eta:g})" if sampling.eta else ""
    return f"{SAMPLER_NAMES[sampling.sampler]}-{sampling.steps}{eta}"


def sampler_check(pipeline: DiffusionPipeline, reference: Tensor, radii: list[float], num: int, batch_size: int,
                  samplers: tuple[SamplingSettings, ...] = SAMPLER_CHECK, size: tuple[int, int] | None = None,
                  inception: InceptionScores | None = None) -> dict[str, dict[str, float]]:
    """The same seeds and weights through several samplers at one size (default: the training size R): a
    sampler defect, or the deterministic samplers' sensitivity to ε errors at low t, shows as speckle."""
    height, width = size or (pipeline.train_resolution, pipeline.train_resolution)
    out = {}
    for sampling in samplers:
        start = time.time()
        samples = generate(pipeline, range(num), height, width, sampling=sampling, batch_size=batch_size,
                           context=torch.no_grad)
        out[sampler_label(sampling)] = {
            **score_cell(samples, reference, resolution_key(height, width), radii=radii, inception=inception),
            "seconds": time.time() - start,
            "saturated": float((samples.abs() > 0.98).float().mean())}  # pixels the clipping holds at ±1
    return out


class Matrix:
    """Collects a report's cells, figure strips, diagnostics and NoiseShift tables while models are scored."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.radii = reference_radii(1000)
        self.refs = {hw: references(*hw, settings.num_reference) for hw in settings.resolutions}
        self.inception = {hw: InceptionScores(self.refs[hw], settings.extractor, settings.num_samples)
                          if settings.extractor is not None else None for hw in settings.resolutions}
        self.cells: dict[str, dict[str, dict]] = {}
        self.figure: dict[str, dict[str, Tensor]] = {}
        self.diagnostics: dict[str, dict] = {}
        self.tables: dict[str, dict] = {}

    def add(self, row: str, hw: tuple[int, int], images: Tensor) -> dict:
        """Score `images` as cell (row, hw) and keep a strip of them for the figure."""
        key = resolution_key(*hw)
        cell = score_cell(images, self.refs[hw], key, radii=self.radii, inception=self.inception[hw])
        self.cells.setdefault(row, {})[key] = cell
        self.figure.setdefault(row, {})[key] = images[: self.settings.figure_samples]
        return cell

    def ground_truth(self) -> None:
        """Renders other than the reference set: each metric's floor at each size."""
        for hw in self.settings.resolutions:
            self.add("ground truth", hw, references(*hw, self.settings.num_samples, first=self.settings.num_reference))

    def variant_cond(self, name: str, pipeline: DiffusionPipeline, variant: str, hw: tuple[int, int]):
        if variant == "analytic":
            return analytic_shift(pipeline, *hw)
        if variant in NOISESHIFT_RULES:
            table = self.tables.setdefault(name if variant == "noiseshift" else Variant.of(name, variant).label, {})
            cond, table[resolution_key(*hw)] = held_out_noiseshift(
                pipeline, *hw, self.settings.sampling, self.settings.calibration_images, NOISESHIFT_RULES[variant])
            return cond
        return None

    def model(self, name: str, pipeline: DiffusionPipeline, payload: dict) -> None:
        """Every cell of one model: its variants at every size, its upsample row, its diagnostics."""
        s, side = self.settings, pipeline.train_resolution
        self.diagnostics[name] = {"global_step": payload["global_step"], "train_seconds": payload.get("train_seconds"),
                                  "command": payload.get("command"), "eps_mse": {}}
        if s.sampler_check:
            reference = self.refs.get((side, side), None)
            reference = reference if reference is not None else references(side, side, s.num_reference)
            self.diagnostics[name]["samplers"] = sampler_check(pipeline, reference, self.radii, s.sampler_check,
                                                               s.batch_size)
        plain_at_r = None  # the plain samples at R, reused by the upsample row (same seeds, same samples)
        for hw in s.resolutions:
            self.diagnostics[name]["eps_mse"][resolution_key(*hw)] = eps_mse_by_bucket(pipeline, self.refs[hw])
            plain = None  # this size's plain samples: the other rows' paired differences are against them
            for variant in s.variants:
                if variant != "plain" and s.shifted_at is not None and hw not in s.shifted_at:
                    continue
                others = s.training_free is not None and name not in s.training_free  # not this model's rows
                if variant in TRAINING_FREE and (not above_training_size(pipeline, *hw) or others):
                    continue
                start = time.time()
                cond = self.variant_cond(name, pipeline, variant, hw)
                sampling, method = training_free(variant, s.sampling, s.variant_args.get(variant))
                samples = generate(pipeline, s.seeds, *hw, sampling=sampling, time_cond=cond,
                                   batch_size=s.batch_size, method=method)
                if variant == "plain" and hw == (side, side):
                    plain_at_r = samples
                plain = samples if variant == "plain" else plain
                row = Variant.of(name, variant).label
                cell = self.add(row, hw, samples)
                if variant != "plain" and plain is not None:
                    cell["paired"] = paired_differences(samples, plain, self.refs[hw])
                cell["seconds"] = time.time() - start
                info(f"mrdiff evidence: {row} at {resolution_key(*hw)}: one-sun {cell['one_sun_rate']:.3f}, "
                     f"spectrum {cell['spectrum_distance']:.3f} ({time.time() - start:.1f} s)")
        if name in s.upsample:
            base = plain_at_r if plain_at_r is not None else generate(
                pipeline, s.seeds, side, side, sampling=s.sampling, batch_size=s.batch_size)
            for hw in s.resolutions:
                if above_training_size(pipeline, *hw):
                    self.add(Variant.of(name, "upsample").label, hw, upsample(base, *hw))

    def result(self) -> dict:
        return {"cells": self.cells, "diagnostics": self.diagnostics, "noiseshift": self.tables,
                "figure": self.figure}


def evaluate(models: dict[str, Path], settings: Settings, device: torch.device) -> dict:
    """Every (row, resolution) cell; rows are (model, variant), '<model> + upsample' and 'ground truth'."""
    matrix = Matrix(settings)
    matrix.ground_truth()
    for name, path in models.items():
        pipeline, payload = load(path, device)
        matrix.model(name, pipeline, payload)
        del pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return matrix.result()
