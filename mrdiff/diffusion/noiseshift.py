"""NoiseShift (He et al. 2025) for DDPM: training-free, per-resolution recalibration of noise conditioning.

A network trained at one resolution misjudges the noise level of images at another: the same σ removes
more or less of the visible signal depending on the pixel count. For each timestep t the sampler will
visit, NoiseShift looks for the conditioning value that minimises the one-step denoising error

    t̂_r(t) = argmin_c  E_{x_0 at r, ε} ‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, c) − ε‖²,

searching coarse-to-fine in σ_rf = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)) units. Every candidate c at a given t is scored
on the same (x_0, ε) pairs (common random numbers), so differences between candidates are not masked
by Monte-Carlo noise. The search runs from high to low t and keeps t̂ monotone.

The result is stored per resolution in a `NoiseShiftTable` (JSON) whose `time_cond` plugs into the
samplers: the network sees t̂ while the update coefficients stay at the nominal t. `AnalyticShift` is the
closed-form baseline that shifts log-SNR by log(n/m) (SD3, Esser et al. 2024; simple diffusion,
Hoogeboom et al. 2023).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mrdiff.diffusion.samplers import EpsFn, TimeCond
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.utils import atomic_write, file_hash

Fallback = Literal["error", "nearest", "identity"]
_ROUND = 6  # candidates are rounded to 1e-6 timesteps so that near-identical values are scored once


# -- search ----------------------------------------------------------------------------------------------
@dataclass
class SearchSettings:
    """Coarse-to-fine search in σ_rf units (defaults as in NoiseShift: ±0.1 by 0.01, then ±0.01 by 0.001)."""

    coarse_window: float = 0.1  # half-width of the coarse σ_rf window around σ_rf(t)
    coarse_stride: float = 0.01
    fine_window: float = 0.01  # half-width of the fine σ_rf window around the coarse best
    fine_stride: float = 0.001
    num_images: int = 64  # x_0 images used (the first num_images of those given)
    max_batch: int = 256  # candidates × images per forward pass
    seed: int = 0  # seed of the ε generator (common random numbers across candidates)

    def __post_init__(self) -> None:
        """Reject settings that cannot define a search grid."""
        for name in ("coarse_window", "fine_window"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SearchSettings.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("coarse_stride", "fine_stride"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SearchSettings.{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_images", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchSettings.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Calibration:
    """One resolution's table, sorted by ascending t: t̂(t) and the one-step losses at t and at t̂."""

    t: list[float]
    t_hat: list[float]
    loss_t: list[float]
    loss_t_hat: list[float]

    def __post_init__(self) -> None:
        """Check equal lengths and strictly increasing t (needed by np.interp in time_cond)."""
        lengths = {len(self.t), len(self.t_hat), len(self.loss_t), len(self.loss_t_hat)}
        if len(lengths) != 1 or not self.t:
            raise ValueError(f"calibration lists must be non-empty and equally long, got lengths {lengths}")
        for name, values in asdict(self).items():
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"calibration {name} holds non-finite values (NaN/inf)")
        if any(b <= a for a, b in zip(self.t, self.t[1:], strict=False)):
            raise ValueError("calibration timesteps must be strictly increasing")
        if any(b < a for a, b in zip(self.t_hat, self.t_hat[1:], strict=False)):
            raise ValueError("calibration t_hat must be non-decreasing in t")

    def check_range(self, num_timesteps: int) -> None:
        """t and t̂ must lie in [0, T−1] of the schedule the table was made for."""
        for name in ("t", "t_hat"):
            values = getattr(self, name)
            if min(values) < 0 or max(values) > num_timesteps - 1:
                raise ValueError(f"calibration {name} spans {min(values)}..{max(values)}, outside "
                                 f"[0, {num_timesteps - 1}]")

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists for JSON."""
        return {k: [float(v) for v in vs] for k, vs in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of to_dict; raises ValueError on missing or non-numeric fields."""
        if not isinstance(data, dict):
            raise ValueError(f"calibration entry must be an object, got {type(data).__name__}")
        try:
            fields = {k: [float(v) for v in data[k]] for k in ("t", "t_hat", "loss_t", "loss_t_hat")}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration entry is malformed ({err!r})") from err
        return cls(**fields)


