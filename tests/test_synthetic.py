"""Tests of the procedural landscape scenes (continuous coordinates, patches, ground truth)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrdiff.data.synthetic import (
    CANVAS_MARGIN,
    RIDGE_LOWEST_CREST,
    RIDGE_SUN_GAP,
    SUN_RADIUS_RANGE,
    Scene,
    render,
    render_canvas,
    sample_scene,
)
from mrdiff.grids import canvas_grid


def test_sample_scene_is_deterministic() -> None:
    """The same seed gives the same scene, different seeds different ones."""
    assert sample_scene(7) == sample_scene(7)
    assert sample_scene(7) != sample_scene(8)
    assert isinstance(sample_scene(7), Scene)


def test_scene_layout_guarantees() -> None:
    """Sun fully inside the margin and clear of every ridge; ridges cover the bottom of the canvas."""
    ridge_counts = set()
    for seed in range(500):
        scene = sample_scene(seed)
        (cx, cy), radius = scene.sun_center, scene.sun_radius
        assert SUN_RADIUS_RANGE[0] <= radius <= SUN_RADIUS_RANGE[1]
        assert -CANVAS_MARGIN <= cx - radius and cx + radius <= CANVAS_MARGIN
        assert -CANVAS_MARGIN <= cy - radius and cy + radius <= CANVAS_MARGIN
        ridge_counts.add(len(scene.ridges))
        for ridge in scene.ridges:
            assert ridge.base - ridge.extent >= cy + radius + RIDGE_SUN_GAP - 1e-9
            assert ridge.base + ridge.extent <= RIDGE_LOWEST_CREST + 1e-9
    assert ridge_counts == {1, 2, 3}


def test_canvas_grid_convention() -> None:
    """x grows with the column, y grows downwards with the row; pixel centres as documented."""
    grid = canvas_grid(48, 80)
    assert grid.shape == (2, 48, 80) and grid.dtype == torch.float32
    assert grid[0, 0, 0].item() == pytest.approx(-1 + 1 / 80)
    assert grid[0, 0, -1].item() == pytest.approx(1 - 1 / 80)
    assert grid[1, 0, 0].item() == pytest.approx(-1 + 1 / 48)
    assert grid[1, -1, 0].item() == pytest.approx(1 - 1 / 48)
    assert torch.all(grid[0, :, 1:] > grid[0, :, :-1]) and torch.all(grid[1, 1:] > grid[1, :-1])
    assert torch.all(grid[0, 1:] == grid[0, :-1]) and torch.all(grid[1, :, 1:] == grid[1, :, :-1])


def test_render_deterministic_range_and_shape() -> None:
    """Rendering is deterministic, float32 in [-1, 1], and honours non-square canvases."""
    scene = sample_scene(3)
    first, second = render_canvas(scene, 48, 80), render_canvas(scene, 48, 80)
    assert first.shape == (3, 48, 80) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert first.min().item() >= -1.0 and first.max().item() <= 1.0
    assert first.std().item() > 0.2  # not a flat image


def test_sky_on_top_mountains_at_the_bottom() -> None:
    """The top row is the sky gradient's top colour; the bottom rows take the front ridge colour."""
    scene = sample_scene(11)
    image = (render_canvas(scene, 64, 64, supersample=1) + 1) / 2
    front = torch.tensor(scene.ridges[-1].color).view(3, 1)
    assert torch.allclose(image[:, -1], front.expand(3, 64), atol=1e-6)
    top = torch.tensor(scene.sky_top).view(3, 1)
    assert torch.allclose(image[:, 0], top.expand(3, 64), atol=0.01)  # the sun never reaches the top row


def test_sun_is_never_occluded() -> None:
    """Every pixel whose footprint lies inside the sun disk has exactly the sun colour."""
    size, pixel = 64, 2.0 / 64
    grid = canvas_grid(size, size)
    for seed in range(40):
        scene = sample_scene(seed)
        (cx, cy) = scene.sun_center
        inside = torch.sqrt((grid[0] - cx) ** 2 + (grid[1] - cy) ** 2) < scene.sun_radius - pixel
        image = (render(scene, grid, (pixel, pixel)) + 1) / 2
        sun = torch.tensor(scene.sun_color).view(3, 1)
        assert inside.sum().item() > 20
        assert torch.allclose(image[:, inside], sun.expand(3, int(inside.sum())), atol=1e-6)


def test_render_is_resolution_consistent() -> None:
    """A 128^2 render area-averaged to 32^2 matches the 32^2 render; without anti-aliasing it does not."""
    for seed in range(6):
        scene = sample_scene(seed)
        fine = F.avg_pool2d(render_canvas(scene, 128, 128).unsqueeze(0), 4).squeeze(0)
        coarse = render_canvas(scene, 32, 32)
        aliased = render_canvas(scene, 32, 32, supersample=1)
        other = render_canvas(sample_scene(seed + 1000), 32, 32)
        assert (fine - coarse).abs().mean().item() < 0.005
        assert (fine - aliased).abs().mean().item() > 0.005
        assert (fine - other).abs().mean().item() > 0.05


def test_render_patch_equals_crop() -> None:
    """Rendering the sub-grid of a patch reproduces the crop of the full canvas."""
    scene = sample_scene(5)
    full = render_canvas(scene, 64, 64)
    patch_grid = canvas_grid(64, 64)[:, 8:40, 16:48]
    patch = render(scene, patch_grid, (2 / 64, 2 / 64))
    assert patch.shape == (3, 32, 32)
    assert torch.allclose(patch, full[:, 8:40, 16:48], atol=1e-6)
    shifted = render(scene, canvas_grid(64, 64)[:, 9:41, 16:48], (2 / 64, 2 / 64))
    assert not torch.allclose(shifted, full[:, 8:40, 16:48], atol=1e-3)


def test_render_rejects_bad_grid() -> None:
    """Grids must be [2, h, w]."""
    with pytest.raises(ValueError):
        render(sample_scene(0), torch.zeros(3, 4, 4), (0.5, 0.5))
