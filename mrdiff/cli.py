"""The `mrdiff` command: LightningCLI's fit, validate and test, plus sample and calibrate."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torchvision.utils import save_image

from mrdiff.callbacks.checkpoint import RunCheckpoint
from mrdiff.callbacks.nonfinite import NonFiniteLossError
from mrdiff.callbacks.progress import RunProgressBar
from mrdiff.callbacks.sample_grid import SampleGrid
from mrdiff.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    check_fits,
    load_checkpoint,
    load_weights,
    run_dir_of,
)
from mrdiff.conditioning import model_fingerprint, time_conditionings
from mrdiff.console import info
from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.diffusion.noiseshift import SearchSettings
from mrdiff.diffusion.noiseshift_table import Fallback, NoiseShiftTable
from mrdiff.diffusion.samplers import Sampler, SamplingSettings
from mrdiff.loggers import CSVRun, SaveConfig, WandbRun
from mrdiff.metrics.fid import InceptionWeightsError
from mrdiff.module import DiffusionModule
from mrdiff.nn.diffusers_unet import DiffusersUNet, OptionalDependencyError
from mrdiff.resolution import Resolution, checked_resolutions, resolution_key
from mrdiff.runlock import RunDirInUse, holding
from mrdiff.utils import NO_SPACE_ERRNOS, NoSpaceError, atomic_write, no_space_errno, unused_path

OVERWRITE_ENV = "MRDIFF_OVERWRITE"  # =1: `mrdiff fit` may write over a run dir that holds checkpoints
DEBUG_ENV = "MRDIFF_DEBUG"  # =1: errors mrdiff knows about show their traceback too
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
            out_dir: Where the grids go (default: <run dir>/samples); earlier grids are never replaced.
        """
        if num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
        grid = self.configured(SampleGrid)
        resolutions = resolutions or (grid.resolutions if grid else [64])
        sampling = overridden(grid.sampling if grid else SamplingSettings(), sampler=sampler, steps=steps, eta=eta)
        sizes = checked_resolutions(model.net, resolutions)
        model = self._load_for_inference(model, ckpt_path, "sample")
        conds = time_conditionings(model, sizes, noiseshift=noiseshift, shift=shift, ckpt_path=ckpt_path,
                                   fallback=noiseshift_fallback)
        out = Path(out_dir) if out_dir else run_dir_of(ckpt_path, self.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        seeds = list(range(seed, seed + num_samples))
        paths = []
        for height, width in sizes:
            time_cond = conds[(height, width)]
            with self.precision_plugin.forward_context():
                images = model.sample(seeds, height, width, sampling=sampling, time_cond=time_cond, progress=True)
            suffix = "" if time_cond is None else ("_noiseshift" if noiseshift else f"_{shift}")
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
            out: The table (default: <run dir>/noiseshift.json); an existing table is merged into, not replaced.
        """
        from mrdiff.callbacks.noiseshift import NoiseShiftCalibration, calibrate_model, plot_table

        callback = self.configured(NoiseShiftCalibration)
        settings = overridden(callback.search if callback else SearchSettings(), coarse_window=coarse_window,
                              coarse_stride=coarse_stride, fine_window=fine_window, fine_stride=fine_stride,
                              num_images=num_images, max_batch=max_batch, k=k, seed=seed)
        sampling = overridden(callback.sampling if callback else SamplingSettings(), sampler=sampler, steps=steps,
                              eta=0.0)  # η does not change which timesteps a sampler visits
        resolutions = resolutions or (callback.resolutions if callback else [64])
        sizes = checked_resolutions(model.net, resolutions)
        model = self._load_for_inference(model, ckpt_path, "calibrate")
        source = "the config's NoiseShiftCalibration" if callback else "the defaults"
        info(f"mrdiff: calibrating {[resolution_key(*s) for s in sizes]} for {sampling} with "
             f"{settings.num_images} images, ±{settings.coarse_window:g} by {settings.coarse_stride:g} then "
             f"±{settings.fine_window:g} by {settings.fine_stride:g}, k = {settings.k:g} (unset options: {source})")
        timesteps = sampling.timesteps(model.schedule)
        with self.precision_plugin.forward_context():
            table = calibrate_model(model, datamodule, sizes, timesteps, settings,
                                    checkpoint=model_fingerprint(model, ckpt_path))
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


def checkpoint_dirs(trainer: Trainer) -> list[Path]:
    """The folders the trainer's checkpoint callbacks write to, where known before fit."""
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def existing_checkpoints(trainer: Trainer) -> list[Path]:
    """Checkpoints a fit into this run dir would write over: the callbacks' *.ckpt and HPC checkpoints."""
    found = [path for folder in checkpoint_dirs(trainer) for path in sorted(folder.glob("*.ckpt"))]
    return found + sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))


