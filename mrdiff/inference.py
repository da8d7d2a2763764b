"""Shared by the CLI and the callbacks: resolution strings, run directories, what the sampler feeds the net."""

from __future__ import annotations

import re
from pathlib import Path

from mrdiff.diffusion.noiseshift import AnalyticShift, NoiseShiftTable, checkpoint_hash, weights_hash
from mrdiff.diffusion.samplers import TimeCond
from mrdiff.module import DiffusionModule
from mrdiff.nn.diffusers_unet import DiffusersUNet

Resolution = int | str


def parse_resolution(value: Resolution) -> tuple[int, int]:
    """64 → (64, 64); "96x128" → (96, 128) as height × width."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(value))
    if not match:
        raise ValueError(f"resolution {value!r} is neither N nor HxW (e.g. 64 or 96x128)")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height <= 0 or width <= 0:
        raise ValueError(f"resolution {value!r} must be positive")
    return height, width


def checked_resolutions(model: DiffusionModule, resolutions: list[Resolution]) -> list[tuple[int, int]]:
    """Parse every resolution and check the U-Net can take it, before any sampling starts."""
    sizes = [parse_resolution(r) for r in resolutions]
    for height, width in sizes:
        model.net.check_size(height, width)
    return sizes


resolution_key = NoiseShiftTable.resolution_key  # "64" or "96x128": one spelling for tables, files and logs


def run_dir_of(ckpt_path: str | None, fallback: str) -> Path:
    """The run directory a checkpoint belongs to (<run>/checkpoints/x.ckpt → <run>)."""
    if ckpt_path:
        path = Path(ckpt_path).resolve()
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return Path(fallback)


def model_fingerprint(model: DiffusionModule, ckpt_path: str | None) -> str | None:
    """What a NoiseShift table records as its checkpoint: the checkpoint file's hash, or for a pretrained
    diffusers UNet loaded without one, the hash of its model files."""
    if ckpt_path:
        return checkpoint_hash(ckpt_path)
    return model.net.fingerprint if isinstance(model.net, DiffusersUNet) else None


def time_conditioning(
    model: DiffusionModule, height: int, width: int, *, noiseshift: str | None, shift: str, ckpt_path: str | None,
) -> TimeCond | None:
    """What the sampler feeds the network instead of t: a NoiseShift table, the analytic shift, or t itself."""
    return time_conditionings(model, [(height, width)], noiseshift=noiseshift, shift=shift,
                              ckpt_path=ckpt_path)[(height, width)]


def time_conditionings(
    model: DiffusionModule, sizes: list[tuple[int, int]], *, noiseshift: str | None, shift: str,
    ckpt_path: str | None,
) -> dict[tuple[int, int], TimeCond | None]:
    """time_conditioning for every size, checked all before any sampling starts (one table load).

    With a checkpoint the table must name the model's weights (as loaded from that checkpoint); a diffusers
    UNet without one must be the model folder the table was calibrated for.
    """
    if noiseshift and shift != "none":
        raise ValueError("give either --noiseshift (a calibrated table) or --shift analytic, not both")
    if noiseshift:
        table = NoiseShiftTable.load(noiseshift, schedule=model.schedule,
                                     checkpoint=model_fingerprint(model, ckpt_path),
                                     weights=weights_hash(model) if ckpt_path else None)
        return {(h, w): table.time_cond(h, w) for h, w in sizes}
    if shift == "analytic":
        return {(h, w): AnalyticShift(model.schedule, train_pixels=model.hparams.train_resolution**2,
                                      sample_pixels=h * w) for h, w in sizes}
    return {size: None for size in sizes}
