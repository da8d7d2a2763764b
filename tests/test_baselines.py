"""The training-free baselines (mrdiff.baselines): each one's defining property, with numbers."""

import pytest
import torch
import torch.nn.functional as F

from mrdiff.baselines import (
    Redenoise,
    Redilation,
    WindowFusion,
    dilation_factor,
    parse_method_args,
    upsample,
)
from mrdiff.diffusion.samplers import (
    PerSampleNoise,
    SamplingSettings,
    ddim_sample,
    ddpm_sample,
    dpm_solver_pp_2m_sample,
)
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.diffusion.windows import fused_eps, window_starts
from mrdiff.nn.safa import ScaleAwareConv2d
from mrdiff.nn.unet import UNet
from mrdiff.pipeline import DiffusionPipeline
from tests.test_diffusion import gaussian_oracle

R = 16


def tiny_net(**kw) -> UNet:
    """Two levels (16 and 8 px at R), attention and SAFA on the deepest, coordinates: every layer kind."""
    cfg = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=8,
               dropout=0.0, coord_frequencies=2, safa_levels=(1,), scale_ref=16.0)
    torch.manual_seed(0)
    net = UNet(**(cfg | kw)).eval()
    for p in net.parameters():  # off the zero initialisation of output layers, so samples depend on the network
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def tiny_pipeline(kind: str = "linear", **kw) -> DiffusionPipeline:
    return DiffusionPipeline(tiny_net(**kw), NoiseSchedule(kind=kind), train_resolution=R)


def up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


DDIM4 = SamplingSettings("ddim", 4)


def record_forward(net: UNet, calls: list) -> None:
    """Record (side, t fed) of each network call (the pipeline calls net.forward, so hooks would not see it)."""
    forward = net.forward

    def recorded(x, t, *args, **kwargs):
        calls.append((tuple(x.shape[-2:]), round(float(t.reshape(-1)[0]))))
        return forward(x, t, *args, **kwargs)

    net.forward = recorded


# -- re-dilation ------------------------------------------------------------------------------------------
def test_redilation_factor_rounds_side_over_r_halves_up():
    assert [dilation_factor(s, 16) for s in (8, 16, 20, 24, 32, 40, 48)] == [1, 1, 1, 2, 2, 3, 3]


def test_redilation_at_the_training_size_changes_nothing():
    pipe = tiny_pipeline()
    plain = pipe.sample([0, 1], R, sampling=DDIM4)
    dilated = pipe.sample([0, 1], R, sampling=DDIM4, method=Redilation(levels=(0, 1), share=1.0))
    assert torch.equal(dilated, plain)
    assert not torch.equal(pipe.sample([0, 1], 2 * R, sampling=DDIM4, method=Redilation()),
                           pipe.sample([0, 1], 2 * R, sampling=DDIM4))


