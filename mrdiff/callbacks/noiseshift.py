"""The NoiseShift callback: calibrate the configured resolutions with the EMA weights at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from mrdiff.callbacks.ema import ema_weights
from mrdiff.callbacks.media import log_figure
from mrdiff.console import info
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.module import DiffusionModule
from mrdiff.noiseshift.calibration import calibrate_pipeline, plot_table
from mrdiff.noiseshift.search import SearchSettings
from mrdiff.noiseshift.table import NoiseShiftTable
from mrdiff.resolution import parse_resolution


def data_images(datamodule):
    """images_at(height, width, n) of `calibrate_pipeline`: the datamodule's reference images at that size."""
    return lambda height, width, n: torch.cat(list(datamodule.reference_images(height, width, n)))


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
            table = calibrate_pipeline(pl_module.pipeline, data_images(trainer.datamodule), self.resolutions,
                                       timesteps, self.search, data=trainer.datamodule.describe())
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
