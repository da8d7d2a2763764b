"""What the sampler feeds a network for each resolution: a NoiseShift table, the analytic shift, or t.

Shared by `mrdiff sample`, `mrdiff test` and the evidence report: the table is loaded once and checked
against the model (schedule and weights, mrdiff.noiseshift.weights) and every resolution before any
sampling starts.
"""

from __future__ import annotations

import os

from mrdiff.diffusion.samplers import TimeCond
from mrdiff.noiseshift.table import Fallback, NoiseShiftTable
from mrdiff.noiseshift.time_cond import AnalyticShift
from mrdiff.noiseshift.weights import identify
from mrdiff.pipeline import DiffusionPipeline


def time_conditionings(
    pipeline: DiffusionPipeline, sizes: list[tuple[int, int]], *, noiseshift: str | None = None,
    shift: str = "none", ckpt_path: str | os.PathLike | None = None, fallback: Fallback = "error",
) -> dict[tuple[int, int], TimeCond | None]:
    """The time conditioning of every size, checked all before any sampling starts (one table load).

    With a checkpoint the table must name the weights loaded from it; a diffusers UNet without one must be
    the model folder the table was calibrated for. `fallback` says what a size the table lacks gets: an
    error, the nearest calibrated size's table, or t itself.
    """
    if noiseshift and shift != "none":
        raise ValueError("give either --noiseshift (a calibrated table) or --shift analytic, not both")
    if noiseshift:
        named = identify(pipeline, ckpt_path)
        table = NoiseShiftTable.load(noiseshift, schedule=pipeline.schedule, checkpoint=named.checkpoint,
                                     weights=named.weights)
        return {(h, w): table.time_cond(h, w, fallback=fallback) for h, w in sizes}
    if shift == "analytic":
        return {(h, w): AnalyticShift(pipeline.schedule, train_pixels=pipeline.train_resolution**2,
                                      sample_pixels=h * w) for h, w in sizes}
    return {size: None for size in sizes}
