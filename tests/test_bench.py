"""`make bench` must keep working: a tiny preset through the real entry point, figures checked for sense."""

import json
import sys
import time

import pytest
import torch

from mrdiff import bench
from mrdiff.bench import common, training

TINY = {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
        "head_channels": 16, "patch": 16, "batch": 4, "resolutions": (16, 24), "sample_batch": 1,
        "calibration": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (),
                        "safa_levels": (1,), "coord_frequencies": 2, "images": 2}}


@pytest.fixture
def tiny(monkeypatch):
    """The TINY preset as --preset tiny, with SAFA on the levels it has."""
    monkeypatch.setitem(bench.PRESETS, "tiny", TINY)
    monkeypatch.setattr(common, "MULTIRES", bench.MULTIRES | {"safa_levels": (1,)})
    return TINY


@pytest.mark.slow
def test_bench_runs_and_reports_flops_and_ratios(tmp_path, monkeypatch, one_thread, tiny):
    pytest.importorskip("diffusers")
    earlier = tmp_path / "bench.json"
    earlier.write_text('{"rows": "an earlier run"}')
    monkeypatch.setattr(sys, "argv", ["bench", "--preset", "tiny", "--repeats", "1", "--out", str(earlier),
                                      "--peak-tflops", "1.0"])
    bench.main()
    assert earlier.read_text() == '{"rows": "an earlier run"}'  # kept: the new figures go beside it
    out = tmp_path / "bench-2.json"
    result = json.loads(out.read_text())
    rows = result["rows"]
    fixed, ref = rows["train fixed U-Net fp32"], rows["train diffusers UNet2DModel fp32"]
    # Matched configuration: close FLOPs. At this toy size attention is a large share and the two count it
    # under different ops (the cpu preset's networks differ by 0.4%); a mismatched block count would be 30%+.
    assert fixed["flops"] == pytest.approx(ref["flops"], rel=0.1)
    assert rows["train multi-res, per-sample scales fp32"]["flops"] > fixed["flops"]
    assert rows["train fixed U-Net bf16 channels_last"]["flops"] == rows["train fixed U-Net bf16"]["flops"]
    for name in ("train fixed U-Net fp32", "sample DDIM-50 at 24² bf16, batch 1"):
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

    monkeypatch.setattr(training, "simple_loss", loss)
    net = Net()
    before = net.conv.weight.clone()
    bench.train_step(net, {"image": torch.randn(2, 3, 4, 4)}, bf16=False, device=torch.device("cpu"))()
    assert seen == [1000] and not torch.equal(before, net.conv.weight)


def test_sampling_rows_eager_and_captured_share_one_graph_per_batch_and_project_10k(one_thread, tiny):
    """--capture rows (here through aot_eager: Inductor is the GPU tier's) follow the eager ones; a row's FLOPs are
    one forward per image per network call; the summary keeps each sampler's best batch and its 10,000-sample time."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    samplers = [bench.parse_sampler("ddim-3"), bench.parse_sampler("dpmpp_2m-2")]
    rows = bench.sampling_rows(TINY, torch.device("cpu"), samplers, [16], [1, 2], capture=True, backend="aot_eager")
    assert [r.name for r in rows][:2] == ["sample DDIM-3 at 16² bf16, batch 1",
                                          "sample DPM-Solver++(2M)-2 at 16² bf16, batch 1"]
    assert [r.meta["captured"] for r in rows] == [False] * 4 + [True] * 4
    assert all(r.name.endswith(", captured") == r.meta["captured"] for r in rows)
    per_call = rows[0].flops / 3
    assert rows[1].flops == per_call * 2 and rows[2].flops == per_call * 2 * 3  # DPM: 2 calls; batch 2
    timing = bench.measure(rows, 1, torch.device("cpu"))
    assert timing == {"dropped_rows": [], "rounds": 1}
    assert counters["stats"]["unique_graphs"] == 2  # batch 1 and batch 2, each shared by both samplers
    for r in rows:
        r.seconds = [r.images / (10.0 if r.meta["captured"] else 5.0) * (1 if r.images == 2 else 2)]
    summary = bench.sampling_summary(rows)["DDIM-3 at 16²"]
    assert summary["best eager"]["batch"] == 2 and summary["best eager"]["seconds_per_10000"] == pytest.approx(2000)
    assert summary["best captured"]["images_per_s"] == pytest.approx(10.0)
    assert summary["captured / eager by batch"] == {1: pytest.approx(2.0), 2: pytest.approx(2.0)}
    torch._dynamo.reset()


def test_a_time_budget_drops_the_rows_it_cannot_warm_up_and_stops_the_rounds():
    calls = []
    slow = bench.Row("slow", lambda: (calls.append("slow"), time.sleep(0.05)), 1, [])
    late = bench.Row("late", lambda: calls.append("late"), 1, [])
    rows = [slow, late]
    timing = bench.measure(rows, 5, torch.device("cpu"), budget=0.03)
    assert timing == {"dropped_rows": ["late"], "rounds": 1} and rows == [slow]
    assert calls == ["slow", "slow"] and slow.warmup_seconds >= 0.05 and len(slow.seconds) == 1


def test_rows_selection_and_sampler_names_are_checked(tmp_path, one_thread, tiny):
    with pytest.raises(SystemExit):
        bench.main(["--rows", "fixed,bogus"])
    with pytest.raises(ValueError, match="NAME-STEPS"):
        bench.parse_sampler("ddim")
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--rows", "fixed,sampling", "--precision", "bf16", "--samplers", "ddim-2",
                "--sample-batches", "1,2", "--sample-resolutions", "16", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert sorted(result["rows"]) == ["sample DDIM-2 at 16² bf16, batch 1", "sample DDIM-2 at 16² bf16, batch 2",
                                      "train fixed U-Net bf16"]
    assert result["rows"]["sample DDIM-2 at 16² bf16, batch 2"]["seconds_per_10000"] > 0
    assert set(result["sampling"]) == {"DDIM-2 at 16²"} and "calibration_seconds" not in result
    assert result["meta"]["rounds"] == 1 and result["meta"]["command"].startswith("python -m mrdiff.bench --preset")