def test_a_redilated_conv_on_an_upsampled_input_is_the_upsampled_output():
    """Every dilated 3×3 conv (plain and SAFA) sees at 2R, through dilation 2, what it saw at R: on a 2× nearest-
    upsampled input its output is the 2× upsampled output of the undilated conv, at every pixel, borders included."""
    net = tiny_net()
    convs = list(net.dilatable_convs((-1,)))
    assert len(convs) == 11  # deepest level: 1 down ResBlock, 2 middle, 2 up (2 convs each), 1 upsampling conv
    assert sum(isinstance(c, ScaleAwareConv2d) for c in convs) == 5  # the SAFA conv2 of the 5 ResBlocks
    scale = net.normalised_scale(torch.tensor([32.0]), torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        inputs = [torch.randn(2, c.in_channels, 8, 8) for c in convs]
        calls = [(lambda x, c=c: c(x, scale)) if isinstance(c, ScaleAwareConv2d) else c for c in convs]
        at_r = [call(x) for call, x in zip(calls, inputs)]
        with net.redilated((-1,), (2, 2)):
            assert all(tuple(c.dilation) == tuple(c.padding) == (2, 2) for c in convs)
            at_2r = [call(up2(x)) for call, x in zip(calls, inputs)]
        undilated = [call(up2(x)) for call, x in zip(calls, inputs)]
    assert all(c.dilation in ((1, 1), 1) and c.padding in ((1, 1), 1) for c in convs)  # restored
    for small, big, plain in zip(at_r, at_2r, undilated):
        assert torch.allclose(big, up2(small), atol=1e-5)
        assert (plain - up2(small)).abs().max() > 1e-2  # undilated, the conv sees half the context


def test_the_redilated_middle_block_on_an_upsampled_input_is_the_upsampled_output():
    """A whole dilated stage (ResBlock, attention, ResBlock; GroupNorm and attention are invariant to nearest
    upsampling): at 2R it computes what it did at R, so its receptive field in canvas units is R's."""
    net = tiny_net(coord_frequencies=0, safa_levels=())
    emb = net.time_embed(torch.randn(1, net.base_channels))
    h = torch.randn(1, 16, 8, 8)

    def mid(x):
        x = net.mid.attention[0](net.mid.blocks[0](x, emb, None, None))
        return net.mid.blocks[1](x, emb, None, None)

    with torch.no_grad():
        small = mid(h)
        with net.redilated((-1,), (2, 2)):
            big = mid(up2(h))
        plain = mid(up2(h))
    assert torch.allclose(big, up2(small), atol=1e-4)
    assert (plain - up2(small)).abs().max() > 1e-2


@pytest.mark.parametrize(("sampling", "share", "dilated"), [(SamplingSettings("ddim", 10), 0.4, 4),
                                                            (SamplingSettings("dpmpp_2m", 5), 0.5, 3),
                                                            (SamplingSettings("ddim", 10), 0.0, 0)])
def test_redilation_is_on_for_its_share_of_the_steps_only(sampling, share, dilated):
    pipe = tiny_pipeline()
    seen = []
    conv = pipe.net.mid.blocks[0].conv1
    hook = conv.register_forward_hook(lambda module, args, out: seen.append(tuple(module.dilation)))
    pipe.sample([0], 2 * R, sampling=sampling, method=Redilation(share=share))
    hook.remove()
    assert seen == [(2, 2)] * dilated + [(1, 1)] * (sampling.steps - dilated)
    seen.clear()
    hook = conv.register_forward_hook(lambda module, args, out: seen.append(tuple(module.dilation)))
    pipe.sample([0], 2 * R, R, sampling=sampling, method=Redilation(share=share))  # 2R × R: dilated along H only
    hook.remove()
    assert seen[:dilated] == [(2, 1)] * dilated


# -- window fusion ----------------------------------------------------------------------------------------
def test_window_starts_cover_the_side_with_the_last_window_at_the_edge():
    assert window_starts(64, 32, 16) == [0, 16, 32]
    assert window_starts(48, 32, 16) == [0, 16]
    assert window_starts(40, 32, 16) == [0, 8]  # the last window moved back to the edge
    assert window_starts(32, 32, 16) == window_starts(24, 32, 16) == [0]
    with pytest.raises(ValueError, match="stride"):
        window_starts(64, 32, 40)
    assert window_starts(16, 16, 20) == [0]  # a side within one window needs no stride


def test_window_fusion_gives_a_pixel_the_mean_of_the_windows_covering_it():
    """ε of a 16-px window = 2x + column + 100·row (in the window's own pixels); windows every 8 px on 24 px."""

    def window_eps(x, t):
        rows, cols = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
        return 2 * x + cols + 100 * rows + t.view(-1, 1, 1, 1)

    x, t = torch.randn(2, 1, 24, 24), torch.tensor([3.0, 5.0])
    out = fused_eps(window_eps, 24, 24, (16, 16), 8)(x, t)
    own = out - 2 * x - t.view(-1, 1, 1, 1)
    assert own[0, 0, 0, 3] == 3  # one window (columns 0-15, rows 0-15)
    assert own[0, 0, 0, 10] == (10 + 2) / 2  # windows from columns 0 and 8: in-window columns 10 and 2
    assert own[0, 0, 0, 20] == 12  # the window from column 8 only
    assert own[1, 0, 12, 12] == (12 + 4) / 2 + 100 * (12 + 4) / 2  # four windows: mean of 12 and 4 on each axis
    assert own[1, 0, 20, 5] == 5 + 100 * 12
    assert fused_eps(window_eps, 16, 16, (16, 16), 8) is window_eps  # one window over the canvas: ε itself


def test_window_fusion_over_one_window_is_plain_sampling():
    pipe = tiny_pipeline()
    for sampling in (DDIM4, SamplingSettings("dpmpp_2m", 3)):
        assert torch.equal(pipe.sample([0, 1], R, sampling=sampling, method=WindowFusion()),
                           pipe.sample([0, 1], R, sampling=sampling))


def test_window_fusion_feeds_each_window_as_a_training_size_canvas():
    pipe, calls, grids = tiny_pipeline(), [], []
    record_forward(pipe.net, calls)
    prepare = pipe.net.prepare
    pipe.net.prepare = lambda grid, scale: (grids.append((tuple(grid.shape), float(scale))), prepare(grid, scale))[1]
    images = pipe.sample([0], 2 * R, sampling=SamplingSettings("ddim", 2), method=WindowFusion())
    assert [size for size, _ in calls] == [(R, R)] * 18  # 3 × 3 windows (stride R/2) per step, 2 steps
    assert grids == [((1, 2, R, R), float(R))]  # one R-size canvas grid and scale for every window
    assert images.shape == (1, 3, 2 * R, 2 * R)


# -- re-denoising -----------------------------------------------------------------------------------------
def test_redenoise_at_t0_zero_is_the_upsampled_sample():
    pipe = tiny_pipeline()
    expected = upsample(pipe.sample([0, 1], R, sampling=DDIM4), 2 * R, 2 * R)
    assert torch.equal(pipe.sample([0, 1], 2 * R, sampling=DDIM4, method=Redenoise(t0=0)), expected)


class OracleNet(torch.nn.Module):
    """The Bayes-optimal ε for data x_0 ~ N(0, v) (test_diffusion.gaussian_oracle) behind the U-Net's interface."""

    def __init__(self, schedule: NoiseSchedule, variance: float = 0.25) -> None:
        super().__init__()
        self.eps, self.in_channels = gaussian_oracle(schedule, variance), 3
        self.anchor = torch.nn.Parameter(torch.ones(1))  # the pipeline finds the device through the parameters

    def forward(self, x, t, grid=None, scale=None, *, prepared=None):
        return self.eps(x, t.double())

    def prepare(self, grid, scale):
        return None

    def check_size(self, height, width):
        pass


@pytest.mark.parametrize(("kind", "bound"), [("cosine", 1e-4), ("linear", 3e-3)])  # measured: 1.2e-5, 1.3e-3
def test_redenoise_at_t0_t_minus_1_becomes_plain_sampling_at_the_target(kind, bound):
    """x_{T−1} = √ᾱ_{T−1} up(x_R) + √(1−ᾱ_{T−1}) z, z the same seeds' x_T as plain sampling's: it becomes plain
    sampling at the target as √ᾱ_{T−1} → 0 (cosine 5e-5, linear 6.4e-3) for an ε that, like any trained model's,
    is ≈ x_T there (∂ε/∂x = I, so x̂_0 moves by O(√ᾱ)); here the exact ε of Gaussian data. A random network's
    ε is not: x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ then moves by O(1), which is why this is tested with the oracle."""
    schedule = NoiseSchedule(kind=kind)
    pipe = DiffusionPipeline(OracleNet(schedule), schedule, train_resolution=R)
    for sampling in (DDIM4, SamplingSettings("ddim", 4, eta=1.0), SamplingSettings("dpmpp_2m", 3)):
        plain = pipe.sample([0, 1], 2 * R, sampling=sampling)
        assert (pipe.sample([0, 1], 2 * R, sampling=sampling, method=Redenoise(t0=999)) - plain).abs().max() < bound
        assert (pipe.sample([0, 1], 2 * R, sampling=sampling, method=Redenoise()) - plain).abs().max() > 0.05


def test_redenoise_samples_at_r_then_visits_the_samplers_timesteps_up_to_t0():
    pipe, calls = tiny_pipeline(), []
    record_forward(pipe.net, calls)
    sampling = SamplingSettings("ddim", 10)  # timesteps 999, 888, …, 111, 0
    out = pipe.sample([0, 1], 2 * R, sampling=sampling, method=Redenoise(t0=500), time_cond=lambda t: t + 1)
    del pipe.net.forward
    assert calls[:10] == [((R, R), t) for t in (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)]  # no time_cond
    assert calls[10:] == [((2 * R, 2 * R), t + 1) for t in (444, 333, 222, 111, 0)]  # from 444, the grid's ≤ 500
    noise = PerSampleNoise([0, 1])  # the same by hand: q(x_444 | up(x_R)) with the seeds' noise, then DDIM
    x0 = upsample(pipe.sample([0, 1], R, sampling=sampling), 2 * R, 2 * R)
    x = pipe.schedule.q_sample(x0, torch.tensor([444, 444]), noise.randn_like(x0))
    with torch.no_grad():
        by_hand = ddim_sample(pipe.canvas_eps(2 * R, 2 * R), pipe.schedule, x, steps=10, start=444, noise=noise,
                              time_cond=lambda t: t + 1, clip_denoised=True).clamp(-1, 1)
    assert torch.equal(out, by_hand)


def test_samplers_started_at_a_timestep_visit_only_the_timesteps_below_it():
    s, seen = NoiseSchedule(num_timesteps=20), []

    def eps(x, t):
        seen.append(int(t[0]))
        return 0.1 * x

    x = torch.ones(1, 1, 2, 2)
    ddim_sample(eps, s, x, steps=5, start=12)  # grid 19, 14, 10, 5, 0
    assert seen == [10, 5, 0]
    seen.clear()
    ddpm_sample(eps, s, x, start=3, noise=torch.Generator().manual_seed(0))
    assert seen == [3, 2, 1, 0]
    seen.clear()
    dpm_solver_pp_2m_sample(eps, s, x, steps=5)
    full = list(seen)
    seen.clear()
    dpm_solver_pp_2m_sample(eps, s, x, steps=5, start=full[2])
    assert seen == full[2:]


# -- every method with every sampler ----------------------------------------------------------------------
@pytest.mark.parametrize("method", [Redilation(), WindowFusion(), Redenoise()], ids=["redilation", "windows",
                                                                                      "redenoise"])
@pytest.mark.parametrize("sampling", [SamplingSettings("ddim", 3, eta=1.0), SamplingSettings("dpmpp_2m", 3)],
                         ids=["ddim", "dpmpp"])
def test_every_baseline_samples_with_ddim_dpm_solver_and_a_time_cond(method, sampling):
    pipe, fed = tiny_pipeline(), []

    def time_cond(t):
        fed.append(float(t[0]))
        return 0.9 * t

    images = pipe.sample([0, 1], 2 * R, 3 * R // 2, sampling=sampling, method=method, time_cond=time_cond)
    assert images.shape == (2, 3, 2 * R, 3 * R // 2) and torch.isfinite(images).all()
    assert images.std() > 0.05 and images.abs().max() <= 1
    assert fed  # the time conditioning reaches the network at the target size
    again = pipe.sample([0, 1], 2 * R, 3 * R // 2, sampling=sampling, method=method, time_cond=time_cond)
    assert torch.equal(images, again)  # seed-deterministic
    alone = pipe.sample([1], 2 * R, 3 * R // 2, sampling=sampling, method=method, time_cond=time_cond)
    assert torch.allclose(alone[0], images[1], atol=1e-4)  # sample i depends on seeds[i] only (as plain: 3e-5)
    assert not torch.allclose(images, pipe.sample([0, 1], 2 * R, 3 * R // 2, sampling=sampling), atol=1e-3)


def test_method_arguments_parse_to_each_fields_type_and_reject_unknown_fields():
    args = parse_method_args("redenoise.t0=400, window_fusion.stride=8,redilation.levels=0/1,redilation.share=0.4,"
                             "window_fusion.window=none")
    assert args == {"redenoise": {"t0": 400}, "window_fusion": {"stride": 8, "window": None},
                    "redilation": {"levels": (0, 1), "share": 0.4}}
    assert Redilation(**args["redilation"]) == Redilation((0, 1), 0.4)
    for bad in ("redenoise.t1=3", "upsample.t0=3", "redenoise.t0", "redenoise=3"):
        with pytest.raises(ValueError, match="METHOD.FIELD=VALUE"):
            parse_method_args(bad)
    with pytest.raises(ValueError, match="share"):
        Redilation(share=1.5)


# -- the evidence report ----------------------------------------------------------------------------------
def test_evidence_report_has_the_training_free_rows_above_r_only(tmp_path):
    """A tiny exported model through `mrdiff evidence report`: each baseline a row at 2R and none at R; redenoise
    at t0 = 0 (set through --variant-args) is the upsample row exactly."""
    import json

    from mrdiff.evidence.report import main
    from mrdiff.module import DiffusionModule

    net_args = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                "head_channels": 8, "dropout": 0.0}
    module = DiffusionModule(tiny_net(**net_args, coord_frequencies=0, safa_levels=()), train_resolution=R,
                             train_scales=[R, 2 * R])
    (tmp_path / "fixed").mkdir()
    torch.save({"state_dict": {k: v.half() for k, v in module.state_dict().items()}, "net": net_args,
                "module": {"train_resolution": R, "train_scales": [R, 2 * R]}, "data": {}, "global_step": 1,
                "command": "test", "train_seconds": 1.0}, tmp_path / "fixed" / "seed0.pt")
    args = ["--models", "fixed", "--weights", str(tmp_path), "--resolutions", f"{R},{2 * R}", "--num-samples", "2",
            "--batch-size", "2", "--steps", "2", "--num-reference", "4", "--device", "cpu",
            "--variants", "plain,scaled_attention,redilation,window_fusion,redenoise"]
    with pytest.raises(SystemExit, match="redenoise.t0"):
        main([*args, "--out", str(tmp_path / "bad"), "--variant-args", "redenoise.t=0"])
    main([*args, "--out", str(tmp_path / "report"), "--variant-args", "redenoise.t0=0"])
    report = json.loads((tmp_path / "report" / "table.json").read_text())
    cells = report["cells"]
    rows = ["fixed + scaled_attention", "fixed + redilation", "fixed + window_fusion", "fixed + redenoise"]
    assert set(cells) == {"ground truth", "fixed", "fixed + upsample", *rows}
    assert all(set(cells[row]) == {str(2 * R)} for row in rows) and set(cells["fixed"]) == {str(R), str(2 * R)}
    assert cells["fixed + redenoise"]["32"]["spectrum_distance"] == cells["fixed + upsample"]["32"]["spectrum_distance"]
    assert report["meta"]["variant_args"] == {"redenoise": {"t0": 0}}
