"""DiffusionModule: wires the U-Net, the noise schedule, L_simple and the samplers into Lightning."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mrdiff.checkpoint import load_weights
from mrdiff.data.sampling import item_seed
from mrdiff.diffusion.samplers import SAMPLERS, STEPPED, EpsFn, PerSampleNoise, Sampler, TimeCond
from mrdiff.diffusion.schedule import NoiseSchedule, ScheduleKind
from mrdiff.nn.coords import CoordMode, canvas_grid
from mrdiff.nn.diffusers_unet import DiffusersUNet
from mrdiff.nn.unet import UNet


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteGuard:
    """Device-side record of non-finite training steps: how many, and the first one's step, loss and inputs.

    Everything stays on the device (torch.where, no .item()), so the training step never waits for the
    GPU; the host reads the record at logging and checkpoint cadence. The gradients are checked after
    DDP's all-reduce, so every rank takes the same decision.
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


class DiffusionModule(L.LightningModule):
    """ε-prediction DDPM trained with L_simple on (patch, grid, scale) batches."""

    def __init__(
        self,
        net: UNet | DiffusersUNet,  # mrdiff's U-Net, or a pretrained diffusers UNet2DModel
        *,
        schedule: ScheduleKind = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,  # linear learning-rate warm-up
        coord_mode: CoordMode = "normalized",  # linked from data.coord_mode: how sampling builds grids
        train_resolution: int = 64,  # side of the training inputs (linked from data): the analytic shift's m
        train_scales: list[int] | None = None,  # [min, max] canvas side seen in training (linked from data)
        nonfinite_loss: Literal["error", "skip"] = "error",  # a NaN/inf loss stops the run, or the step is skipped
        grad_clip_norm: float | None = None,  # clip the global gradient norm here: no host sync, fused AdamW stays
        channels_last: bool = False,
        compile: bool = False,  # torch.compile the U-Net
        compile_mode: str | None = None,  # torch.compile mode, e.g. "max-autotune-no-cudagraphs" on GPUs
        init_weights: str | None = None,  # warm start: a checkpoint or exported weights file (EMA weights)
        loss_weighting: Literal["uniform", "min_snr"] = "uniform",  # min_snr: Hang et al. 2023, weight min(SNR, γ)/SNR
        snr_gamma: float = 5.0,  # γ of min_snr
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        if init_weights:  # before compile and EMA: the averaged copy starts from these weights
            load_weights(self, init_weights)
        self.schedule = NoiseSchedule(kind=schedule, num_timesteps=num_timesteps,
                                      beta_start=beta_start, beta_end=beta_end)
        if isinstance(net, DiffusersUNet):
            check_pretrained(net, self.schedule, train_resolution)
        if channels_last:
            self.net.to_channels_last()
        if compile:  # in place: parameter names (and so checkpoints) stay those of the plain U-Net
            # Static shapes: training has one patch shape. Dynamic shapes make Inductor fail on this U-Net
            # (torch 2.14: "cannot determine truth value of Relational" in a stride-2 conv's stride order),
            # and a static graph per sampling resolution costs a minute of compilation each, so sampling,
            # calibration and evaluation run the eager forward (eps_fn).
            self.net.compile(mode=compile_mode, dynamic=False)
        self.skipped_steps = 0  # non-finite steps skipped so far, this run and the runs it resumes
        self._skipped_before = 0  # of which in the runs it resumes (from the checkpoint)
        self._guard: NonFiniteGuard | None = None
        self._scale_warnings: set[tuple[int, int]] = set()  # sizes already warned about (sampling)

    # -- training ------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, grid: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        return self.net(self._layout(x), t, grid, scale)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def diffusion_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """L_simple = E‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖², t ~ U{0, …, T−1} (DDPM eq. 14).

        With loss_weighting="min_snr", sample i's term is weighted by min(SNR_t, γ)/SNR_t (Min-SNR-γ for
        ε-prediction, Hang et al. 2023): low-noise steps, whose ε is nearly unpredictable and whose errors
        barely move x̂_0, stop dominating the gradient.
        """
        x0 = batch["image"]
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps = self(x_t, t.float(), batch.get("grid"), batch.get("scale"))
        if self.hparams.loss_weighting == "uniform":
            return F.mse_loss(eps.float(), noise.float())
        per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
        snr = self.schedule.gather(self.schedule.alphas_cumprod, t, per_sample).float()
        snr = snr / (1 - snr)
        return (per_sample * snr.clamp(max=self.hparams.snr_gamma) / snr).mean()

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

    def on_fit_start(self) -> None:
        self._base_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Seed the RNGs from (seed, step, rank): t, ε and dropout of a step survive a resume exactly."""
        torch.manual_seed(item_seed(self._base_seed, self.global_step, self.global_rank))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self.diffusion_loss(batch)
        if self._guard is not None:  # no host sync: the fused optimizer skips a non-finite step on the device
            self._guard.record_inputs(loss, batch["image"])
        elif not torch.isfinite(loss):
            return self._nonfinite(loss, batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in self.net.parameters() if p.grad is not None]
        if self._guard is not None:
            optimizer.found_inf = self._guard.check_gradients([p.grad for p in params], self.global_step)
        if self.hparams.grad_clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip_norm, foreach=True)
            self.log("train/grad_norm", norm)  # a device tensor: read at logging cadence

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._guard is not None:
            self.log("train/skipped_steps", self._guard.count.float() + self._skipped_before)
            if (self.global_step % max(self.trainer.log_every_n_steps, 1)) == 0:
                self._report_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._report_nonfinite()  # raises in "error" mode before anything reaches the disk
        checkpoint["mrdiff"] = {"skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = self._skipped_before = int(checkpoint.get("mrdiff", {}).get("skipped_steps", 0))

    def on_train_end(self) -> None:
        self._report_nonfinite()

    def _report_nonfinite(self) -> None:
        """The host looks at the device-side record (a sync, at logging and checkpoint cadence only)."""
        if self._guard is None or not (count := int(self._guard.count)):
            return
        step, loss, inputs_ok = self._guard.first()
        what = f"loss is {loss} at step {step}" + ("" if inputs_ok else "; the input batch has NaN/inf")
        if self.hparams.nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"{what}. That update was skipped and the last saved checkpoint is intact. Lower model.lr, set "
                f"model.grad_clip_norm, or set model.nonfinite_loss=skip to skip such steps (they are counted)."
            )
        if self._skipped_before + count > self.skipped_steps:
            self.skipped_steps = self._skipped_before + count
            print(f"mrdiff: skipped steps with non-finite gradients ({what}); {self.skipped_steps} skipped so far")

    def _nonfinite(self, loss: Tensor, batch: dict[str, Tensor]) -> None:
        """The synchronous check, for optimizers that cannot skip a step on the device (gradient clipping)."""
        inputs_ok = bool(torch.isfinite(batch["image"]).all())
        what = f"loss is {loss.item()} at step {self.global_step}"
        what += "" if inputs_ok else "; the input batch has NaN/inf"
        if self.hparams.nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"{what}. The last saved checkpoint is intact. Lower model.lr, lower the clipping norm, "
                f"or set model.nonfinite_loss=skip to skip such steps (they are counted)."
            )
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        print(f"mrdiff: skipping step ({what}); {self.skipped_steps} skipped so far")
        return None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """Evaluation happens in callbacks (mrdiff.callbacks.evaluation), which sample at every resolution."""

    def predict_step(self, batch: Tensor, batch_idx: int) -> None:
        """Use `mrdiff sample` for images; predict exists for API completeness."""

    def configure_optimizers(self):
        h = self.hparams
        # fused: one kernel for the whole update. Lightning refuses it with trainer.gradient_clip_val under
        # AMP (model.grad_clip_norm clips here instead), and with a GradScaler (16-mixed) the gradients are
        # still scaled when model.grad_clip_norm would see them.
        trainer = self._trainer
        clipping = trainer is not None and bool(trainer.gradient_clip_val)
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if h.grad_clip_norm and (clipping or scaler is not None):
            raise ValueError(
                "model.grad_clip_norm cannot be combined with trainer.gradient_clip_val or 16-mixed precision "
                "(gradients are scaled then): keep one clipping setting, trainer.gradient_clip_val with 16-mixed"
            )
        fused = self.device.type in ("cuda", "cpu") and not clipping
        opt = torch.optim.AdamW(self.net.parameters(), lr=h.lr, betas=tuple(h.betas),
                                weight_decay=h.weight_decay, fused=fused)
        # The fused AdamW kernel skips its update where `found_inf` is set: non-finite steps are caught on
        # the device, with no host sync per step. Other optimizers get the synchronous check.
        self._guard = NonFiniteGuard(self.device) if fused and scaler is None else None
        warmup = max(h.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- sampling ------------------------------------------------------------------------------------
    def eps_fn(self, grid: Tensor | None, scale: Tensor | None) -> EpsFn:
        """ε(x, t) for the samplers, closing over one shared grid and scale (their features mixed once).

        Call it where the forward passes will run (no_grad, the trainer's precision context), since the
        prepared conditioning is computed here.
        """
        prepared = self.net.prepare(grid, scale)

        def eps(x: Tensor, t: Tensor) -> Tensor:
            # .forward: the eager U-Net even when model.compile compiled its __call__ for training
            return self.net.forward(self._layout(x), t.to(x.device, torch.float32), prepared=prepared).float()

        return eps

    def canvas_inputs(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Grid of the full canvas ([1, 2, H, W]) and its scale ([1]: √(H·W), the side for a square)."""
        self.net.check_size(height, width)
        self.warn_outside_training_scales(height, width)
        grid = canvas_grid(height, width, self.hparams.coord_mode, pixel_unit=self.hparams.train_resolution)
        grid = grid[None].to(self.device)
        scale = torch.tensor([math.sqrt(height * width)], device=self.device)
        return grid, scale

    def warn_outside_training_scales(self, height: int, width: int) -> bool:
        """Say once per size when a canvas is larger than any the model was trained on (tiling is likely there)."""
        scales, side = self.hparams.get("train_scales"), max(height, width)
        if not scales or side <= max(scales) or (height, width) in self._scale_warnings:
            return False
        self._scale_warnings.add((height, width))
        print(f"mrdiff: warning: sampling {height}x{width}, larger than the canvases this model was trained on "
              f"({scales[0]}..{scales[1]} px): expect repeated structure (several suns, tiled horizons) there")
        return True

    @torch.no_grad()
    def sample(
        self,
        seeds: Sequence[int],
        height: int,
        width: int | None = None,
        *,
        sampler: Sampler = "ddim",
        steps: int = 50,  # DDIM and DPM-Solver++: network calls
        eta: float = 0.0,  # DDIM only
        time_cond: TimeCond | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> Tensor:
        """Images [len(seeds), C, H, W] in [−1, 1]; sample i depends only on seeds[i]."""
        width = width or height
        grid, scale = self.canvas_inputs(height, width)
        noise = PerSampleNoise(seeds, self.device)
        x_T = noise.randn((self.net_in_channels, height, width))
        kwargs: dict[str, float] = {"steps": steps} if sampler in STEPPED else {}
        if sampler == "ddim":
            kwargs["eta"] = eta
        x0 = SAMPLERS[sampler](self.eps_fn(grid, scale), self.schedule, x_T, noise=noise, time_cond=time_cond,
                               clip_denoised=clip_denoised, progress=progress, **kwargs)
        return x0.clamp(-1, 1)

    @property
    def net_in_channels(self) -> int:
        return self.net.in_channels


def describe_schedule(schedule: NoiseSchedule) -> str:
    """The settings that define a schedule, as the command line spells them."""
    text = f"--model.schedule={schedule.kind} --model.num_timesteps={schedule.num_timesteps}"
    return text + (f" --model.beta_start={schedule.beta_start:g} --model.beta_end={schedule.beta_end:g}"
                   if schedule.kind == "linear" else "")


def check_pretrained(net: DiffusersUNet, schedule: NoiseSchedule, train_resolution: int) -> None:
    """A pretrained network fixes the β schedule and the training size: settings that disagree are errors."""
    trained = NoiseSchedule(**net.trained_schedule)
    same = trained.num_timesteps == schedule.num_timesteps and np.allclose(trained.betas, schedule.betas, rtol=1e-9)
    if not same:
        raise ValueError(f"the diffusers model's scheduler config {net.scheduler_config_path} has the schedule "
                         f"{describe_schedule(trained)} but mrdiff's model settings say {describe_schedule(schedule)}: "
                         f"set the model's schedule settings to the scheduler config's")
    if net.sample_size is not None and net.sample_size != train_resolution:
        raise ValueError(f"the diffusers UNet was trained at {net.sample_size}x{net.sample_size} (sample_size in "
                         f"its config.json) but model.train_resolution, linked from the data settings, is "
                         f"{train_resolution}: set --data.multires=false --data.train_size={net.sample_size} "
                         f"(the analytic shift and the size warnings use it)")
