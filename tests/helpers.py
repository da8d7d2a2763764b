"""Callbacks the tests inject into `mrdiff fit` subprocesses (tests/ is on PYTHONPATH there), and the analytic
Gaussian ε-oracle the NoiseShift tests calibrate (test_noiseshift.py, test_noiseshift_pooled.py).

Oracle: for x_0 ~ N(0, v I) the Bayes-optimal ε-prediction at conditioning c is
ε*(x; c, v) = √(1−ᾱ_c) x / (ᾱ_c v + 1 − ᾱ_c). For v ≥ 1 its gain k(c) grows monotonically with c, so the
argmin over c of E(k(c) x_t − ε)² is unique: k(c) = √(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t) for data variance s².
"""

import json
import math
import os
import signal
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from mrdiff.diffusion.samplers import EpsFn
from mrdiff.diffusion.schedule import NoiseSchedule


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


# -- the NoiseShift oracle --------------------------------------------------------------------------------
def oracle(schedule: NoiseSchedule, v: float) -> EpsFn:
    """ε*(x; c, v) = √(1−ᾱ_c) x / (ᾱ_c v + 1 − ᾱ_c), ᾱ_c at fractional c."""

    def eps(x: Tensor, c: Tensor) -> Tensor:
        ab = schedule.alphas_cumprod_at(c).to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * x / (ab * v + 1 - ab)

    return eps


def closed_form_t_hat(schedule: NoiseSchedule, t: int, s2: float, v: float) -> float:
    """Solve √(1−ᾱ_c)/(ᾱ_c v + 1−ᾱ_c) = √(1−ᾱ_t)/(ᾱ_t s² + 1−ᾱ_t) for fractional c by bisection (v ≥ 1)."""
    ab = float(schedule.alphas_cumprod[t])
    target = math.sqrt(1 - ab) / (ab * s2 + 1 - ab)

    def gain(c: float) -> float:
        a = float(schedule.alphas_cumprod_at(c))
        return math.sqrt(1 - a) / (a * v + 1 - a)

    lo, hi = 0.0, schedule.num_timesteps - 1.0
    assert gain(lo) < target < gain(hi), "optimum outside [0, T-1]"
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gain(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def gaussian_images(n: int, shape: tuple[int, ...], variance: float, seed: int = 1234) -> Tensor:
    """x_0 ~ N(0, variance I), from a seed distinct from the search's ε seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g) * math.sqrt(variance)


def oracle_optimum(schedule: NoiseSchedule, t: int, s2: float, v: float) -> float:
    """closed_form_t_hat clamped to [0, T−1]: the exact-expectation optimum over conditionings in the schedule's
    range (0 or T−1 where the unconstrained optimum lies beyond)."""
    ab = float(schedule.alphas_cumprod[t])
    target = math.sqrt(1 - ab) / (ab * s2 + 1 - ab)
    edges = (0.0, schedule.num_timesteps - 1.0)
    gains = [math.sqrt(1 - a) / (a * v + 1 - a) for a in map(float, schedule.alphas_cumprod_at(edges))]
    if target <= gains[0]:
        return edges[0]
    if target >= gains[1]:
        return edges[1]
    return closed_form_t_hat(schedule, t, s2, v)
