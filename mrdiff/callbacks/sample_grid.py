"""Sample grids during training: fixed seeds at every configured resolution, with the EMA weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from torchvision.utils import save_image

from mrdiff.callbacks.ema import ema_weights
from mrdiff.callbacks.media import log_figure
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.module import DiffusionModule
from mrdiff.resolution import parse_resolution, resolution_key
from mrdiff.utils import atomic_write


class SampleGrid(L.Callback):
    """Every N optimizer steps and at the end of fit, one PNG grid per resolution (rank 0 only).

    Files: <default_root_dir>/<dirname>/step_{step}_{res}.png; W&B key samples/{res}. The seeds are
    the same at every step, so successive grids show how the same samples evolve. `mrdiff sample
    --config <run>/config.yaml` takes its unset options from here.

    Args:
        resolutions: Sizes to sample at, N or "HxW".
        num_samples: Samples per grid.
        every_n_steps: A grid after every N-th optimizer step; 0: only at the end of fit.
        sampling: Sampler, steps and η (default: DDIM-50, η = 0).
        seed: Sample i uses seed + i, at every step and resolution.
        nrow: Images per grid row (default ⌈√num_samples⌉).
        dirname: Folder of the grids, inside the run directory.
    """

    def __init__(
        self,
        resolutions: list[int | str] = [64],  # noqa: B006
        num_samples: int = 16,
        every_n_steps: int = 1000,
        sampling: SamplingSettings | None = None,
        seed: int = 0,
        nrow: int | None = None,
        dirname: str = "samples",
    ) -> None:
        self.resolutions = [parse_resolution(r) for r in resolutions]
        self.num_samples, self.every_n_steps, self.seed = num_samples, every_n_steps, seed
        self.sampling = sampling or SamplingSettings()
        self.nrow = nrow or math.ceil(math.sqrt(num_samples))
        self.dirname = dirname
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Reject resolutions the U-Net cannot take before training starts."""
        if stage == "fit":
            for height, width in self.resolutions:
                pl_module.net.check_size(height, width)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """A grid after every `every_n_steps`-th optimizer step."""
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A grid of the final weights (unless the last step already has one)."""
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: DiffusionModule) -> list[Path]:
        """Write (and log) the grids for the current step, once per step; returns their paths."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return []
        self._last_step = step
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with ema_weights(trainer, pl_module):
                paths = [self._grid(trainer, pl_module, h, w, out, step) for h, w in self.resolutions]
        finally:
            pl_module.train(was_training)
        return paths

    def _grid(self, trainer: L.Trainer, pl_module: DiffusionModule, height: int, width: int, out: Path,
              step: int) -> Path:
        """Sample the fixed seeds at one resolution, save the grid and log it."""
        seeds = list(range(self.seed, self.seed + self.num_samples))
        with trainer.precision_plugin.forward_context():
            images = pl_module.pipeline.sample(seeds, height, width, sampling=self.sampling)
        key = resolution_key(height, width)
        path = out / f"step_{step}_{key}.png"
        with atomic_write(path) as f:
            save_image(images.float() * 0.5 + 0.5, f, format="png", nrow=self.nrow)
        log_figure(trainer, f"samples/{key}", path, step=step)
        return path
