"""Window fusion (MultiDiffusion, Bar-Tal et al. 2023): ε of a large canvas from a fixed-size model.

Every step denoises overlapping windows of the canvas on their own and averages their predictions per pixel:
MultiDiffusion's fused step (eq. 3) with uniform weights has the closed form "the mean, per pixel, of the
windows' outputs covering it" (eq. 5). Done on ε, a wrapper around the ε-function, it serves every sampler
(DDIM, DPM-Solver++, DDPM) and every time conditioning; for DDIM, whose step is affine in ε, it is the same as
averaging the windows' next states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mrdiff.diffusion.samplers import EpsFn


def window_starts(side: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows of `window` px every `stride` px along a side; the last one aligned to the edge so
    the windows cover it. A side no longer than the window has one window, the side itself."""
    if side <= window:
        return [0]
    if not 1 <= stride <= window:
        raise ValueError(f"window fusion needs 1 <= stride <= window, got stride {stride} for window {window}")
    return [*range(0, side - window, stride), side - window]


def fused_eps(window_eps: EpsFn, height: int, width: int, window: tuple[int, int], stride: int) -> EpsFn:
    """ε(x, t) of a height × width canvas: window_eps on each window (window[0] × window[1], cut to the canvas)
    alone, averaged per pixel over the windows that cover it. One window over the whole canvas is window_eps."""
    wh, ww = min(window[0], height), min(window[1], width)
    boxes = [(i, j) for i in window_starts(height, wh, stride) for j in window_starts(width, ww, stride)]
    if (wh, ww) == (height, width):
        return window_eps

    def eps(x: Tensor, t: Tensor) -> Tensor:
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        count = torch.zeros((height, width), dtype=torch.float32, device=x.device)
        for i, j in boxes:  # one window at a time: the batch, and the memory, of a training-size run
            total[..., i:i + wh, j:j + ww] += window_eps(x[..., i:i + wh, j:j + ww], t).float()
            count[i:i + wh, j:j + ww] += 1
        return total / count

    return eps
