"""`make bench` must keep working: a tiny preset through the real entry point, figures checked for sense."""

import json
import sys

import pytest
import torch

from mrdiff import bench

TINY = {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
        "head_channels": 16, "patch": 16, "batch": 4, "resolutions": (16, 24), "sample_batch": 1,
        "calibration": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (),
                        "safa_levels": (1,), "coord_frequencies": 2, "images": 2}}


@pytest.mark.slow
def test_bench_runs_and_reports_flops_and_ratios(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("diffusers")
    monkeypatch.setitem(bench.PRESETS, "tiny", TINY)
    monkeypatch.setattr(bench, "MULTIRES", bench.MULTIRES | {"safa_levels": (1,)})
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--preset", "tiny", "--repeats", "1", "--out", str(out),
                                      "--peak-tflops", "1.0"])
    bench.main()
    result = json.loads(out.read_text())
    rows = result["rows"]
    fixed, ref = rows["train fixed U-Net fp32"], rows["train diffusers UNet2DModel fp32"]
    # Matched configuration: close FLOPs. At this toy size attention is a large share and the two count it
    # under different ops (the cpu preset's networks differ by 0.4%); a mismatched block count would be 30%+.
    assert fixed["flops"] == pytest.approx(ref["flops"], rel=0.1)
    assert rows["train multi-res, per-sample scales fp32"]["flops"] > fixed["flops"]
    assert rows["train fixed U-Net bf16 channels_last"]["flops"] == rows["train fixed U-Net bf16"]["flops"]
    for name in ("train fixed U-Net fp32", "sample DDIM-50 at 24² bf16"):
        assert rows[name]["images_per_s"] > 0 and rows[name]["tflops_per_s"] > 0
    assert rows["train fixed U-Net bf16"]["mfu"] > 0 and rows["train fixed U-Net fp32"]["mfu"] is None
    assert result["ratios"]["fixed / diffusers (fp32)"] > 0
    assert set(result["calibration_seconds"]) == {"16", "24"}


def test_flop_counter_counts_a_conv_exactly():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    forward = 2 * 2 * 5 * 8 * 8 * 3 * 9  # 2 FLOPs per multiply-add, per output value and kernel tap
    assert bench.count_flops(lambda: torch.nn.functional.conv2d(x, w, padding=1).sum().backward()) == 3 * forward


def test_rows_ratios_and_mfu_from_hand_timed_rows(monkeypatch):
    """Medians, TFLOP/s, MFU and ratios on rows whose timings are set by hand."""
    fixed = bench.Row("train fixed U-Net bf16", lambda: None, 8, [4.0, 1.0, 2.0], flops=6e12)  # median 2 s
    multires = bench.Row("train multi-res, per-sample scales bf16", lambda: None, 8, [5.0], flops=6e12)
    result = bench.report([fixed, multires], {"device": "test", "preset": "x", "repeats": 3, "peak_bf16_tflops": 4.0})
    row = result["rows"]["train fixed U-Net bf16"]
    assert row["images_per_s"] == 4.0 and row["tflops_per_s"] == 3.0 and row["mfu"] == 0.75
    assert result["ratios"]["multi-res per-sample cost over fixed (bf16)"] == pytest.approx(2.5)  # 5 s vs 2 s per call
    assert result["ratios"]["fixed / diffusers (fp32)"] is None  # a row that was not measured


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H200", 989.4), ("NVIDIA H100 NVL", 835.0),
                                            ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4),
                                            ("Some Other GPU", None)])
def test_peak_table_knows_the_h100_and_h200_parts(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.peak_tflops(torch.device("cuda"), None) == peak


def test_bench_trains_with_the_shared_loss(monkeypatch):
    """The timed step is diffusion/loss.simple_loss (q_sample through the schedule), as training computes it."""
    seen = []

    def loss(eps, schedule, x0):
        seen.append(schedule.num_timesteps)
        return eps(x0, torch.zeros(x0.shape[0])).square().mean()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, t, grid, scale):
            return self.conv(x)

    monkeypatch.setattr(bench, "simple_loss", loss)
    net = Net()
    before = net.conv.weight.clone()
    bench.train_step(net, {"image": torch.randn(2, 3, 4, 4)}, bf16=False, device=torch.device("cpu"))()
    assert seen == [1000] and not torch.equal(before, net.conv.weight)
