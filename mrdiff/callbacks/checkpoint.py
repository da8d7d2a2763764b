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

    def use_run_dir(self, run_dir: str) -> None:
        """Set the default dirpath early (MrdiffTrainer.__init__), before Lightning resolves `--ckpt_path last`."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(run_dir, "checkpoints"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.use_run_dir(trainer.default_root_dir)  # (a killed save's temporaries: mrdiff.runlock removes them)
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """last.ckpt always holds the final weights (Lightning skips it when any checkpoint was saved before)."""
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
