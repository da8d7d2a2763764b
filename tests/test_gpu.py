"""GPU tier: what behaves differently on CUDA. Skipped on machines without a GPU (CI has none).

Each test pins one CUDA-specific path: bf16 autocast through the CLI, the fused AdamW kernel skipping a
non-finite step via `found_inf`, Inductor on CUDA, sampling through CUDA graphs (compile="reduce-overhead"),
device transfers in sampling / calibration / evaluation, and checkpoints that move between devices.
"""

import json
import math

import pytest
import torch

from mrdiff.cli import main
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.grids import crop_grid
from mrdiff.module import DiffusionModule
from mrdiff.nn.unet import UNet
from mrdiff.nonfinite import NonFiniteGuard
from mrdiff.pipeline import DiffusionPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def small_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=32,
               dropout=0.0, coord_frequencies=2, safa_levels=(0, 1), scale_ref=16.0)
    for p in net.parameters():  # off the zero-initialised output layers, so every parameter gets a gradient
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def batch(device: torch.device, size: int = 16) -> dict:
    scales = (16, 20, 24, 32)
    gen = torch.Generator().manual_seed(1)
    return {"image": (torch.rand(4, 3, size, size, generator=gen) * 2 - 1).to(device),
            "scale": torch.tensor([float(s) for s in scales], device=device),
            "grid": torch.stack([crop_grid(s, s, 0, 0, size, size) for s in scales]).to(device)}


def test_bf16_mixed_fit_through_the_cli_on_cuda(tiny_config_file, tmp_path):
    config = tiny_config_file(**{"trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed",
                                 "model.grad_clip_norm": 1.0, "trainer.max_steps": 6})
    main(["fit", "--config", str(config)])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    # checkpoints written on the GPU load on a CPU-only machine: sample from it on the CPU
    main(["sample", "--config", str(config), "--trainer.accelerator=cpu", f"--ckpt_path={tmp_path}/run/checkpoints/"
          "last.ckpt", "--resolutions=[16,32]", "--num_samples=2", "--steps=3", f"--out_dir={tmp_path}/cpu"])
    assert sorted(p.name for p in (tmp_path / "cpu").glob("*.png")) == ["samples_16.png", "samples_32.png"]


