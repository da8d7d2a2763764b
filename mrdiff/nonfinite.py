"""Non-finite training steps: stop the run (model.nonfinite_loss=error) or skip and count them (skip).

With the fused AdamW (the default), a bad step is caught on the device: the gradients are checked after
DDP's all-reduce, the optimizer skips its update where `found_inf` is set, and the host reads the record
only at logging and checkpoint cadence. Other optimizers (trainer.gradient_clip_val, 16-mixed) get a
synchronous check of the loss in the training step. The count of skipped steps is saved in the
checkpoint as ckpt["mrdiff"]["skipped_steps"] and goes on after a resume.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from mrdiff.console import info

NonFiniteMode = Literal["error", "skip"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteGuard:
    """Device-side record of non-finite training steps: how many, and the first one's step, loss and inputs.

    Everything stays on the device (torch.where, no .item()), so the training step never waits for the GPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.inputs_ok = torch.ones((), dtype=torch.bool, device=device)
        self._loss, self._inputs_ok = self.loss, self.inputs_ok

    def record_inputs(self, loss: Tensor, images: Tensor) -> None:
        """Remember this step's loss and whether its batch was finite (used if the step turns out bad)."""
        self._loss, self._inputs_ok = loss.detach().float(), torch.isfinite(images).all()

    def check_gradients(self, grads: list[Tensor], step: int) -> Tensor:
        """found_inf (0-dim float, 1.0 = skip) for the optimizer; updates the record."""
        found = torch.zeros((), device=self.count.device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=found.device))
        bad = found > 0
        first = bad & (self.step < 0)
        self.step = torch.where(first, step, self.step)  # a Python scalar: no host-to-device copy
        self.loss = torch.where(first, self._loss, self.loss)
        self.inputs_ok = torch.where(first, self._inputs_ok, self.inputs_ok)
        self.count = self.count + bad.long()
        return found

    def first(self) -> tuple[int, float, bool]:
        return int(self.step), float(self.loss), bool(self.inputs_ok)


def describe(loss: float, step: int, inputs_ok: bool) -> str:
    return f"loss is {loss} at step {step}" + ("" if inputs_ok else "; the input batch has NaN/inf")


class NonFiniteSteps(Callback):
    """Owns the non-finite-step policy and count; DiffusionModule adds it (configure_callbacks)."""

    def __init__(self, mode: NonFiniteMode = "error") -> None:
        self.mode = mode
        self.skipped_steps = 0  # this run and the runs it resumes
        self._skipped_before = 0  # of which in the runs it resumes (from the checkpoint)
        self.guard: NonFiniteGuard | None = None  # set when the optimizer can skip a step on the device

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fused = bool(trainer.optimizers and trainer.optimizers[0].defaults.get("fused"))
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        self.guard = NonFiniteGuard(pl_module.device) if fused and not scaled else None

    def accept(self, module: L.LightningModule, loss: Tensor, images: Tensor) -> bool:
        """Whether the training step goes on to its backward pass (the module's training_step asks)."""
        if self.guard is not None:  # no host sync: the fused optimizer skips a non-finite step on the device
            self.guard.record_inputs(loss, images)
            return True
        if torch.isfinite(loss):
            return True
        what = describe(loss.item(), module.global_step, bool(torch.isfinite(images).all()))
        self._raise_or_count(what, self.skipped_steps + 1)
        module.log("train/skipped_steps", float(self.skipped_steps))
        return False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.guard is not None:  # before the module's gradient clipping, as the record is of raw gradients
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            optimizer.found_inf = self.guard.check_gradients(grads, pl_module.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.guard is not None:
            pl_module.log("train/skipped_steps", self.guard.count.float() + self._skipped_before)
            if pl_module.global_step % max(trainer.log_every_n_steps, 1) == 0:
                self.report()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.report()  # raises in "error" mode before anything reaches the disk
        checkpoint.setdefault("mrdiff", {})["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.skipped_steps = self._skipped_before = int(checkpoint.get("mrdiff", {}).get("skipped_steps", 0))

    def report(self) -> None:
        """The host reads the device-side record (a sync, at logging and checkpoint cadence only)."""
        if self.guard is None or not (count := int(self.guard.count)):
            return
        step, loss, inputs_ok = self.guard.first()
        if self._skipped_before + count > self.skipped_steps or self.mode == "error":
            self._raise_or_count(describe(loss, step, inputs_ok), self._skipped_before + count)

    def _raise_or_count(self, what: str, skipped: int) -> None:
        if self.mode == "error":
            raise NonFiniteLossError(
                f"{what}. That update was skipped and the last saved checkpoint is intact. Lower model.lr, set "
                f"model.grad_clip_norm (or lower trainer.gradient_clip_val), or set model.nonfinite_loss=skip to "
                f"skip such steps (they are counted)."
            )
        self.skipped_steps = skipped
        info(f"mrdiff: skipped steps with non-finite values ({what}); {skipped} skipped so far")
