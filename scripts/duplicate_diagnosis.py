"""Where the extra suns come from: a diagnosis of the 2R one-sun rate (issue 15).

    python scripts/duplicate_diagnosis.py --models fixed=models/fixed_97min/seed0.pt,multires=... \
        --sizes 32,64 --scaled fixed,multires --out results/evidence/duplicates_2r

Samples every model at every size (DDIM-25, η = 1, seeds 0..N-1, as the 400-sample report) and splits the
one-sun rate into its failure modes: no sun, two or more suns, and for images with several suns the radius
of the largest sun against the radii of the others, and how often a sun is cut by the canvas edge (never in
the data). An extra sun much smaller than the data's smallest
(radius 0.12 canvas units) is a sun drawn at the wrong scale; a second full-size sun is a counting error.
The last column counts tiled landscapes the sun counts miss: images in which a quarter of the columns
brighten again below their horizon (mrdiff.metrics.structure.stacked_horizons; never in the data).
`--scaled` adds rows with entropy-scaled attention (SamplingSettings.attention_scaling). Writes table.md,
table.json and samples.png into --out, which must not exist yet.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mrdiff.data.synthetic import CANVAS_MARGIN, SUN_RADIUS_RANGE
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evidence import Settings, generate, load_model, references, save_figure
from mrdiff.metrics.detail import bootstrap_interval, wilson_interval
from mrdiff.metrics.structure import STACKED_COLUMNS, detect_suns, stacked_horizons

EDGE = CANVAS_MARGIN + 0.02  # a data sun's disk stays inside ±CANVAS_MARGIN: one reaching past this is cut


def rate(flags: np.ndarray) -> dict[str, float]:
    if len(flags) == 0:
        return mean([])
    lo, hi = wilson_interval(int(flags.sum()), len(flags))
    return {"value": float(flags.mean()), "lo": lo, "hi": hi, "n": len(flags)}


def mean(values: list[float]) -> dict[str, float]:
    if not values:
        return {"value": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    lo, hi = bootstrap_interval(np.array(values))
    return {"value": float(np.mean(values)), "lo": lo, "hi": hi, "n": len(values)}


def failure_modes(images: torch.Tensor) -> dict[str, dict[str, float]]:
    """One-sun, no-sun and several-suns rates; radii of the single suns, and of the largest and the other
    suns in images with several; the share of those others below the data's smallest radius; the share of
    images with stacked horizons (a tiled landscape)."""
    suns = [sorted(detect_suns(image), key=lambda s: -s.radius) for image in images]
    counts = np.array([len(s) for s in suns])
    several = [s for s in suns if len(s) > 1]
    others = [sun.radius for s in several for sun in s[1:]]
    distances = [math.dist(s[0].center, sun.center) for s in several for sun in s[1:]]
    return {
        "one_sun": rate(counts == 1), "no_sun": rate(counts == 0), "several_suns": rate(counts > 1),
        "suns_per_image": mean(counts.astype(float).tolist()),
        "single_radius": mean([s[0].radius for s in suns if len(s) == 1]),
        "largest_radius": mean([s[0].radius for s in several]),
        "other_radius": mean(others),
        "others_below_data_min": rate(np.array(others) < SUN_RADIUS_RANGE[0]),
        "distance_to_largest": mean(distances),
        "at_edge": rate(np.array([any(max(map(abs, sun.center)) + sun.radius > EDGE for sun in s) for s in suns])),
        "stacked_horizons": rate(stacked_horizons(images).numpy() > STACKED_COLUMNS),
    }


COLUMNS = (("one_sun", "one sun", "{:.2f}"), ("no_sun", "no sun", "{:.2f}"), ("several_suns", "≥ 2 suns", "{:.2f}"),
           ("suns_per_image", "suns / image", "{:.2f}"), ("single_radius", "radius, single sun", "{:.3f}"),
           ("largest_radius", "radius, largest of several", "{:.3f}"),
           ("other_radius", "radius, the others", "{:.3f}"),
           ("others_below_data_min", "others < 0.12", "{:.2f}"),
           ("distance_to_largest", "distance to the largest", "{:.2f}"),
           ("at_edge", "sun cut by the edge", "{:.2f}"),
           ("stacked_horizons", "stacked horizons", "{:.2f}"))


def cell_text(cell: dict[str, float], pattern: str) -> str:
    if cell["n"] == 0:
        return "–"
    interval = "" if math.isnan(cell["lo"]) else f" [{pattern.format(cell['lo'])}, {pattern.format(cell['hi'])}]"
    return pattern.format(cell["value"]) + interval


def markdown(result: dict) -> str:
    lines = [f"Written by `{result['command']}` on CPU ({result['threads']} threads, torch {torch.__version__}) in "
             f"{result['minutes']:.1f} min. {result['num_samples']} samples per row, DDIM-25 (η = 1), seeds "
             f"0..{result['num_samples'] - 1}; 95% intervals (Wilson for rates, bootstrap for means). Radii and "
             f"distances in canvas units (the canvas half-width is 1); the data's sun radius is U[0.12, 0.22].", ""]
    for size, rows in result["cells"].items():
        lines += [f"**{size}²**", "", "| | " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for row, cell in rows.items():
            lines.append(f"| {row} | " + " | ".join(cell_text(cell[k], p) for k, _, p in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="name=path,... (exported weights)")
    parser.add_argument("--sizes", default="64")
    parser.add_argument("--scaled", default="", help="models that also get a scaled-attention row (name,...), "
                        "at the sizes other than their training side")
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"mrdiff: error: {args.out} exists; pass a new --out (a report is never overwritten)")
    start = time.time()
    sizes = [int(s) for s in args.sizes.split(",")]
    models = dict(item.split("=", 1) for item in args.models.split(","))
    base = Settings(resolutions=[(s, s) for s in sizes], num_samples=args.num_samples, batch_size=args.batch_size,
                    sampling=SamplingSettings(sampler="ddim", steps=25, eta=1.0))
    cells: dict[str, dict[str, dict]] = {str(s): {} for s in sizes}
    figure: dict[str, dict[str, torch.Tensor]] = {}
    for size in sizes:
        truth = references(size, size, args.num_samples, first=1000)
        cells[str(size)]["ground truth"] = failure_modes(truth)
        figure.setdefault("ground truth", {})[str(size)] = truth[:8]
    for name, path in models.items():
        model, _ = load_model(Path(path), torch.device("cpu"))
        for scaled in (False, True) if name in args.scaled.split(",") else (False,):
            settings = replace(base, sampling=replace(base.sampling, attention_scaling=scaled))
            row = f"{name} + scaled attention" if scaled else name
            for size in sizes:
                if scaled and size == model.hparams.train_resolution:
                    continue  # the same token counts as training: identical to the plain row
                tick = time.time()
                images = generate(model, size, size, settings)
                cells[str(size)][row] = failure_modes(images)
                figure.setdefault(row, {})[str(size)] = images[:8]
                print(f"{row} at {size}: one sun {cells[str(size)][row]['one_sun']['value']:.3f} "
                      f"({time.time() - tick:.0f} s)", flush=True)
    result = {"command": "python scripts/duplicate_diagnosis.py " + " ".join(argv or sys.argv[1:]),
              "threads": torch.get_num_threads(), "minutes": (time.time() - start) / 60,
              "num_samples": args.num_samples, "cells": cells}
    args.out.mkdir(parents=True)
    (args.out / "table.json").write_text(json.dumps(result, indent=1))
    (args.out / "table.md").write_text(markdown(result) + "\n")
    save_figure(figure, [str(s) for s in sizes], args.out / "samples.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
