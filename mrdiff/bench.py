"""`make bench`: training and sampling throughput, measured as ratios within one run.

    python -m mrdiff.bench [--preset cpu|celeba] [--repeats 5] [--compile] [--peak-tflops X] [--out bench.json]

Rows are timed round-robin (every configuration once per repeat, the median kept) so that a noisy,
shared machine slows all of them alike; the ratios between rows are the figures to quote.

Every row also reports its model FLOPs (convolutions, matmuls and attention of the forward and backward
pass, counted by torch.utils.flop_counter on the eager network) and the achieved TFLOP/s. On a GPU
whose bf16 dense peak is known (or given with --peak-tflops) that gives the model FLOP utilisation
(MFU). Elementwise work (normalisation, activations, the optimizer) is not counted: it is the
difference between a row's rate and the peak.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrdiff.console import info
from mrdiff.diffusion.loss import simple_loss
from mrdiff.diffusion.samplers import SamplingSettings, ddim_timesteps
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.grids import crop_grid
from mrdiff.nn.unet import UNet
from mrdiff.noiseshift.search import SearchSettings, calibrate
from mrdiff.pipeline import DiffusionPipeline

PRESETS = {  # U-Net shapes: "cpu" is small enough for a 2-core machine, "celeba" is configs/celeba.yaml
    "cpu": {"base_channels": 64, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attention_levels": (2,),
            "patch": 32, "batch": 16, "resolutions": (32, 48, 64), "sample_batch": 2,
            # calibration timed on the quickstart U-Net (configs/quickstart.yaml) with 16 images
            "calibration": {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                            "attention_levels": (2,), "safa_levels": (1, 2), "coord_frequencies": 4,
                            "images": 16}},
    "celeba": {"base_channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attention_levels": (2,),
               "patch": 64, "batch": 64, "resolutions": (64, 96, 128), "sample_batch": 64,
            "calibration": {"images": 64}},
}
MULTIRES = {"coord_frequencies": 6, "coord_max_frequency": 16.0, "safa_levels": (2, 3), "safa_kernels": 4}
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity)
    "H100 80GB HBM3": 989.4,  # the SXM part's device name
    "H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "A100": 312.0, "L40S": 362.1, "RTX 4090": 165.2,
}


@dataclass
class Row:
    name: str
    step: Callable[[], None]
    images: int  # images per call of step
    seconds: list[float]
    flops: float | None = None  # model FLOPs per call of step

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.seconds)

    @property
    def tflops_per_s(self) -> float | None:
        return self.flops / statistics.median(self.seconds) / 1e12 if self.flops else None


def count_flops(step: Callable[[], None]) -> float:
    """Model FLOPs of one call (runs it once, eagerly, under the counter)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def unet_kwargs(preset: dict, multires: bool) -> dict:
    keys = ("base_channels", "channel_mult", "num_res_blocks", "attention_levels")
    return ({k: preset[k] for k in keys} | {"dropout": 0.0, "head_channels": preset.get("head_channels", 64)}
            | (MULTIRES if multires else {}))


def diffusers_unet(preset: dict) -> torch.nn.Module:
    """diffusers' UNet2DModel at the matched configuration (channels, levels, blocks, attention)."""
    from diffusers import UNet2DModel

    levels = len(preset["channel_mult"])
    attn = set(preset["attention_levels"])
    down = tuple("AttnDownBlock2D" if lv in attn else "DownBlock2D" for lv in range(levels))
    up = tuple("AttnUpBlock2D" if lv in attn else "UpBlock2D" for lv in reversed(range(levels)))
    return UNet2DModel(block_out_channels=tuple(preset["base_channels"] * m for m in preset["channel_mult"]),
                       layers_per_block=preset["num_res_blocks"], down_block_types=down, up_block_types=up,
                       attention_head_dim=preset.get("head_channels", 64),
                       norm_num_groups=math.gcd(32, preset["base_channels"]))


