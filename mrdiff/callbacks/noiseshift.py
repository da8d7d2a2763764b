"""NoiseShift calibration of a trained model: the function behind `mrdiff calibrate` and its callback."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mrdiff.callbacks.ema import ema_weights
from mrdiff.callbacks.media import log_figure
from mrdiff.console import info
from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.diffusion.noiseshift import Calibration, SearchSettings, calibrate
from mrdiff.diffusion.noiseshift_pooled import pooled_summary
from mrdiff.diffusion.noiseshift_table import NoiseShiftTable, weights_hash
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.module import DiffusionModule
from mrdiff.resolution import parse_resolution, resolution_key


@torch.no_grad()
def calibrate_model(
    model: DiffusionModule,
    datamodule: MultiResDataModule,
    resolutions: Sequence[tuple[int, int]],
    timesteps: Sequence[int],
    settings: SearchSettings,
    *,
    checkpoint: str | None = None,
    progress: bool = True,
) -> NoiseShiftTable:
    """A table with one calibration per resolution, on data images prepared at that resolution.

    The table names the weights it was calibrated for (weights_hash of the model as it is now). Prints per
    resolution how many timesteps moved, and warns when the images cannot resolve any shift.
    """
    table = NoiseShiftTable.new(model.schedule, checkpoint=checkpoint, settings=settings,
                                data=datamodule.describe(), weights=weights_hash(model))
    was_training = model.training
    model.eval()
    try:
        for height, width in resolutions:
            start = time.perf_counter()
            images = torch.cat(list(datamodule.reference_images(height, width, settings.num_images)))
            grid, scale = model.canvas_inputs(height, width)
            calibration = calibrate(model.eps_fn(grid, scale), model.schedule, images.to(model.device),
                                    timesteps, settings, progress=progress)
            key = resolution_key(height, width)
            table.add(key, calibration)
            info(f"mrdiff: NoiseShift {key}: {len(timesteps)} timesteps in {time.perf_counter() - start:.1f}s; "
                 + summary(calibration, settings.k))
            warning = resolution_warning(key, calibration, model.schedule, settings, images.shape[0])
            if warning:
                info(f"mrdiff: warning: {warning}", stderr=True)
    finally:
        model.train(was_training)
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
            "calibrate with more images (--num_images; the README says how many)")


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


class NoiseShiftCalibration(L.Callback):
    """Calibrates the configured resolutions with EMA weights at the end of fit (and every N epochs).

    Writes <run dir>/noiseshift.json and noiseshift.png, and logs the plot to the logger. The table names
    the weights it was calibrated for: at the end of fit those of the final last.ckpt (RunCheckpoint saves
    it in on_train_end, which runs before on_fit_end), so `--noiseshift` accepts it with that checkpoint only.
    `mrdiff calibrate --config <run>/config.yaml` takes its unset options from here.

    Args:
        resolutions: Sizes to calibrate, N or "HxW".
        sampling: Calibrate the timesteps these settings visit (default: DDIM-50).
        search: The coarse-to-fine search (default: the paper's, 64 images, ±0.1 by 0.01 then ±0.01 by 0.001).
        every_n_epochs: Also calibrate every N epochs; 0: only at the end of fit.
        filename: The table's file name, in the run directory.
    """

    def __init__(
        self,
        resolutions: list[int | str] = [64],  # noqa: B006
        sampling: SamplingSettings | None = None,
        search: SearchSettings | None = None,
        every_n_epochs: int = 0,
        filename: str = "noiseshift.json",
    ) -> None:
        self.resolutions = [parse_resolution(r) for r in resolutions]
        self.sampling, self.search = sampling or SamplingSettings(), search or SearchSettings()
        self.every_n_epochs, self.filename = every_n_epochs, filename

    def run(self, trainer: L.Trainer, pl_module: DiffusionModule) -> NoiseShiftTable | None:
        if not trainer.is_global_zero:
            return None
        timesteps = self.sampling.timesteps(pl_module.schedule)
        with ema_weights(trainer, pl_module), trainer.precision_plugin.forward_context():
            table = calibrate_model(pl_module, trainer.datamodule, self.resolutions, timesteps, self.search)
        run_dir = Path(trainer.default_root_dir)
        table.save(run_dir / self.filename)
        plot = plot_table(table, run_dir / Path(self.filename).with_suffix(".png").name)
        log_figure(trainer, "noiseshift/t_hat_minus_t", plot)
        info(f"mrdiff: NoiseShift table written to {run_dir / self.filename}")
        return table

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: DiffusionModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: DiffusionModule) -> None:
        self.run(trainer, pl_module)
