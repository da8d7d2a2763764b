"""What the sampler feeds a model's network for each resolution: a NoiseShift table, the analytic shift, or t.

Shared by `mrdiff sample`, the evaluation callback and the evidence report: the table is loaded once and
checked against the model (schedule, checkpoint, weights) and every resolution before any sampling starts.
"""

from __future__ import annotations

from mrdiff.diffusion.noiseshift_table import Fallback, NoiseShiftTable, checkpoint_hash, weights_hash
from mrdiff.diffusion.samplers import TimeCond
from mrdiff.diffusion.time_cond import AnalyticShift
from mrdiff.module import DiffusionModule
from mrdiff.nn.diffusers_unet import DiffusersUNet


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
    ckpt_path: str | None, fallback: Fallback = "error",
) -> dict[tuple[int, int], TimeCond | None]:
    """time_conditioning for every size, checked all before any sampling starts (one table load).

    With a checkpoint the table must name the model's weights (as loaded from that checkpoint); a diffusers
    UNet without one must be the model folder the table was calibrated for. `fallback` says what a size
    the table lacks gets: an error, the nearest calibrated size's table, or t itself.
    """
    if noiseshift and shift != "none":
        raise ValueError("give either --noiseshift (a calibrated table) or --shift analytic, not both")
    if noiseshift:
        table = NoiseShiftTable.load(noiseshift, schedule=model.schedule,
                                     checkpoint=model_fingerprint(model, ckpt_path),
                                     weights=weights_hash(model) if ckpt_path else None)
        return {(h, w): table.time_cond(h, w, fallback=fallback) for h, w in sizes}
    if shift == "analytic":
        return {(h, w): AnalyticShift(model.schedule, train_pixels=model.hparams.train_resolution**2,
                                      sample_pixels=h * w) for h, w in sizes}
    return {size: None for size in sizes}
