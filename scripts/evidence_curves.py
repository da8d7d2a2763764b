"""Training curves of evidence fits from their CSV logs: validation loss and the in-fit structure score.

    python scripts/evidence_curves.py results/archive/cpu_fits   # reads <name>.metrics*.csv, writes curves.md/.png

A resumed fit logs into a new CSV version: <name>.metrics.csv, <name>.metrics-2.csv, ... are read as one log.

The in-fit evaluation (ResolutionEvaluation, EMA weights) samples 200 seeds per size with the sampler its
config names; the validation loss is L_simple on held-out data (each model's own training distribution:
whole scenes for the fixed model, multi-resolution patches for the others, so compare losses within a row).
Models that see different pixels per step (whole 64² canvases in some batches) are compared by the training
pixels they have seen (the expectation over the canvas draws, from <name>.config.yaml), not by steps.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.metrics.detail import wilson_interval


def read(path: Path) -> dict[str, dict[int, float]]:
    """metric → {step: value} from a Lightning CSV log (rows hold the metrics logged at that step)."""
    out: dict[str, dict[int, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    out.setdefault(key, {})[int(row["step"]) + 1] = float(value)
    return out


def logs_in(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """name → its merged log, from every <name>.metrics*.csv (one per fit session)."""
    logs: dict[str, dict[str, dict[int, float]]] = {}
    for path in sorted(folder.glob("*.metrics*.csv")):
        merged = logs.setdefault(path.name.split(".metrics")[0], {})
        for metric, values in read(path).items():
            merged.setdefault(metric, {}).update(values)
    return logs


def pixels_per_step(data: dict) -> float:
    """Expected training pixels per optimizer step: patches, or whole canvases in a canvas_fraction of batches."""
    if not data.get("multires", True):
        side = data.get("train_size") or data["image_size"]
        return data["batch_size"] * side**2
    fraction, sides = data.get("canvas_fraction") or 0.0, data.get("canvas_sizes") or []
    canvas = sum(side**2 for side in sides) / len(sides) if sides else 0.0
    return data["batch_size"] * ((1 - fraction) * data["patch_size"] ** 2 + fraction * canvas)


def plot(logs: dict[str, dict[str, dict[int, float]]], pixels: dict[str, float], path: Path) -> None:
    """Validation loss and the in-fit one-sun rates against training pixels (steps when unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    by_pixels = len(pixels) == len(logs)  # else some fit has no config: steps for all
    xlabel = "training pixels (millions)" if by_pixels else "step"
    for name, log in logs.items():
        unit = pixels[name] / 1e6 if by_pixels else 1  # x per step
        sizes = sorted({int(k.rsplit("_", 1)[1]) for k in log if k.startswith("val/one_sun_rate_")})
        loss = log.get("val/loss", {})
        axes[0].plot([s * unit for s in sorted(loss)], [loss[s] for s in sorted(loss)], label=name)
        for ax, size in zip(axes[1:], (sizes[0], sizes[-1]) if sizes else ()):
            rate = log[f"val/one_sun_rate_{size}"]
            ax.plot([s * unit for s in sorted(rate)], [rate[s] for s in sorted(rate)], marker="o", label=name)
            ax.set(title=f"one-sun rate at {size}² (in-fit)", xlabel=xlabel, ylim=(0, 1))
    axes[0].set(title="validation loss (own distribution)", xlabel=xlabel, yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rate_cell(rate: float, trials: int | None) -> str:
    """'0.775 [0.71, 0.83]': a logged rate with its Wilson interval when the sample count is known."""
    if not trials:
        return f"{rate:.3f}"
    low, high = wilson_interval(round(rate * trials), trials)
    return f"{rate:.3f} [{low:.2f}, {high:.2f}]"


def main(folder: Path) -> None:
    logs = logs_in(folder)
    lines = [f"Written by `python scripts/evidence_curves.py {folder}` from the fits' CSV logs.", ""]
    num_samples: dict[str, int] = {}
    pixels: dict[str, float] = {}
    for name in logs:
        config = folder / f"{name}.config.yaml"
        settings = yaml.safe_load(config.read_text()) if config.is_file() else {}
        if "data" in settings:
            pixels[name] = pixels_per_step(settings["data"])
        callbacks = settings["trainer"]["callbacks"] if settings else []
        for cb in callbacks:
            if cb["class_path"].endswith("ResolutionEvaluation"):
                a = cb["init_args"]
                num_samples[name] = a["num_samples"]
                sampling = {**asdict(SamplingSettings()), **(a.get("sampling") or a)}  # older configs: flat
                lines.append(f"- {name}: in-fit evaluation of the EMA weights, {a['num_samples']} samples per size, "
                             f"{sampling['sampler']}-{sampling['steps']} (η = {sampling['eta'] or 0:g}).")
    lines += ["", "Rates carry Wilson 95% intervals over the in-fit samples.", "",
              "Training pixels: the expected count up to that step, in millions (32² × 32 = 0.033 M per "
              "step for patches of 32² or whole 32² scenes).", "",
              "| model | step | training pixels (M) | val loss | one-sun rate at R (in-fit) "
              "| one-sun rate at 2R (in-fit) | radius error at R | radius error at 2R |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, log in logs.items():
        sizes = sorted({int(k.rsplit("_", 1)[1]) for k in log if k.startswith("val/one_sun_rate_")})
        if len(sizes) < 2:
            continue
        r, r2 = sizes[0], sizes[-1]
        loss = log.get("val/loss", {})
        for step in sorted(log[f"val/one_sun_rate_{r}"]):
            near = min(loss, key=lambda s: abs(s - step)) if loss else None
            rates = [rate_cell(log[f"val/one_sun_rate_{size}"][step], num_samples.get(name)) for size in (r, r2)]
            radii = [f"{log[f'val/radius_error_{size}'][step]:.3f}" for size in (r, r2)]
            seen = f"{step * pixels[name] / 1e6:.0f}" if name in pixels else "–"
            lines.append(f"| {name} | {step} | {seen} | {f'{loss[near]:.5f}' if near is not None else '–'} | "
                         + " | ".join(rates + radii) + " |")
    (folder / "curves.md").write_text("\n".join(lines) + "\n")
    plot(logs, pixels, folder / "curves.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/archive/cpu_fits"))
