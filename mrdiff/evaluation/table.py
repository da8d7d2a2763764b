"""The `mrdiff test` table: rows are variants, columns resolutions, cells metric → value (with intervals).

`ResolutionEvaluation` (mrdiff.callbacks.evaluation) fills it; this module renders it as Markdown (values
with their 95% intervals), CSV, JSON (non-finite values become null) and a plot of FID and the one-sun rate
against resolution.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrdiff.evaluation.cells import Variant
from mrdiff.evaluation.report import format_cell
from mrdiff.resolution import parse_resolution

METRICS: dict[str, tuple[str, str]] = {
    "fid": ("FID ↓", "{:.2f}"),
    "kid": ("KID ↓", "{:.4f}"),
    "one_sun_rate": ("one-sun rate ↑", "{:.3f}"),
    "stacked_horizon_rate": ("stacked-horizon rate ↓", "{:.3f}"),
    "radius_error": ("sun radius error ↓", "{:.3f}"),
    "spectrum_distance": ("power-spectrum distance to the reference ↓", "{:.3f}"),
}
"""Table metrics in display order: heading and number format."""


@dataclass
class EvalTable:
    """Rows: variants; columns: resolutions; cells: metric → value (nan where undefined)."""

    resolutions: list[str]
    variants: list[Variant]
    cells: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    structure: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def value(self, variant: str, resolution: str, metric: str) -> float:
        """One number of the table, nan when it was not measured or is undefined."""
        return self.cells.get((variant, resolution), {}).get(metric, math.nan)

    def metrics(self) -> list[str]:
        """The metrics some cell has, in display order."""
        present = {name for cell in self.cells.values() for name in cell}
        return [name for name in METRICS if name in present]

    def rows(self) -> list[list[Any]]:
        """[variant, metric, value per resolution] for every (variant, metric): the CSV / W&B layout."""
        return [[v.label, metric, *(self.value(v.label, r, metric) for r in self.resolutions)]
                for metric in self.metrics() for v in self.variants]

    def columns(self) -> list[str]:
        """Header of rows(): variant, metric, then the resolutions."""
        return ["variant", "metric", *self.resolutions]

    def markdown(self) -> str:
        """One Markdown table per metric: variants down, resolutions across."""
        blocks = []
        for metric in self.metrics():
            heading, fmt = METRICS[metric]
            if metric in ("fid", "kid") and self.settings.get("num_samples"):  # never compare FIDs across N
                heading += f" (N = {self.settings['num_samples']} fakes, {self.settings.get('num_reference')} reals)"
            lines = [f"**{heading}**", "", "| | " + " | ".join(self.resolutions) + " |",
                     "|---|" + "---:|" * len(self.resolutions)]
            for v in self.variants:
                values = (format_cell(self.cells.get((v.label, r)), metric, fmt) for r in self.resolutions)
                lines.append(f"| {v.label} | " + " | ".join(values) + " |")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + "\n"

    def csv(self) -> str:
        """rows() as CSV, full precision."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns())
        writer.writerows([[*row[:2], *(repr(x) for x in row[2:])] for row in self.rows()])
        return out.getvalue()

    def as_json(self) -> dict[str, Any]:
        """Settings, columns and rows with every metric of every cell (nan → null)."""
        rows = []
        for v in self.variants:
            cells = {r: {**self.cells.get((v.label, r), {}), **({"structure": self.structure[(v.label, r)]}
                                                               if (v.label, r) in self.structure else {})}
                     for r in self.resolutions}
            rows.append({"variant": v.label, "key_suffix": v.slug, "cells": cells})
        return finite({"settings": self.settings, "columns": self.resolutions, "metrics": self.metrics(),
                        "rows": rows})


def finite(obj: Any) -> Any:
    """A copy of nested dicts / lists with non-finite floats replaced by None (valid JSON)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot_eval_table(table: EvalTable, path: Path) -> Path | None:
    """FID and one-sun rate against resolution, one line per variant (PNG); None when neither was measured."""
    metrics = [m for m in ("fid", "one_sun_rate") if m in table.metrics()]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [math.sqrt(math.prod(parse_resolution(r))) for r in table.resolutions]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for v in table.variants:
            values = [table.value(v.label, r, metric) for r in table.resolutions]
            ax.plot(sides, values, marker="o", label=v.label)
        ax.set_xticks(sides, labels=table.resolutions)
        ax.set(xlabel="resolution", ylabel=METRICS[metric][0], title=METRICS[metric][0])
        if metric == "one_sun_rate":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
