"""Sampling rows (DiffusionPipeline.sample, eager and with the per-step network call captured) and NoiseShift
calibration seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from mrdiff.bench.common import Row, count_flops, unet_kwargs
from mrdiff.diffusion.samplers import SamplingSettings, ddim_timesteps
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.nn.unet import UNet
from mrdiff.noiseshift.search import SearchSettings, calibrate
from mrdiff.pipeline import CompileMode, DiffusionPipeline

LABELS = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}
WARMUP = SamplingSettings("ddim", 3)  # a row's untimed first call: compiles, records and replays its graph


def parse_sampler(text: str) -> SamplingSettings:
    """'ddim-50' → DDIM with 50 steps, 'dpmpp_2m-10' → DPM-Solver++(2M) with 10 (mrdiff sample's names)."""
    sampler, _, steps = text.rpartition("-")
    if not steps.isdigit():
        raise ValueError(f"sampler {text!r}: give NAME-STEPS, e.g. ddim-50 or dpmpp_2m-10")
    return SamplingSettings(sampler, int(steps))


def label(sampling: SamplingSettings) -> str:
    return f"{LABELS[sampling.sampler]}-{sampling.steps}"


def inference_pipeline(net: UNet, device: torch.device, compile: CompileMode = "none",
                       backend: str = "inductor") -> DiffusionPipeline:
    """The U-Net in a sampling pipeline, so the rows time the framework's own sampling path."""
    return DiffusionPipeline(net.to(device).eval(), NoiseSchedule(), compile=compile, compile_backend=backend)


def forward_flops(pipeline: DiffusionPipeline, resolution: int) -> float:
    """Model FLOPs of one network call on one image of the canvas (the conditioning is prepared once per canvas)."""
    with torch.no_grad():
        eps = pipeline.canvas_eps(resolution, resolution)
        x = torch.zeros(1, pipeline.in_channels, resolution, resolution, device=pipeline.device)
        return count_flops(lambda: eps(x, torch.zeros(1, device=pipeline.device)))


def sampling_rows(preset: dict, device: torch.device, samplers: Sequence[SamplingSettings] = (SamplingSettings(),),
                  resolutions: Sequence[int] | None = None, batches: Sequence[int] | None = None,
                  capture: bool = False, backend: str = "inductor") -> list[Row]:
    """Images/s of the multi-resolution U-Net in bf16 for each sampler, resolution and batch; with `capture`, each
    again with the per-step network call compiled and replayed as a CUDA graph (compile="reduce-overhead"), after
    every eager row. The rows of one canvas and batch share one compiled graph."""
    torch.manual_seed(0)
    net = UNet(**unet_kwargs(preset, True)).to(device).eval()
    modes: list[CompileMode] = ["none", *(["reduce-overhead"] if capture else [])]
    pipelines = {mode: inference_pipeline(net, device, mode, backend) for mode in modes}
    resolutions = resolutions or preset["resolutions"]
    per_image = {res: forward_flops(pipelines["none"], res) for res in resolutions}
    rows = []
    for mode in modes:
        for res in resolutions:
            for batch in batches or (preset["sample_batch"],):
                for sampling in samplers:
                    calls = len(sampling.timesteps(pipelines[mode].schedule))
                    name = f"sample {label(sampling)} at {res}² bf16, batch {batch}"
                    rows.append(Row(
                        name + (", captured" if mode != "none" else ""),
                        sample_call(pipelines[mode], batch, res, sampling, device), batch, [],
                        per_image[res] * batch * calls, warmup=sample_call(pipelines[mode], batch, res, WARMUP, device),
                        meta={"sampler": label(sampling), "resolution": res, "batch": batch,
                              "captured": mode != "none"}))
    return rows


def sample_call(pipeline: DiffusionPipeline, batch: int, resolution: int, sampling: SamplingSettings,
                device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pipeline.sample(list(range(batch)), resolution, sampling=sampling)

    return run


def calibration_seconds(preset: dict, device: torch.device) -> dict[str, float]:
    """NoiseShift calibration (50 DDIM timesteps, default search windows) seconds per resolution."""
    settings = dict(preset["calibration"])
    num_images = settings.pop("images")
    pipeline = inference_pipeline(UNet(**(unet_kwargs(preset, True) | settings)), device)
    timesteps, out = ddim_timesteps(pipeline.schedule.num_timesteps, 50), {}
    for res in preset["resolutions"]:
        images = torch.rand(num_images, 3, res, res, device=device) * 2 - 1
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
            calibrate(pipeline.canvas_eps(res, res), pipeline.schedule, images, timesteps,
                      SearchSettings(num_images=num_images), progress=False)
        out[str(res)] = time.perf_counter() - start
    return out
