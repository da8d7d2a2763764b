"""The synthetic-scenes Table 1: train the model matrix, evaluate every model at every resolution, report.

    mrdiff evidence report [--train] [--models fixed,multires,...] [--weights models] --out results/<claim>

Models (configs/evidence/<name>.yaml over configs/evidence/base.yaml, base resolution R = 32): a
fixed-resolution DDPM trained on whole scenes at R, the multi-resolution model (R² patches of scenes
rendered at s ∈ {R} ∪ U[R, 2R], coordinates + SAFA), the same with a quarter of the batches whole 2R
canvases ("canvases", an mrdiff addition) and the ablations. Each trained model is exported as
fp16 EMA weights with what is needed to rebuild it (`<weights>/<name>/seed0.pt`, mrdiff.exported); existing
exports are reused, so evaluation alone needs no training: the shipped CPU-sized models are in models/.

Rows per model: plain, + NoiseShift (calibrated here on held-out renders), + analytic shift; plus
"fixed + upsample" (the fixed model's samples at R, bicubic-upsampled; `--upsample` names other
fixed-resolution rows to give the same trivial baseline), on request the training-free baselines above R
(--variants scaled_attention,redilation,window_fusion,redenoise: mrdiff.baselines; --variant-args tunes them)
and the ground-truth renders themselves, which give each metric's ceiling at each resolution. Columns:
resolutions. Every rate carries a Wilson 95% interval, every mean a bootstrap 95% interval. The report
(Markdown, JSON, figure) is written by this run, with the machine, the versions and the wall time.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mrdiff.baselines import method_args_for
from mrdiff.console import info
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evaluation.matrix import DEFAULT_VARIANTS, VARIANTS, Settings, evaluate
from mrdiff.evaluation.report import write_report
from mrdiff.exported import export, read
from mrdiff.metrics.fid import configured_weights, inception
from mrdiff.resolution import parse_resolution

MODELS = ("fixed", "multires", "canvases", "no_coords", "no_safa", "pixel")
CONFIGS = Path("configs/evidence")


# -- models -------------------------------------------------------------------------------------------
def fit_args(name: str, run_root: Path, overlays: list[str], extra: list[str]) -> list[str]:
    """`mrdiff fit` arguments of one model: base.yaml, the model's overlay, then any size overlays."""
    configs = [str(CONFIGS / "base.yaml"), str(CONFIGS / f"{name}.yaml"), *overlays]
    return ["fit", *(a for c in configs for a in ("--config", c)), f"--trainer.default_root_dir={run_root / name}",
            *extra]


def train(args: list[str], run: Path) -> Path:
    """`mrdiff fit` of one model of the matrix; returns the run's last.ckpt."""
    info("mrdiff evidence: mrdiff " + shlex.join(args))
    start = time.time()
    subprocess.run([sys.executable, "-m", "mrdiff", *args], check=True)
    (run / "train_seconds.txt").write_text(f"{time.time() - start:.0f}\n")
    return run / "checkpoints" / "last.ckpt"


