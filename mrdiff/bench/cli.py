"""`make bench`: training and sampling throughput, measured as ratios within one run.

    python -m mrdiff.bench [--preset cpu|celeba] [--rows fixed,multires,diffusers,sampling,...] [--precision bf16]
                           [--compile] [--samplers ddim-50,dpmpp_2m-10] [--sample-batches 128,256] [--capture]
                           [--repeats 5] [--time-budget S] [--cache-dir DIR] [--peak-tflops X] [--out bench.json]

Rows are timed round-robin (every configuration once per repeat, the median kept) so that a noisy,
shared machine slows all of them alike; the ratios between rows are the figures to quote.

Every row also reports its model FLOPs (convolutions, matmuls and attention of the forward and backward
pass, counted by torch.utils.flop_counter on the eager network) and the achieved TFLOP/s. On a GPU
whose bf16 dense peak is known (or given with --peak-tflops) that gives the model FLOP utilisation
(MFU). Elementwise work (normalisation, activations, the optimizer) is not counted: it is the
difference between a row's rate and the peak. On a GPU every row also gets its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from mrdiff.bench.common import PRESETS, measure, peak_tflops
from mrdiff.bench.report import report
from mrdiff.bench.sampling import calibration_seconds, parse_sampler, sampling_rows
from mrdiff.bench.training import TRAINING_ROWS, training_rows
from mrdiff.console import info
from mrdiff.utils import atomic_write, unused_path

ROWS = (*TRAINING_ROWS, "sampling", "calibration")


def names(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return items


def integers(text: str) -> list[int]:
    return [int(item) for item in names(text)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrdiff.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: celeba on GPU, cpu on CPU")
    p.add_argument("--rows", type=lambda s: names(s, ROWS), default=list(ROWS),
                   help=f"comma-separated row groups (default: all): {', '.join(ROWS)}")
    p.add_argument("--precision", type=lambda s: names(s, ("fp32", "bf16")), default=["fp32", "bf16"],
                   help="training rows' precisions (default: fp32,bf16); sampling is bf16")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile training rows (bf16) of the multires, diffusers and fixed rows chosen")
    p.add_argument("--samplers", type=lambda s: [parse_sampler(x) for x in names(s)], default="ddim-50",
                   help="sampling rows' samplers as NAME-STEPS (default: ddim-50; e.g. ddim-50,dpmpp_2m-10)")
    p.add_argument("--sample-resolutions", type=integers, default=None,
                   help="sampling rows' canvas sides (default: the preset's)")
    p.add_argument("--sample-batches", type=integers, default=None,
                   help="sampling rows' batch sizes (default: the preset's)")
    p.add_argument("--capture", action="store_true",
                   help="add sampling rows whose per-step network call is compiled and replayed as a CUDA graph "
                        "(DiffusionPipeline compile='reduce-overhead')")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: rows that would begin their warm-up (compilation) later are dropped, and no "
                        "round begins that would end later; the report says what was dropped")
    p.add_argument("--cache-dir", default=None,
                   help="torch.compile's persistent cache (TORCHINDUCTOR_CACHE_DIR: FX graphs, Triton kernels): "
                        "a second run with the same torch, GPU and networks compiles from it")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak of the accelerator for MFU (default: known GPUs' data-sheet figure)")
    p.add_argument("--skip-calibration", action="store_true", help="leave out the calibration row")
    p.add_argument("--skip-sampling", action="store_true", help="leave out the sampling rows")
    p.add_argument("--out", default="bench.json")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    if args.cache_dir:  # read by Inductor when it first compiles; Triton's cache goes beneath it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("celeba" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    keys = [key for key in args.rows if key in TRAINING_ROWS]
    rows = training_rows(preset, device, args.compile, keys, args.precision) if keys else []
    if "sampling" in args.rows and not args.skip_sampling:
        rows += sampling_rows(preset, device, args.samplers, args.sample_resolutions, args.sample_batches,
                              args.capture)
    timing = measure(rows, args.repeats, device, args.time_budget, start)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}",
            "preset": preset_name, "repeats": args.repeats, "torch": torch.__version__,
            "command": " ".join(["python -m mrdiff.bench", *(sys.argv[1:] if argv is None else argv)]),
            "calibration_images": preset["calibration"]["images"],
            "peak_bf16_tflops": peak_tflops(device, args.peak_tflops), **timing,
            "cudagraph_skips": cudagraph_skips()}
    result = report(rows, meta)
    if timing["dropped_rows"]:
        info(f"\nover the time budget, not measured: {', '.join(timing['dropped_rows'])}")
    if meta["cudagraph_skips"]:
        info(f"\nInductor skipped CUDA graphs {meta['cudagraph_skips']} time(s): the captured rows ran without them")
    if "calibration" in args.rows and not args.skip_calibration:
        result["calibration_seconds"] = calibration_seconds(preset, device)
        images = meta["calibration_images"]
        info(f"\nNoiseShift calibration (50 DDIM timesteps, {images} images), seconds per resolution")
        for res, seconds in result["calibration_seconds"].items():
            info(f"  {res}²: {seconds:.1f} s")
    result["meta"]["seconds"] = time.perf_counter() - start
    out = unused_path(Path(args.out))  # an earlier run's figures are kept: bench-2.json, …
    with atomic_write(out, "w") as f:
        json.dump(result, f, indent=1)
    info(f"\nmrdiff.bench: wrote {out} ({result['meta']['seconds']:.0f} s)")


def cudagraph_skips() -> int:
    """How often Inductor fell back from CUDA graphs in this process (0 where nothing asked for them)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
