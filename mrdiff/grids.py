"""Coordinate grids: where each pixel of a patch or a canvas sits, as a [2, h, w] tensor.

A grid is a float tensor [2, h, w] (or batched [B, 2, h, w]): channel 0 is x (grows with the column),
channel 1 is y (grows with the row, row 0 at the top). In the default "normalized" convention the
pixel centres of the whole rescaled image span [−1, 1]: x_j = (2j + 1)/W − 1. The "pixel" convention
(an ablation switch) measures pixel centres in a fixed unit instead of the canvas: x_j = (2j + 1)/U − 1 with
U the training input side (the patch side), so both conventions agree on a U×U canvas, while on a larger
canvas pixel coordinates run past 1 and stay locked to the pixel grid. Raw integer indices would put every
log-spaced frequency (an integer number of cycles per unit) on a whole period per pixel: sin = 0, cos = 1.

The data pipeline (patches, whole canvases, synthetic renders) and the sampling pipeline both build grids
here; the network only turns them into features (mrdiff.nn.coords).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

CoordMode = Literal["normalized", "pixel"]


def axis_coords(start: int, length: int, size: int, mode: CoordMode, pixel_unit: int | None = None) -> Tensor:
    """Coordinates of pixels start … start+length−1 of an axis that is `size` pixels long.

    `pixel_unit` (pixel mode only): the number of pixels that spans 2 coordinate units (the training side).
    """
    index = torch.arange(start, start + length, dtype=torch.float32)
    if mode == "pixel":
        if not pixel_unit or pixel_unit <= 0:
            raise ValueError("pixel coordinates need pixel_unit: the training input side in pixels")
        return (2 * index + 1) / pixel_unit - 1
    if mode == "normalized":
        return (2 * index + 1) / size - 1
    raise ValueError(f"unknown coordinate mode {mode!r}: use 'normalized' or 'pixel'")


def crop_grid(
    canvas_height: int, canvas_width: int, top: int, left: int, height: int, width: int,
    mode: CoordMode = "normalized", pixel_unit: int | None = None,
) -> Tensor:
    """[2, height, width] grid of a crop at (top, left) inside a canvas_height × canvas_width image."""
    if top < 0 or left < 0 or top + height > canvas_height or left + width > canvas_width:
        raise ValueError(
            f"crop {height}x{width} at ({top}, {left}) lies outside the {canvas_height}x{canvas_width} canvas"
        )
    ys = axis_coords(top, height, canvas_height, mode, pixel_unit)
    xs = axis_coords(left, width, canvas_width, mode, pixel_unit)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"))


def canvas_grid(height: int, width: int, mode: CoordMode = "normalized", pixel_unit: int | None = None) -> Tensor:
    """[2, height, width] grid of a whole canvas (what inference at any resolution uses)."""
    return crop_grid(height, width, 0, 0, height, width, mode, pixel_unit)
