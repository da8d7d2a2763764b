"""The multi-resolution patch sampler (seed paper §3.1): rescale, crop, and the crop's coordinate grid.

Per image: with probability p_min the image is rescaled to s_min, otherwise to s ~ U{s_min, …, s_max};
a patch_size² patch is cropped at a uniformly random position, and its grid holds the coordinates of
its pixels inside the rescaled image (mrdiff.nn.coords). Optionally (canvas_fraction, an mrdiff addition
beyond the paper) a share of the batches holds whole canvases at sides above patch_size instead, so the
loss also sees layouts that no single patch contains (one sun per canvas). Synthetic scenes are rendered directly at
the drawn scale (no resampling loss); images are resized with antialiasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from mrdiff.data.synthetic import Scene, render
from mrdiff.grids import CoordMode, crop_grid


@dataclass(frozen=True)
class PatchSampler:
    """Draws (scale, crop position) and cuts patches with their grids."""

    s_min: int
    s_max: int
    patch_size: int
    p_min: float = 0.5  # probability of rescaling to exactly s_min
    coord_mode: CoordMode = "normalized"
    canvas_fraction: float = 0.0  # share of batches made of whole canvases at one of canvas_sizes
    canvas_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if min(self.s_min, self.s_max, self.patch_size) <= 0:
            raise ValueError(f"sizes must be positive: s_min={self.s_min}, s_max={self.s_max}, "
                             f"patch_size={self.patch_size}")
        if not self.patch_size <= self.s_min <= self.s_max:
            raise ValueError(
                f"need patch_size <= s_min <= s_max, got patch_size={self.patch_size}, s_min={self.s_min}, "
                f"s_max={self.s_max}: a patch is cut from an image rescaled to at least s_min"
            )
        if not 0 <= self.p_min <= 1:
            raise ValueError(f"p_min is a probability, got {self.p_min}")
        if not 0 <= self.canvas_fraction <= 1:
            raise ValueError(f"canvas_fraction is a probability, got {self.canvas_fraction}")
        if self.canvas_fraction > 0 and not self.canvas_sizes:
            raise ValueError("canvas_fraction > 0 needs canvas_sizes: the sides of the whole-canvas batches")
        if any(not self.s_min <= side <= self.s_max for side in self.canvas_sizes):
            raise ValueError(f"canvas_sizes {list(self.canvas_sizes)} must lie in [s_min, s_max] = "
                             f"[{self.s_min}, {self.s_max}]")

    def draw_canvas(self, generator: torch.Generator | None = None) -> int | None:
        """The side of a whole-canvas batch with probability canvas_fraction (uniform over canvas_sizes),
        else None: a batch of patches."""
        u = torch.rand(2, generator=generator)
        if u[0] >= self.canvas_fraction:
            return None
        return self.canvas_sizes[min(int(u[1] * len(self.canvas_sizes)), len(self.canvas_sizes) - 1)]

    def draw_scale(self, generator: torch.Generator | None = None) -> int:
        """s_min with probability p_min, else uniform on the integers s_min … s_max."""
        u = torch.rand(2, generator=generator)
        if u[0] < self.p_min:
            return self.s_min
        return self.s_min + min(int(u[1] * (self.s_max - self.s_min + 1)), self.s_max - self.s_min)

    def draw_crop(self, scale: int, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(top, left) uniform over the positions where the patch fits."""
        top, left = torch.randint(0, scale - self.patch_size + 1, (2,), generator=generator).tolist()
        return top, left

    def grid(self, scale: int, top: int, left: int) -> Tensor:
        return crop_grid(scale, scale, top, left, self.patch_size, self.patch_size, self.coord_mode,
                         pixel_unit=self.patch_size)

    def cut(self, item: Tensor | Scene, scale: int, top: int, left: int) -> Tensor:
        """The patch of `item` rescaled to scale²: rendered for a Scene, resized + cropped for an image."""
        p = self.patch_size
        if isinstance(item, Scene):
            return render(item, crop_grid(scale, scale, top, left, p, p), (2 / scale, 2 / scale))
        image = resize(item, scale, scale)
        return image[:, top : top + p, left : left + p]


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """Antialiased bilinear resize of a float image (no-op at its own size)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return TF.resize(image, [height, width], antialias=True)


def prepare_full(item: Tensor | Scene, height: int, width: int) -> Tensor:
    """A whole image at height × width, as the data pipeline makes it (FID reference, fixed mode)."""
    if isinstance(item, Scene):
        from mrdiff.data.synthetic import render_canvas

        return render_canvas(item, height, width)
    return resize(item, height, width).clamp(-1, 1)


class PatchCollate:
    """Collate function: items (image tensors or Scenes) → {"image", "grid", "scale"}.

    With `sampler=None` (fixed-resolution mode) every item is prepared whole at `size`.
    With `per_batch_scale`, one scale is drawn per batch (same marginal distribution, one SAFA kernel mix
    per layer); `scale` is then [1] instead of [B]. Items come as (item_seed, item) pairs: an item's
    scale and crop are drawn from its own seed (the batch's first seed for a shared scale), so batches
    do not depend on the worker that builds them.
    """

    def __init__(
        self, sampler: PatchSampler | None, *, size: int, per_batch_scale: bool = False,
        coord_mode: CoordMode = "normalized",
    ) -> None:
        self.sampler, self.size, self.per_batch_scale = sampler, size, per_batch_scale
        self.coord_mode = coord_mode

    def __call__(self, batch: Sequence[tuple[int, Any]]) -> dict[str, Tensor]:
        seeds, items = zip(*batch)
        if self.sampler is None:
            return self.whole(items, self.size)
        # its own generator (seed + 2): skipping the draw when there are no canvases changes no other draw
        side = self.sampler.draw_canvas(_generator(seeds[0] + 2)) if self.sampler.canvas_fraction else None
        if side is not None:  # a batch of whole canvases: the loss sees a layout larger than one patch
            return self.whole(items, side)
        shared = self.sampler.draw_scale(_generator(seeds[0] + 1)) if self.per_batch_scale else None
        patches, grids, scales = [], [], []
        for seed, item in zip(seeds, items):
            gen = _generator(seed)
            scale = self.sampler.draw_scale(gen)  # always drawn, so crops match across both modes
            scale = shared if shared is not None else scale
            top, left = self.sampler.draw_crop(scale, gen)
            patches.append(self.sampler.cut(item, scale, top, left))
            grids.append(self.sampler.grid(scale, top, left))
            scales.append(float(scale))
        scale_t = torch.tensor(scales[:1] if shared is not None else scales)
        return {"image": torch.stack(patches), "grid": torch.stack(grids), "scale": scale_t}


    def whole(self, items: Sequence[Any], side: int) -> dict[str, Tensor]:
        """Every item whole at side², with the canvas grid and one shared scale.

        Pixel coordinates keep the training input side as their unit (the patch side, or `size` in
        fixed-resolution mode), as patches and inference do, whatever the canvas side.
        """
        images = torch.stack([prepare_full(it, side, side) for it in items])
        unit = self.sampler.patch_size if self.sampler is not None else self.size
        grid = crop_grid(side, side, 0, 0, side, side, self.coord_mode, pixel_unit=unit)
        return {"image": images, "grid": grid.expand(len(items), -1, -1, -1).contiguous(),
                "scale": torch.full((1,), float(side))}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % 2**63)