def test_fused_adamw_skips_a_nonfinite_step_on_cuda_without_touching_the_weights():
    net = small_unet().to(CUDA)
    module = DiffusionModule(net, num_timesteps=100)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    guard = NonFiniteGuard(CUDA)

    def step(b, index):
        loss = module.diffusion_loss(b, torch.Generator(device=CUDA).manual_seed(index))
        guard.record_inputs(loss, b["image"])
        loss.backward()
        opt.found_inf = guard.check_gradients([p.grad for p in net.parameters()], index)
        opt.step()
        opt.zero_grad()

    good = batch(CUDA)
    step(good, 0)
    before = [p.detach().clone() for p in net.parameters()]
    poisoned = {**good, "image": good["image"].clone()}
    poisoned["image"][0, 0, 0, 0] = float("nan")
    step(poisoned, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(int(opt.state[p]["step"]) == 1 for p in net.parameters())  # Adam's t did not advance
    step(good, 2)
    assert not torch.equal(before[0], next(net.parameters()))
    first_step, loss, inputs_ok = guard.first()
    assert int(guard.count) == 1 and first_step == 1 and math.isnan(loss) and not inputs_ok


def test_compiled_training_equals_eager_within_bf16_tolerance():
    eager = DiffusionModule(small_unet(), num_timesteps=100).to(CUDA)
    compiled = DiffusionModule(small_unet(), num_timesteps=100, compile=True).to(CUDA)
    b = batch(CUDA)
    losses, grads = [], []
    for module in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.diffusion_loss(b, torch.Generator(device=CUDA).manual_seed(3))
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in module.net.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99, f"gradient directions differ: cosine {float(cosine):.4f}"


def test_sampling_through_cuda_graphs_equals_eager_for_the_same_seeds():
    """compile="reduce-overhead": one Inductor graph per canvas, batch and precision, replayed as a CUDA graph at
    every step. Tolerances: fp32 with TF32 off, max |Δ| ≤ 5e-4 (only Inductor's fused arithmetic differs); bf16
    autocast, relative L2 error ≤ 5e-2 (fused kernels skip some of eager's bf16 roundings). A stale timestep or
    conditioning would be O(1) off."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net, schedule = small_unet().to(CUDA).eval(), NoiseSchedule(num_timesteps=100)
    eager = DiffusionPipeline(net, schedule, train_resolution=16)
    graphs = DiffusionPipeline(net, schedule, train_resolution=16, compile="reduce-overhead")
    seeds, tf32 = [0, 1, 2, 3], (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        for sampling in (SamplingSettings("ddim", 10), SamplingSettings("dpmpp_2m", 6)):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            a, b = eager.sample(seeds, 32, 16, sampling=sampling), graphs.sample(seeds, 32, 16, sampling=sampling)
            assert (a - b).abs().max() <= 5e-4, f"{sampling} fp32: {float((a - b).abs().max()):.2e}"
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            with torch.autocast("cuda", dtype=torch.bfloat16):
                a, b = eager.sample(seeds, 32, 16, sampling=sampling), graphs.sample(seeds, 32, 16, sampling=sampling)
                again = graphs.sample(seeds, 32, 16, sampling=sampling)
            error = float((a - b).norm() / a.norm())
            assert error <= 5e-2, f"{sampling} bf16: relative L2 error {error:.2e}"
            assert torch.allclose(again, b, rtol=0, atol=1e-5)  # a replay gives what the recording gave
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # fp32 and bf16, both samplers
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    torch._dynamo.reset()


def test_sampling_and_calibration_on_cuda_match_the_cpu():
    from mrdiff.noiseshift.search import SearchSettings, calibrate

    cpu = DiffusionModule(small_unet(), num_timesteps=100).eval()
    gpu = DiffusionModule(small_unet(), num_timesteps=100).eval().to(CUDA)
    a = cpu.pipeline.sample([0, 1, 2], 32, 16, sampling=SamplingSettings(steps=5))
    b = gpu.pipeline.sample([0, 1, 2], 32, 16, sampling=SamplingSettings(steps=5)).cpu()
    # per-sample generators draw different streams on CPU and CUDA: compare with the CPU's noise on the GPU
    assert a.shape == b.shape == (3, 3, 32, 16) and torch.isfinite(b).all()
    x_T = torch.randn(3, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    from mrdiff.diffusion.samplers import ddim_sample

    outs = []
    for module in (cpu, gpu):
        with torch.no_grad():
            outs.append(ddim_sample(module.pipeline.canvas_eps(32, 16), module.schedule, x_T.to(module.device), steps=5,
                                    clip_denoised=True).cpu())
    assert torch.allclose(outs[0], outs[1], atol=1e-2), float((outs[0] - outs[1]).abs().max())

    settings = SearchSettings(coarse_window=0.05, coarse_stride=0.01, fine_window=0.01, fine_stride=0.002,
                              num_images=4, max_batch=64, seed=0, rule="per_timestep")
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    tables = []
    for module in (cpu, gpu):
        with torch.no_grad():
            eps = module.pipeline.canvas_eps(16, 16)
            tables.append(calibrate(eps, module.schedule, x0.to(module.device), [90, 50, 10], settings,
                                    progress=False).t_hat)
    # the loss landscape is flat near its minimum: allow one fine stride of σ_rf (a few timesteps here)
    assert max(abs(a - b) for a, b in zip(*tables)) <= 3, tables


def test_mrdiff_test_on_cuda_matches_the_cpu_table(tiny_config_file, tmp_path):
    config = tiny_config_file(**{"trainer.max_steps": 2})
    main(["fit", "--config", str(config)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evaluation = ('{"class_path": "mrdiff.callbacks.evaluation.ResolutionEvaluation", "init_args": '
                  '{"resolutions": [16, 32], "num_samples": 8, "sampling": {"steps": 4}, "batch_size": 8, '
                  '"fid": false}}')
    tables = {}
    for accelerator in ("cpu", "gpu"):
        main(["test", "--config", str(config), f"--trainer.accelerator={accelerator}", f"--ckpt_path={ckpt}",
              f"--trainer.callbacks+={evaluation}"])
        tables[accelerator] = json.loads((tmp_path / "run" / "eval_table.json").read_text())
    # the per-sample generators draw other streams on CUDA, so the samples (and scores) differ; the table does not
    assert [r["variant"] for r in tables["cpu"]["rows"]] == [r["variant"] for r in tables["gpu"]["rows"]]
    assert tables["cpu"]["columns"] == tables["gpu"]["columns"]
