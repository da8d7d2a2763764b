"""Fourier features of coordinate grids (Tancik et al. 2020): what the U-Net concatenates in every block.

The grids themselves (which pixel sits where, in the normalized or pixel convention) are built in
mrdiff.grids, shared by the data and sampling pipelines.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn


class FourierFeatures(nn.Module):
    """γ(g) = [sin 2πBg, cos 2πBg] with B log-spaced per axis or Gaussian (Tancik et al. 2020).

    The log-spaced frequencies run from min_frequency to max_frequency. With the default start of 1 cycle
    per unit and integer frequencies (1, 2, 4, 8), every feature has period 1: x and x + 1, the left and
    right halves of a [−1, 1] canvas, share all features. min_frequency < 0.5 gives every canvas point its
    own features; docs/evidence.md reports what that changed on the synthetic scenes (a mixed result,
    which is why the default stays at 1).

    With `antialias`, each feature is replaced by its average over the pixel footprint (a box of the grid
    spacing Δ per axis): sin and cos of 2π b·g are scaled by Π_c sinc(b_c Δ_c), exactly, with sinc(u) =
    sin(πu)/(πu). Frequencies at or above one cycle per pixel on an axis are zeroed instead of flipping
    sign. Frequencies a level cannot resolve so fade out instead of aliasing, which keeps the features
    consistent across resolutions and U-Net levels, the point of the method (mip-NeRF's integrated
    encoding uses a Gaussian footprint for the same purpose).
    """

    def __init__(
        self,
        *,
        num_frequencies: int = 6,  # per axis ("log") or in total ("gaussian")
        max_frequency: float = 16.0,  # cycles per grid unit of the highest log-spaced frequency
        min_frequency: float = 1.0,  # cycles per grid unit of the lowest log-spaced frequency
        basis: Literal["log", "gaussian"] = "log",
        gaussian_std: float = 4.0,  # std of the Gaussian frequencies
        antialias: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be positive, got {num_frequencies}")
        if basis == "log":
            if not 0 < min_frequency <= max_frequency:
                raise ValueError(f"need 0 < min_frequency <= max_frequency, got {min_frequency} and {max_frequency}")
            matrix = log_matrix(num_frequencies, min_frequency, max_frequency)
            self._legacy = log_matrix(num_frequencies, 1.0, max_frequency)
        elif basis == "gaussian":
            gen = torch.Generator().manual_seed(seed)
            matrix = torch.randn(num_frequencies, 2, generator=gen) * gaussian_std
            self._legacy = matrix
        else:
            raise ValueError(f"unknown Fourier basis {basis!r}: use 'log' or 'gaussian'")
        self.register_buffer("matrix", matrix)  # [F, 2] cycles per unit; saved, so weights keep their features
        self.antialias = antialias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Checkpoints written before the frequencies were saved used min_frequency = 1 (then fixed): they get
        # those frequencies back, whatever this module was configured with.
        state_dict.setdefault(prefix + "matrix", self._legacy.to(self.matrix))
        super()._load_from_state_dict(state_dict, prefix, *args)

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
        cycles = self.matrix.to(grid.dtype)[None] * grid_spacing(grid)[:, None]  # [B, F, 2]: cycles per pixel
        per_axis = torch.where(cycles.abs() < 1, torch.sinc(cycles), torch.zeros_like(cycles))
        damp = per_axis.prod(-1).repeat(1, 2)  # [B, 2F]: the same factor for sin and cos
        return features * damp[:, :, None, None]


def log_matrix(num: int, low: float, high: float) -> Tensor:
    """[2·num, 2] frequencies: num log-spaced from low to high on x, then the same on y."""
    freqs = torch.logspace(math.log2(low), math.log2(high), num, base=2.0)
    eye = torch.eye(2)
    return torch.cat([freqs[:, None] * eye[0], freqs[:, None] * eye[1]])  # x rows, then y rows


def grid_spacing(grid: Tensor) -> Tensor:
    """[B, 2] distance between neighbouring pixel centres along x and y (0 where an axis has one pixel)."""
    h, w = grid.shape[-2:]
    dx = (grid[:, 0, 0, -1] - grid[:, 0, 0, 0]) / max(w - 1, 1)
    dy = (grid[:, 1, -1, 0] - grid[:, 1, 0, 0]) / max(h - 1, 1)
    return torch.stack([dx.abs(), dy.abs()], dim=1)
