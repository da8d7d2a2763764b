"""Procedural landscape scenes defined in continuous canvas coordinates.

A scene is a sky gradient, exactly one sun (a hard-edged warm disk high in the sky) and one to three
mountain ridges in front of the horizon. Every element is an analytic function of the canvas point
``(x, y)`` in ``[-1, 1]^2``, so a scene renders consistently at any resolution, and any patch of a canvas
is rendered by evaluating that patch's pixel centres. ``x`` grows with the column index and ``y`` grows
downwards with the row index (row 0 is the top). The generating parameters double as ground truth for the
structure metrics in :mod:`mrdiff.metrics.structure`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mrdiff.grids import canvas_grid

Color = tuple[float, float, float]

SUN_RADIUS_RANGE: tuple[float, float] = (0.12, 0.22)
"""Range of the sun radius in canvas units (the canvas half-width is 1)."""
CANVAS_MARGIN: float = 0.95
"""The sun disk always lies inside ``[-CANVAS_MARGIN, CANVAS_MARGIN]^2``."""
SUN_LOWEST_EDGE: float = -0.2
"""The bottom edge of the sun never goes below this ``y``."""
RIDGE_SUN_GAP: float = 0.08
"""Minimal vertical distance between the bottom of the sun and the top of any ridge."""
RIDGE_HIGHEST_TOP: float = -0.3
"""No ridge reaches above this ``y``, so the top quarter of the canvas is always sky (and sun)."""
RIDGE_LOWEST_CREST: float = 0.6
"""Every ridge crest stays above this ``y``, so the bottom 20% of the canvas is always mountain."""


@dataclass(frozen=True)
class Ridge:
    """One mountain ridge: crest ``y(x) = base + sum_k a_k sin(w_k x + p_k)``; points below take ``color``."""

    base: float
    amplitudes: tuple[float, ...]
    frequencies: tuple[float, ...]
    phases: tuple[float, ...]
    color: Color

    @property
    def extent(self) -> float:
        """Largest possible deviation of the crest from ``base``."""
        return float(sum(abs(a) for a in self.amplitudes))

    def crest(self, x: torch.Tensor) -> torch.Tensor:
        """Crest height ``y`` at horizontal positions ``x`` (any shape)."""
        y = torch.full_like(x, self.base)
        for amp, freq, phase in zip(self.amplitudes, self.frequencies, self.phases, strict=True):
            y = y + amp * torch.sin(freq * x + phase)
        return y


@dataclass(frozen=True)
class Scene:
    """Ground truth and rendering parameters of one landscape; colours are RGB in ``[0, 1]``."""

    sun_center: tuple[float, float]
    sun_radius: float
    sun_color: Color
    sky_top: Color
    sky_bottom: Color
    ridges: tuple[Ridge, ...]
    """Ordered far to near; nearer ridges are painted over farther ones."""


def _sky_color(rng: np.random.Generator, blue: tuple[float, float]) -> Color:
    """Bluish sky colour with red well below blue, so no sky pixel looks like the sun."""
    b = rng.uniform(*blue)
    r = b - rng.uniform(0.30, 0.45)
    g = rng.uniform(r + 0.1, b - 0.05)
    return (float(r), float(g), float(b))


def _sample_sun(rng: np.random.Generator) -> tuple[tuple[float, float], float, Color]:
    """Sun centre, radius and colour: a saturated warm disk in the upper part of the canvas."""
    radius = float(rng.uniform(*SUN_RADIUS_RANGE))
    cx = float(rng.uniform(-CANVAS_MARGIN + radius, CANVAS_MARGIN - radius))
    cy = float(rng.uniform(-CANVAS_MARGIN + radius, SUN_LOWEST_EDGE - radius))
    color = (float(rng.uniform(0.96, 1.0)), float(rng.uniform(0.78, 0.9)), float(rng.uniform(0.22, 0.32)))
    return (cx, cy), radius, color


def _ridge_shape(rng: np.random.Generator, extent: float) -> tuple[tuple[float, ...], ...]:
    """Amplitudes, angular frequencies and phases of a smooth 1-D noise with total amplitude ``extent``."""
    count = int(rng.integers(3, 5))
    freqs = np.sort(rng.uniform(0.5, 4.0, size=count)) * math.pi
    weights = rng.uniform(0.4, 1.0, size=count) / np.arange(1, count + 1)
    amps = extent * weights / weights.sum()
    phases = rng.uniform(0.0, 2.0 * math.pi, size=count)
    return tuple(float(a) for a in amps), tuple(float(f) for f in freqs), tuple(float(p) for p in phases)


def _ridge_color(rng: np.random.Generator, sky_bottom: Color, depth: float) -> Color:
    """Ridge colour: hazy blue-grey far away (``depth`` near 0), dark green-grey in front (``depth`` 1)."""
    haze = rng.uniform(0.5, 0.65)
    dark = (rng.uniform(0.05, 0.15), rng.uniform(0.10, 0.22), rng.uniform(0.08, 0.18))
    return tuple(float((1 - depth) * haze * s + depth * d) for s, d in zip(sky_bottom, dark, strict=True))


def _sample_ridges(rng: np.random.Generator, sun_bottom: float, sky_bottom: Color) -> tuple[Ridge, ...]:
    """One to three ridges whose crests stay between the sun and the bottom fifth of the canvas."""
    count = int(rng.integers(1, 4))
    top_limit = max(sun_bottom + RIDGE_SUN_GAP, RIDGE_HIGHEST_TOP)
    extents = rng.uniform(0.05, 0.16, size=count)
    bases = [rng.uniform(top_limit + e, RIDGE_LOWEST_CREST - e) for e in extents]
    order = np.argsort(bases)  # far ridges sit higher on the canvas
    ridges = []
    for rank, idx in enumerate(order):
        amps, freqs, phases = _ridge_shape(rng, float(extents[idx]))
        color = _ridge_color(rng, sky_bottom, (rank + 1) / count)
        ridges.append(Ridge(float(bases[idx]), amps, freqs, phases, color))
    return tuple(ridges)


def sample_scene(seed: int) -> Scene:
    """Deterministically sample a scene from an integer seed."""
    rng = np.random.default_rng(seed)
    sky_top = _sky_color(rng, (0.60, 0.85))
    sky_bottom = _sky_color(rng, (0.85, 0.97))
    center, radius, sun_color = _sample_sun(rng)
    ridges = _sample_ridges(rng, center[1] + radius, sky_bottom)
    return Scene(center, radius, sun_color, sky_top, sky_bottom, ridges)


def _subsample_points(
    grid: torch.Tensor, pixel_size: tuple[float, float], supersample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a regular ``supersample x supersample`` pattern in each pixel footprint, ``[S*S, h, w]``."""
    steps = (torch.arange(supersample, dtype=torch.float32, device=grid.device) + 0.5) / supersample - 0.5
    off_y, off_x = torch.meshgrid(steps * pixel_size[1], steps * pixel_size[0], indexing="ij")
    xs = grid[0].unsqueeze(0) + off_x.reshape(-1, 1, 1)
    ys = grid[1].unsqueeze(0) + off_y.reshape(-1, 1, 1)
    return xs, ys


