"""Coordinate grids, Fourier features, SAFA and the U-Net."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrdiff.grids import canvas_grid, crop_grid
from mrdiff.nn.coords import FourierFeatures, grid_spacing
from mrdiff.nn.safa import ScaleAwareConv2d
from mrdiff.nn.unet import Attention, ResBlock, UNet, norm_groups, timestep_embedding


def test_crop_grid_holds_exact_normalised_pixel_centres():
    grid = crop_grid(64, 64, top=8, left=20, height=4, width=3)
    assert grid.shape == (2, 4, 3)
    xs = torch.tensor([(2 * (20 + j) + 1) / 64 - 1 for j in range(3)])
    ys = torch.tensor([(2 * (8 + i) + 1) / 64 - 1 for i in range(4)])
    assert torch.allclose(grid[0], xs.expand(4, 3))
    assert torch.allclose(grid[1], ys[:, None].expand(4, 3))
    # pixel mode: centres in units of a 32-pixel side, whatever the canvas (here 64): x_j = (2j + 1)/32 − 1
    pixel = crop_grid(64, 64, 8, 20, 4, 3, mode="pixel", pixel_unit=32)
    assert pixel[0, 0].tolist() == [0.28125, 0.34375, 0.40625]
    assert pixel[1, :, 0].tolist() == [-0.46875, -0.40625, -0.34375, -0.28125]
    assert torch.equal(canvas_grid(32, 32, "pixel", pixel_unit=32), canvas_grid(32, 32))  # the two agree at U
    with pytest.raises(ValueError, match="pixel_unit"):
        crop_grid(64, 64, 8, 20, 4, 3, mode="pixel")


@pytest.mark.parametrize("mode", ["normalized", "pixel"])
def test_fourier_features_vary_across_a_patch_in_both_coordinate_modes(mode):
    """Integer pixel indices once made every log-spaced feature constant (sin 2π·k·j = 0): never again."""
    ff = FourierFeatures(num_frequencies=4, max_frequency=8.0)  # integer frequencies: the hard case
    for canvas in (32, 48, 64):
        top = left = (canvas - 32) // 2
        grid = crop_grid(canvas, canvas, top, left, 32, 32, mode=mode, pixel_unit=32)[None]
        features = ff(grid)[0]
        spread = features.flatten(1).std(dim=1).view(2, -1).amax(0)  # per frequency: its sin or its cos varies
        assert (spread > 0.3).all(), f"{mode} at {canvas}: constant frequencies {spread.tolist()}"


def _closest_other_column(ff: FourierFeatures, width: int = 64) -> tuple[float, float]:
    """Over the columns of a width-pixel canvas: the smallest feature distance between two columns at least
    a quarter canvas apart, and that distance for the columns half a canvas apart (x and x + 1)."""
    features = ff(canvas_grid(8, width)[None])[0, :, 0].T  # [width, 2F]: one feature vector per column
    dist = torch.cdist(features, features)
    far = (torch.arange(width)[:, None] - torch.arange(width)[None]).abs() >= width // 4
    return float(dist[far].min()), float(dist[torch.arange(width // 2), torch.arange(width // 2) + width // 2].max())


def test_fourier_features_tell_every_canvas_position_apart():
    """From 1 cycle per unit up (the default), integer frequencies repeat with period 1: x and x + 1 (the left
    and right halves of the canvas, or sky and ground) share all features. A floor of 0.25 does not."""
    default = FourierFeatures(num_frequencies=4, max_frequency=8.0)
    assert _closest_other_column(default)[1] < 1e-2  # the same features half a canvas apart (float error)
    closest, half = _closest_other_column(FourierFeatures(num_frequencies=4, max_frequency=8.0, min_frequency=0.25))
    assert closest > 0.25 and half > 1.0
    with pytest.raises(ValueError, match="min_frequency"):
        FourierFeatures(min_frequency=0.0)


def test_fourier_frequencies_travel_with_the_weights_and_old_checkpoints_keep_theirs():
    new = FourierFeatures(num_frequencies=4, max_frequency=8.0, min_frequency=0.25)
    assert torch.allclose(new.matrix[:4, 0], torch.tensor([0.25, 0.25 * 32 ** (1 / 3), 0.25 * 32 ** (2 / 3), 8.0]))
    old_style = FourierFeatures(num_frequencies=4, max_frequency=8.0, min_frequency=0.25)
    state = {k: v for k, v in new.state_dict().items() if k != "matrix"}  # a checkpoint from before the setting
    old_style.load_state_dict(state)
    assert torch.equal(old_style.matrix[:4, 0], torch.tensor([1.0, 2.0, 4.0, 8.0]))  # its training frequencies
    reloaded = FourierFeatures(num_frequencies=4, max_frequency=8.0, min_frequency=1.0)
    reloaded.load_state_dict(new.state_dict())
    assert torch.equal(reloaded.matrix, new.matrix)  # a saved matrix wins over the configured one


def test_full_canvas_spans_minus_one_to_one_and_crops_are_sub_grids():
    full = canvas_grid(96, 128)
    assert full[0].min() == pytest.approx(-1 + 1 / 128) and full[0].max() == pytest.approx(1 - 1 / 128)
    assert full[1].min() == pytest.approx(-1 + 1 / 96)
    assert torch.equal(crop_grid(96, 128, 10, 30, 32, 32), full[:, 10:42, 30:62])
    with pytest.raises(ValueError, match="outside"):
        crop_grid(64, 64, 40, 0, 32, 32)


def test_average_pooled_grid_is_the_coarser_canvas_grid():
    """The U-Net pools grids to each level: exact for pixel centres."""
    pooled = F.avg_pool2d(canvas_grid(64, 64)[None], 4)[0]
    assert torch.allclose(pooled, canvas_grid(16, 16), atol=1e-6)


def test_fourier_features_values_and_antialiasing():
    ff = FourierFeatures(num_frequencies=3, max_frequency=4.0, min_frequency=1.0, antialias=False)
    grid = canvas_grid(8, 8)[None]
    out = ff(grid)
    assert out.shape == (1, 12, 8, 8)
    # channel 1 is sin(2π·2·x), channel 3 is sin(2π·1·y)
    assert torch.allclose(out[0, 1], torch.sin(2 * math.pi * 2 * grid[0, 0]), atol=1e-5)
    assert torch.allclose(out[0, 3], torch.sin(2 * math.pi * grid[0, 1]), atol=1e-5)
    # antialiasing = the feature averaged over each pixel's footprint: compare with a 64×64 supersampled mean
    damped = FourierFeatures(num_frequencies=3, max_frequency=4.0, min_frequency=1.0)(grid)
    spacing = 2 / 8
    offsets = (torch.arange(64) + 0.5) / 64 - 0.5  # sub-pixel positions across one footprint
    for channel, (axis, freq) in {0: (0, 1.0), 1: (0, 2.0), 3: (1, 1.0), 4: (1, 2.0)}.items():
        coord = grid[0, axis][..., None] + spacing * offsets  # [8, 8, 64]
        numeric = torch.sin(2 * math.pi * freq * coord).mean(-1)
        assert torch.allclose(damped[0, channel], numeric, atol=2e-3), channel
    assert torch.allclose(damped[0, 2], torch.zeros(8, 8))  # 4 cycles per unit = 1 per pixel: averages to 0
    assert torch.allclose(grid_spacing(grid), torch.tensor([[spacing, spacing]]))


def test_safa_with_one_kernel_is_a_plain_conv():
    conv = ScaleAwareConv2d(5, 7, num_kernels=1)
    x = torch.randn(3, 5, 9, 9)
    ref = F.conv2d(x, conv.weight[0], conv.bias[0], padding=1)
    assert torch.allclose(conv(x, torch.tensor([0.1, 0.5, 0.9])), ref, atol=1e-5)
    assert torch.allclose(conv(x, torch.tensor([0.3])), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["grouped", "experts", "stacked", "auto"])
def test_safa_batched_per_sample_path_equals_a_loop(mode):
    torch.manual_seed(0)
    conv = ScaleAwareConv2d(6, 4, num_kernels=3, mode=mode)
    x, scale = torch.randn(5, 6, 8, 8), torch.randn(5)
    looped = torch.cat([conv(x[i : i + 1], scale[i : i + 1]) for i in range(5)])
    assert torch.allclose(conv(x, scale), looped, atol=1e-5)
    kernels = torch.einsum("k,koihw->oihw", conv.mixing_weights(scale[:1])[0], conv.weight)
    assert torch.allclose(looped[:1], F.conv2d(x[:1], kernels, (conv.mixing_weights(scale[:1]) @ conv.bias)[0],
                                               padding=1), atol=1e-5)


@pytest.mark.parametrize("size", [4, 12])  # "auto" runs stacked at 4×4 and grouped at 12×12
def test_safa_per_sample_paths_have_the_same_gradients(size):
    x, scale = torch.randn(5, 6, size, size), torch.randn(5)
    grads = {}
    for mode in ("grouped", "experts", "stacked", "auto"):
        torch.manual_seed(0)
        conv = ScaleAwareConv2d(6, 4, num_kernels=3, mode=mode)
        xi = x.clone().requires_grad_()
        (conv(xi, scale) * torch.linspace(-1, 1, 4 * size * size).reshape(4, size, size)).sum().backward()
        grads[mode] = [xi.grad] + [p.grad for p in conv.parameters()]
    for mode in ("experts", "stacked", "auto"):
        for ref, got in zip(grads["grouped"], grads[mode], strict=True):
            assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4), mode


def test_safa_kernel_depends_on_scale():
    conv = ScaleAwareConv2d(2, 2, num_kernels=4)
    w = conv.mixing_weights(torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(w.sum(-1), torch.ones(3)) and not torch.allclose(w[0], w[2])


def test_timestep_embedding_accepts_fractional_t():
    e = timestep_embedding(torch.tensor([10.0, 10.5, 11.0]), 32)
    assert e.shape == (3, 32)
    assert not torch.allclose(e[0], e[1]) and not torch.allclose(e[1], e[2])
    slow = [*range(6, 16), *range(22, 32)]  # channels of frequencies below 0.05: locally linear in t
    assert torch.allclose(e[1, slow], (e[0, slow] + e[2, slow]) / 2, atol=1e-3)


def small_unet(**kw):
    cfg = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), head_channels=16)
    return UNet(**(cfg | kw))


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (64, 64), (32, 64), (48, 16)])
def test_unet_with_coords_and_safa_runs_at_any_divisible_size(size):
    net = small_unet(coord_frequencies=3, safa_levels=(0, 1, 2))
    h, w = size
    x = torch.randn(2, 3, h, w)
    out = net(x, torch.tensor([5.0, 700.5]), canvas_grid(h, w), torch.tensor([float(h), float(w)]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_channels_last_unet_with_safa_gives_the_same_output():
    torch.manual_seed(0)
    net = small_unet(coord_frequencies=3, safa_levels=(1, 2), dropout=0.0)
    for p in net.parameters():  # move off the zero initialisation of output layers
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, scale = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 500.0]), torch.tensor([40.0, 64.0])
    ref = net(x, t, canvas_grid(32, 32), scale)
    net.to_channels_last()  # the 5-D SAFA kernel banks cannot be channels_last: they are left alone
    assert net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), t, canvas_grid(32, 32), scale)
    assert torch.allclose(out, ref, atol=1e-5)


def test_prepared_conditioning_gives_the_same_output_as_grid_and_scale():
    torch.manual_seed(0)
    net = small_unet(coord_frequencies=3, safa_levels=(0, 1, 2), dropout=0.0)
    for p in net.parameters():  # move off the zero initialisation of output layers
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 32, 48), torch.tensor([3.0, 250.5, 999.0])
    grid, scale = canvas_grid(32, 48)[None], torch.tensor([math.sqrt(32 * 48)])
    with torch.no_grad():
        prepared = net.prepare(grid, scale)
        assert len(prepared.scale) == 3 * 1 + 3 * 2 + 2  # a kernel per SAFA ResBlock: 1 down, 2 up per level, 2 mid
        ref = net(x, t, grid, scale)
        assert torch.allclose(net(x, t, prepared=prepared), ref, atol=1e-6)
        other = net.prepare(grid, torch.tensor([20.0]))
        assert not torch.allclose(net(x, t, prepared=other), ref, atol=1e-3)
    with pytest.raises(ValueError, match="one scale shared by the batch"):
        net.prepare(grid, torch.tensor([32.0, 48.0]))


def test_unet_conditioning_changes_the_output():
    torch.manual_seed(0)
    net = small_unet(coord_frequencies=3, safa_levels=(0,))
    for p in net.parameters():  # move off the zero initialisation of output layers
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([100.0])
    base = net(x, t, crop_grid(64, 64, 0, 0, 32, 32), 64.0)
    assert not torch.allclose(base, net(x, t, crop_grid(64, 64, 32, 32, 32, 32), 64.0))
    assert not torch.allclose(base, net(x, t, crop_grid(64, 64, 0, 0, 32, 32), 40.0))


def block_responses_to_t(net: UNet) -> list[float]:
    """Each ResBlock on its own (same input h): the change of its output between t = 100 and t = 900,
    relative to the output's size."""
    embs = [net.time_embed(timestep_embedding(torch.tensor([t]), net.base_channels)) for t in (100.0, 900.0)]
    out = []
    for block in (m for m in net.modules() if isinstance(m, ResBlock)):
        h = torch.randn(1, block.norm1.num_channels, 8, 8)
        a, b = (block(h, emb, None, None) for emb in embs)
        out.append(float((a - b).abs().max() / a.abs().max()))
    return out


