"""Exported weights: a few-MB file that rebuilds a trained model anywhere, as a sampling pipeline.

`export` turns a run's checkpoint into fp16 EMA weights plus the U-Net's and the module's settings and the
command that trained it; `load` rebuilds a `DiffusionPipeline` from such a file, without Lightning. The
files under models/ are exports (listed with their commands and hashes in models/MANIFEST.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.nn.unet import UNet
from mrdiff.pipeline import DiffusionPipeline
from mrdiff.utils import atomic_write

FP32_KEYS = ("coords.matrix",)  # constants the features are computed from: fp16 would move the frequencies
MODULE_ONLY = ("net", "_instantiator", "init_weights")  # hyperparameters that do not describe the weights


def export(ckpt_path: Path, out: Path, command: str, wall_seconds: float | None) -> Path:
    """fp16 EMA weights of `ckpt_path` (a run's checkpoint, beside its config.yaml) written atomically to `out`."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = yaml.safe_load((Path(ckpt_path).parent.parent / "config.yaml").read_text())
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in MODULE_ONLY}
    payload = {
        "state_dict": {k: v.half() if v.is_floating_point() and not k.endswith(FP32_KEYS) else v
                       for k, v in ckpt["state_dict"].items()},
        "net": config["model"]["net"]["init_args"], "module": hparams, "data": config["data"],
        "global_step": ckpt["global_step"], "command": command, "train_seconds": wall_seconds,
    }
    with atomic_write(out) as f:  # a killed export leaves the previous weights intact
        torch.save(payload, f)
    return out


def read(path: str | Path) -> dict[str, Any]:
    """The export's payload (weights on the CPU, as stored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported weights at {path}: point at a file written by `mrdiff evidence "
                                f"export` (models/MANIFEST.md lists the shipped ones)")
    return torch.load(path, map_location="cpu", weights_only=False)


def pipeline_from_payload(payload: dict[str, Any], device: torch.device | str = "cpu") -> DiffusionPipeline:
    """The pipeline an export describes: fp32 weights on `device`, eval mode."""
    net = UNet(**{"norm_group_channels": 1, **payload["net"]})  # exports without it predate the setting (1)
    state = {k.removeprefix("net."): v.float() if v.is_floating_point() else v
             for k, v in payload["state_dict"].items()}
    net.load_state_dict(state)
    module = payload["module"]
    schedule = NoiseSchedule(kind=module.get("schedule", "linear"), num_timesteps=module.get("num_timesteps", 1000),
                             beta_start=module.get("beta_start", 1e-4), beta_end=module.get("beta_end", 0.02))
    return DiffusionPipeline(net.to(device).eval(), schedule, coord_mode=module.get("coord_mode", "normalized"),
                             train_resolution=module.get("train_resolution", 64),
                             train_scales=module.get("train_scales"),
                             channels_last=module.get("channels_last", False))


def load(path: str | Path, device: torch.device | str = "cpu") -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Rebuild an export as a pipeline on `device`; returns it with the payload (command, steps, settings)."""
    payload = read(path)
    return pipeline_from_payload(payload, device), payload