def _color(rgb: Color, like: torch.Tensor) -> torch.Tensor:
    """A colour as a ``[3, 1, 1, 1]`` tensor on the device of ``like``."""
    return torch.tensor(rgb, dtype=torch.float32, device=like.device).view(3, 1, 1, 1)


def _shade(scene: Scene, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Colour ``[3, *xs.shape]`` in ``[0, 1]`` of the scene at points ``(xs, ys)``."""
    t = ((ys + 1.0) * 0.5).clamp(0.0, 1.0).unsqueeze(0)
    top, bottom = _color(scene.sky_top, xs), _color(scene.sky_bottom, xs)
    image = top + (bottom - top) * t
    cx, cy = scene.sun_center
    in_sun = (xs - cx) ** 2 + (ys - cy) ** 2 <= scene.sun_radius**2
    image = torch.where(in_sun.unsqueeze(0), _color(scene.sun_color, xs), image)
    for ridge in scene.ridges:
        below = ys >= ridge.crest(xs)
        image = torch.where(below.unsqueeze(0), _color(ridge.color, xs), image)
    return image


def render(
    scene: Scene, grid: torch.Tensor, pixel_size: tuple[float, float], supersample: int = 4
) -> torch.Tensor:
    """Render ``scene`` at the pixel centres ``grid`` [2, h, w] as a [3, h, w] float32 image in [-1, 1].

    Each pixel is the average of ``supersample x supersample`` points spread over its footprint of
    ``pixel_size = (width, height)`` canvas units, which anti-aliases the hard edges.
    """
    if grid.ndim != 3 or grid.shape[0] != 2:
        raise ValueError(f"grid must have shape [2, h, w], got {tuple(grid.shape)}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    xs, ys = _subsample_points(grid.float(), pixel_size, supersample)
    image = _shade(scene, xs, ys).mean(dim=1)
    return (image * 2.0 - 1.0).clamp(-1.0, 1.0)


def render_canvas(scene: Scene, height: int, width: int, supersample: int = 4) -> torch.Tensor:
    """Render the full canvas of ``scene`` at ``height x width`` pixels, [3, H, W] in [-1, 1]."""
    return render(scene, canvas_grid(height, width), (2.0 / width, 2.0 / height), supersample)


def reference_radii(num: int = 1000, seed: int = 0) -> list[float]:
    """Ground-truth sun radii (canvas units) of ``num`` scenes ``sample_scene(seed + i)``: what the structure
    score (mrdiff.metrics.structure) compares detected suns with."""
    return [sample_scene(seed + i).sun_radius for i in range(num)]
