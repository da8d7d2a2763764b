"""mrdiff touches a few private Lightning attributes; pyproject pins `lightning>=2.6,<2.7` for them.

Each test below fails loudly, naming the attribute, when a Lightning release moves one. Raising the pin
means running this file first.
"""

import inspect

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from mrdiff.callbacks.ema import EMA

PIN = "pyproject.toml pins lightning<2.7 for it"


def test_weight_averaging_internals_the_ema_callback_uses():
    ema = EMA(decay=0.9)
    # EMA replaces the averaging function through the keyword arguments given to AveragedModel
    assert isinstance(getattr(ema, "_kwargs", None), dict) and "multi_avg_fn" in ema._kwargs, PIN
    for name in ("_latest_update_step", "_average_model"):
        assert hasattr(ema, name), f"WeightAveraging.{name} is gone: {PIN}"
    assert list(inspect.signature(EMAWeightAveraging._swap_models).parameters) == ["self", "pl_module"], PIN


def test_model_checkpoint_internals_run_checkpoint_uses():
    for name in ("_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(ModelCheckpoint, name, None)), f"ModelCheckpoint.{name} is gone: {PIN}"
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters) == [
        "self", "trainer", "monitor_candidates"], PIN


def test_logger_internals_the_run_dir_loggers_set():
    from mrdiff.loggers import CSVRun

    logger = CSVRun()
    assert logger._root_dir == logger._save_dir == ".", f"CSVLogger._root_dir/_save_dir moved: {PIN}"
    logger.use_run_dir("/some/run")
    assert logger.save_dir == "/some/run" and logger.log_dir == "/some/run/logs/version_0", PIN


def test_trainer_and_cli_internals_the_cli_uses():
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert hasattr(trainer._checkpoint_connector, "_hpc_resume_path"), f"_hpc_resume_path is gone: {PIN}"
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None)), f"LightningCLI._parse_ckpt_path: {PIN}"
