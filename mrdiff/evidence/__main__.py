"""`python -m mrdiff.evidence SUBCOMMAND …` (the same as `mrdiff evidence SUBCOMMAND …`)."""

from __future__ import annotations

import importlib
import sys

from mrdiff.console import info

SUBCOMMANDS = {
    "report": "train (with --train) and evaluate the model matrix: every model, variant and resolution",
    "summary": "one size of a report: models down, metrics across",
    "diagnose": "failure modes at 2R (sun counts, stacked horizons) with a figure",
    "solvers": "samplers against network calls on the same seeds and weights",
    "curves": "in-fit curves of several fits against training pixels",
    "noiseshift": "how many images a NoiseShift calibration needs",
    "tune": "pick each training-free method's setting from tuning reports",
    "export": "a run's checkpoint as shippable weights (fp16 EMA, settings, command)",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<11} {text}" for name, text in SUBCOMMANDS.items())
    return f"usage: mrdiff evidence SUBCOMMAND [options]  (SUBCOMMAND --help for its options)\n\n{rows}\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        info(usage().rstrip())
        return
    name = argv[0]
    if name not in SUBCOMMANDS:
        raise SystemExit(f"mrdiff: error: unknown evidence subcommand {name!r}: choose from "
                         f"{', '.join(SUBCOMMANDS)} (mrdiff evidence --help)")
    importlib.import_module(f"mrdiff.evidence.{name}").main(argv[1:])


if __name__ == "__main__":
    main()
