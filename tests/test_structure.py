"""Tests of the structure score: sun detection, ground-truth agreement and collapse detection."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrdiff.data.synthetic import reference_radii, render_canvas, sample_scene
from mrdiff.metrics.structure import (
    StructureScore,
    Sun,
    detect_suns,
    stacked_horizons,
    structure_score,
    sun_mask,
)


@pytest.fixture(scope="module")
def ref() -> list[float]:
    """Ground-truth radii of the data distribution."""
    return reference_radii(1000)


def _renders(size: int, count: int, first_seed: int = 0) -> torch.Tensor:
    """Clean renders ``[count, 3, size, size]`` of consecutive scenes."""
    return torch.stack([render_canvas(sample_scene(first_seed + i), size, size) for i in range(count)])


def _tiled(count: int) -> torch.Tensor:
    """``count`` 64^2 canvases, each four 32^2 scenes tiled 2x2 (what a collapsed model tends to draw)."""
    tiles = _renders(32, 4 * count, first_seed=500).view(count, 4, 3, 32, 32)
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def test_sun_mask_colours() -> None:
    """Sun colours are sun-like; sky, mountains, white, grey and pure red are not."""
    colours = torch.tensor(
        [[1.0, 0.85, 0.3], [0.96, 0.78, 0.32], [0.5, 0.7, 0.9], [0.2, 0.4, 0.7], [0.1, 0.2, 0.15]]
        + [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [1.0, 0.1, 0.1]]
    )
    image = (colours.T.reshape(1, 3, 1, -1) * 2 - 1).contiguous()
    assert sun_mask(image).squeeze().tolist() == [True, True, False, False, False, False, False, False]
    as_uint8 = ((image + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(sun_mask(as_uint8), sun_mask(image))


def test_scene_colours_never_trigger_the_mask() -> None:
    """Only the sun disk (and its anti-aliased rim) is detected in a clean render."""
    for seed in range(20):
        scene = sample_scene(seed)
        no_sun = dataclasses.replace(scene, sun_radius=0.0)
        assert not sun_mask(render_canvas(no_sun, 64, 64).unsqueeze(0)).any()
        assert detect_suns(render_canvas(no_sun, 64, 64)) == []


@pytest.mark.parametrize("size", [64, 128])
def test_detection_matches_ground_truth(size: int) -> None:
    """Detected centre within a pixel and radius within 5% of the scene's values."""
    pixel = 2.0 / size
    for seed in range(20):
        scene = sample_scene(seed)
        suns = detect_suns(render_canvas(scene, size, size))
        assert len(suns) == 1 and isinstance(suns[0], Sun)
        (x, y), (cx, cy) = suns[0].center, scene.sun_center
        assert abs(x - cx) < pixel and abs(y - cy) < pixel
        assert suns[0].radius == pytest.approx(scene.sun_radius, rel=0.05)
        assert suns[0].is_round


def test_detection_on_non_square_canvas() -> None:
    """Radius and centre stay in canvas units on a 48x80 canvas, and the squeezed disk counts as round."""
    scene = sample_scene(4)
    suns = detect_suns(render_canvas(scene, 48, 80))
    assert len(suns) == 1
    assert suns[0].radius == pytest.approx(scene.sun_radius, rel=0.05)
    assert suns[0].center[0] == pytest.approx(scene.sun_center[0], abs=2 / 80)
    assert suns[0].center[1] == pytest.approx(scene.sun_center[1], abs=2 / 48)
    assert suns[0].is_round


@pytest.mark.parametrize("size", [32, 64, 128])
def test_score_of_ground_truth(size: int, ref: list[float]) -> None:
    """Clean renders have exactly one round sun of the reference size, in the sky, above a horizon."""
    score = structure_score(_renders(size, 64, first_seed=2000), reference_radii=ref, resolution=f"{size}")
    assert isinstance(score, StructureScore) and score.num_images == 64
    assert score.one_sun_rate >= (0.98 if size == 32 else 1.0)
    assert score.mean_num_suns == pytest.approx(1.0, abs=0.02)
    assert score.radius_error < 0.05
    assert score.radius_std == pytest.approx(score.radius_ref_std, rel=0.25)
    assert score.radius_in_range_rate == 1.0 and score.round_rate >= 0.95
    assert score.sun_in_sky_rate == 1.0 and score.horizon_rate == 1.0
    assert score.as_dict()["resolution"] == f"{size}"