def _timesteps_descending(timesteps: Sequence[int], num_timesteps: int) -> list[int]:
    """Unique integer timesteps in [0, T−1], sorted from high to low."""
    if any(float(t) != int(t) for t in timesteps):
        raise ValueError(f"timesteps must be integers, got {list(timesteps)}")
    steps = sorted({int(t) for t in timesteps}, reverse=True)
    if not steps:
        raise ValueError("calibrate needs at least one timestep")
    if steps[-1] < 0 or steps[0] > num_timesteps - 1:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {steps[-1]}..{steps[0]}")
    return steps


def _candidates(
    schedule: NoiseSchedule, center: float, window: float, stride: float, cap: float
) -> list[float]:
    """Fractional t at σ_rf(center) + k·stride, |k·stride| ≤ window, clamped to [0, min(T−1, cap)]."""
    half = int(math.floor(window / stride + 1e-9))
    sigma = float(schedule.sigma_rf_at(center)) + stride * np.arange(-half, half + 1, dtype=np.float64)
    t = np.round(schedule.t_from_sigma_rf(sigma).numpy(), _ROUND)
    return sorted({float(v) for v in np.clip(t, 0.0, min(schedule.num_timesteps - 1.0, cap))})


def _chunks(k: int, n: int, max_batch: int) -> Iterator[tuple[int, int, int, int]]:
    """(c0, c1, i0, i1): candidates [c0, c1) × images [i0, i1) per pass, at most max_batch pairs."""
    if max_batch >= n:
        group = max_batch // n
        for c0 in range(0, k, group):
            yield c0, min(c0 + group, k), 0, n
        return
    for c in range(k):
        for i0 in range(0, n, max_batch):
            yield c, c + 1, i0, min(i0 + max_batch, n)


def _losses(eps: EpsFn, x_t: Tensor, noise: Tensor, cands: Sequence[float], max_batch: int) -> np.ndarray:
    """Per-candidate mean of (ε_θ(x_t, c) − ε)² over images and elements, candidates × images batched."""
    n, k, device = x_t.shape[0], len(cands), x_t.device
    acc = torch.float32 if device.type == "mps" else torch.float64
    cand_t = torch.tensor(list(cands), dtype=torch.float32, device=device)
    totals = torch.zeros(k, dtype=acc, device=device)
    for c0, c1, i0, i1 in _chunks(k, n, max_batch):
        g, m, x = c1 - c0, i1 - i0, x_t[i0:i1]
        x = x if g == 1 else x.unsqueeze(0).expand(g, *x.shape).reshape(g * m, *x.shape[1:])
        pred = eps(x, cand_t[c0:c1].repeat_interleave(m))
        if pred.shape != x.shape:
            raise ValueError(f"eps returned shape {tuple(pred.shape)} for input {tuple(x.shape)}")
        diff = pred.reshape(g, m, -1).float() - noise[i0:i1].reshape(1, m, -1).float()
        totals[c0:c1] += diff.pow(2).mean(-1).to(acc).sum(1)  # per-image means in float32, sums in acc
    losses = (totals / n).cpu().double().numpy()
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"eps produced non-finite losses at candidates {list(cands)}")
    return losses


class _StepSearch:
    """Coarse-to-fine search at one timestep t; scores are cached so each candidate is evaluated once."""

    def __init__(self, eps: EpsFn, schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: int) -> None:
        ab = float(schedule.alphas_cumprod[t])
        self.eps, self.schedule, self.t, self.noise = eps, schedule, float(t), noise
        self.x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise  # DDPM eq. 4, shared by all candidates (CRN)
        self.scores: dict[float, float] = {}

    def score(self, cands: Sequence[float], max_batch: int) -> None:
        """Evaluate the candidates not scored yet."""
        new = [c for c in cands if c not in self.scores]
        if new:
            losses = _losses(self.eps, self.x_t, self.noise, new, max_batch).tolist()
            self.scores.update(zip(new, losses, strict=True))

    def best(self, cap: float) -> float:
        """argmin of the loss over scored candidates ≤ cap; ties go to the candidate closest to t."""
        allowed = [c for c in self.scores if c <= cap]
        return min(allowed, key=lambda c: (self.scores[c], abs(c - self.t)))

    def run(self, s: SearchSettings, cap: float) -> tuple[float, float, float]:
        """(t̂, loss at t, loss at t̂): coarse grid plus t itself, then the fine grid around the coarse best."""
        coarse = _candidates(self.schedule, self.t, s.coarse_window, s.coarse_stride, cap)
        self.score([*coarse, self.t], s.max_batch)
        best = self.best(cap)
        fine = _candidates(self.schedule, best, s.fine_window, s.fine_stride, cap)
        self.score([*fine, best], s.max_batch)
        t_hat = self.best(cap)
        return t_hat, self.scores[self.t], self.scores[t_hat]


