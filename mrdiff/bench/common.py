"""The benchmark's presets, its timed rows and the round-robin timing of them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrdiff.console import info

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
    warmup: Callable[[], None] | None = None  # the untimed first call (default: step); compiles and records
    warmup_seconds: float | None = None  # how long it took: mostly compilation for a compiled row
    peak_bytes: int = 0  # torch.cuda.max_memory_allocated during the row's timed calls
    peak_above_start: int = 0  # that peak less what was allocated when the call began: the row's working set
    meta: dict = field(default_factory=dict)  # what the report groups rows by (sampler, batch, ...)

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


def measure(rows: list[Row], repeats: int, device: torch.device, budget: float | None = None,
            start: float | None = None) -> dict:
    """Round-robin timing: one warm-up call each, then up to `repeats` rounds over all rows.

    With a time `budget` (seconds since `start`), a row is dropped whose warm-up, if it took as long as the
    longest so far (a compilation, once one has run), would end past it; rows come eager first, so the dropped
    ones are compiled ones. No round begins that would end past the budget if it took as long as the last one;
    at least one round is timed. Returns what was dropped and how many rounds ran.
    """
    start = time.perf_counter() if start is None else start
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    dropped, longest = [], 0.0
    for row in list(rows):
        if budget is not None and elapsed() + longest > budget:
            info(f"mrdiff.bench: {elapsed():.0f} s of a {budget:.0f} s budget spent: dropping {row.name!r}")
            rows.remove(row)
            dropped.append(row.name)
            continue
        sync(device)
        began = time.perf_counter()
        (row.warmup or row.step)()
        sync(device)
        row.warmup_seconds = time.perf_counter() - began
        longest = max(longest, row.warmup_seconds)
        info(f"mrdiff.bench: warmed up {row.name!r} in {row.warmup_seconds:.1f} s ({elapsed():.0f} s in)")
    rounds = 0
    for _ in range(repeats):
        began = time.perf_counter()
        for row in rows:
            timed_call(row, device)
        rounds += 1
        if budget is not None and elapsed() + (time.perf_counter() - began) > budget:
            break
    return {"dropped_rows": dropped, "rounds": rounds}


def timed_call(row: Row, device: torch.device) -> None:
    """One call of the row's step: its seconds, and on a GPU the peak memory it reached."""
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    row.step()
    sync(device)
    row.seconds.append(time.perf_counter() - began)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        row.peak_bytes = max(row.peak_bytes, peak)
        row.peak_above_start = max(row.peak_above_start, peak - resident)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """bf16 dense peak of this GPU: --peak-tflops, else the data-sheet figure for a known model."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name]
    return matches[0] if matches else None
