"""Callbacks the tests inject into `mrdiff fit` subprocesses (tests/ is on PYTHONPATH there)."""

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class RecordBatches(L.Callback):
    """Writes, per rank, what each training batch held and the step training started from."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.start_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({"step": trainer.global_step, "sum": float(batch["image"].sum()),
                             "scale": batch["scale"].tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"batches_rank{trainer.global_rank}_{os.getpid()}.json"
        path.write_text(json.dumps({"start_step": self.start_step, "world_size": trainer.world_size,
                                    "batches": self.batches}))


class SignalAt(L.Callback):
    """Sends SIGUSR1 to this process at a step (as SLURM does before the time limit), then stops."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
            trainer.should_stop = True


class PoisonBatch(L.Callback):
    """Puts a NaN into the training batch at one step (a corrupt sample, an overflow)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["image"][0, 0, 0, 0] = float("nan")


class WeightProbe(L.Callback):
    """Records a copy of the module's weights and its training mode at every on_train_batch_end.

    Placed before and after a sampling callback in the callback list, two probes show whether that callback
    left the raw training weights (and train mode) as it found them.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, torch.Tensor], bool]] = []  # at every batch end
        self.seen_at_epoch_end: list[tuple[dict[str, torch.Tensor], bool]] = []

    @staticmethod
    def record(pl_module) -> tuple[dict[str, torch.Tensor], bool]:
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, pl_module.training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(self.record(pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seen_at_epoch_end.append(self.record(pl_module))


class WaitForFile(L.Callback):
    """Holds training at its start until `path` exists (at most `timeout` s): a fit that stays in its run dir."""

    def __init__(self, path: str, timeout: float = 120.0) -> None:
        self.path, self.timeout = Path(path), timeout

    def on_train_start(self, trainer, pl_module) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