@torch.no_grad()
def calibrate(
    eps: EpsFn,
    schedule: NoiseSchedule,
    images: Tensor,
    timesteps: Sequence[int],
    settings: SearchSettings = SearchSettings(),
    progress: bool = True,
) -> Calibration:
    """t̂(t) = argmin_c E‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, c) − ε‖² for each t, from high to low t with t̂ monotone.

    `images` are clean x_0 ([N, C, H, W], model data range) at the target resolution; `eps` is called on
    their device. The cap t̂(t) ≤ t̂(t') for t < t' may exclude c = t itself, whose loss is still reported.
    """
    steps = _timesteps_descending(timesteps, schedule.num_timesteps)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, C, H, W], got shape {tuple(images.shape)}")
    x0 = images[: settings.num_images]
    generator = torch.Generator().manual_seed(settings.seed)
    cap, rows = schedule.num_timesteps - 1.0, []
    bar = tqdm(steps, desc="NoiseShift", leave=False, disable=not progress)
    for t in bar:
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        t_hat, loss_t, loss_hat = _StepSearch(eps, schedule, x0, noise, t).run(settings, cap)
        bar.set_postfix(t=t, t_hat=f"{t_hat:.2f}")
        cap = t_hat
        rows.append((float(t), t_hat, loss_t, loss_hat))
    rows.reverse()
    return Calibration(*(list(col) for col in zip(*rows, strict=True)))


# -- table -----------------------------------------------------------------------------------------------
checkpoint_hash = file_hash  # a table records the checkpoint it was calibrated for by this hash


