"""The multi-resolution patch sampler, the collate function and the data module."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.data.images import ImageFolder
from mrdiff.data.order import ResumableSampler
from mrdiff.data.patches import PatchCollate, PatchSampler, resize
from mrdiff.data.synthetic import render_canvas, sample_scene
from mrdiff.grids import canvas_grid


def test_scale_distribution_half_at_s_min_rest_uniform():
    sampler = PatchSampler(s_min=64, s_max=128, patch_size=64)
    gen = torch.Generator().manual_seed(0)
    scales = np.array([sampler.draw_scale(gen) for _ in range(20_000)])
    assert scales.min() == 64 and scales.max() == 128
    # P(s_min) = 0.5 + 0.5/65 (the uniform part can also land on s_min)
    p = 0.5 + 0.5 / 65
    assert abs((scales == 64).mean() - p) < 4 * np.sqrt(p * (1 - p) / len(scales))
    counts = np.bincount(scales[scales > 64] - 65, minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over 65..128


def test_crop_positions_are_uniform_and_inside():
    sampler = PatchSampler(s_min=40, s_max=40, patch_size=32)
    gen = torch.Generator().manual_seed(1)
    tops = np.array([sampler.draw_crop(40, gen)[0] for _ in range(9000)])
    assert tops.min() == 0 and tops.max() == 8
    assert stats.chisquare(np.bincount(tops, minlength=9)).pvalue > 1e-3


def test_patch_grid_is_the_crop_of_the_rescaled_image_grid():
    sampler = PatchSampler(s_min=48, s_max=96, patch_size=32)
    assert torch.equal(sampler.grid(80, 10, 37), canvas_grid(80, 80)[:, 10:42, 37:69])
    image = torch.rand(3, 128, 128) * 2 - 1
    patch = sampler.cut(image, 80, 10, 37)
    assert torch.allclose(patch, resize(image, 80, 80)[:, 10:42, 37:69])


def test_synthetic_patch_is_rendered_at_the_drawn_scale():
    scene = sample_scene(3)
    sampler = PatchSampler(s_min=32, s_max=64, patch_size=32)
    assert torch.allclose(sampler.cut(scene, 64, 16, 8), render_canvas(scene, 64, 64)[:, 16:48, 8:40], atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"s_min": 32, "s_max": 64, "patch_size": 48}, "patch_size <= s_min <= s_max"),
    ({"s_min": 64, "s_max": 32, "patch_size": 32}, "patch_size <= s_min <= s_max"),
    ({"s_min": 0, "s_max": 32, "patch_size": 32}, "must be positive"),
])
def test_impossible_patch_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchSampler(**kwargs)


def test_collate_per_sample_and_per_batch_scales():
    items = [(1000 + i, sample_scene(i)) for i in range(6)]
    sampler = PatchSampler(s_min=32, s_max=64, patch_size=32, p_min=0.0)
    per_sample = PatchCollate(sampler, size=64)(items)
    assert per_sample["image"].shape == (6, 3, 32, 32) and per_sample["grid"].shape == (6, 2, 32, 32)
    assert per_sample["scale"].shape == (6,) and len(set(per_sample["scale"].tolist())) > 1
    shared = PatchCollate(sampler, size=64, per_batch_scale=True)(items)
    assert shared["scale"].shape == (1,)
    again = PatchCollate(sampler, size=64)(items)
    assert torch.equal(again["image"], per_sample["image"])  # draws are a function of the item seeds


def test_resumable_sampler_shards_resumes_and_varies_by_epoch():
    data = list(range(20))
    ranks = [ResumableSampler(data, batch_size=2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    shards = [list(s) for s in ranks]
    assert not {i for i, _ in shards[0]} & {i for i, _ in shards[1]}  # disjoint DDP shards
    assert len({seed for shard in shards for _, seed in shard}) == 20  # every position its own seed
    straight = list(ResumableSampler(data, batch_size=4, seed=0))
    resumed = ResumableSampler(data, batch_size=4, seed=0)
    resumed.skip(epoch=0, batches=2)
    assert list(resumed) == straight[8:]
    assert list(resumed) == straight  # the skip applies once
    resumed.set_epoch(1)
    assert list(resumed) != straight


def test_fixed_mode_gives_whole_images_with_the_canvas_grid():
    dm = MultiResDataModule(multires=False, image_size=32, batch_size=4, num_workers=0, num_scenes=8, num_val=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].abs().max() <= 1
    assert torch.equal(batch["grid"][0], canvas_grid(32, 32)) and batch["scale"].tolist() == [32.0]


def write_images(root, n=6, size=80):
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    for i in range(n):
        array = rng.integers(0, 255, (size, size + 10, 3), dtype=np.uint8)
        folder = root / "a" / "b" if i % 2 else root
        Image.fromarray(array).save(folder / f"img{i}.{'png' if i % 3 else 'jpg'}")
    (root / "notes.txt").write_text("not an image")


def test_folder_source_finds_nested_images_and_ignores_other_files(tmp_path):
    write_images(tmp_path)
    dataset = ImageFolder(tmp_path, size=64)
    assert len(dataset) == 6 and dataset.ignored_files == 1
    assert dataset[0].shape == (3, 64, 64)
    dm = MultiResDataModule(source="folder", root=str(tmp_path), image_size=64, s_min=32, s_max=64,
                            patch_size=32, batch_size=2, num_workers=0, num_val=1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    refs = next(dm.reference_images(48, 48, 3))
    assert refs.shape == (3, 3, 48, 48)


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_batches_do_not_depend_on_the_number_of_workers(source, tmp_path):
    """Scales, crops and images are drawn from (seed, epoch, position), not from a worker's RNG state."""
    if source == "folder":
        write_images(tmp_path, n=16)
    batches = {}
    for workers in (0, 2):
        dm = MultiResDataModule(source=source, root=str(tmp_path) if source == "folder" else None,
                                image_size=64, s_min=32, s_max=64, patch_size=32, batch_size=4,
                                num_workers=workers, num_scenes=12, num_val=2)
        dm.setup()
        batches[workers] = [b for _, b in zip(range(3), dm.train_dataloader())]
    for plain, parallel in zip(batches[0], batches[2]):
        assert plain.keys() == parallel.keys()
        for key in plain:
            assert torch.equal(plain[key], parallel[key]), key
    assert not torch.equal(batches[0][0]["image"], batches[0][1]["image"])  # and the batches do differ


