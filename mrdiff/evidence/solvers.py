"""Samplers against network calls: the same seeds and weights through DDIM and DPM-Solver++(2M) at several sizes.

    mrdiff evidence solvers --models fixed=models/fixed/seed0.pt,canvases=models/canvases/seed0.pt \
        --sizes 32,64 --samplers ddim-50,ddim-20,dpmpp_2m-20,dpmpp_2m-10 --out results/solvers

Every row samples seeds 0..N−1 and is scored as the evidence report scores its cells (mrdiff.evaluation:
one-sun rate with a Wilson interval, suns per image and the detail metrics with bootstrap intervals, and KID
with its interval when the Inception weights are available) against held-out ground-truth renders.
Writes table.md and table.json into --out (a new folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from mrdiff.console import info
from mrdiff.data.synthetic import reference_radii
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evaluation.cells import references
from mrdiff.evaluation.matrix import sampler_check
from mrdiff.evaluation.report import format_cell
from mrdiff.evaluation.scores import InceptionScores
from mrdiff.exported import load
from mrdiff.metrics.fid import configured_weights, inception
from mrdiff.resolution import parse_resolution, resolution_key

METRICS = (("one_sun_rate", "one-sun rate ↑", "{:.3f}"), ("mean_num_suns", "suns per image", "{:.2f}"),
           ("stacked_horizon_rate", "stacked horizons ↓", "{:.2f}"),
           ("spectrum_distance", "spectrum distance ↓", "{:.3f}"),
           ("neighbour_difference", "neighbour diff.", "{:.3f}"), ("kid", "KID ↓", "{:.4f}"))


def parse_sampler(text: str) -> SamplingSettings:
    """'ddim-50' → DDIM with 50 network calls; 'dpmpp_2m-10'; 'ddim-50-eta1' for η = 1."""
    parts = text.split("-")
    try:
        eta = float(parts[2].removeprefix("eta")) if len(parts) > 2 else 0.0
        return SamplingSettings(parts[0], int(parts[1]), eta=eta)
    except (IndexError, ValueError) as error:
        raise SystemExit(f"mrdiff: error: --samplers {text!r}: write SAMPLER-STEPS[-etaE], e.g. ddim-50 or "
                         f"dpmpp_2m-10 ({error})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrdiff evidence solvers", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fixed=models/fixed/seed0.pt",
                   help="LABEL=PATH,... exported weights (models/MANIFEST.md lists the shipped ones)")
    p.add_argument("--sizes", default="32,64", help="canvas sizes, e.g. 32,64 (R and 2R)")
    p.add_argument("--samplers", default="ddim-50,ddim-20,dpmpp_2m-20,dpmpp_2m-10")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-reference", type=int, default=1000)
    p.add_argument("--inception-weights", default=None, help="default: the cached `make fid-weights` file, if any")
    p.add_argument("--out", required=True, help="a new folder for table.md, table.json and curves.png")
    p.add_argument("--redraw", action="store_true", help="only draw curves.png again from --out's table.json")
    return p


def plot(rows: list[dict], path: Path) -> None:
    """Each metric against network calls, one panel per metric and size, one line per model and sampler, with
    the rows' 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["size"] for row in rows}, key=lambda k: parse_resolution(k)[0])
    metrics = [(m, title) for m, title, _ in METRICS if m in ("one_sun_rate", "spectrum_distance", "kid")
               and any(m in row for row in rows)]
    fig, axes = plt.subplots(len(sizes), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(sizes)), squeeze=False)
    for i, size in enumerate(sizes):
        for j, (metric, title) in enumerate(metrics):
            ax = axes[i][j]
            for model in dict.fromkeys(row["model"] for row in rows):
                for family, marker in (("DDIM", "o"), ("DPM", "s")):
                    line = sorted((r for r in rows if r["model"] == model and r["size"] == size
                                   and r["sampler"].startswith(family)), key=lambda r: r["network_calls"])
                    if not line:
                        continue
                    x = [r["network_calls"] for r in line]
                    y = [r[metric] for r in line]
                    err = [[r[metric] - r[f"{metric}_lo"] for r in line], [r[f"{metric}_hi"] - r[metric] for r in line]]
                    ax.errorbar(x, y, yerr=err, marker=marker, capsize=2, label=f"{model} {family}")
            ax.set(xscale="log", xlabel="network calls", title=f"{title} at {size}")
            ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    out = Path(args.out)
    if args.redraw:
        plot(json.loads((out / "table.json").read_text())["rows"], out / "curves.png")
        info(f"mrdiff evidence: drew {out}/curves.png from its table.json")
        return
    if (out / "table.json").exists():
        raise SystemExit(f"mrdiff: error: {out} already holds a report (table.json): pass another --out")
    models = dict(entry.split("=", 1) for entry in args.models.split(",") if "=" in entry)
    missing = [p for p in models.values() if not Path(p).is_file()]
    if not models or missing:
        raise SystemExit(f"mrdiff: error: --models {args.models}: no weights at {missing or 'any entry'}; give "
                         f"LABEL=PATH of files from models/ (models/MANIFEST.md)")
    samplers = tuple(parse_sampler(s) for s in args.samplers.split(","))
    sizes = [parse_resolution(s) for s in args.sizes.split(",")]
    extractor = inception(args.inception_weights) if configured_weights(args.inception_weights) else None
    radii, rows = reference_radii(1000), []
    for hw in sizes:
        reference = references(*hw, args.num_reference)
        scores = InceptionScores(reference, extractor, args.num_samples) if extractor is not None else None
        for label, path in models.items():
            pipeline, _ = load(path)
            found = sampler_check(pipeline, reference, radii, args.num_samples, args.batch_size, samplers,
                                  size=hw, inception=scores)
            for (sampler, cell), sampling in zip(found.items(), samplers):
                rows.append({"model": label, "size": resolution_key(*hw), "sampler": sampler,
                             "network_calls": sampling.steps, **cell})
                info(f"mrdiff evidence: {label} {resolution_key(*hw)} {sampler}: one-sun {cell['one_sun_rate']:.3f}, "
                     f"spectrum {cell['spectrum_distance']:.3f}, {cell['seconds']:.0f} s")
    meta = {"command": "mrdiff evidence solvers " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "models": models, "num_samples": args.num_samples, "torch": torch.__version__,
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "table.md").write_text(markdown(meta, rows))
    plot(rows, out / "curves.png")
    info(markdown(meta, rows).rstrip())


def markdown(meta: dict, rows: list[dict]) -> str:
    metrics = [m for m in METRICS if any(m[0] in row for row in rows)]
    lines = [f"Written by `{meta['command']}` on {meta['device']}: seeds 0..{meta['num_samples'] - 1} in every row, "
             f"95% intervals (Wilson for rates, bootstrap for means, ±1.96 s.d. of subsets for KID).", "",
             "| model | size | sampler | network calls | s / image | " + " | ".join(m[1] for m in metrics) + " |",
             "|---|---|---|---:|---:|" + "---|" * len(metrics)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['size']} | {row['sampler']} | {row['network_calls']} | "
                     f"{row['seconds'] / meta['num_samples']:.3f} | "
                     + " | ".join(format_cell(row, m, fmt) for m, _, fmt in metrics) + " |")
    return "\n".join(lines) + "\n"
