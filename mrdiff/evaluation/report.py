"""Writing reports: the evidence report's Markdown tables, its figure of samples, and its JSON.

Rows are models and their variants, columns resolutions; every cell shows its 95% interval where it has one
(`format_cell`). The report names the command, machine, versions and wall time that produced it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from mrdiff.console import info
from mrdiff.resolution import resolution_key

T_BUCKETS = ((0, 100), (100, 300), (300, 600), (600, 900), (900, 1000))
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}


METRICS = (("one_sun_rate", "one-sun rate ↑ (ground truth: the data's own rate)", "{:.2f}"),
           ("mean_num_suns", "suns per image (ground truth: 1)", "{:.2f}"),
           ("stacked_horizon_rate", "images with stacked horizons, a tiled landscape ↓ (ground truth: the data's own "
                                    "rate)", "{:.2f}"),
           ("spectrum_distance", "power-spectrum distance to ground truth ↓ (mean |Δ log10 power|)", "{:.3f}"),
           ("neighbour_difference", "neighbour difference (speckle; compare with ground truth)", "{:.3f}"),
           ("sky_red", "sky red, top quarter (compare with ground truth)", "{:.2f}"),
           ("fid", "FID against the reference renders ↓ (with Inception weights)", "{:.1f}"),
           ("kid", "KID against the reference renders ↓ (with Inception weights)", "{:.4f}"))


def format_cell(cell: dict | None, metric: str, pattern: str) -> str:
    if not cell or metric not in cell or not math.isfinite(cell[metric]):
        return "–"
    lo, hi = cell.get(f"{metric}_lo", math.nan), cell.get(f"{metric}_hi", math.nan)
    value = pattern.format(cell[metric])
    return value if not math.isfinite(lo) else f"{value} [{pattern.format(lo)}, {pattern.format(hi)}]"


def markdown(result: dict) -> str:
    meta, cells = result["meta"], result["cells"]
    columns = [resolution_key(*hw) for hw in meta["resolutions"]]
    eta = f" (η = {meta['eta']:g})" if meta.get("eta") else ""
    first = meta.get("first_seed", 0)
    lines = [f"Written by `{meta['command']}` on {meta['device']} (torch {meta['torch']}) in "
             f"{meta['wall_seconds'] / 60:.1f} min. {meta['num_samples']} samples per cell, "
             f"{SAMPLER_NAMES.get(meta.get('sampler', 'ddim'), meta.get('sampler'))}-{meta['steps']}{eta}, "
             f"seeds {first}..{first + meta['num_samples'] - 1}; intervals are 95% (Wilson for rates, bootstrap for "
             f"means). "
             f"Trained at R = {meta['base_resolution']}.", ""]
    for metric, title, pattern in METRICS:
        if not any(metric in cell for by_res in cells.values() for cell in by_res.values()):
            continue  # FID and KID only where Inception weights were given
        lines += [f"**{title}**", "", "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row, by_res in cells.items():
            values = (format_cell(by_res.get(c), metric, pattern) for c in columns)
            lines.append(f"| {row} | " + " | ".join(values) + " |")
        lines.append("")
    lines += paired_lines(cells, columns)
    lines += ["**Training and ε-MSE per timestep bucket at R (held-out renders; x̂0-MSE in brackets)**", ""]
    buckets = [f"{lo}-{hi}" for lo, hi in T_BUCKETS]
    lines += ["| model | steps | train min | " + " | ".join(buckets) + " |", "|---|---:|---:|" + "---:|" * len(buckets)]
    base = resolution_key(meta["base_resolution"], meta["base_resolution"])
    for name, diag in result["diagnostics"].items():
        mse = diag["eps_mse"].get(base, {})
        minutes = f"{diag['train_seconds'] / 60:.1f}" if diag.get("train_seconds") else "–"
        lines.append(f"| {name} | {diag['global_step']} | {minutes} | " + " | ".join(
            f"{mse[b]['eps_mse']:.4f} ({mse[b]['x0_mse']:.3g})" if b in mse else "–" for b in buckets) + " |")
    checks = {name: diag["samplers"] for name, diag in result["diagnostics"].items() if diag.get("samplers")}
    if checks:
        lines += ["", f"**Samplers at R: the same seeds and weights through each sampler "
                      f"({meta.get('sampler_check')} samples)**", "",
                  "| model | sampler | one-sun rate | neighbour difference | spectrum distance | pixels at ±1 | "
                  "seconds |", "|---|---|---:|---:|---:|---:|---:|"]
        truth = result["cells"].get("ground truth", {}).get(base)
        if truth:
            lines.append(f"| ground truth | – | {format_cell(truth, 'one_sun_rate', '{:.2f}')} | "
                         f"{format_cell(truth, 'neighbour_difference', '{:.3f}')} | "
                         f"{format_cell(truth, 'spectrum_distance', '{:.3f}')} | – | – |")
        for name, by_sampler in checks.items():
            for sampler, cell in by_sampler.items():
                lines.append(f"| {name} | {sampler} | {format_cell(cell, 'one_sun_rate', '{:.2f}')} | "
                             f"{format_cell(cell, 'neighbour_difference', '{:.3f}')} | "
                             f"{format_cell(cell, 'spectrum_distance', '{:.3f}')} | {cell['saturated']:.3f} | "
                             f"{cell['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def save_figure(figure: dict[str, dict[str, torch.Tensor]], columns: list[str], path: Path) -> None:
    """Rows = models and variants, columns = resolutions; each cell a strip of samples at its true size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows = list(figure)
    strips = {(row, col): make_grid(images * 0.5 + 0.5, nrow=len(images), padding=1, pad_value=1)
              for row, cells in figure.items() for col, images in cells.items()}
    # every sample at twice its pixel size (dpi 110): a 64² strip of 8 stays legible instead of being shrunk
    # to a fixed cell width; widths and heights follow the largest strip of each column and row
    inch = 2 / 110
    widths = [max([strips[r, c].shape[2] for r in rows if (r, c) in strips], default=32) * inch for c in columns]
    heights = [max([strips[r, c].shape[1] for c in columns if (r, c) in strips], default=32) * inch for r in rows]
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(sum(widths) + 0.25 * len(columns) + 1.4, sum(heights) + 0.3 * len(rows) + 0.4),
                             gridspec_kw={"width_ratios": widths, "height_ratios": heights})
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            if (row, col) in strips:
                ax.imshow(strips[row, col].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
            if j == 0:
                ax.set_ylabel(row, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0:
                ax.set_title(col, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAIRED = (("one_sun_rate", "Δ one-sun rate", "{:+.3f}"), ("spectrum_distance", "Δ spectrum distance", "{:+.4f}"),
          ("sky_red", "Δ sky red", "{:+.3f}"))


def paired_lines(cells: dict, columns: list[str]) -> list[str]:
    """Each row's paired difference against its model's plain row at the same size and seeds (when measured)."""
    found = [(row, key, by_res[key]["paired"]) for row, by_res in cells.items() for key in columns
             if "paired" in by_res.get(key, {})]
    if not found:
        return []
    lines = ["**Paired against the plain row: the same seeds, row − plain, 95% bootstrap over seeds**", "",
             "| row | size | " + " | ".join(title for _, title, _ in PAIRED) + " |",
             "|---|---|" + "---:|" * len(PAIRED)]
    for row, key, paired in found:
        lines.append(f"| {row} | {key} | " + " | ".join(format_cell(paired, m, f) for m, _, f in PAIRED) + " |")
    return [*lines, ""]


def plot_noiseshift(tables: dict[str, dict[str, dict]], path: Path) -> None:
    """t̂ − t of every NoiseShift calibration the report made, one panel per row, one line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.4), squeeze=False)
    for ax, (row, by_size) in zip(axes[0], tables.items()):
        for key, cal in by_size.items():
            t = np.asarray(cal["t"])
            accepted = (cal.get("pooled") or {}).get("accepted")
            label = key + ("" if accepted is None else (" (accepted)" if accepted else " (rejected: identity)"))
            ax.plot(t, np.asarray(cal["t_hat"]) - t, marker=".", label=label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="timestep t", ylabel="t̂ − t", title=row)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figure = result.pop("figure")
    columns = [resolution_key(*hw) for hw in result["meta"]["resolutions"]]
    save_figure(figure, columns, out / "samples.png")
    if result.get("noiseshift"):
        plot_noiseshift(result["noiseshift"], out / "noiseshift.png")
    (out / "table.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(markdown(result))
    info(f"mrdiff evidence: wrote {out}/table.md, table.json and samples.png")
