"""Coordinate grids and their Fourier features (Tancik et al. 2020).

A grid is a float tensor [2, h, w] (or batched [B, 2, h, w]): channel 0 is x (grows with the column),
channel 1 is y (grows with the row, row 0 at the top). In the default "normalized" convention the
pixel centres of the whole rescaled image span [−1, 1]: x_j = (2j + 1)/W − 1. The "pixel" convention
uses raw pixel indices instead (an ablation switch).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

CoordMode = Literal["normalized", "pixel"]


def axis_coords(start: int, length: int, size: int, mode: CoordMode) -> Tensor:
    """Coordinates of pixels start … start+length−1 of an axis that is `size` pixels long."""
    index = torch.arange(start, start + length, dtype=torch.float32)
    if mode == "pixel":
        return index
    if mode == "normalized":
        return (2 * index + 1) / size - 1
    raise ValueError(f"unknown coordinate mode {mode!r}: use 'normalized' or 'pixel'")


def crop_grid(
    canvas_height: int, canvas_width: int, top: int, left: int, height: int, width: int,
    mode: CoordMode = "normalized",
) -> Tensor:
    """[2, height, width] grid of a crop at (top, left) inside a canvas_height × canvas_width image."""
    if top < 0 or left < 0 or top + height > canvas_height or left + width > canvas_width:
        raise ValueError(
            f"crop {height}x{width} at ({top}, {left}) lies outside the {canvas_height}x{canvas_width} canvas"
        )
    ys = axis_coords(top, height, canvas_height, mode)
    xs = axis_coords(left, width, canvas_width, mode)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"))


def canvas_grid(height: int, width: int, mode: CoordMode = "normalized") -> Tensor:
    """[2, height, width] grid of a whole canvas (what inference at any resolution uses)."""
    return crop_grid(height, width, 0, 0, height, width, mode)


class FourierFeatures(nn.Module):
    """γ(g) = [sin 2πBg, cos 2πBg] with B log-spaced per axis or Gaussian (Tancik et al. 2020).

    With `antialias`, each feature is attenuated by exp(−(2πb)²σ²/2), its expectation over a pixel
    footprint of variance σ² = spacing²/12 (mip-NeRF's integrated encoding), so frequencies a grid
    cannot resolve fade out instead of aliasing. This keeps the features consistent across resolutions
    and U-Net levels, which is the point of the method.
    """

    def __init__(
        self,
        *,
        num_frequencies: int = 6,  # per axis ("log") or in total ("gaussian")
        max_frequency: float = 16.0,  # cycles per grid unit of the highest log-spaced frequency
        basis: Literal["log", "gaussian"] = "log",
        gaussian_std: float = 4.0,  # std of the Gaussian frequencies
        antialias: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be positive, got {num_frequencies}")
        if basis == "log":
            freqs = torch.logspace(0, math.log2(max_frequency), num_frequencies, base=2.0)
            eye = torch.eye(2)
            matrix = torch.cat([freqs[:, None] * eye[0], freqs[:, None] * eye[1]])  # x rows, then y rows
        elif basis == "gaussian":
            gen = torch.Generator().manual_seed(seed)
            matrix = torch.randn(num_frequencies, 2, generator=gen) * gaussian_std
        else:
            raise ValueError(f"unknown Fourier basis {basis!r}: use 'log' or 'gaussian'")
        self.register_buffer("matrix", matrix, persistent=False)  # [F, 2] cycles per unit
        self.antialias = antialias

    @property
    def out_channels(self) -> int:
        return 2 * self.matrix.shape[0]

    def forward(self, grid: Tensor) -> Tensor:
        """[B, 2, h, w] grid → [B, 2F, h, w] features."""
        omega = 2 * math.pi * self.matrix.to(grid.dtype)  # [F, 2]
        phase = torch.einsum("fc,bchw->bfhw", omega, grid)
        features = torch.cat([phase.sin(), phase.cos()], dim=1)
        if not self.antialias:
            return features
        spacing = grid_spacing(grid)  # [B, 2]
        variance = (omega[None] * spacing[:, None]).pow(2).sum(-1) / 12  # [B, F]: Σ_c (ω_c Δ_c)²/12
        damp = torch.exp(-variance / 2).repeat(1, 2)
        return features * damp[:, :, None, None]


def grid_spacing(grid: Tensor) -> Tensor:
    """[B, 2] distance between neighbouring pixel centres along x and y (1 where an axis has one pixel)."""
    h, w = grid.shape[-2:]
    dx = (grid[:, 0, 0, -1] - grid[:, 0, 0, 0]) / max(w - 1, 1)
    dy = (grid[:, 1, -1, 0] - grid[:, 1, 0, 0]) / max(h - 1, 1)
    return torch.stack([dx.abs(), dy.abs()], dim=1)