@pytest.mark.parametrize("base", [16, 32, 64, 128])
def test_every_resblock_sees_the_timestep_at_every_width(base):
    """The time embedding is added per channel before a GroupNorm, which removes each group's mean: with one
    channel per group the network cannot see t at all (the CPU evidence models' defect, 16-32 channels)."""
    torch.manual_seed(0)
    shape = {"base_channels": base, "channel_mult": (1, 2), "attention_levels": ()}
    net = small_unet(**shape).eval()
    for p in net.parameters():  # move off the zero initialisation of output layers
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        assert min(block_responses_to_t(net)) > 0.01
        if base <= 16:  # the rule before norm_group_channels: 16 groups on 16 and 32 groups on 32 channels
            legacy = small_unet(**shape, norm_group_channels=1).eval()
            legacy.load_state_dict(net.state_dict())
            assert max(block_responses_to_t(legacy)) < 1e-5  # t-blind


def test_norm_groups_keep_ddpms_32_groups_where_channels_allow():
    assert [norm_groups(c, 4) for c in (16, 32, 64, 96, 128, 256)] == [4, 8, 16, 16, 32, 32]
    assert [norm_groups(c, 1) for c in (16, 32, 48, 64, 128)] == [16, 32, 16, 32, 32]  # gcd(32, c): the old rule


