"""ModelCheckpoint that keeps checkpoints in <run dir>/checkpoints whatever the logger."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose default dirpath is trainer.default_root_dir/checkpoints (the run dir).

    Version counters are off by default: a requeued or resumed job overwrites last.ckpt instead of
    writing last-v1.ckpt, so `--ckpt_path last` and the run dir always point at the newest state.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
