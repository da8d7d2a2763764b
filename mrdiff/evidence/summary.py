"""One size of an evidence report, models down and metrics across: the layout of the README's headline tables.

    mrdiff evidence summary results/evidence/cpu_matrix_matched_seeds --at 64

Reads REPORT/table.json (written by `mrdiff evidence report`), prints the table and writes it to
REPORT/summary_<at>.md. Every number is the report's own, with its 95% interval where the report has one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrdiff.console import info
from mrdiff.evaluation.report import format_cell
from mrdiff.resolution import parse_resolution, resolution_key

COLUMNS = (  # (metric, heading, format); the first is read at R, the others at --at
    ("one_sun_rate", "one-sun rate at R", "{:.2f}"),
    ("one_sun_rate", "one-sun rate", "{:.2f}"),
    ("mean_num_suns", "suns per image", "{:.2f}"),
    ("stacked_horizon_rate", "stacked horizons", "{:.2f}"),
    ("spectrum_distance", "spectrum distance", "{:.3f}"),
    ("radius_error", "sun radius error", "{:.3f}"),
)


def summary(result: dict, at: str) -> str:
    """Markdown: one row per model and variant of the report, COLUMNS across, at size `at`."""
    base = resolution_key(result["meta"]["base_resolution"], result["meta"]["base_resolution"])
    headings = [f"{COLUMNS[0][1]} ({base})", *(f"{title} at {at}" for _, title, _ in COLUMNS[1:])]
    lines = [f"From `{result['meta']['command']}`; 95% intervals as in the report.", "",
             "| | " + " | ".join(headings) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row, by_size in result["cells"].items():
        keys = [base] + [at] * (len(COLUMNS) - 1)
        cells = [format_cell(by_size.get(key), metric, pattern) for key, (metric, _, pattern) in zip(keys, COLUMNS)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mrdiff evidence summary", description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="a folder written by mrdiff evidence report")
    parser.add_argument("--at", required=True, help="a size of the report, e.g. 64 or 32x64")
    args = parser.parse_args(argv)
    result = json.loads((args.report / "table.json").read_text())
    at = resolution_key(*parse_resolution(args.at))
    text = summary(result, at)
    (args.report / f"summary_{at}.md").write_text(text)
    info(text.rstrip())