def test_unet_rejects_bad_sizes_and_levels_clearly():
    net = small_unet()
    with pytest.raises(ValueError, match="not divisible by the U-Net's downsampling factor 4"):
        net(torch.randn(1, 3, 30, 32), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"attention_levels \[3\] do not exist"):
        small_unet(attention_levels=(3,))
    with pytest.raises(ValueError, match="pass grid="):
        small_unet(coord_frequencies=2)(torch.randn(1, 3, 32, 32), torch.tensor([1.0]))


def test_sampling_outside_the_trained_scales_warns_once(capsys):
    from mrdiff.module import DiffusionModule

    net = UNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), head_channels=8)
    warn = DiffusionModule(net, train_scales=[32, 64], warmup_steps=1).pipeline.warn_outside_training_scales
    assert not warn(64, 64) and not warn(48, 32)
    assert warn(64, 128) and not warn(64, 128)
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "64x128" in out and "32..64" in out
    assert not DiffusionModule(net, warmup_steps=1).pipeline.warn_outside_training_scales(512, 512)  # unknown: silent


def _probe_attention(tokens: int, reference: int | None, d: int = 8) -> float:
    """Weight a query puts on the one key whose logit is log(reference) when every other key's logit is 0,
    read off an Attention layer with identity projections at `tokens` = side² positions."""
    layer = Attention(d, head_channels=d)
    layer.norm = torch.nn.Identity()
    eye = torch.eye(d)[:, :, None, None]
    gain = math.log(reference or 64) * math.sqrt(d)  # q·k / sqrt(d) = log(reference) for the unit target vector
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([gain * eye, eye, eye]))
        layer.qkv.bias.zero_()
        layer.proj.weight.copy_(eye)
        layer.proj.bias.zero_()
    layer.reference_tokens = reference
    side = math.isqrt(tokens)
    x = torch.zeros(1, d, side, side)
    x[0, 0, 0, 0] = 1.0  # the target token; all other tokens are zero vectors (logit 0, value 0)
    return float(layer(x)[0, 0, 0, 0] - 1.0)  # residual removed: the attention weight on the target


