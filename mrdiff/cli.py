"""The `mrdiff` command: LightningCLI with fit validate test predict, plus sample and calibrate."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torchvision.utils import save_image

from mrdiff.checkpoint import AtomicCheckpointIO, load_checkpoint, load_weights
from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.diffusion.noiseshift import NoiseShiftTable, SearchSettings, checkpoint_hash
from mrdiff.inference import (
    Resolution,
    checked_resolutions,
    resolution_key,
    run_dir_of,
    time_conditioning,
)
from mrdiff.loggers import SaveConfig, WandbRun
from mrdiff.module import DiffusionModule


class MrdiffTrainer(Trainer):
    """Lightning's Trainer with atomic checkpoints and the `sample` and `calibrate` subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plugins = kwargs.pop("plugins", None) or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        super().__init__(*args, plugins=plugins, **kwargs)
        for logger in self.loggers:
            if isinstance(logger, WandbRun) and logger.dir_from_trainer:
                logger.use_run_dir(self.default_root_dir)

    def _load_for_inference(self, model: DiffusionModule, ckpt_path: str | None, command: str) -> DiffusionModule:
        if not ckpt_path:
            raise ValueError(f"`mrdiff {command}` needs a trained model: pass --ckpt_path path/to/last.ckpt")
        load_weights(model, ckpt_path)
        return model.to(self.strategy.root_device).eval()

    def sample(
        self,
        model: DiffusionModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        resolutions: list[Resolution] = [64],  # noqa: B006 - jsonargparse needs a literal default
        num_samples: int = 16,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,  # sample i uses seed + i at every resolution
        noiseshift: str | None = None,  # NoiseShift table (JSON) from `mrdiff calibrate`
        shift: Literal["none", "analytic"] = "none",  # the analytic resolution-shift baseline
        out_dir: str | None = None,  # default: <run dir>/samples
    ) -> list[Path]:
        """Write a PNG grid of `num_samples` samples per resolution; returns their paths."""
        sizes = checked_resolutions(model, resolutions)
        model = self._load_for_inference(model, ckpt_path, "sample")
        out = Path(out_dir) if out_dir else run_dir_of(ckpt_path, self.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        seeds = list(range(seed, seed + num_samples))
        paths = []
        for height, width in sizes:
            time_cond = time_conditioning(model, height, width, noiseshift=noiseshift, shift=shift,
                                          ckpt_path=ckpt_path)
            with self.precision_plugin.forward_context():
                images = model.sample(seeds, height, width, sampler=sampler, steps=steps, eta=eta,
                                      time_cond=time_cond, progress=True)
            suffix = "" if time_cond is None else ("_noiseshift" if noiseshift else f"_{shift}")
            path = out / f"samples_{resolution_key(height, width)}{suffix}.png"
            save_image(images.float() * 0.5 + 0.5, path, nrow=max(1, int(math.sqrt(num_samples))))
            paths.append(path)
            print(f"mrdiff: wrote {num_samples} samples at {height}x{width} to {path}")
        return paths


    def calibrate(
        self,
        model: DiffusionModule,
        datamodule: MultiResDataModule,
        ckpt_path: str | None = None,
        resolutions: list[Resolution] = [64],  # noqa: B006
        sampler: Literal["ddpm", "ddim"] = "ddim",  # calibrate the timesteps this sampler visits
        steps: int = 50,
        num_images: int = 64,
        coarse_window: float = 0.1,  # σ_rf units
        coarse_stride: float = 0.01,
        fine_window: float = 0.01,
        fine_stride: float = 0.001,
        max_batch: int = 256,  # candidates × images per forward pass
        out: str | None = None,  # default: <run dir>/noiseshift.json (merged into an existing table)
    ) -> Path:
        """Calibrate NoiseShift tables for a trained model at the given resolutions."""
        from mrdiff.callbacks.noiseshift import calibrate_model, plot_table, sampler_timesteps

        sizes = checked_resolutions(model, resolutions)
        model = self._load_for_inference(model, ckpt_path, "calibrate")
        settings = SearchSettings(coarse_window=coarse_window, coarse_stride=coarse_stride, fine_window=fine_window,
                                  fine_stride=fine_stride, num_images=num_images, max_batch=max_batch)
        timesteps = sampler_timesteps(model.schedule.num_timesteps, sampler, steps)
        with self.precision_plugin.forward_context():
            table = calibrate_model(model, datamodule, sizes, timesteps, settings,
                                    checkpoint=checkpoint_hash(ckpt_path))
        path = Path(out) if out else run_dir_of(ckpt_path, self.default_root_dir) / "noiseshift.json"
        if path.exists():
            previous = NoiseShiftTable.load(path, schedule=model.schedule, checkpoint=table.checkpoint)
            previous.merge(table)
            table = previous
        table.save(path)
        plot_table(table, path.with_suffix(".png"))
        print(f"mrdiff: NoiseShift table for {table.resolutions()} written to {path}")
        return path


def training_side(multires: bool, patch_size: int, image_size: int, train_size: int | None) -> int:
    """Side of one training input: the patch (multi-resolution) or the fixed training size."""
    return patch_size if multires else (train_size or image_size)


class MrdiffCLI(LightningCLI):
    """LightningCLI for DiffusionModule + MultiResDataModule with mrdiff's extra subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", MrdiffTrainer)
        kwargs.setdefault("save_config_callback", SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(DiffusionModule, MultiResDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "sample": {"model", "datamodule"},
            "calibrate": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.coord_mode", "model.coord_mode")
        parser.link_arguments(("data.multires", "data.patch_size", "data.image_size", "data.train_size"),
                              "model.train_resolution", compute_fn=training_side)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(ckpt_path)  # a clear error for a missing / truncated / foreign file
        super()._parse_ckpt_path()


def main(args: list[str] | None = None) -> None:
    torch.set_float32_matmul_precision("high")
    # mid-epoch resume is exact here (MultiResDataModule.state_dict skips the batches already seen)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    MrdiffCLI(args=args)


if __name__ == "__main__":
    main()
