"""The benchmark's tables: every row, the ratios between rows of one run, and the best batch of each sampler."""

from __future__ import annotations

import statistics

from mrdiff.bench.common import Row
from mrdiff.console import info

GIB = 2**30
SAMPLES = 10_000  # the evaluation's sample count per cell (configs/celeba.yaml): what sampling rows project to


def ratio(rows: dict[str, Row], a: str, b: str) -> float | None:
    return rows[a].images_per_s / rows[b].images_per_s if a in rows and b in rows else None


def _cost(rows: dict[str, Row], tag: str, variant: str) -> float | None:
    """Time per image of the multi-resolution U-Net relative to the fixed one (1.10 = 10% slower)."""
    return ratio(rows, f"train fixed U-Net {tag}", f"train multi-res, {variant} {tag}")


def training_ratios(by_name: dict[str, Row]) -> dict[str, float | None]:
    diffusers = "train diffusers UNet2DModel"
    return {
        "fixed / diffusers (fp32)": ratio(by_name, "train fixed U-Net fp32", f"{diffusers} fp32"),
        "fixed / diffusers (bf16)": ratio(by_name, "train fixed U-Net bf16", f"{diffusers} bf16"),
        "multi-res per-sample cost over fixed (bf16)": _cost(by_name, "bf16", "per-sample scales"),
        "multi-res per-batch cost over fixed (bf16)": _cost(by_name, "bf16", "per-batch scale"),
        "multi-res per-sample cost over fixed (fp32)": _cost(by_name, "fp32", "per-sample scales"),
        "bf16 / fp32 (fixed)": ratio(by_name, "train fixed U-Net bf16", "train fixed U-Net fp32"),
        "bf16 / fp32 (multi-res)": ratio(by_name, "train multi-res, per-sample scales bf16",
                                          "train multi-res, per-sample scales fp32"),
        "channels_last / default (fixed, bf16)": ratio(by_name, "train fixed U-Net bf16 channels_last",
                                                       "train fixed U-Net bf16"),
        "compiled / eager (fixed, bf16)": ratio(by_name, "train fixed U-Net bf16 compiled", "train fixed U-Net bf16"),
        "compiled / eager (multi-res per-sample, bf16)": ratio(
            by_name, "train multi-res, per-sample scales bf16 compiled", "train multi-res, per-sample scales bf16"),
        "compiled / eager (diffusers, bf16)": ratio(by_name, f"{diffusers} bf16 compiled", f"{diffusers} bf16"),
        "fixed compiled / diffusers compiled (bf16)": ratio(by_name, "train fixed U-Net bf16 compiled",
                                                            f"{diffusers} bf16 compiled"),
        "multi-res compiled / diffusers compiled (bf16)": ratio(
            by_name, "train multi-res, per-sample scales bf16 compiled", f"{diffusers} bf16 compiled"),
        "fixed compiled / diffusers eager (bf16)": ratio(by_name, "train fixed U-Net bf16 compiled",
                                                         f"{diffusers} bf16"),
        "multi-res per-sample cost over fixed (bf16 compiled)": _cost(by_name, "bf16 compiled", "per-sample scales"),
    }


def sampling_summary(rows: list[Row]) -> dict[str, dict]:
    """Per sampler and resolution, eager and captured: the batch with the most images/s, its projected seconds
    for 10,000 samples and peak memory, and captured / eager at every batch both ran."""
    out: dict[str, dict] = {}
    for row in (r for r in rows if "sampler" in r.meta):
        key = f"{row.meta['sampler']} at {row.meta['resolution']}²"
        mode = "captured" if row.meta["captured"] else "eager"
        entry = out.setdefault(key, {})
        best = entry.get(f"best {mode}")
        if best is None or row.images_per_s > best["images_per_s"]:
            entry[f"best {mode}"] = {"batch": row.meta["batch"], "images_per_s": row.images_per_s,
                                     f"seconds_per_{SAMPLES}": SAMPLES / row.images_per_s,
                                     "peak_gib": row.peak_bytes / GIB}
        if row.meta["captured"]:
            eager = next((r for r in rows if r.meta == {**row.meta, "captured": False}), None)
            if eager is not None:
                entry.setdefault("captured / eager by batch", {})[row.meta["batch"]] = \
                    row.images_per_s / eager.images_per_s
    return out


def report(rows: list[Row], meta: dict) -> dict:
    by_name = {r.name: r for r in rows}
    peak = meta.get("peak_bf16_tflops")
    mfu = {r.name: r.tflops_per_s / peak if peak and r.flops and "bf16" in r.name else None for r in rows}
    info(f"\nmrdiff bench — {meta['device']}, preset {meta['preset']}, median of {meta['repeats']} rounds")
    info(f"{'row':<58} {'images/s':>9} {'s/call':>8} {'GFLOP/call':>11} {'TFLOP/s':>8} {'MFU':>6} "
         f"{'peak GiB':>8} {'+GiB':>6} {'warm-up s':>9}")
    for r in rows:
        flops = f"{r.flops / 1e9:>11.1f} {r.tflops_per_s:>8.3f}" if r.flops else f"{'':>11} {'':>8}"
        line = (f"{r.name:<58} {r.images_per_s:>9.2f} {statistics.median(r.seconds):>8.3f} {flops} "
                f"{format(mfu[r.name], '.1%') if mfu[r.name] else '':>6} ")
        memory = f"{r.peak_bytes / GIB:>8.2f} {r.peak_above_start / GIB:>6.2f}" if r.peak_bytes else f"{'':>8} {'':>6}"
        info(line + memory + (f" {r.warmup_seconds:>9.1f}" if r.warmup_seconds is not None else ""))
    ratios = training_ratios(by_name)
    if any(value is not None for value in ratios.values()):
        info("\nratios")
    for key, value in ratios.items():
        if value is not None:
            info(f"  {key:<52} {value:6.2f}" + ("" if "cost" not in key else f"  ({(value - 1) * 100:+.0f}%)"))
    sampling = sampling_summary(rows)
    if sampling:
        info(f"\nsampling: the best batch of each, and the seconds {SAMPLES:,} samples would take at its rate")
    for key, entry in sampling.items():
        for mode in ("eager", "captured"):
            if (best := entry.get(f"best {mode}")) is not None:
                info(f"  {key:<32} {mode:<8} batch {best['batch']:>4}: {best['images_per_s']:8.1f} images/s, "
                     f"{best[f'seconds_per_{SAMPLES}']:7.1f} s per {SAMPLES:,}"
                     + (f", peak {best['peak_gib']:.2f} GiB" if best["peak_gib"] else ""))
        for batch, value in entry.get("captured / eager by batch", {}).items():
            info(f"  {key:<32} captured / eager at batch {batch}: {value:.2f}")
    return {"meta": meta, "ratios": ratios, "sampling": sampling,
            "rows": {r.name: {"images_per_s": r.images_per_s, "seconds": r.seconds, "flops": r.flops,
                              "tflops_per_s": r.tflops_per_s, "mfu": mfu[r.name],
                              "warmup_seconds": r.warmup_seconds, "peak_gib": r.peak_bytes / GIB,
                              "peak_above_start_gib": r.peak_above_start / GIB, **r.meta,
                              **({f"seconds_per_{SAMPLES}": SAMPLES / r.images_per_s} if "sampler" in r.meta else {})}
                     for r in rows}}
