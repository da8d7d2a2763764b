"""DDIM against DPM-Solver++(2M) on a shipped evidence model: quality per network call, with 95% intervals.

    python scripts/compare_solvers.py [--weights models/fixed/seed0.pt] [--num-samples 256] [--out results/solvers]

Every row samples the same seeds at the model's training resolution and is scored as mrdiff.evidence scores
its cells (one-sun rate with a Wilson interval, suns per image and the detail metrics with bootstrap
intervals) against ground-truth renders. Writes table.md and table.json into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evidence import cell_metrics, load_model, references
from mrdiff.metrics.structure import reference_radii
from mrdiff.resolution import resolution_key

ROWS = (("ddim", 50), ("ddim", 20), ("dpmpp_2m", 20), ("dpmpp_2m", 10))
METRICS = (("one_sun_rate", "one-sun rate ↑", "{:.3f}"), ("mean_num_suns", "suns per image", "{:.2f}"),
           ("spectrum_distance", "spectrum distance ↓", "{:.3f}"),
           ("neighbour_difference", "neighbour diff.", "{:.3f}"))


def cell(values: dict, metric: str, pattern: str) -> str:
    return f"{pattern.format(values[metric])} [{pattern.format(values[metric + '_lo'])}, " \
           f"{pattern.format(values[metric + '_hi'])}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="models/fixed/seed0.pt")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-reference", type=int, default=1000)
    p.add_argument("--out", default="results/solvers")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "table.json").exists():
        raise SystemExit(f"mrdiff: error: {out} already holds a report (table.json): pass another --out")
    model, _ = load_model(Path(args.weights), torch.device("cpu"))
    side = model.hparams.train_resolution
    key = resolution_key(side, side)
    reference, radii = references(side, side, args.num_reference), reference_radii(1000)
    seeds = list(range(args.num_samples))
    rows = []
    for sampler, steps in ROWS:
        start = time.perf_counter()
        samples = torch.cat([model.sample(seeds[i:i + args.batch_size], side, sampling=SamplingSettings(sampler, steps))
                             for i in range(0, len(seeds), args.batch_size)])
        seconds = time.perf_counter() - start
        rows.append({"sampler": sampler, "steps": steps, "network_calls": steps,
                     "seconds_per_image": seconds / len(seeds), **cell_metrics(samples, reference, radii, key)})
        print(f"{sampler}-{steps}: one-sun {rows[-1]['one_sun_rate']:.3f}, spectrum "
              f"{rows[-1]['spectrum_distance']:.3f}, {seconds:.0f} s", flush=True)
    meta = {"command": "python scripts/compare_solvers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "weights": args.weights, "resolution": key, "num_samples": args.num_samples,
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Written by `{meta['command']}` on {meta['device']}: {args.weights} at {key}, seeds "
             f"0..{args.num_samples - 1} in every row, 95% intervals.", "",
             "| sampler | network calls | s / image | " + " | ".join(m[1] for m in METRICS) + " |",
             "|---|---:|---:|" + "---|" * len(METRICS)]
    for row in rows:
        lines.append(f"| {row['sampler']}-{row['steps']} | {row['network_calls']} | {row['seconds_per_image']:.3f} | "
                     + " | ".join(cell(row, m, fmt) for m, _, fmt in METRICS) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
