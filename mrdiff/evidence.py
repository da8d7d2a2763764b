"""The synthetic-scenes Table 1: train the model matrix, evaluate every model at every resolution, report.

    python -m mrdiff.evidence [--train] [--models fixed,multires,...] [--out results/evidence]

Models (configs/evidence/<name>.yaml over configs/evidence/base.yaml, base resolution R = 32): a
fixed-resolution DDPM trained on whole scenes at R, the multi-resolution model (R² patches of scenes
rendered at s ∈ {R} ∪ U[R, 2R], coordinates + SAFA), the same with a quarter of the batches whole 2R
canvases ("canvases", an mrdiff addition) and the ablations. Each trained model is exported as
fp16 EMA weights with what is needed to rebuild it (`models/evidence/<name>.pt`); existing exports are
reused, so evaluation alone needs no training.

Rows per model: plain, + NoiseShift (calibrated here on held-out renders), + analytic shift; plus
"fixed + upsample" (the fixed model's samples at R, bicubic-upsampled; `--upsample` names other
fixed-resolution rows to give the same trivial baseline) and the ground-truth renders
themselves, which give each metric's ceiling at each resolution. Columns: resolutions. Every rate carries
a Wilson 95% interval, every mean a bootstrap 95% interval. The report (Markdown, JSON, figure) is written
by this run, with the machine, the versions and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torchmetrics.image.kid import KernelInceptionDistance

from mrdiff.data.synthetic import render_canvas, sample_scene
from mrdiff.diffusion.noiseshift import Calibration, SearchSettings, calibrate
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.diffusion.time_cond import AnalyticShift, InterpolatedTimeCond
from mrdiff.metrics.detail import bootstrap_interval, detail_report, wilson_interval
from mrdiff.metrics.fid import FID, configured_weights, inception, to_uint8
from mrdiff.metrics.structure import reference_radii, scan, structure_score
from mrdiff.module import DiffusionModule
from mrdiff.nn.unet import UNet
from mrdiff.resolution import parse_resolution, resolution_key
from mrdiff.utils import atomic_write

VARIANTS = ("plain", "noiseshift", "analytic")
MODELS = ("fixed", "multires", "canvases", "no_coords", "no_safa", "pixel")
CONFIGS = Path("configs/evidence")
HELD_OUT_SEED = 10**7  # scenes for references and calibration: never in the training set (seeds < 10^6)
T_BUCKETS = ((0, 100), (100, 300), (300, 600), (600, 900), (900, 1000))
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}


# -- models -------------------------------------------------------------------------------------------
def fit_args(name: str, run_root: Path, overlays: list[str], extra: list[str]) -> list[str]:
    """`mrdiff fit` arguments of one model: base.yaml, the model's overlay, then any size overlays."""
    configs = [str(CONFIGS / "base.yaml"), str(CONFIGS / f"{name}.yaml"), *overlays]
    return ["fit", *(a for c in configs for a in ("--config", c)), f"--trainer.default_root_dir={run_root / name}",
            *extra]


