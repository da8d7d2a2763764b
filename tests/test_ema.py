"""The EMA callback's average against hand-computed values, and the raw weights back after sampling with it."""

import lightning as L
import pytest
import torch

from mrdiff.callbacks.ema import EMA


class Scalar(L.LightningModule):
    """One weight w, loss = w: plain SGD with lr 1 makes w = −1, −2, −3 after steps 1, 2, 3."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return self.w * 1.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)


def fit(steps: int, ema: EMA, *more: L.Callback) -> Scalar:
    module = Scalar()
    L.Trainer(max_steps=steps, callbacks=[ema, *more], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module)
    return module


def test_ema_follows_the_warm_up_decay_by_hand():
    """decay 0.9, warm-up 10: the first update copies w; then d = min(0.9, (1+n)/(10+n)) with n updates done.

    after step 1: avg = −1
    after step 2: d = 2/11, avg = 2/11·(−1) + 9/11·(−2) = −20/11
    after step 3: d = 3/12, avg = 1/4·(−20/11) + 3/4·(−3) = −119/44
    """
    for steps, expected in ((1, -1.0), (2, -20 / 11), (3, -119 / 44)):
        ema = EMA(decay=0.9, warmup=10.0)
        module = fit(steps, ema)
        assert float(ema._average_model.module.w) == pytest.approx(expected, abs=1e-6)
        assert float(module.w) == pytest.approx(expected, abs=1e-6)  # Lightning leaves the average in at the end


def test_the_decay_caps_at_its_final_value():
    """warm-up 0 makes (1+n)/n ≥ 1, so the cap 0.5 applies from the second update: −1, −1.5, −2.25."""
    ema = EMA(decay=0.5, warmup=0.0)
    fit(3, ema)
    assert float(ema._average_model.module.w) == pytest.approx(-2.25, abs=1e-6)


class SwapAtStep3(L.Callback):
    """What a sampling callback sees at the end of step 3 inside `ema.averaged`, and the weight after it."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.seen = ema, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            with self.ema.averaged(pl_module):
                self.seen["inside"] = float(pl_module.w)
            self.seen["after"] = float(pl_module.w)


def test_averaged_swaps_the_ema_weights_in_and_the_raw_ones_back_during_training():
    ema = EMA(decay=0.9, warmup=10.0)
    probe = SwapAtStep3(ema)
    fit(3, ema, probe)
    assert probe.seen["inside"] == pytest.approx(-119 / 44, abs=1e-6)  # sampling callbacks see the average
    assert probe.seen["after"] == pytest.approx(-3.0)  # and training goes on with the raw weight


def test_testing_from_a_checkpoint_loads_the_ema_weights_without_a_warning(tmp_path, recwarn):
    """Outside fit the checkpoint's state_dict (the average) is the model: no "cannot be restored" warning."""
    module = Scalar()
    trainer = L.Trainer(max_steps=3, callbacks=[EMA(decay=0.9)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    module.test_step = lambda batch, batch_idx: None
    module.test_dataloader = module.train_dataloader
    recwarn.clear()
    L.Trainer(callbacks=[EMA(decay=0.9)], logger=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").test(module, ckpt_path=ckpt)
    assert module.w.item() == pytest.approx(-119 / 44)  # the average after 3 steps (see the test above)
    assert not [w for w in recwarn if "WeightAveraging" in str(w.message)]
