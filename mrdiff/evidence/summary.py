"""One size of an evidence report, models down and metrics across: the layout of the README's headline table.

    mrdiff evidence summary results/evidence/cpu_matrix_matched_seeds --at 64

Reads REPORT/table.json (written by `mrdiff evidence report`), prints the table and writes it to
REPORT/summary_<at>.md. Every number is the report's own, with its 95% interval where the report has one.

With --verdict MODEL,... (the trained multi-resolution models) a second table follows: per metric, the best of
those models against the best training-free row ("<model> + <method>", upsampling included), and who wins; a
metric is won where the two 95% intervals are disjoint (a cell without an interval decides nothing).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mrdiff.console import info
from mrdiff.evaluation.cells import TRAINING_FREE
from mrdiff.evaluation.report import format_cell
from mrdiff.resolution import parse_resolution, resolution_key
from mrdiff.utils import atomic_write

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


VERDICT_METRICS = (  # (metric, heading, format, higher is better)
    ("one_sun_rate", "one-sun rate", "{:.2f}", True),
    ("stacked_horizon_rate", "stacked horizons", "{:.2f}", False),
    ("spectrum_distance", "spectrum distance", "{:.3f}", False),
    ("radius_error", "sun radius error", "{:.3f}", False),
    ("kid", "KID", "{:.4f}", False),
)


def best(rows: dict[str, dict], metric: str, higher: bool) -> tuple[str, dict] | None:
    """The row with the best value of `metric` (ties: the narrower interval; one without an interval last), None
    when no row measured it."""
    measured = [(row, cell) for row, cell in rows.items() if cell and math.isfinite(cell.get(metric, math.nan))]
    if not measured:
        return None

    def key(item: tuple[str, dict]) -> tuple[float, float]:
        cell = item[1]
        width = cell.get(f"{metric}_hi", math.nan) - cell.get(f"{metric}_lo", math.nan)
        return (-cell[metric] if higher else cell[metric], width if math.isfinite(width) else math.inf)

    return min(measured, key=key)


def winner(a: dict, b: dict, metric: str, higher: bool, pattern: str = "{:.4f}") -> str:
    """'a' or 'b' where the two 95% intervals are disjoint as printed (`pattern`'s precision: bounds that touch
    there are within the bootstrap's own noise), 'tie' where they overlap or touch, 'untested' where either
    cell has none (a report from before the metric had one)."""
    bounds = [float(pattern.format(c.get(f"{metric}_{end}", math.nan))) for c in (a, b) for end in ("lo", "hi")]
    if not all(math.isfinite(x) for x in bounds):
        return "untested"
    lo_a, hi_a, lo_b, hi_b = bounds
    if lo_a > hi_b or hi_a < lo_b:
        return "a" if (lo_a > hi_b) == higher else "b"
    return "tie"


def is_training_free(row: str, trained: list[str]) -> bool:
    """'<model> + <method>' rows of a training-free method or of upsampling, on a model other than `trained`."""
    model, _, method = row.rpartition(" + ")
    return method in (*TRAINING_FREE, "upsample") and model not in trained


OUTCOME = {"a": "trained", "b": "training-free", "tie": "neither (intervals overlap)",
           "untested": "untested (no interval)"}
MARK = {"a": "worse", "b": "better", "tie": "=", "untested": "?"}  # a training-free row against the trained ones


def verdict(result: dict, at: str, trained: list[str]) -> str:
    """Markdown at `at`: per metric the best of the `trained` rows against the best training-free row; then each
    training-free row against the best trained row of each metric, whether it dominates them, is dominated or
    trades off; and the verdict: the trained models dominated by a row, dominating every row, or a trade-off."""
    cells = {row: by_size.get(at) for row, by_size in result["cells"].items()}
    free = {row: cell for row, cell in cells.items() if is_training_free(row, trained) and cell}
    ours = {row: cells.get(row) for row in trained}
    measured = [(metric, heading, pattern, higher, top) for metric, heading, pattern, higher in VERDICT_METRICS
                if (top := best(ours, metric, higher)) is not None]
    if not measured or not free:
        missing = "a cell of " + ", ".join(trained) if not measured else "a training-free row ('<model> + <method>')"
        raise ValueError(f"the reports have no {missing} at {at}: nothing to judge")
    lines = [f"**Verdict at {at}**: the best of {', '.join(trained)} against the best training-free row, per "
             "metric; won where the 95% intervals are disjoint.", "",
             "| metric | best trained | best training-free | wins |", "|---|---|---|---|"]
    for metric, heading, pattern, higher, top in measured:
        if (other := best(free, metric, higher)) is not None:
            lines.append(f"| {heading} | {top[0]} {format_cell(top[1], metric, pattern)} | "
                         f"{other[0]} {format_cell(other[1], metric, pattern)} | "
                         f"{OUTCOME[winner(top[1], other[1], metric, higher, pattern)]} |")
    lines += ["", "Each training-free row against the best trained row of each metric (better or worse: disjoint "
              "intervals; =: they overlap; ?: no interval):", "",
              "| training-free row | " + " | ".join(m[1] for m in measured) + " | against the trained models |",
              "|---|" + "---|" * (len(measured) + 1)]
    states: dict[str, str] = {}
    for row, cell in free.items():
        marks = [MARK[winner(top[1], cell, metric, higher, pattern)] if math.isfinite(cell.get(metric, math.nan))
                 else "–" for metric, _, pattern, higher, top in measured]
        better, worse = "better" in marks, "worse" in marks
        states[row] = ("dominates them" if better and not worse else "dominated" if worse and not better
                       else "trade-off" if better else "no difference resolved")
        lines.append(f"| {row} | " + " | ".join(marks) + f" | {states[row]} |")
    above = [row for row, state in states.items() if state == "dominates them"]
    counts = ", ".join(f"{sum(s == state for s in states.values())} {'trade off' if state == 'trade-off' else state}"
                       for state in sorted(set(states.values())))
    if above:
        said = f"the trained models are dominated by {', '.join(above)}"
    elif all(state == "dominated" for state in states.values()):
        said = "the trained models dominate every training-free row"
    elif "trade-off" in states.values():
        said = f"a trade-off: no training-free row dominates the trained models; {counts}"
    else:
        said = f"no training-free row dominates the trained models or trades off against them; {counts}"
    return "\n".join([*lines, "", f"Verdict: {said}."]) + "\n"


SAME_SAMPLES = ("one_sun_rate", "mean_num_suns", "stacked_horizon_rate", "spectrum_distance", "radius_error")
SAME_SEEDS = ("first_seed", "num_samples", "sampler", "steps", "eta")  # what pairs the rows of several reports


def merged(results: list[dict]) -> dict:
    """Several reports as one: their rows in order, the first report's base resolution, every report's command.

    A row already there (e.g. ground truth) keeps the first report's cells; a later report's cell of that row
    and size adds only the metrics the first lacks (such as an interval a later mrdiff computes), and only if
    the numbers both have agree exactly (at least one of them), which they do for the same samples (same weights,
    seeds and sampler); otherwise the first report's cell stands alone, and a line says so. A size the first
    lacks is taken whole. Reports sampled on other seeds or with another sampler are refused (ValueError)."""
    first_meta = results[0]["meta"]
    for result in results[1:]:
        differ = [k for k in SAME_SEEDS if result["meta"].get(k) != first_meta.get(k)]
        if differ:
            raise ValueError(f"{result['meta']['command']!r} differs from the first report in {', '.join(differ)}: "
                             f"their rows are not paired by seed; summarise reports sampled alike")
    cells: dict[str, dict] = {}
    for result in results:
        for row, by_size in result["cells"].items():
            if row not in cells:
                cells[row] = {size: dict(cell) for size, cell in by_size.items()}
                continue
            for size, cell in by_size.items():
                first = cells[row].get(size)
                shared = [m for m in SAME_SAMPLES if m in first and m in cell] if first is not None else []
                if first is None:
                    cells[row][size] = dict(cell)
                elif shared and all(first[m] == cell[m] for m in shared):
                    cells[row][size] = {**cell, **first}
                else:
                    info(f"mrdiff: {row!r} at {size} differs between reports (other samples?): the first report's "
                         "cell is kept alone")
    command = "`; `".join(r["meta"]["command"] for r in results)
    return {"meta": {**results[0]["meta"], "command": command}, "cells": cells}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mrdiff evidence summary", description=__doc__.split("\n")[0])
    parser.add_argument("reports", type=Path, nargs="+",
                        help="folders written by mrdiff evidence report (several: their rows in one table; sample "
                             "them on the same seeds)")
    parser.add_argument("--at", required=True, help="a size of the report, e.g. 64 or 32x64")
    parser.add_argument("--verdict", default=None, metavar="MODEL,...",
                        help="the trained multi-resolution models: add the table of the best of them against the "
                             "best training-free row per metric, and the verdict")
    parser.add_argument("--out", type=Path, default=None,
                        help="the summary file (default: summary_<at>.md beside the one report; needed for several)")
    parser.add_argument("--replace", action="store_true",
                        help="rewrite an existing summary that differs (one that would come out the same is left)")
    args = parser.parse_args(argv)
    if len(args.reports) > 1 and args.out is None:
        raise SystemExit("mrdiff: error: several reports need --out FILE: the summary belongs to none of them")
    try:
        result = merged([json.loads((report / "table.json").read_text()) for report in args.reports])
    except ValueError as error:
        raise SystemExit(f"mrdiff: error: {error}") from None
    at = resolution_key(*parse_resolution(args.at))
    text = summary(result, at)
    if args.verdict:
        trained = [m.strip() for m in args.verdict.split(",") if m.strip()]
        if set(trained) - set(result["cells"]):
            raise SystemExit(f"mrdiff: error: --verdict names {sorted(set(trained) - set(result['cells']))}, rows "
                             f"no report has: pick them from {', '.join(result['cells'])}")
        try:
            text += "\n" + verdict(result, at, trained)
        except ValueError as error:
            raise SystemExit(f"mrdiff: error: --verdict: {error}") from None
    out = args.out or args.reports[0] / f"summary_{at}.md"
    if out.is_file() and out.read_text() != text and not args.replace:
        raise SystemExit(f"mrdiff: error: {out} holds another summary: pass --replace to rewrite it (the docs that "
                         f"paste it must then be updated), or another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as f:
        f.write(text)
    info(text.rstrip())
