"""The training bar counts the run's steps across epochs (its ETA is the run's), as MrdiffTrainer sets up."""

import lightning as L
import torch

from mrdiff.callbacks.progress import RunProgressBar
from mrdiff.trainer import MrdiffTrainer


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.w - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)  # 4 steps per epoch


def test_the_training_bar_runs_to_max_steps_across_epochs(tmp_path, capsys):
    trainer = MrdiffTrainer(max_steps=10, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            accelerator="cpu", default_root_dir=tmp_path)
    bar = next(cb for cb in trainer.callbacks if isinstance(cb, RunProgressBar))  # added by MrdiffTrainer
    trainer.fit(Tiny())
    err = capsys.readouterr().out  # Lightning's bars write to stdout
    assert trainer.current_epoch == 3 and bar.train_progress_bar.total == 10
    assert "10/10" in err and "4/4" not in err  # one bar for the run, not one per 4-step epoch
    assert "Epoch 2, step" in err


def test_no_bar_is_added_when_progress_bars_are_off(tmp_path):
    trainer = MrdiffTrainer(max_steps=1, logger=False, enable_progress_bar=False, accelerator="cpu",
                            default_root_dir=tmp_path)
    assert not any(isinstance(cb, RunProgressBar) for cb in trainer.callbacks)