def weights_hash(module: torch.nn.Module) -> str:
    """First 16 hex digits of a SHA-256 over the module's state_dict (names, dtypes, shapes, bytes).

    Names the weights a table was calibrated for whatever file holds them: the end-of-fit table and the
    final last.ckpt (EMA weights in both) give the same hash.
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def parse_resolution_key(key: str) -> tuple[int, int]:
    """(H, W) from "64" (square) or "96x128" (H x W)."""
    parts = key.split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"bad resolution key {key!r}: expected e.g. '64' or '96x128' (HxW)")
    return int(parts[0]), int(parts[-1])


def _pixels(key: str) -> int:
    """H·W of a resolution key."""
    return math.prod(parse_resolution_key(key))


def _identity(t: Tensor) -> Tensor:
    """Nominal t as a float tensor."""
    return t if t.is_floating_point() else t.float()


@dataclass
class InterpolatedTimeCond:
    """t ↦ t̂ by linear interpolation in t; outside the calibrated range t̂ = t + (edge offset), clamped."""

    t: np.ndarray
    t_hat: np.ndarray
    num_timesteps: int
    key: str = field(default="")

    def __call__(self, t: Tensor) -> Tensor:
        """t̂ on t's device, in t's dtype (float32 for integer t)."""
        tv = t.detach().double().cpu().numpy()
        out = np.interp(tv, self.t, self.t_hat)
        out = np.where(tv < self.t[0], tv + (self.t_hat[0] - self.t[0]), out)
        out = np.where(tv > self.t[-1], tv + (self.t_hat[-1] - self.t[-1]), out)
        out = np.clip(out, 0.0, self.num_timesteps - 1.0)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return torch.as_tensor(out, dtype=dtype, device=t.device)


def _describe_schedule(d: dict[str, Any]) -> str:
    """Compact 'kind=linear, T=1000, …' for error messages."""
    names = {"num_timesteps": "T"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in d.items())


class NoiseShiftTable:
    """Per-resolution NoiseShift calibrations for one (schedule, checkpoint), stored as JSON."""

    FORMAT_VERSION = 1

    def __init__(
        self,
        *,
        schedule: dict[str, Any],  # NoiseSchedule.describe() of the schedule the table was made for
        checkpoint: str | None,  # checkpoint_hash of the checkpoint file, or None
        settings: dict[str, Any],  # search settings (asdict(SearchSettings))
        data: dict[str, Any],  # where the x_0 images came from (free-form)
        calibrations: dict[str, Calibration],
        weights: str | None = None,  # weights_hash of the model calibrated, or None
    ) -> None:
        if "num_timesteps" not in schedule:
            raise ValueError("schedule description lacks num_timesteps: pass NoiseSchedule.describe()")
        self.schedule, self.checkpoint, self.weights = dict(schedule), checkpoint, weights
        self.settings, self.data = dict(settings), dict(data)
        self.calibrations: dict[str, Calibration] = {}
        for key, cal in calibrations.items():
            self.add(key, cal)

    @classmethod
    def new(
        cls,
        schedule: NoiseSchedule,
        *,
        checkpoint: str | None = None,
        settings: SearchSettings | None = None,
        data: dict[str, Any] | None = None,
        weights: str | None = None,
    ) -> NoiseShiftTable:
        """Empty table for a live schedule and search settings."""
        return cls(schedule=schedule.describe(), checkpoint=checkpoint, weights=weights,
                   settings=asdict(settings or SearchSettings()), data=data or {}, calibrations={})

    @staticmethod
    def resolution_key(height: int, width: int) -> str:
        """"64" when square, "96x128" (HxW) otherwise."""
        if height < 1 or width < 1:
            raise ValueError(f"resolution must be positive, got {height}x{width}")
        return str(height) if height == width else f"{height}x{width}"

    def add(self, key: str, calibration: Calibration) -> None:
        """Store (or replace) the calibration of resolution `key`."""
        h, w = parse_resolution_key(key)
        try:
            calibration.check_range(int(self.schedule["num_timesteps"]))
        except ValueError as err:
            raise ValueError(f"resolution {key}: {err}") from None
        self.calibrations[self.resolution_key(h, w)] = calibration

    def merge(self, other: NoiseShiftTable) -> None:
        """Add another table's resolutions (same schedule and checkpoint required; other's entries win)."""
        if other.schedule != self.schedule:
            raise ValueError(
                f"cannot merge tables for different schedules: ({_describe_schedule(self.schedule)}) "
                f"vs ({_describe_schedule(other.schedule)})"
            )
        for name in ("checkpoint", "weights"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if None not in (mine, theirs) and mine != theirs:
                raise ValueError(f"cannot merge tables for different {name}: {mine} vs {theirs}")
        for key, cal in other.calibrations.items():
            self.add(key, cal)

    def resolutions(self) -> list[str]:
        """Resolution keys, by increasing pixel count."""
        return sorted(self.calibrations, key=lambda k: (_pixels(k), k))

    def __getitem__(self, key: str) -> Calibration:
        """Calibration of a resolution key ("64", "96x128")."""
        return self.calibrations[key]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {
            "format_version": self.FORMAT_VERSION,
            "schedule": self.schedule,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "settings": self.settings,
            "data": self.data,
            "resolutions": {k: self.calibrations[k].to_dict() for k in self.resolutions()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically: a temporary file in the same directory, then os.replace."""
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        schedule: NoiseSchedule | None = None,  # if given, the table must have been made for it
        checkpoint: str | None = None,  # checkpoint_hash of the model's checkpoint file
        weights: str | None = None,  # weights_hash of the model
    ) -> NoiseShiftTable:
        """Read a table, checking format version, values, schedule and weights with actionable errors.

        When `checkpoint` or `weights` is given the table must name the same weights (its `weights`, else its
        `checkpoint` hash); a table that names neither is refused then.
        """
        doc = _read_json(Path(path))
        table = _table_from_doc(cls, doc, path)
        if schedule is not None and table.schedule != schedule.describe():
            raise ValueError(
                f"NoiseShift table {path} was calibrated for schedule ({_describe_schedule(table.schedule)}) "
                f"but the model uses ({_describe_schedule(schedule.describe())}): recalibrate for this "
                "schedule or load the table made for it"
            )
        table.check_weights(path, checkpoint=checkpoint, weights=weights)
        return table

    def check_weights(self, path: object, *, checkpoint: str | None, weights: str | None) -> None:
        """Refuse a table made for other weights, or one that names none when the model's are known."""
        if weights is not None and self.weights is not None:
            mine, theirs, what = self.weights, weights, "weights"
        elif checkpoint is not None and self.checkpoint is not None:
            mine, theirs, what = self.checkpoint, checkpoint, "checkpoint"
        elif weights is not None or checkpoint is not None:
            raise ValueError(f"NoiseShift table {path} does not name the weights it was calibrated for (a table "
                             "from an older mrdiff): recalibrate it with `mrdiff calibrate` for this checkpoint")
        else:
            return
        if mine != theirs:
            raise ValueError(
                f"NoiseShift table {path} was calibrated for {what} {mine} but the model's {what} hash is "
                f"{theirs}: recalibrate for this checkpoint or load its table"
            )

    def _nearest(self, height: int, width: int) -> str:
        """Present resolution whose pixel count is closest (by ratio) to height·width."""
        target = math.log(height * width)
        return min(self.resolutions(), key=lambda k: abs(math.log(_pixels(k)) - target))

    def time_cond(self, height: int, width: int, *, fallback: Fallback = "error") -> TimeCond:
        """Nominal t ↦ t̂ at a resolution; `fallback` decides what a resolution missing from the table gets."""
        key = self.resolution_key(height, width)
        if key not in self.calibrations:
            if fallback == "identity":
                return _identity
            if fallback != "nearest" or not self.calibrations:
                raise ValueError(
                    f"no NoiseShift calibration for resolution {key}; present: {self.resolutions() or 'none'}"
                    ". Calibrate this resolution or pass fallback='nearest' or fallback='identity'"
                )
            key = self._nearest(height, width)
        cal = self.calibrations[key]
        t, t_hat = np.asarray(cal.t, dtype=np.float64), np.asarray(cal.t_hat, dtype=np.float64)
        return InterpolatedTimeCond(t, t_hat, int(self.schedule["num_timesteps"]), key)