def test_score_catches_tiled_collapse(ref: list[float]) -> None:
    """2x2 tiled scenes: four half-size suns per image, half of them low on the canvas."""
    score = structure_score(_tiled(32), reference_radii=ref, resolution="64")
    assert score.one_sun_rate == 0.0
    assert score.mean_num_suns == pytest.approx(4.0, abs=0.2)
    assert score.radius_error > 0.4
    assert score.radius_mean / score.radius_ref_mean == pytest.approx(0.5, abs=0.08)
    assert score.radius_in_range_rate < 0.2
    assert score.sun_in_sky_rate == pytest.approx(0.5, abs=0.1)


def test_noise_has_no_suns(ref: list[float]) -> None:
    """Uniform and Gaussian noise give no sun at all (speckle is rejected), and radii are undefined."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(16, 3, 128, 128, generator=generator) * 2 - 1
    gaussian = torch.randn(16, 3, 128, 128, generator=generator).clamp(-1, 1)
    for images in (uniform, gaussian):
        assert sun_mask(images).float().mean().item() > 0.05  # plenty of sun-coloured pixels...
        score = structure_score(images, reference_radii=ref, resolution="128")
        assert score.mean_num_suns == 0.0 and score.no_sun_rate == 1.0  # ...but no sun
        assert math.isnan(score.radius_mean) and math.isnan(score.round_rate)


def test_stretched_sun_is_not_round() -> None:
    """A sun stretched to twice its width fails the roundness check."""
    image = render_canvas(sample_scene(1), 64, 64).unsqueeze(0)
    stretched = F.interpolate(image, size=(64, 128), mode="bilinear", align_corners=False)
    crop = stretched[:, :, :, 32:96]  # a square canvas holding an elliptic sun
    suns = detect_suns(crop[0])
    assert len(suns) == 1 and suns[0].aspect > 1.8 and not suns[0].is_round


def test_uint8_and_float_inputs_agree(ref: list[float]) -> None:
    """Scores of float images in [-1, 1] and their uint8 versions coincide closely."""
    images = _renders(64, 8)
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    a = structure_score(images, reference_radii=ref, resolution="64")
    b = structure_score(as_uint8, reference_radii=torch.tensor(ref), resolution="64")
    assert a.one_sun_rate == b.one_sun_rate == 1.0
    assert a.radius_mean == pytest.approx(b.radius_mean, rel=0.01)


def test_reference_radii_are_ground_truth() -> None:
    """Reference radii come from the scene sampler."""
    radii = reference_radii(10, seed=3)
    assert radii == [sample_scene(3 + i).sun_radius for i in range(10)]


def test_duplicate_diagnosis_splits_one_sun_from_an_added_small_sun():
    """`mrdiff evidence diagnose`: ground truth counts one sun each; pasting a second scene's smaller
    sun into a canvas counts as 'several', with the small one as the other sun."""
    from mrdiff.evidence import diagnose as script
    scenes = [sample_scene(i) for i in range(40)]
    truth = torch.stack([render_canvas(s, 64, 64) for s in scenes])
    modes = script.failure_modes(truth)
    assert modes["one_sun"]["value"] == 1.0 and modes["at_edge"]["value"] == 0.0
    assert modes["several_suns"]["n"] == 40 and modes["other_radius"]["n"] == 0  # no others: an empty cell
    big = max(range(40), key=lambda i: scenes[i].sun_radius)
    gap = [math.dist(scenes[big].sun_center, s.sun_center) - scenes[big].sun_radius - s.sun_radius for s in scenes]
    apart = [i for i in range(40) if gap[i] > 0.1]  # disks clear of the big one's: two separate suns
    small = min(apart, key=lambda i: scenes[i].sun_radius)
    composite = torch.where(sun_mask(truth[small : small + 1])[:, None], truth[small : small + 1], truth[big : big + 1])
    two = script.failure_modes(composite)
    assert two["several_suns"]["value"] == 1.0 and two["suns_per_image"]["value"] == 2.0
    assert two["other_radius"]["value"] == pytest.approx(scenes[small].sun_radius, abs=0.02)
    assert two["largest_radius"]["value"] == pytest.approx(scenes[big].sun_radius, abs=0.02)


def test_stacked_horizons_are_sky_bands_below_a_ridge_and_never_in_the_data():
    """Going down a rendered column the luma rarely rises again below the first ridge (a nearer ridge can be
    a little lighter than a farther one): no image of the data stacks horizons. A band of the image's own
    sky pasted into its ground (the bottom fifth is always mountain) is a second horizon in every column."""
    truth = torch.stack([render_canvas(sample_scene(i), 64, 64) for i in range(40)])
    assert stacked_horizons(truth).mean() < 0.02 and stacked_horizons(truth).max() < 0.25  # 0.009, 0.20 here
    tiled = truth.clone()
    tiled[:, :, 54:60] = truth[:, :, 0:6]  # the top rows are sky (and maybe sun), rows ≥ 52 are ground
    shares = stacked_horizons(tiled)
    assert shares.mean() > 0.8 and (shares > 0.25).all()
    assert stacked_horizons(truth[0]).shape == (1,)
    # the score's rate counts images over STACKED_COLUMNS: 15 tiled of 40 is 0.375, the renders alone 0
    radii = reference_radii(100)
    mixed = torch.cat([tiled[:15], truth[15:]])
    assert structure_score(mixed, reference_radii=radii, resolution="64").stacked_horizon_rate == 15 / 40
    assert structure_score(truth, reference_radii=radii, resolution="64").stacked_horizon_rate == 0.0


def _one_sun_scan(radii: np.ndarray):
    from mrdiff.metrics.structure import ImageScan, Sun

    suns = [[Sun(center=(0.0, -0.5), radius=float(r), area=10, fill=1.0, aspect=1.0)] for r in radii]
    return ImageScan(suns, np.ones(len(radii), dtype=bool), np.zeros(len(radii), dtype=bool))


def test_radius_error_carries_a_bootstrap_interval_of_the_normal_width():
    """Suns of one radius give a point interval at |r − ref| / ref; radii of s.d. σ around a mean 20% above the
    reference give an interval about the point value whose width is the normal one, 2·1.96·σ/(√n·ref)."""
    from mrdiff.evaluation.scores import structure_metrics

    reference = [0.1] * 50 + [0.3] * 50  # mean 0.2
    same = structure_metrics(_one_sun_scan(np.full(40, 0.25)), reference, "64")
    assert same["radius_error"] == pytest.approx(0.25) and same["radius_error_lo"] == pytest.approx(0.25)
    assert same["radius_error_hi"] == pytest.approx(0.25)
    rng = np.random.default_rng(3)
    n, sigma = 400, 0.05
    radii = 0.24 + sigma * rng.standard_normal(n)
    cell = structure_metrics(_one_sun_scan(radii), reference, "64")
    assert cell["radius_error"] == pytest.approx(abs(radii.mean() - 0.2) / 0.2)
    assert cell["radius_error_lo"] < cell["radius_error"] < cell["radius_error_hi"]
    width = 2 * 1.96 * radii.std() / np.sqrt(n) / 0.2
    assert cell["radius_error_hi"] - cell["radius_error_lo"] == pytest.approx(width, rel=0.15)


def test_radius_error_interval_survives_resamples_without_a_sun():
    """One sun in 100 images: about a third of the bootstrap resamples hold none; the interval is still the
    single radius's error (a point), not NaN."""
    from mrdiff.evaluation.scores import structure_metrics
    from mrdiff.metrics.structure import ImageScan

    found = _one_sun_scan(np.array([0.3]))
    found = ImageScan(found.suns + [[] for _ in range(99)], np.ones(100, dtype=bool), np.zeros(100, dtype=bool))
    cell = structure_metrics(found, [0.2], "64")
    assert cell["radius_error"] == pytest.approx(0.5)
    assert cell["radius_error_lo"] == pytest.approx(0.5) and cell["radius_error_hi"] == pytest.approx(0.5)
