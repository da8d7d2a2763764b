"""DiffusionModule: training in Lightning (L_simple, the optimizer, the EMA hookup); sampling is `module.pipeline`."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch import Tensor

from mrdiff.checkpoint import load_weights
from mrdiff.diffusion.loss import LossWeighting, simple_loss
from mrdiff.diffusion.schedule import NoiseSchedule, ScheduleKind
from mrdiff.grids import CoordMode
from mrdiff.nn.diffusers_unet import DiffusersUNet
from mrdiff.nn.unet import UNet
from mrdiff.nonfinite import NonFiniteMode, NonFiniteSteps
from mrdiff.pipeline import DiffusionPipeline
from mrdiff.seeding import mix_seed, seeded_rng


class DiffusionModule(L.LightningModule):
    """ε-prediction DDPM trained with L_simple on (patch, grid, scale) batches.

    Args:
        net: mrdiff's U-Net (mrdiff.nn.unet.UNet), or a pretrained diffusers UNet2DModel (DiffusersUNet).
        schedule: The β schedule: linear (DDPM) or cosine.
        num_timesteps: T.
        beta_start: β_1 of the linear schedule.
        beta_end: β_T of the linear schedule.
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's (β1, β2).
        warmup_steps: Steps of linear learning-rate warm-up.
        coord_mode: How sampling builds coordinate grids (linked from data.coord_mode).
        train_resolution: Side of the training inputs, the analytic shift's reference (linked from data).
        train_scales: [min, max] canvas side seen in training (linked from data): sampling outside warns.
        nonfinite_loss: A NaN/inf loss stops the run (error), or the step is skipped and counted (skip).
        grad_clip_norm: Clip the global gradient norm to this (no host sync; fused AdamW stays fused).
        channels_last: Store the U-Net's conv kernels channels_last (faster convolutions on GPUs).
        compile: torch.compile the U-Net for training (sampling runs the eager forward).
        compile_mode: torch.compile's mode, e.g. max-autotune-no-cudagraphs on GPUs.
        init_weights: Warm start from a checkpoint or an exported weights file (its EMA weights).
        loss_weighting: uniform (L_simple) or min_snr (Hang et al. 2023: weight min(SNR, γ)/SNR).
        snr_gamma: γ of min_snr.
    """

    def __init__(
        self,
        net: UNet | DiffusersUNet,
        *,
        schedule: ScheduleKind = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        coord_mode: CoordMode = "normalized",
        train_resolution: int = 64,
        train_scales: list[int] | None = None,
        nonfinite_loss: NonFiniteMode = "error",
        grad_clip_norm: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        init_weights: str | None = None,
        loss_weighting: LossWeighting = "uniform",
        snr_gamma: float = 5.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        if init_weights:  # before compile and EMA: the averaged copy starts from these weights
            load_weights(self, init_weights)
        self.schedule = NoiseSchedule(kind=schedule, num_timesteps=num_timesteps,
                                      beta_start=beta_start, beta_end=beta_end)
        if isinstance(net, DiffusersUNet):  # a pretrained network fixes the β schedule and the training size
            self.schedule.require_same(NoiseSchedule(**net.trained_schedule),
                                       f"the diffusers model's scheduler config {net.scheduler_config_path}")
            net.check_training_size(train_resolution)
        if channels_last:
            self.net.to_channels_last()
        if compile:  # in place, so checkpoints keep the plain names. Static: training has one patch shape, and
            # Inductor fails on dynamic shapes here (torch 2.14); sampling runs the eager forward (pipeline.eps_fn).
            self.net.compile(mode=compile_mode, dynamic=False)
        self.nonfinite = NonFiniteSteps(nonfinite_loss)  # a callback (configure_callbacks) that owns the count
        self._generator: torch.Generator | None = None  # t, ε of a training step (seeded per step)
        self._pipeline: DiffusionPipeline | None = None

    # -- training ------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, grid: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        return self.net(self.pipeline.layout(x), t, grid, scale)

    def diffusion_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """L_simple on a (patch, grid, scale) batch, weighted as model.loss_weighting says (diffusion/loss.py)."""
        grid, scale = batch.get("grid"), batch.get("scale")
        return simple_loss(lambda x_t, t: self(x_t, t, grid, scale), self.schedule, batch["image"],
                           weighting=self.hparams.loss_weighting, snr_gamma=self.hparams.snr_gamma,
                           generator=generator)

    def setup(self, stage: str) -> None:
        """Fail before training if the data's inputs cannot go through this U-Net."""
        if stage == "fit" and isinstance(self.net, DiffusersUNet):
            raise ValueError("fine-tuning a diffusers UNet with `mrdiff fit` is not supported (it has no grid or "
                             "scale inputs): use it with `mrdiff sample`, `calibrate` and `test`")
        side = self.hparams.train_resolution
        try:
            self.net.check_size(side, side)
        except ValueError as error:
            raise ValueError(f"training inputs are {side}x{side} (data.patch_size, or data.train_size in fixed "
                             f"mode): {error}") from None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Stamp what the weights' shapes cannot tell: the U-Net's GroupNorm rule (checkpoint.check_norm_groups)."""
        if hasattr(self.net, "norm_group_channels"):
            checkpoint.setdefault("mrdiff", {})["norm_group_channels"] = self.net.norm_group_channels

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.nonfinite]

    def on_fit_start(self) -> None:
        self._base_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._generator = torch.Generator(self.device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """t, ε and dropout are seeded from (seed, step, rank), so a step survives a resume exactly."""
        seed = mix_seed(self._base_seed, self.global_step, self.global_rank)
        with seeded_rng(self._generator, seed) as generator:
            loss = self.diffusion_loss(batch, generator)
        if not self.nonfinite.accept(self, loss, batch["image"]):
            return None  # skipped (model.nonfinite_loss=skip) without a backward pass
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hparams.grad_clip_norm:  # after NonFiniteSteps has checked the raw gradients
            params = [p for p in self.net.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip_norm, foreach=True)
            self.log("train/grad_norm", norm)  # a device tensor: read at logging cadence

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """Evaluation happens in mrdiff.callbacks.evaluation (over mrdiff.evaluation), at every resolution."""

    def configure_optimizers(self):
        h = self.hparams
        # fused: one kernel per update. Lightning refuses it with trainer.gradient_clip_val under AMP (so
        # model.grad_clip_norm clips here), and under 16-mixed the gradients it would see are still scaled.
        trainer = self._trainer
        clipping = trainer is not None and bool(trainer.gradient_clip_val)
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if h.grad_clip_norm and (clipping or scaler is not None):
            raise ValueError(
                "model.grad_clip_norm cannot be combined with trainer.gradient_clip_val or 16-mixed precision "
                "(gradients are scaled then): keep one clipping setting, trainer.gradient_clip_val with 16-mixed"
            )
        fused = self.device.type in ("cuda", "cpu") and not clipping
        opt = torch.optim.AdamW(self.net.parameters(), lr=h.lr, betas=tuple(h.betas),  # fused: skips the update
                                weight_decay=h.weight_decay, fused=fused)  # where found_inf is set (nonfinite.py)
        warmup = max(h.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- sampling ------------------------------------------------------------------------------------
    @property
    def pipeline(self) -> DiffusionPipeline:
        """This module's network and schedule as a sampling pipeline (mrdiff.pipeline), built once."""
        if self._pipeline is None:
            h = self.hparams
            self._pipeline = DiffusionPipeline(self.net, self.schedule, coord_mode=h.coord_mode,
                                               train_resolution=h.train_resolution, train_scales=h.train_scales,
                                               channels_last=h.channels_last)
        return self._pipeline