def test_scaled_attention_keeps_a_querys_attention_mass_at_larger_token_counts():
    n = 64  # 8² tokens, the level-2 count of a 32² training input
    trained = _probe_attention(n, reference=None)
    assert trained == pytest.approx(n / (2 * n - 1), abs=1e-4)  # e^log n / (e^log n + n - 1)
    plain = _probe_attention(4 * n, reference=None)  # 2R: the same logit, four times as many keys
    assert plain == pytest.approx(n / (n + 4 * n - 1), abs=1e-4)  # diluted from 0.50 to 0.20
    scaled = _probe_attention(4 * n, reference=n)
    assert scaled == pytest.approx(trained, abs=5e-3)  # log(4n)/log(n) restores the mass
    assert _probe_attention(n, reference=n) == trained  # at the training count nothing changes


def test_unet_scaled_attention_sets_each_levels_training_count_and_restores_it():
    net = small_unet(attention_levels=(1, 2)).eval()
    with net.scaled_attention(32):
        counts = sorted({(level, layer.reference_tokens) for level, layer in net.attention_layers()})
        assert counts == [(1, 256), (2, 64)]
    assert all(layer.reference_tokens is None for _, layer in net.attention_layers())
    torch.manual_seed(0)
    for p in net.parameters():  # move off the zero initialisation of output layers
        p.data.add_(0.05 * torch.randn_like(p))
    t = torch.tensor([500.0])
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        plain = net(x, t)
        with net.scaled_attention(32):  # the training size: every count matches, the output is unchanged
            assert torch.equal(net(x, t), plain)
        x = torch.randn(1, 3, 64, 64)
        plain = net(x, t)
        with net.scaled_attention(32):
            assert not torch.allclose(net(x, t), plain, atol=1e-4)


