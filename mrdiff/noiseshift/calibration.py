"""NoiseShift calibration of a model at several resolutions: the table, its summary lines and its plot.

What `mrdiff calibrate`, the end-of-fit callback and the evidence report run. The search for one
resolution is `mrdiff.noiseshift.search.calibrate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mrdiff.console import info
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.pooled import pooled_summary
from mrdiff.noiseshift.search import Calibration, SearchSettings, calibrate
from mrdiff.noiseshift.table import NoiseShiftTable
from mrdiff.noiseshift.weights import weights_hash
from mrdiff.pipeline import DiffusionPipeline
from mrdiff.resolution import resolution_key


@torch.no_grad()
def calibrate_pipeline(
    pipeline: DiffusionPipeline,
    images_at: Callable[[int, int, int], Tensor],
    resolutions: Sequence[tuple[int, int]],
    timesteps: Sequence[int],
    settings: SearchSettings,
    *,
    checkpoint: str | None = None,
    data: dict | None = None,
    progress: bool = True,
) -> NoiseShiftTable:
    """A table with one calibration per resolution, on `images_at(height, width, n)` (held-out images).

    The table names the weights it was calibrated for (weights_hash of the network as it is now). Says per
    resolution how many timesteps moved, and warns when the images cannot resolve any shift.
    """
    table = NoiseShiftTable.new(pipeline.schedule, checkpoint=checkpoint, settings=settings, data=data,
                                weights=weights_hash(pipeline))
    was_training = pipeline.net.training
    pipeline.net.eval()
    try:
        for height, width in resolutions:
            start = time.perf_counter()
            images = images_at(height, width, settings.num_images).to(pipeline.device)
            calibration = calibrate(pipeline.canvas_eps(height, width), pipeline.schedule, images, timesteps,
                                    settings, progress=progress)
            key = resolution_key(height, width)
            table.add(key, calibration)
            info(f"mrdiff: NoiseShift {key}: {len(timesteps)} timesteps in {time.perf_counter() - start:.1f}s; "
                 + summary(calibration, settings.k))
            warning = resolution_warning(key, calibration, pipeline.schedule, settings, images.shape[0])
            if warning:
                info(f"mrdiff: warning: {warning}", stderr=True)
    finally:
        pipeline.net.train(was_training)
    return table


def summary(calibration: Calibration, k: float) -> str:
    """'t̂ moved at 3 of 25 timesteps (k = 3), t̂ − t from −12.0 to +0.0, median band width 8.1 timesteps'."""
    shift = np.asarray(calibration.t_hat) - np.asarray(calibration.t)
    rule = f"k = {k:g}" if calibration.rule == "per_timestep" else calibration.rule
    line = (f"t̂ moved at {calibration.moved} of {len(shift)} timesteps ({rule}), "
            f"t̂ − t from {shift.min():+.1f} to {shift.max():+.1f}")
    if calibration.has_uncertainty:
        width = np.asarray(calibration.band_hi) - np.asarray(calibration.band_lo)
        line += f", median band width {np.median(width):.1f} timesteps"
    if calibration.pooled is not None:
        line += "; " + pooled_summary(calibration)
    return line


def unresolved(calibration: Calibration, schedule: NoiseSchedule, settings: SearchSettings) -> np.ndarray:
    """[timesteps] True where the band reaches a coarse stride (σ_rf) or more on each side of t̂ (or the end
    of [0, T−1]): there the data cannot tell t̂ from the next step of the search's own coarse grid."""
    sigma = schedule.sigma_rf_at
    reach = settings.coarse_stride
    lo = np.asarray(sigma(np.asarray(calibration.band_lo)))
    hi = np.asarray(sigma(np.asarray(calibration.band_hi)))
    center = np.asarray(sigma(np.asarray(calibration.t_hat)))
    bottom, top = float(sigma(0.0)), float(sigma(schedule.num_timesteps - 1.0))
    return (lo <= np.maximum(center - reach, bottom) + 1e-9) & (hi >= np.minimum(center + reach, top) - 1e-9)


def resolution_warning(
    key: str, calibration: Calibration, schedule: NoiseSchedule, settings: SearchSettings, num_images: int
) -> str | None:
    """A warning when at half the timesteps or more the band spans the search (`unresolved`)."""
    if not calibration.has_uncertainty:
        return None
    blind = unresolved(calibration, schedule, settings)
    if blind.mean() < 0.5:
        return None
    return (f"NoiseShift {key}: with {num_images} images the search cannot tell a shift of one coarse stride "
            f"(±{settings.coarse_stride:g} σ_rf) from none at {int(blind.sum())} of {len(blind)} timesteps, "
            "so t̂ stays at t there for lack of evidence, not because the model needs no shift: "
            "calibrate with more images (--num_images; docs/noiseshift.md says how many)")


def plot_table(table: NoiseShiftTable, path: Path) -> Path:
    """t̂ − t against t, one line per resolution, with the band of candidates tied with the best (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in table.resolutions():
        cal = table[key]
        t = np.asarray(cal.t)
        (line,) = ax.plot(t, np.asarray(cal.t_hat) - t, marker=".", label=f"{key} ({cal.moved} moved)")
        if cal.has_uncertainty:
            ax.fill_between(t, np.asarray(cal.band_lo) - t, np.asarray(cal.band_hi) - t, color=line.get_color(),
                            alpha=0.2, lw=0)
    ax.axhline(0, color="grey", lw=0.5)
    k = table.settings.get("k")
    band = "" if k is None else f"; bands: within k = {k:g} standard errors of the best"
    ax.set(xlabel="timestep t", ylabel="t̂ − t", title=f"NoiseShift calibration per resolution{band}")
    ax.title.set_fontsize(9)
    ax.legend(title="resolution")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
