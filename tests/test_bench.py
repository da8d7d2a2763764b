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
        row = rows[name]
        assert row["images_per_s"] > 0 and row["tflops_per_s"] == pytest.approx(
            row["flops"] / sorted(row["seconds"])[0] / 1e12)
    assert rows["train fixed U-Net bf16"]["mfu"] == pytest.approx(rows["train fixed U-Net bf16"]["tflops_per_s"])
    ratios = result["ratios"]
    assert ratios["fixed / diffusers (fp32)"] == pytest.approx(fixed["images_per_s"] / ref["images_per_s"])
    assert set(result["calibration_seconds"]) == {"16", "24"}


def test_flop_counter_counts_a_conv_exactly():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    forward = 2 * 2 * 5 * 8 * 8 * 3 * 9  # 2 FLOPs per multiply-add, per output value and kernel tap
    assert bench.count_flops(lambda: torch.nn.functional.conv2d(x, w, padding=1).sum().backward()) == 3 * forward
