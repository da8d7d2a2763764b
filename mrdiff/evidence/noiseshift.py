"""How many images a NoiseShift calibration needs: the search's rules on a shipped model, written by one run.

    mrdiff evidence noiseshift --model models/fixed/seed0.pt --size 24 --out results/noiseshift_images

On held-out synthetic-scene renders at one resolution (DDIM-25 timesteps, the quickstart's search windows):
1. tables by each rule: pooled (the default: one curve, one held-out test), per_timestep (k = 3) and argmin
   (k = 0), with 8 and 32 images, and for pooled and per_timestep a second 32-image table with another ε seed
   and other images (agreement within bands);
2. on fresh images and noise, the one-step loss at each 32-image table's t̂ minus the loss at t (summed over
   timesteps, per image; mean with a 95% t-interval): does a table's move generalise?
3. DDIM-25 samples with seeds 0..S−1 without a table and with each rule's 32-image table: one-sun rate (Wilson
   95%) and spectrum distance to held-out renders (bootstrap 95%), and each table's paired difference against
   no table (bootstrap over seeds, 95%).
Writes measure.json, table.md and t_hat.png into --out (a new folder).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from mrdiff.console import info
from mrdiff.data.synthetic import render_canvas, sample_scene
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evaluation.cells import HELD_OUT_SEED
from mrdiff.exported import load
from mrdiff.metrics.detail import bootstrap_interval, radial_power_spectrum, spectrum_distance, wilson_interval
from mrdiff.metrics.structure import sun_counts
from mrdiff.noiseshift.calibration import resolution_warning, summary, unresolved
from mrdiff.noiseshift.search import Calibration, SearchSettings, calibrate
from mrdiff.noiseshift.time_cond import InterpolatedTimeCond

IMAGE_SETS = {"a": 0, "b": 10_000, "fresh": 20_000, "reference": 30_000}  # offsets above HELD_OUT_SEED


def renders(size: int, num: int, image_set: str) -> torch.Tensor:
    """Held-out scenes (never in the training set) rendered at size², one disjoint set per name."""
    first = HELD_OUT_SEED + IMAGE_SETS[image_set]
    return torch.stack([render_canvas(sample_scene(first + i), size, size) for i in range(num)])


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """95% Student-t interval of the mean."""
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


PLAN = {  # table name → (rule, images, k, ε seed, image set)
    "pooled_8": ("pooled", 8, 3.0, 0, "a"), "pooled_32": ("pooled", 32, 3.0, 0, "a"),
    "pooled_32_seed1": ("pooled", 32, 3.0, 1, "b"),
    "per_timestep_8": ("per_timestep", 8, 3.0, 0, "a"), "per_timestep_32": ("per_timestep", 32, 3.0, 0, "a"),
    "per_timestep_32_seed1": ("per_timestep", 32, 3.0, 1, "b"), "argmin_32": ("argmin", 32, 0.0, 0, "a"),
}
COMPARED = ("pooled_32", "per_timestep_32", "argmin_32")  # the tables whose gain and samples are measured


def calibrations(model, size: int, steps: list[int]) -> dict[str, dict]:
    """name → {calibration, settings, seconds, images}."""
    eps = model.canvas_eps(size, size)
    out = {}
    for name, (rule, num, k, seed, image_set) in PLAN.items():
        settings = SearchSettings(num_images=num, k=k, seed=seed, rule=rule, coarse_stride=0.02, fine_stride=0.002,
                                  max_batch=512)
        start = time.perf_counter()
        cal = calibrate(eps, model.schedule, renders(size, num, image_set), steps, settings, progress=False)
        out[name] = {"calibration": cal, "settings": settings, "seconds": time.perf_counter() - start,
                     "images": image_set}
        info(f"{name}: {summary(cal, k)} ({out[name]['seconds']:.0f} s)")
    return out


def agreement(a: Calibration, b: Calibration) -> dict[str, int]:
    """Timesteps where b's t̂ lies in a's band, a's in b's, and both."""
    in_a = [lo <= h <= hi for lo, h, hi in zip(a.band_lo, b.t_hat, a.band_hi, strict=True)]
    in_b = [lo <= h <= hi for lo, h, hi in zip(b.band_lo, a.t_hat, b.band_hi, strict=True)]
    return {"b_in_a": sum(in_a), "a_in_b": sum(in_b), "both": sum(x and y for x, y in zip(in_a, in_b, strict=True)),
            "timesteps": len(in_a)}


def one_step_loss(eps, x_t: torch.Tensor, noise: torch.Tensor, c: float) -> np.ndarray:
    """[N] per-image mean of (ε_θ(x_t, c) − ε)²."""
    pred = eps(x_t, torch.full((x_t.shape[0],), float(c)))
    return (pred - noise).pow(2).flatten(1).double().mean(1).numpy()


@torch.no_grad()
def held_out_gain(model, size: int, tables: dict[str, Calibration], num: int) -> dict[str, dict]:
    """Per table: Σ_t [ℓ_i(t̂) − ℓ_i(t)] per fresh image i on fresh noise; mean and 95% t-interval."""
    eps, schedule = model.canvas_eps(size, size), model.schedule
    x0, generator = renders(size, num, "fresh"), torch.Generator().manual_seed(12)
    totals = {name: np.zeros(num) for name in tables}
    steps = next(iter(tables.values())).t
    for i, t in enumerate(steps):
        noise = torch.randn(x0.shape, generator=generator)
        ab = float(schedule.alphas_cumprod[int(t)])
        x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise

        at_t, cache = one_step_loss(eps, x_t, noise, t), {}
        for name, cal in tables.items():
            c = cal.t_hat[i]
            if c != t:
                cache[c] = cache[c] if c in cache else one_step_loss(eps, x_t, noise, c)
                totals[name] += cache[c] - at_t
    return {name: {"mean": float(v.mean()), "ci": t_interval(v) if v.any() else (0.0, 0.0)}
            for name, v in totals.items()}


@torch.no_grad()
def sampled(model, size: int, tables: dict[str, Calibration | None], num: int, steps: int,
            reference: torch.Tensor) -> dict:
    """One-sun rate and spectrum distance per table (None: no table), and each table's paired difference
    against no table (bootstrap over seeds)."""
    ref_spectrum = radial_power_spectrum(reference)
    seeds, out, per_seed = list(range(num)), {}, {}
    for name, cal in tables.items():
        cond = None if cal is None else InterpolatedTimeCond(np.array(cal.t), np.array(cal.t_hat), 1000)
        start = time.perf_counter()
        images = model.sample(seeds, size, size, sampling=SamplingSettings(steps=steps), time_cond=cond).float()
        one = (sun_counts(images) == 1).astype(float)
        spectra = radial_power_spectrum(images)
        per_seed[name] = (one, spectra)
        dist = spectrum_distance(spectra, ref_spectrum)
        out[name] = {"one_sun_rate": float(one.mean()), "one_sun_ci": wilson_interval(int(one.sum()), num),
                     "spectrum_distance": dist,
                     "spectrum_ci": bootstrap_interval(spectra, lambda s: spectrum_distance(s, ref_spectrum)),
                     "seconds": time.perf_counter() - start}
        info(f"samples {name}: one-sun {one.mean():.3f}, spectrum {dist:.3f}")
    one_n, spec_n = per_seed["none"]
    index = np.arange(num)
    for name in [n for n in tables if n != "none"]:
        one_x, spec_x = per_seed[name]
        out[f"{name}_minus_none"] = {
            "one_sun_rate": float(one_x.mean() - one_n.mean()),
            "one_sun_ci": bootstrap_interval(index, lambda i, a=one_x: a[i].mean() - one_n[i].mean()),
            "spectrum_distance": spectrum_distance(spec_x, ref_spectrum) - spectrum_distance(spec_n, ref_spectrum),
            "spectrum_ci": bootstrap_interval(index, lambda i, a=spec_x: spectrum_distance(a[i], ref_spectrum)
                                              - spectrum_distance(spec_n[i], ref_spectrum)),
            "seeds_with_different_one_sun": int((one_x != one_n).sum()),
        }
    return out


def figure(cals: dict[str, dict], size: int, path: Path) -> None:
    """t̂ − t of the 32-image tables: each rule with its band, and the second seed of pooled and per_timestep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, style in (("pooled_32", "o-"), ("pooled_32_seed1", "x--"), ("per_timestep_32", "s-"),
                        ("per_timestep_32_seed1", "+--"), ("argmin_32", ".:")):
        cal = cals[name]["calibration"]
        t = np.asarray(cal.t)
        (line,) = ax.plot(t, np.asarray(cal.t_hat) - t, style, ms=4, label=f"{name} ({cal.moved} moved)")
        if not name.endswith("seed1") and cal.has_uncertainty:
            ax.fill_between(t, np.asarray(cal.band_lo) - t, np.asarray(cal.band_hi) - t, alpha=0.15, lw=0,
                            color=line.get_color())
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="timestep t", ylabel="t̂ − t", title=f"NoiseShift at {size}², 32 images, by rule")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The tables of the NoiseShift doc."""
    meta = result["meta"]
    lines = [f"Written by `{meta['command']}` ({meta['machine']}, torch {meta['torch']}, 1 thread) in "
             f"{meta['wall_seconds'] / 60:.1f} min; {meta['model']} at {meta['size']}², "
             f"DDIM-{meta['steps']} timesteps.", "",
             "| table | rule | images | moved | median band width (timesteps) | timesteps unresolved | warns |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, row in result["tables"].items():
        lines.append(f"| {name} | {row['rule']} | {row['images']} | {row['moved']} of {row['timesteps']} | "
                     f"{row['median_band_width']:.1f} | {row['unresolved']} | {'yes' if row['warning'] else 'no'} |")
    lines.append("")
    for rule, g in result["agreement"].items():
        lines.append(f"- {rule}, seed 0 vs seed 1 (other ε, other images), 32 images: seed 1's t̂ in seed 0's band "
                     f"at {g['b_in_a']} of {g['timesteps']} timesteps, seed 0's in seed 1's at {g['a_in_b']}.")
    lines += ["", "| on 64 fresh images and noise | Σ_t ℓ(t̂) − ℓ(t) per image, mean [95% CI] |", "|---|---:|"]
    for name, row in result["held_out"].items():
        lines.append(f"| {name} | {row['mean']:+.5f} [{row['ci'][0]:+.5f}, {row['ci'][1]:+.5f}] |")
    s = result["samples"]
    lines += ["", f"| {meta['num_samples']} DDIM-{meta['steps']} samples, seeds 0..{meta['num_samples'] - 1} | "
              "one-sun rate [95% CI] | spectrum distance ↓ [95% CI] |", "|---|---:|---:|"]
    for name in s:
        r, f = s[name], "{:+.3f}" if name.endswith("_minus_none") else "{:.3f}"
        cells = [f"{f.format(r[m])} [{f.format(r[ci][0])}, {f.format(r[ci][1])}]"
                 for m, ci in (("one_sun_rate", "one_sun_ci"), ("spectrum_distance", "spectrum_ci"))]
        lines.append(f"| {name.replace('_minus_none', ' − none')} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mrdiff evidence noiseshift", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/fixed/seed0.pt")
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--num-samples", type=int, default=160)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps: the timesteps calibrated and sampled")
    p.add_argument("--out", required=True, help="a new folder")
    args = p.parse_args(argv)
    if (Path(args.out) / "measure.json").exists():
        raise SystemExit(f"mrdiff: error: {args.out} already holds a measurement: pass another --out")
    torch.set_num_threads(1)
    start, out = time.time(), Path(args.out)
    model, _ = load(args.model)
    steps = SamplingSettings("ddim", args.steps).timesteps(model.schedule)
    with torch.no_grad():
        cals = calibrations(model, args.size, steps)
    tables = {}
    for name, c in cals.items():
        cal, s = c["calibration"], c["settings"]
        tables[name] = {"rule": s.rule, "images": s.num_images, "k": s.k, "seed": s.seed, "moved": cal.moved,
                        "timesteps": len(cal.t),
                        "median_band_width": float(np.median(np.subtract(cal.band_hi, cal.band_lo))),
                        "unresolved": int(unresolved(cal, model.schedule, s).sum()),
                        "warning": resolution_warning(str(args.size), cal, model.schedule, s, s.num_images),
                        "seconds": c["seconds"], "calibration": cal.to_dict()}
    compared = {name: cals[name]["calibration"] for name in COMPARED}
    result = {"tables": tables,
              "agreement": {rule: agreement(cals[f"{rule}_32"]["calibration"], cals[f"{rule}_32_seed1"]["calibration"])
                            for rule in ("pooled", "per_timestep")},
              "held_out": held_out_gain(model, args.size, compared, 64),
              "samples": sampled(model, args.size, {"none": None, **compared}, args.num_samples, args.steps,
                                 renders(args.size, 400, "reference"))}
    command = "mrdiff evidence noiseshift " + " ".join(argv if argv is not None else sys.argv[1:])
    result["meta"] = {"command": command, "model": args.model, "size": args.size,
                      "num_samples": args.num_samples, "steps": args.steps, "torch": torch.__version__,
                      "machine": platform.processor() or platform.machine(), "wall_seconds": time.time() - start}
    out.mkdir(parents=True, exist_ok=True)
    (out / "measure.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "table.md").write_text(markdown(result))
    figure(cals, args.size, out / "t_hat.png")
    info(markdown(result))