def _read_json(path: Path) -> dict[str, Any]:
    """Parse the file, turning missing/corrupt files into errors that name the file and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"NoiseShift table {path} does not exist: run the calibration for this model "
                                "first or fix the path")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"NoiseShift table {path} is not valid JSON ({err}): delete it and recalibrate") \
            from err
    if not isinstance(doc, dict):
        raise ValueError(f"NoiseShift table {path} is not a JSON object: delete it and recalibrate")
    return doc


def _table_from_doc(cls: type[NoiseShiftTable], doc: dict[str, Any], path: object) -> NoiseShiftTable:
    """Build a table from its JSON document, validating version and fields."""
    version = doc.get("format_version")
    if version != cls.FORMAT_VERSION:
        raise ValueError(f"NoiseShift table {path} has format_version {version!r}, this code reads version "
                         f"{cls.FORMAT_VERSION}: recalibrate to write a current table")
    missing = [k for k in ("schedule", "checkpoint", "settings", "data", "resolutions") if k not in doc]
    if missing or not isinstance(doc["resolutions"], dict) or not isinstance(doc["schedule"], dict):
        bad = missing or ["resolutions/schedule"]
        raise ValueError(f"NoiseShift table {path} is malformed (missing or invalid: {bad}): "
                         "delete it and recalibrate")
    try:
        cals = {}
        for key, entry in doc["resolutions"].items():
            try:
                cals[key] = Calibration.from_dict(entry)
            except ValueError as err:
                raise ValueError(f"resolution {key}: {err}") from err
        return cls(schedule=doc["schedule"], checkpoint=doc["checkpoint"], weights=doc.get("weights"),
                   settings=doc["settings"] or {}, data=doc["data"] or {}, calibrations=cals)
    except (ValueError, TypeError) as err:
        raise ValueError(f"NoiseShift table {path} is malformed ({err}): delete it and recalibrate") from err


# -- analytic baseline -----------------------------------------------------------------------------------
class AnalyticShift:
    """SD3 / simple-diffusion resolution shift: t̂ = t(λ(t) + log(n/m)), n, m = sample, train pixels."""

    def __init__(self, schedule: NoiseSchedule, *, train_pixels: int, sample_pixels: int) -> None:
        if train_pixels < 1 or sample_pixels < 1:
            raise ValueError(f"pixel counts must be positive: train={train_pixels}, sample={sample_pixels}")
        self.schedule = schedule
        self.train_pixels, self.sample_pixels = train_pixels, sample_pixels
        self.shift = math.log(sample_pixels / train_pixels)  # λ shifted by −log(m/n)

    def __call__(self, t: Tensor) -> Tensor:
        """t̂ = t_from_log_snr(log_snr_at(t) + log(n/m)), float32 on t's device, clamped to [0, T−1]."""
        if self.shift == 0.0:
            return t.to(torch.float32)
        lam = self.schedule.log_snr_at(t) + self.shift
        return self.schedule.t_from_log_snr(lam).to(device=t.device, dtype=torch.float32)