def train_step(net: torch.nn.Module, inputs: dict, *, bf16: bool, device: torch.device,
               diffusers: bool = False, channels_last: bool = False) -> Callable[[], None]:
    """One forward + backward + AdamW step of L_simple (diffusion/loss.py, as training computes it) on fixed inputs."""
    schedule = NoiseSchedule()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    x0 = inputs["image"]
    if channels_last:
        net.to_channels_last() if isinstance(net, UNet) else net.to(memory_format=torch.channels_last)
        x0 = x0.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if diffusers:
            return net(x_t, t).sample
        return net(x_t, t, inputs.get("grid"), inputs.get("scale"))

    def step() -> None:
        with autocast:
            loss = simple_loss(eps, schedule, x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch_inputs(preset: dict, device: torch.device, scale_mode: str) -> dict:
    """A batch of patches with grids and scales (per sample, or one shared scale)."""
    b, p = preset["batch"], preset["patch"]
    gen = torch.Generator().manual_seed(0)
    scales = torch.randint(p, 2 * p + 1, (b,), generator=gen)
    grids = torch.stack([crop_grid(int(s), int(s), 0, 0, p, p) for s in scales])
    scale = scales.float()[:1] if scale_mode == "shared" else scales.float()
    return {"image": torch.randn(b, 3, p, p, generator=gen).to(device), "grid": grids.to(device),
            "scale": scale.to(device)}


def training_rows(preset: dict, device: torch.device, compile: bool) -> list[Row]:
    """Eager rows in fp32 and bf16; with `compile`, the bf16 rows again under torch.compile."""
    rows, batch = [], preset["batch"]
    variants = (("fixed U-Net", False, "shared"), ("multi-res, per-sample scales", True, "sample"),
                ("multi-res, per-batch scale", True, "shared"))
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        for name, multires, scale_mode in variants:
            torch.manual_seed(0)
            net = UNet(**unet_kwargs(preset, multires)).to(device)
            step = train_step(net, batch_inputs(preset, device, scale_mode), bf16=bf16, device=device)
            rows.append(Row(f"train {name} {tag}", step, batch, [], count_flops(step)))
        shared = batch_inputs(preset, device, "shared")
        plain = UNet(**unet_kwargs(preset, False)).to(device)
        step = train_step(plain, shared, bf16=bf16, device=device, channels_last=True)
        fixed_flops = next(r.flops for r in rows if r.name == f"train fixed U-Net {tag}")
        rows.append(Row(f"train fixed U-Net {tag} channels_last", step, batch, [], fixed_flops))
        try:
            ref = diffusers_unet(preset).to(device)
        except ImportError:
            info("mrdiff.bench: diffusers not installed (pip install -e '.[bench]'): no reference rows")
        else:
            step = train_step(ref, shared, bf16=bf16, device=device, diffusers=True)
            rows.append(Row(f"train diffusers UNet2DModel {tag}", step, batch, [], count_flops(step)))
    if compile:
        eager = {r.name: r for r in rows}
        for name, multires, scale_mode in (*variants[:2], ("diffusers UNet2DModel", None, "shared")):
            if f"train {name} bf16" not in eager:
                continue
            torch.manual_seed(0)
            net = diffusers_unet(preset) if multires is None else UNet(**unet_kwargs(preset, multires))
            net = net.to(device)
            net.compile(dynamic=False)  # in place and static, as model.compile does
            step = train_step(net, batch_inputs(preset, device, scale_mode), bf16=True, device=device,
                              diffusers=multires is None)
            rows.append(Row(f"train {name} bf16 compiled", step, batch, [], eager[f"train {name} bf16"].flops))
    return rows


def inference_pipeline(net: UNet, device: torch.device) -> DiffusionPipeline:
    """The U-Net in a sampling pipeline, so the rows time the framework's own sampling path."""
    return DiffusionPipeline(net.to(device).eval(), NoiseSchedule())


def sampling_rows(preset: dict, device: torch.device) -> list[Row]:
    """DDIM-50 images/s per resolution with the multi-resolution U-Net in bf16 (DiffusionPipeline.sample)."""
    pipeline, rows, n = inference_pipeline(UNet(**unet_kwargs(preset, True)), device), [], preset["sample_batch"]
    for res in preset["resolutions"]:

        def run(res: int = res) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pipeline.sample(list(range(n)), res, sampling=SamplingSettings("ddim", 50))

        rows.append(Row(f"sample DDIM-50 at {res}² bf16", run, n, [], count_flops(run)))
    return rows


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


def measure(rows: list[Row], repeats: int, device: torch.device) -> None:
    """Round-robin timing: one warm-up call each, then `repeats` rounds over all rows."""
    for row in rows:
        row.step()
    for _ in range(repeats):
        for row in rows:
            sync(device)
            start = time.perf_counter()
            row.step()
            sync(device)
            row.seconds.append(time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ratio(rows: dict[str, Row], a: str, b: str) -> float | None:
    return rows[a].images_per_s / rows[b].images_per_s if a in rows and b in rows else None


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """bf16 dense peak of this GPU: --peak-tflops, else the data-sheet figure for a known model."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name]
    return matches[0] if matches else None


def report(rows: list[Row], meta: dict) -> dict:
    by_name = {r.name: r for r in rows}
    peak = meta.get("peak_bf16_tflops")
    info(f"\nmrdiff bench — {meta['device']}, preset {meta['preset']}, median of {meta['repeats']} rounds")
    info(f"{'row':<52} {'images/s':>10} {'s/call':>9} {'GFLOP/call':>11} {'TFLOP/s':>8}" + ("   MFU" if peak else ""))
    for r in rows:
        line = f"{r.name:<52} {r.images_per_s:>10.2f} {statistics.median(r.seconds):>9.3f}"
        if r.flops:
            line += f" {r.flops / 1e9:>11.1f} {r.tflops_per_s:>8.3f}"
            if peak and "bf16" in r.name:
                line += f" {r.tflops_per_s / peak:>5.1%}"
        info(line)
    ratios = {
        "fixed / diffusers (fp32)": ratio(by_name, "train fixed U-Net fp32", "train diffusers UNet2DModel fp32"),
        "fixed / diffusers (bf16)": ratio(by_name, "train fixed U-Net bf16", "train diffusers UNet2DModel bf16"),
        "multi-res per-sample cost over fixed (bf16)": _cost(by_name, "bf16", "per-sample scales"),
        "multi-res per-batch cost over fixed (bf16)": _cost(by_name, "bf16", "per-batch scale"),
        "multi-res per-sample cost over fixed (fp32)": _cost(by_name, "fp32", "per-sample scales"),
        "bf16 / fp32 (fixed)": ratio(by_name, "train fixed U-Net bf16", "train fixed U-Net fp32"),
        "bf16 / fp32 (multi-res)": ratio(by_name, "train multi-res, per-sample scales bf16",
                                          "train multi-res, per-sample scales fp32"),
        "channels_last / default (fixed, bf16)": ratio(by_name, "train fixed U-Net bf16 channels_last",
                                                       "train fixed U-Net bf16"),
        "compiled / eager (fixed, bf16)": ratio(by_name, "train fixed U-Net bf16 compiled", "train fixed U-Net bf16"),
        "fixed compiled / diffusers compiled (bf16)": ratio(by_name, "train fixed U-Net bf16 compiled",
                                                            "train diffusers UNet2DModel bf16 compiled"),
        "fixed compiled / diffusers eager (bf16)": ratio(by_name, "train fixed U-Net bf16 compiled",
                                                         "train diffusers UNet2DModel bf16"),
        "multi-res per-sample cost over fixed (bf16 compiled)": _cost(by_name, "bf16 compiled", "per-sample scales"),
    }
    info("\nratios")
    for key, value in ratios.items():
        if value is not None:
            info(f"  {key:<50} {value:6.2f}" + ("" if "cost" not in key else f"  ({(value - 1) * 100:+.0f}%)"))
    return {"meta": meta, "ratios": ratios,
            "rows": {r.name: {"images_per_s": r.images_per_s, "seconds": r.seconds, "flops": r.flops,
                              "tflops_per_s": r.tflops_per_s,
                              "mfu": r.tflops_per_s / peak if peak and r.flops and "bf16" in r.name else None}
                     for r in rows}}


def _cost(rows: dict[str, Row], tag: str, variant: str) -> float | None:
    """Time per image of the multi-resolution U-Net relative to the fixed one (1.10 = 10% slower)."""
    return ratio(rows, f"train fixed U-Net {tag}", f"train multi-res, {variant} {tag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: celeba on GPU, cpu on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (bf16)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak of the accelerator for MFU (default: known GPUs' data-sheet figure)")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("celeba" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    rows = training_rows(preset, device, args.compile) + ([] if args.skip_sampling else sampling_rows(preset, device))
    measure(rows, args.repeats, device)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}",
            "preset": preset_name, "repeats": args.repeats, "torch": torch.__version__,
            "calibration_images": preset["calibration"]["images"],
            "peak_bf16_tflops": peak_tflops(device, args.peak_tflops)}
    result = report(rows, meta)
    if not args.skip_calibration:
        result["calibration_seconds"] = calibration_seconds(preset, device)
        images = meta["calibration_images"]
        info(f"\nNoiseShift calibration (50 DDIM timesteps, {images} images), seconds per resolution")
        for res, seconds in result["calibration_seconds"].items():
            info(f"  {res}²: {seconds:.1f} s")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    info(f"\nmrdiff.bench: wrote {args.out}")


if __name__ == "__main__":
    main()
