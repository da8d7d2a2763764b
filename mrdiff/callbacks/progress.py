"""A training bar over the whole run: steps done of trainer.max_steps, so its ETA is the run's.

Lightning's bar counts the batches of the current epoch and restarts at every epoch, so its ETA is the
epoch's. mrdiff's runs are step-bounded (and synthetic epochs are arbitrary), so the bar counts global
steps, starting from the resumed step. Without max_steps it falls back to Lightning's per-epoch bar.

`mrdiff test` has no test bar: its dataloader is a one-batch placeholder, and the work is the
ResolutionEvaluation, which has a bar of its own. Two open bars would nest, and tqdm would write
cursor-up escapes ("\x1b[A") into every redirected log.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class RunProgressBar(TQDMProgressBar):
    """TQDMProgressBar whose training bar runs from the resumed step to max_steps across epochs."""

    def init_test_tqdm(self) -> Tqdm:
        """A closed bar: the test stage's only bar is the evaluation's."""
        return Tqdm(disable=True)

    def _by_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0 and self.train_progress_bar is not None

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if not self._by_steps(trainer):
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this process (resumed or not)
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # the rate and ETA count this process's steps only
        bar.n = trainer.global_step
        bar.set_description(f"Epoch {trainer.current_epoch}, step")
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if step % max(self.refresh_rate, 1) == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
