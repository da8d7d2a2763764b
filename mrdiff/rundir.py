"""The run directory guard: a fit never writes over another run's checkpoints, and `--ckpt_path last` finds them."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from mrdiff.checkpoint import CheckpointError
from mrdiff.console import info

OVERWRITE_ENV = "MRDIFF_OVERWRITE"  # =1: `mrdiff fit` may write over a run dir that holds checkpoints


def checkpoint_dirs(trainer: Trainer) -> list[Path]:
    """The folders the trainer's checkpoint callbacks write to, where known before fit."""
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def existing_checkpoints(trainer: Trainer) -> list[Path]:
    """Checkpoints a fit into this run dir would write over: the callbacks' *.ckpt and HPC checkpoints."""
    found = [path for folder in checkpoint_dirs(trainer) for path in sorted(folder.glob("*.ckpt"))]
    return found + sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))


def resolve_last(trainer: Trainer) -> str | None:
    """`--ckpt_path last` as a path: the newest last.ckpt of the checkpoint callbacks, whatever the logger.

    None (a new run) only when the run holds no checkpoint at all; CheckpointError when it holds others.
    """
    names = [folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
             for folder in checkpoint_dirs(trainer)]
    found = [path for path in names if path.is_file()]
    if found:
        return str(max(found, key=lambda path: path.stat().st_mtime))
    if not names:
        raise CheckpointError("--ckpt_path last: no checkpoint callback with a known folder (add "
                              "mrdiff.callbacks.checkpoint.RunCheckpoint with save_last: true) — pass the path")
    others = existing_checkpoints(trainer)
    if others:
        raise CheckpointError(f"--ckpt_path last: no {names[0].name} in {names[0].parent}, but the run holds "
                              f"{', '.join(p.name for p in others[:3])}: pass one of them as --ckpt_path")
    info(f"mrdiff: --ckpt_path last: no checkpoint in {names[0].parent} yet, starting a new run")
    return None


def refuse_to_overwrite(trainer: Trainer) -> None:
    """A fit that does not resume must not write over a run dir that already holds checkpoints."""
    if os.environ.get(OVERWRITE_ENV) == "1":
        return
    existing = existing_checkpoints(trainer)
    if existing:
        raise CheckpointError(
            f"run dir {trainer.default_root_dir} already holds checkpoints "
            f"({', '.join(p.name for p in existing[:3])}): resume with --ckpt_path last, start a new run with "
            f"--trainer.default_root_dir <new dir>, or set {OVERWRITE_ENV}=1 to write over it"
        )
