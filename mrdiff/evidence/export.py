"""Export a run's checkpoint as shippable weights: fp16 EMA weights, the settings, the training command.

    mrdiff evidence export RUN/checkpoints/last.ckpt models/<recipe>/seed<N>.pt --command "mrdiff fit ..."
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mrdiff.console import info
from mrdiff.exported import export


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrdiff evidence export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint in <run dir>/checkpoints/ (its config.yaml is read)")
    p.add_argument("out", type=Path, help="the weights file to write (an existing one is not replaced)")
    p.add_argument("--command", required=True, help="the exact command that trained the run (stored in the file)")
    p.add_argument("--train-seconds", type=float, default=None, help="the fit's wall time")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not args.checkpoint.is_file() or not (args.checkpoint.parent.parent / "config.yaml").is_file():
        raise SystemExit(f"mrdiff: error: {args.checkpoint} is not a checkpoint inside a run dir with config.yaml: "
                         f"pass <run dir>/checkpoints/last.ckpt")
    if args.out.exists():
        raise SystemExit(f"mrdiff: error: {args.out} exists: weights are never overwritten; pick another path")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(args.checkpoint, args.out, args.command, args.train_seconds)
    info(f"mrdiff evidence: wrote {args.out} (add it to models/ with `python -m mrdiff.manifest`)")
