"""One size of an evidence report, models down and metrics across: the layout of the README's headline table.

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

COLUMNS = (  # (metric, heading, format, read at R?)
    ("one_sun_rate", "one-sun rate at R", "{:.2f}", True),
    ("one_sun_rate", "one-sun rate", "{:.2f}", False),
    ("mean_num_suns", "suns per image", "{:.2f}", False),
    ("stacked_horizon_rate", "stacked horizons", "{:.2f}", False),
    ("spectrum_distance", "spectrum distance", "{:.3f}", False),
    ("radius_error", "sun radius error", "{:.3f}", False),
)
KID_COLUMNS = (("kid", "KID at R", "{:.4f}", True), ("kid", "KID", "{:.4f}", False))  # reports with Inception


def summary(result: dict, at: str) -> str:
    """Markdown: one row per model and variant of the report, COLUMNS across (and KID at R and at `at` when
    the report measured it), at size `at`."""
    base = resolution_key(result["meta"]["base_resolution"], result["meta"]["base_resolution"])
    has_kid = any("kid" in cell for by_size in result["cells"].values() for cell in by_size.values())
    columns = COLUMNS + (KID_COLUMNS if has_kid else ())
    headings = [f"{title} ({base})" if at_r else f"{title} at {at}" for _, title, _, at_r in columns]
    lines = [f"From `{result['meta']['command']}`; 95% intervals as in the report.", "",
             "| | " + " | ".join(headings) + " |", "|---|" + "---:|" * len(columns)]
    for row, by_size in result["cells"].items():
        cells = [format_cell(by_size.get(base if at_r else at), metric, pattern)
                 for metric, _, pattern, at_r in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merged(results: list[dict]) -> dict:
    """Several reports as one: their rows in order (a row already there, e.g. ground truth, is kept from the
    first report), the first report's base resolution, and every report's command."""
    cells: dict[str, dict] = {}
    for result in results:
        for row, by_size in result["cells"].items():
            cells.setdefault(row, by_size)
    command = "`; `".join(r["meta"]["command"] for r in results)
    return {"meta": {**results[0]["meta"], "command": command}, "cells": cells}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mrdiff evidence summary", description=__doc__.split("\n")[0])
    parser.add_argument("reports", type=Path, nargs="+",
                        help="folders written by mrdiff evidence report (several: their rows in one table; sample "
                             "them on the same seeds)")
    parser.add_argument("--at", required=True, help="a size of the report, e.g. 64 or 32x64")
    parser.add_argument("--out", type=Path, default=None,
                        help="the summary file (default: summary_<at>.md beside the one report; needed for several)")
    args = parser.parse_args(argv)
    if len(args.reports) > 1 and args.out is None:
        raise SystemExit("mrdiff: error: several reports need --out FILE: the summary belongs to none of them")
    result = merged([json.loads((report / "table.json").read_text()) for report in args.reports])
    at = resolution_key(*parse_resolution(args.at))
    text = summary(result, at)
    out = args.out or args.reports[0] / f"summary_{at}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    info(text.rstrip())