def resolve_last(trainer: Trainer) -> str | None:
    """`--ckpt_path last` as a path: the newest last.ckpt of the checkpoint callbacks, whatever the logger.

    None (a new run) only when the run holds no checkpoint at all; CheckpointError when it holds others.
    """
    names = [folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
             for folder in checkpoint_dirs(trainer)]
    found = [path for path in names if path.is_file()]
    if found:
        return str(max(found, key=lambda path: path.stat().st_mtime))
    if not names:
        raise CheckpointError("--ckpt_path last: no checkpoint callback with a known folder (add "
                              "mrdiff.callbacks.checkpoint.RunCheckpoint with save_last: true) — pass the path")
    others = existing_checkpoints(trainer)
    if others:
        raise CheckpointError(f"--ckpt_path last: no {names[0].name} in {names[0].parent}, but the run holds "
                              f"{', '.join(p.name for p in others[:3])}: pass one of them as --ckpt_path")
    info(f"mrdiff: --ckpt_path last: no checkpoint in {names[0].parent} yet, starting a new run")
    return None


def refuse_to_overwrite(trainer: Trainer) -> None:
    """A fit that does not resume must not write over a run dir that already holds checkpoints."""
    if os.environ.get(OVERWRITE_ENV) == "1":
        return
    existing = existing_checkpoints(trainer)
    if existing:
        raise CheckpointError(
            f"run dir {trainer.default_root_dir} already holds checkpoints "
            f"({', '.join(p.name for p in existing[:3])}): resume with --ckpt_path last, start a new run with "
            f"--trainer.default_root_dir <new dir>, or set {OVERWRITE_ENV}=1 to write over it"
        )


def training_side(multires: bool, patch_size: int, image_size: int, train_size: int | None) -> int:
    """Side of one training input: the patch (multi-resolution) or the fixed training size."""
    return patch_size if multires else (train_size or image_size)


def training_scales(multires: bool, s_min: int, s_max: int, image_size: int, train_size: int | None) -> list[int]:
    """[smallest, largest] canvas side the model saw in training: [s_min, s_max], or the fixed size twice."""
    return [s_min, s_max] if multires else [train_size or image_size] * 2


