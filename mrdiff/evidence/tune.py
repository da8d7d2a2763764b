"""Pick each training-free method's setting from tuning reports, so no method is shown at a strawman setting.

    mrdiff evidence tune results/baselines/tuning_1 results/baselines/tuning_2 … --at 64 --out results/baselines

Each tuning report is a `mrdiff evidence report` run on tuning seeds (`--first-seed`, other than the final
report's) with one value per method (`--variant-args`). For every method the setting with the best layout at
`--at` wins: the highest one-sun rate minus stacked-horizon rate (a tiled landscape is as much a failure as a
second sun); within 0.01 of the best, the lowest spectrum distance. Writes choice.md and choice.json, and prints
the `--variant-args` of the winners for the final report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from mrdiff.console import info
from mrdiff.evaluation.report import format_cell
from mrdiff.resolution import parse_resolution, resolution_key

TIE = 0.01  # layout scores this close count as equal: the spectrum distance decides


def layout(cell: dict) -> float:
    return cell["one_sun_rate"] - cell["stacked_horizon_rate"]


def candidates(reports: list[Path], at: str) -> dict[str, list[dict]]:
    """method → [{setting, report, cell}] over every tuning report that has the method's row at `at`."""
    found: dict[str, list[dict]] = {}
    for report in reports:
        result = json.loads((report / "table.json").read_text())
        args = result["meta"].get("variant_args") or {}
        for row, by_size in result["cells"].items():
            method = row.rsplit(" + ", 1)[-1] if " + " in row else None
            if method and at in by_size and method in args:
                found.setdefault(method, []).append({"setting": args[method], "report": str(report),
                                                     "cell": by_size[at]})
    return found


def best(options: list[dict]) -> dict:
    top = max(layout(o["cell"]) for o in options)
    close = [o for o in options if layout(o["cell"]) >= top - TIE]
    return min(close, key=lambda o: o["cell"]["spectrum_distance"])


def variant_args(choice: dict[str, dict]) -> str:
    """The winners as `--variant-args` (tuple values joined by '/')."""
    parts = []
    for method, option in choice.items():
        for key, value in option["setting"].items():
            text = "/".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            parts.append(f"{method}.{key}={text}")
    return ",".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mrdiff evidence tune", description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="tuning reports written by mrdiff evidence report")
    p.add_argument("--at", required=True, help="the size the methods are tuned at, e.g. 64")
    p.add_argument("--out", type=Path, required=True, help="where choice.md and choice.json go")
    args = p.parse_args(argv)
    if (args.out / "choice.json").exists():
        raise SystemExit(f"mrdiff: error: {args.out} already holds a choice (choice.json): pass another --out; "
                         f"choices are never overwritten")
    at = resolution_key(*parse_resolution(args.at))
    found = candidates(args.reports, at)
    if not found:
        raise SystemExit(f"mrdiff: error: no training-free rows with --variant-args at {at} in {args.reports}: "
                         f"pass reports written with --variants and --variant-args")
    choice = {method: best(options) for method, options in found.items()}
    command = "mrdiff evidence tune " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [f"Written by `{command}`. Best layout at {at} (one-sun rate − stacked-horizon rate; within {TIE} of "
             "the best, the lowest spectrum distance), on the tuning reports' seeds.", "",
             "| method | setting | one-sun rate | stacked horizons | spectrum distance | chosen |",
             "|---|---|---:|---:|---:|---|"]
    for method, options in found.items():
        for o in options:
            cell = o["cell"]
            lines.append(f"| {method} | {json.dumps(o['setting'])} | {format_cell(cell, 'one_sun_rate', '{:.2f}')} | "
                         f"{format_cell(cell, 'stacked_horizon_rate', '{:.2f}')} | "
                         f"{format_cell(cell, 'spectrum_distance', '{:.3f}')} | {'✓' if o is choice[method] else ''} |")
    lines += ["", f"Final report: `--variant-args {variant_args(choice)}`"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "choice.md").write_text("\n".join(lines) + "\n")
    (args.out / "choice.json").write_text(json.dumps({"command": command, "at": at, "choice": choice,
                                                      "variant_args": variant_args(choice)}, indent=1))
    info("\n".join(lines))