def test_a_share_of_batches_holds_whole_canvases_at_the_listed_sides():
    sampler = PatchSampler(s_min=32, s_max=64, patch_size=32, canvas_fraction=0.25, canvas_sizes=(48, 64))
    collate = PatchCollate(sampler, size=64)
    sides = []
    for b in range(400):
        items = [(10_000 * b + i, sample_scene(i)) for i in range(2)]
        side = sampler.draw_canvas(torch.Generator().manual_seed(items[0][0] + 2))
        sides.append(side)
        if side is None or b % 20:
            continue
        batch = collate(items)  # a whole canvas: the ground-truth render, the canvas grid, one scale
        assert torch.allclose(batch["image"][1], render_canvas(items[1][1], side, side), atol=1e-6)
        assert torch.equal(batch["grid"][0], canvas_grid(side, side)) and batch["scale"].tolist() == [float(side)]
    share = sum(s is not None for s in sides) / len(sides)
    assert abs(share - 0.25) < 1.96 * (0.25 * 0.75 / 400) ** 0.5 * 1.5  # binomial: 0.25 ± 0.064
    assert {s for s in sides if s is not None} == {48, 64}
    assert PatchCollate(PatchSampler(32, 64, 32), size=64)(items)["image"].shape[-1] == 32  # default: patches
    with pytest.raises(ValueError, match="canvas_sizes"):
        PatchSampler(32, 64, 32, canvas_fraction=0.5)
    with pytest.raises(ValueError, match="lie in"):
        PatchSampler(32, 64, 32, canvas_fraction=0.5, canvas_sizes=(96,))


def test_the_curves_script_counts_the_pixels_the_patch_draws_give():
    """`mrdiff evidence curves` compares fits by training pixels: its per-step count is the mean of the
    sampler's own canvas draws (a quarter of the batches whole 64² canvases: 1.75× a patch batch's pixels),
    and a fixed model's batch is whole scenes at train_size."""
    import yaml

    from mrdiff.evidence import curves as script
    from tests.conftest import ROOT
    configs = ROOT / "results" / "evidence" / "cpu_fits_remedy"
    canvases = yaml.safe_load((configs / "canvas25.config.yaml").read_text())["data"]
    fixed = yaml.safe_load((configs / "fixed.config.yaml").read_text())["data"]
    sampler = PatchSampler(canvases["s_min"], canvases["s_max"], canvases["patch_size"],
                           canvas_fraction=canvases["canvas_fraction"], canvas_sizes=tuple(canvases["canvas_sizes"]))
    sides = [sampler.draw_canvas(torch.Generator().manual_seed(seed)) or canvases["patch_size"] for seed in range(4000)]
    drawn = canvases["batch_size"] * sum(side**2 for side in sides) / len(sides)
    assert script.pixels_per_step(canvases) == pytest.approx(drawn, rel=0.04)  # 3σ of 4,000 draws: 3.5%
    assert script.pixels_per_step(fixed) == 32 * 32**2
    assert script.pixels_per_step(canvases) / script.pixels_per_step(fixed) == pytest.approx(1.75)


def test_pixel_coordinates_share_one_unit_in_patches_whole_canvases_and_inference():
    """coord_mode=pixel: the training patch side is the unit everywhere, so pixel (i, j) of a 32² canvas gets
    the same coordinate in a 16² patch cut from it, in a whole-canvas batch and at inference:
    x_j = (2j + 1)/16 − 1, from −15/16 at the first pixel to 47/16 at the last."""
    from mrdiff.data.synthetic import sample_scene
    from mrdiff.module import DiffusionModule
    from mrdiff.nn.unet import UNet

    sampler = PatchSampler(32, 32, 16, coord_mode="pixel", canvas_fraction=1.0, canvas_sizes=(32,))
    collate = PatchCollate(sampler, size=16, coord_mode="pixel")
    canvas = collate.whole([sample_scene(0)], 32)["grid"][0]
    patch = sampler.grid(32, 8, 12)  # rows 8..23, columns 12..27 of the 32² canvas
    net = UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), coord_frequencies=2)
    module = DiffusionModule(net, coord_mode="pixel", train_resolution=16, warmup_steps=1)
    inference = module.pipeline.canvas_inputs(32, 32)[0][0]
    assert torch.equal(canvas, inference)
    assert torch.equal(patch, canvas[:, 8:24, 12:28])
    assert canvas[0, 0, 0] == -15 / 16 and canvas[0, 0, 31] == 47 / 16 and canvas[1, 31, 0] == 47 / 16