class MrdiffArgumentParser(LightningArgumentParser):
    """jsonargparse's parser, whose errors (unknown keys, wrong types, missing files) are one line too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prog", "mrdiff")  # not `__main__.py` under `python -m mrdiff`
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get(DEBUG_ENV) == "1":
            super().error(message, ex)
        self._logger.error(message)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        print(moved_option_line(message) or f"mrdiff: error: {' '.join(message.split())} (the options: {prog} --help)",
              file=sys.stderr)
        self.exit(2)


SAMPLING_FIELDS = [field.name for field in dataclasses.fields(SamplingSettings)]
MOVED = {  # callback → {option it took directly before the settings groups: the group that holds it now}
    "SampleGrid": dict.fromkeys(SAMPLING_FIELDS, "sampling"),
    "ResolutionEvaluation": dict.fromkeys(SAMPLING_FIELDS, "sampling"),
    "NoiseShiftCalibration": {**dict.fromkeys(SAMPLING_FIELDS, "sampling"),
                              **dict.fromkeys((field.name for field in dataclasses.fields(SearchSettings)), "search")},
}


def moved_option_line(message: str) -> str | None:
    """The error for a callback option that moved into a settings group (configs written before it did)."""
    found = re.search(r"class_path '(?:[\w.]*\.)?(\w+)':\s*Option '(\w+)' is not accepted", message)
    callback, option = found.groups() if found else (None, None)
    group = MOVED.get(callback, {}).get(option)
    if group is None:
        return None
    return (f"mrdiff: error: {callback} takes {option} inside `{group}:` now (a config from an older mrdiff): "
            f"write `{group}: {{{option}: ...}}` under its init_args, as configs/quickstart.yaml does")


DESCRIPTION = ("mrdiff: train a multi-resolution diffusion model (fit), sample it at any resolution (sample), "
               "calibrate NoiseShift tables (calibrate) and measure FID per resolution (test).")


class MrdiffCLI(LightningCLI):
    """LightningCLI for DiffusionModule + MultiResDataModule with mrdiff's extra subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", MrdiffTrainer)
        kwargs.setdefault("parser_class", MrdiffArgumentParser)
        kwargs.setdefault("save_config_callback", SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(DiffusionModule, MultiResDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `predict`: `mrdiff sample` writes images, `mrdiff test` evaluates them (a predict that did
        # nothing was removed rather than kept for API completeness)
        lightning = {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}
        return {
            **lightning,
            "sample": {"model", "datamodule"},
            "calibrate": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.coord_mode", "model.coord_mode")
        parser.link_arguments(("data.multires", "data.s_min", "data.s_max", "data.image_size", "data.train_size"),
                              "model.train_scales", compute_fn=training_scales)
        parser.link_arguments(("data.multires", "data.patch_size", "data.image_size", "data.train_size"),
                              "model.train_resolution", compute_fn=training_side)

    def before_fit(self) -> None:
        """Before anything is written: resolve `--ckpt_path last`, check the checkpoint fits, never overwrite a run."""
        config = self.config_init[self.config_init.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = config["ckpt_path"] = resolve_last(self.trainer)
        if ckpt_path is None:
            ckpt_path = self.trainer._checkpoint_connector._hpc_resume_path  # a requeued SLURM job resumes
        if ckpt_path is None:
            refuse_to_overwrite(self.trainer)
        elif ckpt_path not in ("best", "hpc", "registry"):
            check_fits(self.model, ckpt_path)

    def _run_subcommand(self, subcommand: str) -> None:
        """fit, test and calibrate write into a run dir: one process at a time (mrdiff.runlock), checked first."""
        run_dir = None
        if subcommand in ("fit", "test", "calibrate"):  # `sample` writes into its --out_dir, `validate` nothing
            ckpt = self.config_init[subcommand].get("ckpt_path")  # test, calibrate: the checkpoint's run dir
            ckpt = None if subcommand == "fit" or ckpt in ("last", "best", "hpc", "registry") else ckpt
            run_dir = run_dir_of(ckpt, self.trainer.default_root_dir)
        with holding(run_dir, global_zero=self.trainer.is_global_zero):
            super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(ckpt_path)  # a clear error for a missing / truncated / foreign file
        super()._parse_ckpt_path()


KNOWN_ERRORS = (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError, InceptionWeightsError,
                NoSpaceError, MisconfigurationException, OptionalDependencyError, RunDirInUse)


def error_line(error: BaseException) -> str | None:
    """`mrdiff: error: <message>` for the errors mrdiff knows about (and a full disk); None for the others."""
    code = no_space_errno(error)
    if code is not None and not isinstance(error, NoSpaceError):
        where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
        return f"mrdiff: error: {NO_SPACE_ERRNOS[code]}{where}: free some space and run again"
    if isinstance(error, KNOWN_ERRORS):
        return "mrdiff: error: " + " ".join(str(error).split())
    return None


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def info_logs_to_stdout() -> None:
    """Lightning's info lines ("GPU available", "Seed set to") go to stdout: stderr keeps warnings and errors."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)
                handler.addFilter(_BelowWarning())
                warnings_handler = logging.StreamHandler(sys.stderr)
                warnings_handler.setLevel(logging.WARNING)
                logger.addHandler(warnings_handler)


def main(args: list[str] | None = None, *, exit_on_error: bool | None = None) -> None:
    """The `mrdiff` command. From the command line (args None) a known error is one line on stderr, exit 2,
    unless MRDIFF_DEBUG=1; called with args (from Python) errors propagate as exceptions."""
    torch.set_float32_matmul_precision("high")
    # mid-epoch resume is exact here (MultiResDataModule.state_dict skips the batches already seen)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    if exit_on_error is None:
        exit_on_error = args is None
    if exit_on_error:
        info_logs_to_stdout()
    try:
        MrdiffCLI(args=args)
    except KeyboardInterrupt:
        if not exit_on_error or os.environ.get(DEBUG_ENV) == "1":
            raise
        print("mrdiff: interrupted (files are written atomically: none was left half-written)", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        line = error_line(error) if exit_on_error and os.environ.get(DEBUG_ENV) != "1" else None
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