def test_sampling_settings_switch_scaled_attention_on_at_the_training_side_only():
    from mrdiff.diffusion.samplers import SamplingSettings
    from mrdiff.module import DiffusionModule

    torch.manual_seed(0)
    net = small_unet(dropout=0.0)
    for p in net.parameters():  # move off the zero initialisation of output layers
        p.data.add_(0.05 * torch.randn_like(p))
    module = DiffusionModule(net, train_resolution=16, warmup_steps=1).eval()
    plain, scaled = (SamplingSettings(steps=3, attention_scaling=flag) for flag in (False, True))
    assert str(scaled) == "ddim-3, scaled attention"
    with torch.no_grad():
        sample = module.pipeline.sample
        assert torch.equal(sample([0, 1], 16, sampling=scaled), sample([0, 1], 16, sampling=plain))
        big = sample([0, 1], 32, sampling=plain)
        assert not torch.allclose(sample([0, 1], 32, sampling=scaled), big, atol=1e-4)
    assert all(layer.reference_tokens is None for _, layer in net.attention_layers())  # restored after sampling


def test_shipped_weights_from_before_the_frequency_floor_keep_their_coordinates_and_their_quality():
    """models/multires/seed0.pt was trained with frequencies 1, 2, 4, 8 and saved without them: it must reload
    with those, and sampling shows why (the same weights on other frequencies lose the sun)."""
    from pathlib import Path

    from mrdiff.diffusion.samplers import SamplingSettings
    from mrdiff.exported import load
    from mrdiff.metrics.structure import sun_counts

    model, _ = load(Path(__file__).parents[1] / "models/multires/seed0.pt")
    assert torch.equal(model.net.coords.matrix[:4, 0], torch.tensor([1.0, 2.0, 4.0, 8.0]))
    sampling = SamplingSettings(steps=25, eta=1.0)
    with torch.no_grad():
        own = (sun_counts(model.sample(range(32), 32, sampling=sampling)) == 1).mean()
        model.net.coords.matrix.copy_(FourierFeatures(num_frequencies=4, max_frequency=8.0, min_frequency=0.25).matrix)
        other = (sun_counts(model.sample(range(32), 32, sampling=sampling)) == 1).mean()
    assert own >= 0.8 and other <= own - 0.3, (own, other)
