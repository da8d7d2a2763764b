"""mrdiff's Trainer: Lightning's, with atomic checkpoints, one progress bar per run, and the inference
subcommands `mrdiff sample` and `mrdiff calibrate` (LightningCLI runs a subcommand as a Trainer method)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, TypeVar

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from torchvision.utils import save_image

from mrdiff.baselines import METHODS, method_args_for
from mrdiff.callbacks.checkpoint import RunCheckpoint
from mrdiff.callbacks.progress import RunProgressBar
from mrdiff.callbacks.sample_grid import SampleGrid
from mrdiff.checkpoint import AtomicCheckpointIO, load_weights, run_dir_of
from mrdiff.console import info
from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.diffusion.samplers import Sampler, SamplingSettings
from mrdiff.loggers import CSVRun, WandbRun
from mrdiff.module import DiffusionModule
from mrdiff.nn.diffusers_unet import DiffusersUNet
from mrdiff.noiseshift.conditioning import time_conditionings
from mrdiff.noiseshift.search import Rule, SearchSettings
from mrdiff.noiseshift.table import Fallback, NoiseShiftTable
from mrdiff.resolution import Resolution, checked_resolutions, resolution_key
from mrdiff.utils import atomic_write, unused_path

C = TypeVar("C")
S = TypeVar("S")


class MrdiffTrainer(Trainer):
    """Lightning's Trainer with atomic checkpoints and the `sample` and `calibrate` subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plugins = kwargs.pop("plugins", None) or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        super().__init__(*args, plugins=plugins, **kwargs)
        # Lightning's default bar, which restarts every epoch, becomes one over the run's steps. (Swapped after
        # __init__: popping `callbacks` from kwargs would hide the argument from jsonargparse's signature reading.)
        self.callbacks = [RunProgressBar(cb.refresh_rate) if type(cb) is TQDMProgressBar else cb
                          for cb in self.callbacks]
        for logger in self.loggers:
            if isinstance(logger, WandbRun | CSVRun) and logger.dir_from_trainer:
                logger.use_run_dir(self.default_root_dir)
        for callback in self.checkpoint_callbacks:
            if isinstance(callback, RunCheckpoint):
                callback.use_run_dir(self.default_root_dir)

    def _load_for_inference(self, model: DiffusionModule, ckpt_path: str | None, command: str) -> DiffusionModule:
        if not ckpt_path and not isinstance(model.net, DiffusersUNet):  # a diffusers UNet brings its weights
            raise ValueError(f"`mrdiff {command}` needs a trained model: pass --ckpt_path path/to/last.ckpt")
        if ckpt_path:
            load_weights(model, ckpt_path)
        return model.to(self.strategy.root_device).eval()

    def configured(self, kind: type[C]) -> C | None:
        """The config's callback of this type (its settings are the defaults of `sample` and `calibrate`)."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    def sample(
        self,
        model: DiffusionModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        resolutions: list[Resolution] | None = None,
        num_samples: int = 16,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        seed: int = 0,
        noiseshift: str | None = None,
        noiseshift_fallback: Fallback = "error",
        shift: Literal["none", "analytic"] = "none",
        attention_scaling: bool | None = None,
        method: Literal["redilation", "window_fusion", "redenoise"] | None = None,
        method_args: str = "",
        out_dir: str | None = None,
    ) -> list[Path]:
        """Write a PNG grid of `num_samples` samples per resolution; returns their paths.

        Options left unset take the config's SampleGrid settings, so `--config <run>/config.yaml` samples
        the way the run's grids were drawn; `--sampler`, `--steps` and `--eta` override the fields of its
        SamplingSettings one by one (without a SampleGrid: DDIM-50, η = 0).

        Args:
            ckpt_path: The checkpoint to sample (its EMA weights); not needed for a pretrained diffusers UNet.
            resolutions: Sizes to sample at, N or HxW (default: the config's SampleGrid's, else [64]).
            num_samples: Samples per resolution, in one grid.
            sampler: Overrides sampling.sampler: ddim, dpmpp_2m or ddpm.
            steps: Overrides sampling.steps: network calls of DDIM or DPM-Solver++.
            eta: Overrides sampling.eta: DDIM's η, 0 for deterministic sampling, 1 as stochastic as DDPM.
            seed: Sample i uses seed + i at every resolution.
            noiseshift: A NoiseShift table (JSON) from `mrdiff calibrate` for these weights.
            noiseshift_fallback: What a size missing from the table gets: an error, the nearest calibrated
                size's table, or t itself (identity).
            shift: The analytic resolution shift instead (SD3-style log-SNR shift), or none.
            attention_scaling: Overrides sampling.attention_scaling: entropy-scaled attention (Jin et al. 2023).
            method: A training-free way of sampling a fixed-size model above its training size
                (mrdiff.baselines, docs/baselines.md): redilation, window_fusion or redenoise.
            method_args: Its parameters other than the defaults, METHOD.FIELD=VALUE,... (e.g. redenoise.t0=300).
            out_dir: Where the grids go (default: <run dir>/samples); earlier grids are never replaced.
        """
        if num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
        grid = self.configured(SampleGrid)
        resolutions = resolutions or (grid.resolutions if grid else [64])
        sampling = overridden(grid.sampling if grid else SamplingSettings(), sampler=sampler, steps=steps, eta=eta,
                              attention_scaling=attention_scaling)
        args = method_args_for(method_args, [method] if method else [], f"--method_args {method_args!r}",
                               f"not --method {method}: pass --method with one of {', '.join(METHODS)}")
        chosen = METHODS[method](**args.get(method, {})) if method else None
        sizes = checked_resolutions(model.net, resolutions)
        model = self._load_for_inference(model, ckpt_path, "sample")
        conds = time_conditionings(model.pipeline, sizes, noiseshift=noiseshift, shift=shift, ckpt_path=ckpt_path,
                                   fallback=noiseshift_fallback)
        out = Path(out_dir) if out_dir else run_dir_of(ckpt_path, self.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        seeds = list(range(seed, seed + num_samples))
        paths = []
        for height, width in sizes:
            time_cond = conds[(height, width)]
            with self.precision_plugin.forward_context():
                images = model.pipeline.sample(seeds, height, width, sampling=sampling, time_cond=time_cond,
                                               progress=True, method=chosen)
            suffix = "" if time_cond is None else ("_noiseshift" if noiseshift else f"_{shift}")
            suffix += (f"_{method}" if method else "") + ("_scaled_attention" if attention_scaling else "")
            wanted = out / f"samples_{resolution_key(height, width)}{suffix}.png"
            path = unused_path(wanted)
            with atomic_write(path) as f:
                save_image(images.float() * 0.5 + 0.5, f, format="png", nrow=max(1, int(math.sqrt(num_samples))))
            paths.append(path)
            kept = f" ({wanted.name} from an earlier run is kept)" if path != wanted else ""
            info(f"mrdiff: wrote {num_samples} samples at {height}x{width} to {path}{kept}")
        return paths


    def calibrate(
        self,
        model: DiffusionModule,
        datamodule: MultiResDataModule,
        ckpt_path: str | None = None,
        resolutions: list[Resolution] | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        num_images: int | None = None,
        coarse_window: float | None = None,
        coarse_stride: float | None = None,
        fine_window: float | None = None,
        fine_stride: float | None = None,
        max_batch: int | None = None,
        k: float | None = None,
        seed: int | None = None,
        rule: Rule | None = None,
        out: str | None = None,
    ) -> Path:
        """Calibrate NoiseShift tables for a trained model at the given resolutions.

        Options left unset take the config's NoiseShiftCalibration settings (its resolutions, SamplingSettings
        and SearchSettings), else the paper's (64², DDIM-50, 64 images, ±0.1 by 0.01 then ±0.01 by 0.001);
        each option given overrides one field.

        Args:
            ckpt_path: The checkpoint to calibrate (its EMA weights).
            resolutions: Sizes to calibrate, N or HxW.
            sampler: Overrides sampling.sampler: calibrate the timesteps this sampler visits.
            steps: Overrides sampling.steps: network calls of that sampler.
            num_images: Overrides search.num_images: held-out images per resolution.
            coarse_window: Overrides search.coarse_window: half-width of the coarse search, in σ_rf units.
            coarse_stride: Overrides search.coarse_stride.
            fine_window: Overrides search.fine_window: half-width of the fine search around the coarse choice.
            fine_stride: Overrides search.fine_stride.
            max_batch: Overrides search.max_batch: candidates × images per forward pass.
            k: Overrides search.k: move t̂ only when it beats t by more than k standard errors.
            seed: Overrides search.seed: seed of the ε draws (a second seed checks a table's bands).
            rule: Overrides search.rule: pooled (one curve, one held-out test), per_timestep or argmin.
            out: The table (default: <run dir>/noiseshift.json); an existing table is merged into, not replaced.
        """
        from mrdiff.callbacks.noiseshift import NoiseShiftCalibration, data_images
        from mrdiff.noiseshift.calibration import calibrate_pipeline, plot_table
        from mrdiff.noiseshift.weights import identify

        callback = self.configured(NoiseShiftCalibration)
        settings = overridden(callback.search if callback else SearchSettings(), coarse_window=coarse_window,
                              coarse_stride=coarse_stride, fine_window=fine_window, fine_stride=fine_stride,
                              num_images=num_images, max_batch=max_batch, k=k, seed=seed, rule=rule)
        sampling = overridden(callback.sampling if callback else SamplingSettings(), sampler=sampler, steps=steps,
                              eta=0.0)  # η does not change which timesteps a sampler visits
        resolutions = resolutions or (callback.resolutions if callback else [64])
        sizes = checked_resolutions(model.net, resolutions)
        model = self._load_for_inference(model, ckpt_path, "calibrate")
        source = "the config's NoiseShiftCalibration" if callback else "the defaults"
        info(f"mrdiff: calibrating {[resolution_key(*s) for s in sizes]} for {sampling} with "
             f"{settings.num_images} images, ±{settings.coarse_window:g} by {settings.coarse_stride:g} then "
             f"±{settings.fine_window:g} by {settings.fine_stride:g}, k = {settings.k:g}, rule {settings.rule} "
             f"(unset options: {source})")
        timesteps = sampling.timesteps(model.schedule)
        with self.precision_plugin.forward_context():
            table = calibrate_pipeline(model.pipeline, data_images(datamodule), sizes, timesteps, settings,
                                       checkpoint=identify(model, ckpt_path).checkpoint, data=datamodule.describe())
        path = Path(out) if out else run_dir_of(ckpt_path, self.default_root_dir) / "noiseshift.json"
        if path.exists():
            previous = NoiseShiftTable.load(path, schedule=model.schedule, checkpoint=table.checkpoint,
                                            weights=table.weights)
            previous.merge(table)
            table = previous
        table.save(path)
        plot_table(table, path.with_suffix(".png"))
        info(f"mrdiff: NoiseShift table for {table.resolutions()} written to {path}")
        return path


def overridden(settings: S, **given: Any) -> S:
    """The settings with the options given on the command line (those not None) replaced."""
    return dataclasses.replace(settings, **{name: value for name, value in given.items() if value is not None})
