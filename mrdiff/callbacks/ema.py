"""EMA of the weights through Lightning's EMAWeightAveraging, with a decay warm-up and a swap context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """EMAWeightAveraging whose decay ramps up: min(decay, (1 + n)/(warmup + n)) after n updates.

    Early in training the average would otherwise be dominated by the random initialisation for
    ~1/(1 − decay) steps. Lightning puts the averaged weights into checkpoints' `state_dict`, so
    sampling, FID and calibration from a checkpoint use them; `averaged(pl_module)` swaps them in
    for callbacks that sample in the middle of training.
    """

    def __init__(
        self,
        decay: float = 0.9999,  # final decay
        warmup: float = 10.0,  # ramp length: decay (1 + n)/(warmup + n) = 1 − (warmup − 1)/(warmup + n) at update n
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,  # keep the average elsewhere (e.g. "cpu"); default: the model's device
    ) -> None:
        super().__init__(device=device, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)
        self.decay, self.warmup = decay, warmup
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = self._lerp
        self._num_updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self._num_updates) / (self.warmup + self._num_updates))

    @torch.no_grad()
    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        """avg ← d·avg + (1 − d)·current with the warm-up decay d, as one foreach op (no host sync)."""
        weight = 1.0 - self.current_decay()
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            a, c = zip(*floats)
            torch._foreach_lerp_(list(a), list(c), weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        before = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._latest_update_step != before:
            self._num_updates += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_updates": self._num_updates}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._num_updates = state_dict.get("num_updates", 0)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Outside fit there is no average to restore: the checkpoint's state_dict (the EMA weights) is the
        model, so `mrdiff test` / `sample` need no warning that the averaging state is not restored."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @contextmanager
    def averaged(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Run the block with the averaged weights in the module (a no-op outside fit)."""
        if self._average_model is None:
            yield
            return
        self._swap_models(pl_module)
        try:
            yield
        finally:
            self._swap_models(pl_module)


@contextmanager
def ema_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """The averaged weights when an EMA callback is training them; otherwise the module's own."""
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging)), None)
    if isinstance(ema, EMA) and not trainer.validating:
        with ema.averaged(pl_module):
            yield
    else:
        yield
