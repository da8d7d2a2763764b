"""Send images and tables to whichever loggers the trainer has (W&B gets them natively)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_figure(trainer: L.Trainer, key: str, path: Path, step: int | None = None) -> None:
    """Log a PNG file as an image (W&B); other loggers keep the file on disk only."""
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)], step=step if step is not None else trainer.global_step)


def log_table(trainer: L.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table (W&B)."""
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=columns, data=rows)