def train(args: list[str], run: Path) -> Path:
    """`mrdiff fit` of one model of the matrix; returns the run's last.ckpt."""
    print("mrdiff evidence: mrdiff " + shlex.join(args), flush=True)
    start = time.time()
    subprocess.run([sys.executable, "-m", "mrdiff", *args], check=True)
    (run / "train_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    return run / "checkpoints" / "last.ckpt"


FP32_KEYS = ("coords.matrix",)  # constants the features are computed from: fp16 would move the frequencies


def export(ckpt_path: Path, out: Path, command: str, wall_seconds: float | None) -> Path:
    """fp16 EMA weights plus the U-Net and module settings: a few MB that rebuild the model anywhere."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = yaml.safe_load((ckpt_path.parent.parent / "config.yaml").read_text())
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in ("net", "_instantiator", "init_weights")}
    payload = {
        "state_dict": {k: v.half() if v.is_floating_point() and not k.endswith(FP32_KEYS) else v
                       for k, v in ckpt["state_dict"].items()},
        "net": config["model"]["net"]["init_args"], "module": hparams, "data": config["data"],
        "global_step": ckpt["global_step"], "command": command, "train_seconds": wall_seconds,
    }
    with atomic_write(out) as f:  # a killed export leaves the previous weights intact
        torch.save(payload, f)
    return out


def load_model(path: Path, device: torch.device) -> tuple[DiffusionModule, dict]:
    """Rebuild a model exported by `export` (fp32 weights on `device`, eval mode)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    net = UNet(**{"norm_group_channels": 1, **payload["net"]})  # exports without it predate the setting (1)
    module = DiffusionModule(net, **payload["module"])
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    return module.to(device).eval(), payload


# -- evaluation ---------------------------------------------------------------------------------------
@dataclass
class Settings:
    resolutions: list[tuple[int, int]]
    num_samples: int = 400
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # the CPU report uses DDIM-25, η = 1
    batch_size: int = 400
    calibration_images: int = 32
    num_reference: int = 1000  # ground-truth renders per resolution (spectra, colours)
    figure_samples: int = 6
    variants: tuple[str, ...] = VARIANTS
    shifted_at: list[tuple[int, int]] | None = None  # where the shifted rows are sampled; None: every resolution
    extractor: torch.nn.Module | None = None  # Inception (FID and KID per cell), when weights are given
    sampler_check: int = 0  # samples per sampler in the DDIM / DDPM / DPM-Solver++ comparison at R; 0: none
    upsample: tuple[str, ...] = ("fixed",)  # models whose samples at R, upsampled, make "<model> + upsample" rows


def references(height: int, width: int, num: int, first: int = 0) -> torch.Tensor:
    """Held-out renders HELD_OUT_SEED + first … + first + num − 1 (the ground-truth row uses others than the
    reference set, so its distances are the metric's floor, not zero by construction)."""
    return torch.stack([render_canvas(sample_scene(HELD_OUT_SEED + first + i), height, width) for i in range(num)])


def generate(model: DiffusionModule, height: int, width: int, settings: Settings, time_cond=None) -> torch.Tensor:
    """num_samples samples on the model's device in bf16 (GPU) or fp32 (CPU), returned on the CPU."""
    out, seeds = [], list(range(settings.num_samples))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    for start in range(0, len(seeds), settings.batch_size):
        with autocast:
            out.append(model.sample(seeds[start:start + settings.batch_size], height, width,
                                    sampling=settings.sampling, time_cond=time_cond).float().cpu())
    return torch.cat(out)


def noiseshift_cond(model: DiffusionModule, height: int, width: int, settings: Settings) -> tuple[object, dict]:
    """NoiseShift calibrated at (height, width) on held-out renders; returns time_cond and the table."""
    images = references(height, width, settings.calibration_images).to(model.device)
    timesteps = settings.sampling.timesteps(model.schedule)
    search = SearchSettings(num_images=settings.calibration_images, coarse_stride=0.02, fine_window=0.02,
                            fine_stride=0.004, max_batch=1024)
    grid, scale = model.canvas_inputs(height, width)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    with torch.no_grad(), autocast:
        calibration: Calibration = calibrate(model.eps_fn(grid, scale), model.schedule, images, timesteps, search,
                                             progress=False)
    cond = InterpolatedTimeCond(np.array(calibration.t), np.array(calibration.t_hat), model.schedule.num_timesteps)
    return cond, calibration.to_dict()


def cell_metrics(images: torch.Tensor, reference: torch.Tensor, radii: list[float], key: str,
                 inception: InceptionScores | None = None) -> dict[str, float]:
    """Structure (one-sun and stacked-horizon rates with Wilson intervals, mean suns with a bootstrap
    interval), detail, and FID and KID against the reference renders when Inception scores are given."""
    found = scan(images)  # one pass: the score and the per-image counts behind its intervals
    score = structure_score(found, reference_radii=radii, resolution=key)
    counts = found.counts.astype(float)
    ones = int((counts == 1).sum())
    lo, hi = wilson_interval(ones, len(counts))
    t_lo, t_hi = wilson_interval(int(found.stacked.sum()), len(counts))
    n_lo, n_hi = bootstrap_interval(counts)
    return {"one_sun_rate": ones / len(counts), "one_sun_rate_lo": lo, "one_sun_rate_hi": hi,
            "mean_num_suns": float(counts.mean()), "mean_num_suns_lo": n_lo, "mean_num_suns_hi": n_hi,
            "stacked_horizon_rate": score.stacked_horizon_rate, "stacked_horizon_rate_lo": t_lo,
            "stacked_horizon_rate_hi": t_hi, "radius_error": score.radius_error, **detail_report(images, reference),
            **(inception(images) if inception is not None else {})}


class InceptionScores:
    """torchmetrics' FID and KID against one resolution's reference renders on one feature extractor. The
    reference features are extracted once and kept across the rows scored against them; KID is the mean over
    subsets with a ±1.96·s.d.-of-subsets band (torchmetrics' estimate of its spread)."""

    @torch.no_grad()
    def __init__(self, reference: torch.Tensor, extractor: torch.nn.Module, num_fakes: int) -> None:
        self.fid = FID(extractor)
        self.kid = KernelInceptionDistance(feature=extractor, subset_size=min(num_fakes, len(reference), 100),
                                           subsets=50, normalize=False, reset_real_features=False)
        for batch in reference.split(200):
            self.fid.update_images(batch, real=True)
            self.kid.update(to_uint8(batch), real=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        self.fid.reset()  # the fakes only: both metrics keep their real features
        self.kid.reset()
        for batch in images.split(200):
            self.fid.update_images(batch, real=False)
            self.kid.update(to_uint8(batch), real=False)
        kid_mean, kid_std = (float(v) for v in self.kid.compute())
        return {"fid": float(self.fid.compute()), "kid": kid_mean, "kid_lo": kid_mean - 1.96 * kid_std,
                "kid_hi": kid_mean + 1.96 * kid_std}


def eps_mse_by_bucket(model: DiffusionModule, reference: torch.Tensor, seed: int = 0) -> dict[str, dict[str, float]]:
    """ε-MSE and x̂0-MSE per timestep bucket on held-out renders (what separates undertraining from a defect)."""
    x0 = reference[:64].to(model.device)
    grid, scale = model.canvas_inputs(*x0.shape[-2:])
    eps = model.eps_fn(grid, scale)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for lo, hi in T_BUCKETS:
            t = torch.randint(lo, hi, (x0.shape[0],), generator=gen).to(model.device)
            noise = torch.randn(x0.shape, generator=gen).to(model.device)
            x_t = model.schedule.q_sample(x0, t, noise)
            e = eps(x_t, t.float())
            ab = model.schedule.gather(model.schedule.alphas_cumprod, t, x0).float()
            x0_hat = (x_t - (1 - ab).sqrt() * e) / ab.sqrt()
            out[f"{lo}-{hi}"] = {"eps_mse": float((e - noise).pow(2).mean()),
                                 "x0_mse": float((x0_hat - x0).pow(2).mean())}
    return out


def upsample(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


SAMPLER_CHECK = (SamplingSettings("ddim", 50), SamplingSettings("ddim", 50, eta=1.0), SamplingSettings("ddpm", 1000),
                 SamplingSettings("dpmpp_2m", 10))


def sampler_check(model: DiffusionModule, reference: torch.Tensor, radii: list[float], num: int,
                  batch_size: int) -> dict[str, dict[str, float]]:
    """The same seeds and weights at R through DDIM-50, DDPM-1000 and DPM-Solver++-10: a sampler defect (or
    the deterministic samplers' sensitivity to ε errors at low t) shows as speckle that DDPM does not have."""
    side = model.hparams.train_resolution
    key = resolution_key(side, side)
    out = {}
    for sampling in SAMPLER_CHECK:
        start, images = time.time(), []
        for first in range(0, num, batch_size):
            seeds = list(range(first, min(first + batch_size, num)))
            images.append(model.sample(seeds, side, side, sampling=sampling).float().cpu())
        eta = f" (η = {sampling.eta:g})" if sampling.eta else ""
        label, samples = f"{SAMPLER_NAMES[sampling.sampler]}-{sampling.steps}{eta}", torch.cat(images)
        out[label] = {**cell_metrics(samples, reference, radii, key), "seconds": time.time() - start,
                      "saturated": float((samples.abs() > 0.98).float().mean())}  # pixels the clipping holds at ±1
    return out


def evaluate(models: dict[str, Path], settings: Settings, device: torch.device) -> dict:
    """Every (row, resolution) cell; rows are (model, variant), '<model> + upsample' and 'ground truth'."""
    radii = reference_radii(1000)
    refs = {hw: references(*hw, settings.num_reference) for hw in settings.resolutions}
    inception = {hw: InceptionScores(refs[hw], settings.extractor, settings.num_samples) if settings.extractor
                 else None for hw in settings.resolutions}
    cells: dict[str, dict[str, dict]] = {}
    figure: dict[str, dict[str, torch.Tensor]] = {}
    diagnostics: dict[str, dict] = {}
    tables: dict[str, dict] = {}
    for hw in settings.resolutions:
        key = resolution_key(*hw)
        gt = references(*hw, settings.num_samples, first=settings.num_reference)  # disjoint from the reference
        cells.setdefault("ground truth", {})[key] = cell_metrics(gt, refs[hw], radii, key, inception[hw])
        figure.setdefault("ground truth", {})[key] = gt[: settings.figure_samples]
    for name, path in models.items():
        model, payload = load_model(path, device)
        train_side = model.hparams.train_resolution
        diagnostics[name] = {"global_step": payload["global_step"], "train_seconds": payload.get("train_seconds"),
                             "command": payload.get("command"), "eps_mse": {}}
        if settings.sampler_check:
            side = (train_side, train_side)
            reference = refs[side] if side in refs else references(*side, settings.num_reference)
            diagnostics[name]["samplers"] = sampler_check(model, reference, radii, settings.sampler_check,
                                                          settings.batch_size)
        plain_at_r = None  # the plain samples at R, reused by the upsample row (same seeds, same samples)
        for hw in settings.resolutions:
            key = resolution_key(*hw)
            diagnostics[name]["eps_mse"][key] = eps_mse_by_bucket(model, refs[hw])
            for variant in settings.variants:
                if variant != "plain" and settings.shifted_at is not None and hw not in settings.shifted_at:
                    continue
                start = time.time()
                if variant == "plain":
                    cond = None
                elif variant == "analytic":
                    cond = AnalyticShift(model.schedule, train_pixels=train_side**2, sample_pixels=hw[0] * hw[1])
                else:
                    cond, tables.setdefault(name, {})[key] = noiseshift_cond(model, *hw, settings)
                samples = generate(model, *hw, settings, cond)
                if variant == "plain" and hw == (train_side, train_side):
                    plain_at_r = samples
                row = name if variant == "plain" else f"{name} + {variant}"
                cells.setdefault(row, {})[key] = cell_metrics(samples, refs[hw], radii, key, inception[hw])
                cells[row][key]["seconds"] = time.time() - start
                figure.setdefault(row, {})[key] = samples[: settings.figure_samples]
                print(f"mrdiff evidence: {row} at {key}: one-sun {cells[row][key]['one_sun_rate']:.3f}, "
                      f"spectrum {cells[row][key]['spectrum_distance']:.3f} ({time.time() - start:.1f} s)", flush=True)
        if name in settings.upsample:
            base = plain_at_r if plain_at_r is not None else generate(model, train_side, train_side, settings)
            row = f"{name} + upsample"
            for hw in settings.resolutions:
                if hw[0] * hw[1] > train_side**2:
                    key = resolution_key(*hw)
                    up = upsample(base, *hw)
                    cells.setdefault(row, {})[key] = cell_metrics(up, refs[hw], radii, key, inception[hw])
                    figure.setdefault(row, {})[key] = up[: settings.figure_samples]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"cells": cells, "diagnostics": diagnostics, "noiseshift": tables, "figure": figure}


# -- report -------------------------------------------------------------------------------------------
METRICS = (("one_sun_rate", "one-sun rate ↑ (ground truth: the data's own rate)", "{:.2f}"),
           ("mean_num_suns", "suns per image (ground truth: 1)", "{:.2f}"),
           ("stacked_horizon_rate", "images with stacked horizons, a tiled landscape ↓ (ground truth: the data's own "
                                    "rate)", "{:.2f}"),
           ("spectrum_distance", "power-spectrum distance to ground truth ↓ (mean |Δ log10 power|)", "{:.3f}"),
           ("neighbour_difference", "neighbour difference (speckle; compare with ground truth)", "{:.3f}"),
           ("sky_red", "sky red, top quarter (compare with ground truth)", "{:.2f}"),
           ("fid", "FID against the reference renders ↓ (with Inception weights)", "{:.1f}"),
           ("kid", "KID against the reference renders ↓ (with Inception weights)", "{:.4f}"))


def format_cell(cell: dict | None, metric: str, pattern: str) -> str:
    if not cell or metric not in cell or not math.isfinite(cell[metric]):
        return "–"
    lo, hi = cell.get(f"{metric}_lo", math.nan), cell.get(f"{metric}_hi", math.nan)
    value = pattern.format(cell[metric])
    return value if not math.isfinite(lo) else f"{value} [{pattern.format(lo)}, {pattern.format(hi)}]"


def markdown(result: dict) -> str:
    meta, cells = result["meta"], result["cells"]
    columns = [resolution_key(*hw) for hw in meta["resolutions"]]
    eta = f" (η = {meta['eta']:g})" if meta.get("eta") else ""
    lines = [f"Written by `{meta['command']}` on {meta['device']} (torch {meta['torch']}) in "
             f"{meta['wall_seconds'] / 60:.1f} min. {meta['num_samples']} samples per cell, "
             f"{SAMPLER_NAMES.get(meta.get('sampler', 'ddim'), meta.get('sampler'))}-{meta['steps']}{eta}, "
             f"seeds 0..{meta['num_samples'] - 1}; intervals are 95% (Wilson for rates, bootstrap for means). "
             f"Trained at R = {meta['base_resolution']}.", ""]
    for metric, title, pattern in METRICS:
        if not any(metric in cell for by_res in cells.values() for cell in by_res.values()):
            continue  # FID and KID only where Inception weights were given
        lines += [f"**{title}**", "", "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row, by_res in cells.items():
            values = (format_cell(by_res.get(c), metric, pattern) for c in columns)
            lines.append(f"| {row} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["**Training and ε-MSE per timestep bucket at R (held-out renders; x̂0-MSE in brackets)**", ""]
    buckets = [f"{lo}-{hi}" for lo, hi in T_BUCKETS]
    lines += ["| model | steps | train min | " + " | ".join(buckets) + " |", "|---|---:|---:|" + "---:|" * len(buckets)]
    base = resolution_key(meta["base_resolution"], meta["base_resolution"])
    for name, diag in result["diagnostics"].items():
        mse = diag["eps_mse"].get(base, {})
        minutes = f"{diag['train_seconds'] / 60:.1f}" if diag.get("train_seconds") else "–"
        lines.append(f"| {name} | {diag['global_step']} | {minutes} | " + " | ".join(
            f"{mse[b]['eps_mse']:.4f} ({mse[b]['x0_mse']:.3g})" if b in mse else "–" for b in buckets) + " |")
    checks = {name: diag["samplers"] for name, diag in result["diagnostics"].items() if diag.get("samplers")}
    if checks:
        lines += ["", f"**Samplers at R: the same seeds and weights through each sampler "
                      f"({meta.get('sampler_check')} samples)**", "",
                  "| model | sampler | one-sun rate | neighbour difference | spectrum distance | pixels at ±1 | "
                  "seconds |", "|---|---|---:|---:|---:|---:|---:|"]
        truth = result["cells"].get("ground truth", {}).get(base)
        if truth:
            lines.append(f"| ground truth | – | {format_cell(truth, 'one_sun_rate', '{:.2f}')} | "
                         f"{format_cell(truth, 'neighbour_difference', '{:.3f}')} | "
                         f"{format_cell(truth, 'spectrum_distance', '{:.3f}')} | – | – |")
        for name, by_sampler in checks.items():
            for sampler, cell in by_sampler.items():
                lines.append(f"| {name} | {sampler} | {format_cell(cell, 'one_sun_rate', '{:.2f}')} | "
                             f"{format_cell(cell, 'neighbour_difference', '{:.3f}')} | "
                             f"{format_cell(cell, 'spectrum_distance', '{:.3f}')} | {cell['saturated']:.3f} | "
                             f"{cell['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def save_figure(figure: dict[str, dict[str, torch.Tensor]], columns: list[str], path: Path) -> None:
    """Rows = models and variants, columns = resolutions; each cell a strip of samples at its true size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows = list(figure)
    strips = {(row, col): make_grid(images * 0.5 + 0.5, nrow=len(images), padding=1, pad_value=1)
              for row, cells in figure.items() for col, images in cells.items()}
    # every sample at twice its pixel size (dpi 110): a 64² strip of 8 stays legible instead of being shrunk
    # to a fixed cell width; widths and heights follow the largest strip of each column and row
    inch = 2 / 110
    widths = [max([strips[r, c].shape[2] for r in rows if (r, c) in strips], default=32) * inch for c in columns]
    heights = [max([strips[r, c].shape[1] for c in columns if (r, c) in strips], default=32) * inch for r in rows]
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(sum(widths) + 0.25 * len(columns) + 1.4, sum(heights) + 0.3 * len(rows) + 0.4),
                             gridspec_kw={"width_ratios": widths, "height_ratios": heights})
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            if (row, col) in strips:
                ax.imshow(strips[row, col].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
            if j == 0:
                ax.set_ylabel(row, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0:
                ax.set_title(col, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figure = result.pop("figure")
    columns = [resolution_key(*hw) for hw in result["meta"]["resolutions"]]
    save_figure(figure, columns, out / "samples.png")
    (out / "table.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(markdown(result))
    print(f"mrdiff evidence: wrote {out}/table.md, table.json and samples.png")


# -- command ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mrdiff.evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated subset of " + ", ".join(MODELS) + "; LABEL=PATH adds exported weights "
                        "outside the matrix as row LABEL (e.g. a fine-tune), never trained here")
    p.add_argument("--weights", default="models/evidence", help="exported weights (<name>.pt), read or written")
    p.add_argument("--train", action="store_true", help="train the models whose weights are missing")
    p.add_argument("--runs", default="runs/evidence", help="run dirs of the fits --train starts")
    p.add_argument("--overlay", action="append", default=[], metavar="YAML",
                   help="a config put after each model's own for --train, e.g. configs/evidence/cpu.yaml "
                        "(the CPU-sized matrix); repeatable")
    p.add_argument("--fit-args", default="", help="extra `mrdiff fit` arguments for --train, e.g. "
                                                  "'--trainer.max_time=00:00:30:00'")
    p.add_argument("--out", default="results/evidence")
    p.add_argument("--resolutions", default="24,32,48,64,32x64", help="R = 32: below R, R, 1.5R, 2R, R x 2R")
    p.add_argument("--num-samples", type=int, default=400)
    default = SamplingSettings()
    p.add_argument("--sampler", default=default.sampler, choices=["ddim", "dpmpp_2m"])
    p.add_argument("--steps", type=int, default=default.steps)
    p.add_argument("--eta", type=float, default=default.eta, help="DDIM's η (1: stochastic, DDPM-like)")
    p.add_argument("--batch-size", type=int, default=400)
    p.add_argument("--calibration-images", type=int, default=32)
    p.add_argument("--num-reference", type=int, default=1000)
    p.add_argument("--variants", default=",".join(VARIANTS), help="rows per model: a subset of " + ", ".join(VARIANTS))
    p.add_argument("--shifted-at", default=None, metavar="RES,...",
                   help="sample the noiseshift and analytic rows only at these resolutions (default: at all)")
    p.add_argument("--upsample", default=None, metavar="MODEL,...",
                   help="models (fixed-resolution ones) whose samples at R, bicubic-upsampled, are the trivial "
                        "baseline row '<model> + upsample' above R (default: fixed, when it is evaluated)")
    p.add_argument("--sampler-check", type=int, default=0, metavar="N",
                   help="also sample N seeds at R with DDIM-50, DDPM-1000 and DPM-Solver++-10 (a sampler check)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception weights file: adds FID and KID per cell (default: $MRDIFF_INCEPTION_WEIGHTS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def comma_list(text: str) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    entries = comma_list(args.models)
    names = [e for e in entries if "=" not in e]
    labelled = [e.split("=", 1) for e in entries if "=" in e]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"mrdiff: error: unknown evidence models {unknown}: choose from {', '.join(MODELS)}, "
                         f"or name exported weights as LABEL=PATH")
    extra = dict(labelled)
    if len(extra) < len(labelled) or any(not label or label in MODELS for label in extra):
        raise SystemExit(f"mrdiff: error: --models {args.models}: each LABEL=PATH needs its own non-empty label "
                         f"outside {', '.join(MODELS)}")
    missing = [f"{n}={p}" for n, p in extra.items() if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"mrdiff: error: no weights at {', '.join(missing)}: point LABEL=PATH at a file "
                         f"written by mrdiff.evidence.export")
    variants = tuple(comma_list(args.variants))
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"mrdiff: error: unknown --variants {sorted(set(variants) - set(VARIANTS))}: "
                         f"choose from {', '.join(VARIANTS)}")
    upsample = ("fixed",) if args.upsample is None else tuple(comma_list(args.upsample))
    if args.upsample is not None and set(upsample) - set(names) - set(extra):
        raise SystemExit(f"mrdiff: error: --upsample {args.upsample} names models outside --models: "
                         f"pick them from {', '.join(names + list(extra))}")
    resolutions = [parse_resolution(r) for r in args.resolutions.split(",")]
    shifted_at = None if args.shifted_at is None else [parse_resolution(r) for r in args.shifted_at.split(",")]
    if shifted_at is not None and set(shifted_at) - set(resolutions):
        raise SystemExit(f"mrdiff: error: --shifted-at {args.shifted_at} names resolutions outside --resolutions "
                         f"{args.resolutions}: pick them from --resolutions")
    if (Path(args.out) / "table.json").exists():
        raise SystemExit(f"mrdiff: error: {args.out} already holds a report (table.json): pass another --out "
                         f"or move it away; reports are never overwritten")
    weights = {n: Path(args.weights) / f"{n}.pt" for n in names}
    for name, path in weights.items():
        if path.is_file():
            continue
        if not args.train:
            raise SystemExit(f"mrdiff: error: no weights at {path}: pass --train to train {name} "
                             f"(or --weights pointing at exported models)")
        run_start = time.time()
        fit = fit_args(name, Path(args.runs), args.overlay, shlex.split(args.fit_args))
        ckpt = train(fit, Path(args.runs) / name)
        export(ckpt, path, "mrdiff " + shlex.join(fit), time.time() - run_start)
    weights.update({n: Path(p) for n, p in extra.items()})
    device = torch.device(args.device)
    settings = Settings(resolutions=resolutions,
                        num_samples=args.num_samples, sampling=SamplingSettings(args.sampler, args.steps, args.eta),
                        batch_size=args.batch_size, calibration_images=args.calibration_images,
                        num_reference=args.num_reference,
                        variants=variants, shifted_at=shifted_at,
                        sampler_check=args.sampler_check, upsample=upsample,
                        extractor=inception(args.inception_weights).to(device)
                        if configured_weights(args.inception_weights) else None)
    result = evaluate(weights, settings, device)
    first = torch.load(next(iter(weights.values())), map_location="cpu", weights_only=False)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result["meta"] = {
        "command": "python -m mrdiff.evidence " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__, "wall_seconds": time.time() - start,
        "resolutions": settings.resolutions, "num_samples": settings.num_samples, **asdict(settings.sampling),
        "sampler_check": settings.sampler_check, "variants": settings.variants, "shifted_at": settings.shifted_at,
        "base_resolution": first["module"]["train_resolution"], "models": {n: str(p) for n, p in weights.items()},
    }
    write_report(result, Path(args.out))


if __name__ == "__main__":
    main()