# -- command ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrdiff evidence report", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fixed,multires,canvases",
                   help="comma-separated subset of " + ", ".join(MODELS) + " (default: the three shipped in "
                        "models/); LABEL=PATH adds exported weights "
                        "outside the matrix as row LABEL (e.g. a fine-tune), never trained here")
    p.add_argument("--weights", default="models", help="exported weights (<name>/seed0.pt), read or written")
    p.add_argument("--train", action="store_true", help="train the models whose weights are missing")
    p.add_argument("--runs", default="runs/evidence", help="run dirs of the fits --train starts")
    p.add_argument("--overlay", action="append", default=[], metavar="YAML",
                   help="a config put after each model's own for --train, e.g. configs/evidence/cpu.yaml "
                        "(the CPU-sized matrix); repeatable")
    p.add_argument("--fit-args", default="", help="extra `mrdiff fit` arguments for --train, e.g. "
                                                  "'--trainer.max_time=00:00:30:00'")
    p.add_argument("--out", default="runs/evidence/report", help="a new folder (reports are never overwritten)")
    p.add_argument("--resolutions", default="24,32,48,64,32x64", help="R = 32: below R, R, 1.5R, 2R, R x 2R")
    p.add_argument("--num-samples", type=int, default=400)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first … first + N − 1 (tune on others than "
                                                              "the report's)")
    default = SamplingSettings()
    p.add_argument("--sampler", default=default.sampler, choices=["ddim", "dpmpp_2m"])
    p.add_argument("--steps", type=int, default=default.steps)
    p.add_argument("--eta", type=float, default=default.eta, help="DDIM's η (1: stochastic, DDPM-like)")
    p.add_argument("--batch-size", type=int, default=400)
    p.add_argument("--calibration-images", type=int, default=32)
    p.add_argument("--num-reference", type=int, default=1000)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="rows per model: a subset of " + ", ".join(VARIANTS) + " (the last four, the training-free "
                        "baselines, only above R)")
    p.add_argument("--variant-args", default="", metavar="METHOD.FIELD=VALUE,...",
                   help="parameters of the training-free rows other than their defaults, e.g. "
                        "redenoise.t0=400,window_fusion.stride=8,redilation.levels=1/2,redilation.share=0.4")
    p.add_argument("--shifted-at", default=None, metavar="RES,...",
                   help="sample the rows other than plain (noiseshift, analytic, the training-free ones) only at "
                        "these resolutions (default: at all)")
    p.add_argument("--upsample", default=None, metavar="MODEL,...",
                   help="models (fixed-resolution ones) whose samples at R, bicubic-upsampled, are the trivial "
                        "baseline row '<model> + upsample' above R (default: fixed, when it is evaluated)")
    p.add_argument("--training-free", default=None, metavar="MODEL,...",
                   help="models that get the training-free rows of --variants (default: every model); e.g. only the "
                        "fixed-resolution ones, next to a multi-resolution model's plain row")
    p.add_argument("--sampler-check", type=int, default=0, metavar="N",
                   help="also sample N seeds at R with DDIM-50, DDPM-1000 and DPM-Solver++-10 (a sampler check)")
    p.add_argument("--inception-weights", default=None,
                   help="Inception weights file: adds FID and KID per cell (default: $MRDIFF_INCEPTION_WEIGHTS, else "
                        "the file `make fid-weights` wrote, if any)")
    p.add_argument("--no-inception", action="store_true", help="no FID or KID even when weights are there")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def comma_list(text: str) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def model_subset(option: str, text: str, models: list[str]) -> tuple[str, ...]:
    """The models an option names, each among --models (else one error line)."""
    subset = tuple(comma_list(text))
    if set(subset) - set(models):
        raise SystemExit(f"mrdiff: error: {option} {text} names models outside --models: "
                         f"pick them from {', '.join(models)}")
    return subset


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    start = time.time()
    entries = comma_list(args.models)
    names = [e for e in entries if "=" not in e]
    labelled = [e.split("=", 1) for e in entries if "=" in e]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"mrdiff: error: unknown evidence models {unknown}: choose from {', '.join(MODELS)}, "
                         f"or name exported weights as LABEL=PATH")
    extra = dict(labelled)
    if len(extra) < len(labelled) or any(not label or label in MODELS for label in extra):
        raise SystemExit(f"mrdiff: error: --models {args.models}: each LABEL=PATH needs its own non-empty label "
                         f"outside {', '.join(MODELS)}")
    missing = [f"{n}={p}" for n, p in extra.items() if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"mrdiff: error: no weights at {', '.join(missing)}: point LABEL=PATH at a file "
                         f"written by `mrdiff evidence export`")
    variants = tuple(comma_list(args.variants))
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"mrdiff: error: unknown --variants {sorted(set(variants) - set(VARIANTS))}: "
                         f"choose from {', '.join(VARIANTS)}")
    try:
        variant_args = method_args_for(args.variant_args, variants, "--variant-args",
                                       f"not among --variants {args.variants}")
    except ValueError as error:
        raise SystemExit(f"mrdiff: error: {error}") from None
    upsample = ("fixed",) if args.upsample is None else model_subset("--upsample", args.upsample, names + list(extra))
    free = None if args.training_free is None else model_subset("--training-free", args.training_free,
                                                                  names + list(extra))
    resolutions = [parse_resolution(r) for r in args.resolutions.split(",")]
    shifted_at = None if args.shifted_at is None else [parse_resolution(r) for r in args.shifted_at.split(",")]
    if shifted_at is not None and set(shifted_at) - set(resolutions):
        raise SystemExit(f"mrdiff: error: --shifted-at {args.shifted_at} names resolutions outside --resolutions "
                         f"{args.resolutions}: pick them from --resolutions")
    if (Path(args.out) / "table.json").exists():
        raise SystemExit(f"mrdiff: error: {args.out} already holds a report (table.json): pass another --out "
                         f"or move it away; reports are never overwritten")
    weights = {n: Path(args.weights) / n / "seed0.pt" for n in names}
    for name, path in weights.items():
        if path.is_file():
            continue
        if not args.train:
            raise SystemExit(f"mrdiff: error: no weights at {path}: pass --train to train {name} "
                             f"(or --weights pointing at exported models)")
        run_start = time.time()
        fit = fit_args(name, Path(args.runs), args.overlay, shlex.split(args.fit_args))
        ckpt = train(fit, Path(args.runs) / name)
        export(ckpt, path, "mrdiff " + shlex.join(fit), time.time() - run_start)
    weights.update({n: Path(p) for n, p in extra.items()})
    device = torch.device(args.device)
    settings = Settings(resolutions=resolutions,
                        num_samples=args.num_samples, first_seed=args.first_seed,
                        sampling=SamplingSettings(args.sampler, args.steps, args.eta),
                        batch_size=args.batch_size, calibration_images=args.calibration_images,
                        num_reference=args.num_reference,
                        variants=variants, variant_args=variant_args, shifted_at=shifted_at,
                        sampler_check=args.sampler_check, upsample=upsample, training_free=free,
                        extractor=inception(args.inception_weights).to(device)
                        if configured_weights(args.inception_weights) and not args.no_inception else None)
    result = evaluate(weights, settings, device)
    first = read(next(iter(weights.values())))
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result["meta"] = {
        "command": "mrdiff evidence report " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__, "wall_seconds": time.time() - start,
        "resolutions": settings.resolutions, "num_samples": settings.num_samples,
        "first_seed": settings.first_seed, **asdict(settings.sampling),
        "sampler_check": settings.sampler_check, "variants": settings.variants,
        "variant_args": settings.variant_args, "training_free": settings.training_free,
        "shifted_at": settings.shifted_at,
        "base_resolution": first["module"]["train_resolution"], "models": {n: str(p) for n, p in weights.items()},
    }
    write_report(result, Path(args.out))


if __name__ == "__main__":
    main()
