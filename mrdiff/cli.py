"""The `mrdiff` command: LightningCLI's fit, validate and test, plus sample and calibrate (mrdiff.trainer),
and `mrdiff evidence …` (mrdiff.evidence); known errors end as one line."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import warnings
from typing import Any, NoReturn

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mrdiff.checkpoint import CheckpointError, check_fits, load_checkpoint, run_dir_of
from mrdiff.console import error as console_error
from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.loggers import SaveConfig
from mrdiff.metrics.fid import InceptionWeightsError
from mrdiff.module import DiffusionModule
from mrdiff.nn.diffusers_unet import OptionalDependencyError
from mrdiff.noiseshift.search import SearchSettings
from mrdiff.nonfinite import NonFiniteLossError
from mrdiff.rundir import refuse_to_overwrite, resolve_last
from mrdiff.runlock import RunDirInUse, holding
from mrdiff.trainer import MrdiffTrainer
from mrdiff.utils import NO_SPACE_ERRNOS, NoSpaceError, no_space_errno

DEBUG_ENV = "MRDIFF_DEBUG"  # =1: errors mrdiff knows about show their traceback too


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
        console_error(moved_option_line(message)
                      or f"mrdiff: error: {' '.join(message.split())} (the options: {prog} --help)")
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
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["evidence"]:  # the evidence commands: plain argparse, no Trainer
            from mrdiff.evidence.__main__ import main as evidence

            return evidence(argv[1:])
        MrdiffCLI(args=args)
    except KeyboardInterrupt:
        if not exit_on_error or os.environ.get(DEBUG_ENV) == "1":
            raise
        console_error("mrdiff: interrupted (files are written atomically: none was left half-written)")
        sys.exit(130)
    except Exception as error:
        line = error_line(error) if exit_on_error and os.environ.get(DEBUG_ENV) != "1" else None
        if line is None:
            raise
        console_error(line)
        sys.exit(2)


if __name__ == "__main__":
    main()
