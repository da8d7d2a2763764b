"""Training-free baselines: what a fixed-resolution model can do at sampling time above its training size R.

The field's answers to "sample a model at 2R without retraining", to compare mrdiff with (issue 33):
- Redilation (ScaleCrafter, He et al. 2023): the 3×3 convolutions of the deep U-Net levels run dilated by
  f = target side / R for the first, high-noise share of the steps, so they see as much of the canvas as at R;
- WindowFusion (MultiDiffusion, Bar-Tal et al. 2023): every step averages the ε of overlapping R-size windows;
- Redenoise (SDEdit, Meng et al. 2022; the core of DemoFusion and of cascades): sample at R, upsample bicubically,
  noise to t₀ and denoise at the target size from there.
Entropy-scaled attention (Jin et al. 2023) is SamplingSettings.attention_scaling.

Each is a frozen dataclass of its paper's parameters, applied as `pipeline.sample(..., method=Redilation())` with
any sampler of SamplingSettings and any time conditioning (NoiseShift, the analytic shift).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mrdiff.diffusion.samplers import EpsFn, PerSampleNoise, SamplingSettings
from mrdiff.diffusion.windows import fused_eps
from mrdiff.pipeline import DiffusionPipeline


def upsample(images: Tensor, height: int, width: int) -> Tensor:
    """Bicubic (antialiased) resize to height × width, clamped to [−1, 1]."""
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def denoise(pipeline: DiffusionPipeline, eps: EpsFn, x: Tensor, noise: PerSampleNoise, sampling: SamplingSettings,
            **kwargs: Any) -> Tensor:
    """sampling.run over eps from x, with the pipeline's scaled attention when the settings ask; clamped to [−1, 1]."""
    with pipeline.scaled_attention(sampling.attention_scaling):
        return sampling.run(eps, pipeline.schedule, x, noise=noise, **kwargs).clamp(-1, 1)


def from_noise(pipeline: DiffusionPipeline, eps: EpsFn, seeds: Sequence[int], height: int, width: int,
               sampling: SamplingSettings, **kwargs: Any) -> Tensor:
    """What pipeline.sample does with the canvas ε, over another ε: the same seeds' x_T, the same sampler."""
    noise = PerSampleNoise(seeds, pipeline.device)
    return denoise(pipeline, eps, noise.randn((pipeline.in_channels, height, width)), noise, sampling, **kwargs)


def dilation_factor(side: int, train_side: int) -> int:
    """f = side / R rounded to the nearest integer, halves up (1.5R → 2, 1.25R → 1): a conv dilates by whole
    pixels (ScaleCrafter resizes features for fractional f instead; below 1.5R we leave the layer as it is)."""
    return max(1, math.floor(side / train_side + 0.5))


@dataclass(frozen=True)
class Redilation:
    """Re-dilation (ScaleCrafter, He et al. 2023, §3.2): the 3×3 convolutions of `levels` run with dilation and
    padding f = (round(H/R), round(W/R)) on the first `share` of the sampling steps, plain after.

    Args:
        levels: U-Net levels whose convolutions dilate (UNet.dilatable_convs; −1 is the deepest, with the middle
            blocks). ScaleCrafter's settings at 2× the side dilate only SD's deepest level, its middle block and
            its upsampler (assets/dilate_settings/sd1.5_1024x1024.txt): deep layers set the layout, and dilating
            the fine ones costs detail. The evidence U-Net's deepest level runs at 8×8 at R = 32, as SD's does.
        share: Steps dilated, from the first: ScaleCrafter's 2× configs dilate 20 (SD 2.1) or 30 (SD 1.5, SDXL)
            of 50 DDIM steps; 0.5 lies between. The layout is fixed early, and late dilated steps blur detail.
    """

    levels: tuple[int, ...] = (-1,)
    share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1 or not self.levels:
            raise ValueError(f"re-dilation needs levels and a share in [0, 1], got {self.levels}, {self.share}")

    def sample(self, pipeline: DiffusionPipeline, seeds: Sequence[int], height: int, width: int, *,
               sampling: SamplingSettings, **kwargs: Any) -> Tensor:
        """pipeline.sample with the U-Net re-dilated on the first round(share · steps) network calls."""
        net, side = pipeline.net, pipeline.train_resolution
        if not hasattr(net, "redilated"):
            raise ValueError(f"re-dilation needs mrdiff's U-Net, not {type(net).__name__}")
        dilation = (dilation_factor(height, side), dilation_factor(width, side))
        calls = math.floor(self.share * len(sampling.timesteps(pipeline.schedule)) + 0.5)
        eps, count = pipeline.canvas_eps(height, width), itertools.count()

        def redilated(x: Tensor, t: Tensor) -> Tensor:
            if next(count) >= calls:  # one network call per step in every sampler
                return eps(x, t)
            with net.redilated(self.levels, dilation):
                return eps(x, t)

        return from_noise(pipeline, redilated, seeds, height, width, sampling, **kwargs)


@dataclass(frozen=True)
class WindowFusion:
    """Window fusion (MultiDiffusion, Bar-Tal et al. 2023, eq. 5): each step's ε is the per-pixel mean of the ε of
    overlapping window × window crops (mrdiff.diffusion.windows), each fed as a canvas of its own (its grid, its
    scale): what a fixed-size model sees.

    Args:
        window: Side of the windows; None: the training side R.
        stride: Offset between windows; None: window / 2 (MultiDiffusion's panoramas use 64-latent windows every 8;
            half a window is the usual cheaper overlap, 9 windows at 2R). The last window is aligned to the edge.
    """

    window: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if (self.window is not None and self.window < 1) or (self.stride is not None and self.stride < 1):
            raise ValueError(f"window fusion needs a positive window and stride, got {self.window}, {self.stride}")

    def sample(self, pipeline: DiffusionPipeline, seeds: Sequence[int], height: int, width: int, *,
               sampling: SamplingSettings, **kwargs: Any) -> Tensor:
        """pipeline.sample with the canvas ε replaced by the fused windows' ε."""
        window = self.window or pipeline.train_resolution
        wh, ww = min(window, height), min(window, width)
        eps = fused_eps(pipeline.canvas_eps(wh, ww), height, width, (wh, ww), self.stride or max(1, window // 2))
        return from_noise(pipeline, eps, seeds, height, width, sampling, **kwargs)


@dataclass(frozen=True)
class Redenoise:
    """Upsample, then re-denoise (SDEdit, Meng et al. 2022): sample at R, upsample bicubically to the target,
    noise to t₀ with q(x_t₀ | x_0) (DDPM eq. 4) and run the same sampler at the target size over its timesteps
    ≤ t₀ (t₀ off the sampler's grid: the image is noised to the first of them).

    The noise is the same seeds' x_T of plain sampling at the target (and the stochastic samplers go on drawing
    from the same generators), so as t₀ → T − 1 (√ᾱ_t₀ → 0) this becomes plain sampling at the target for an ε
    that is ≈ x there, as a trained model's is (a random network's is not: x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ then moves by
    O(1)); t₀ = 0 adds no noise and takes no step: the upsampled image itself. The sample at R takes no time
    conditioning (it is at the training size); the re-denoising takes the caller's.

    Args:
        t0: The timestep the upsampled image is noised to; None: T // 2, the middle of the t₀ ∈ [0.3, 0.6]·T of
            SDEdit's experiments (its trade-off of faithfulness to the guide against realism). At 500 of the linear
            schedule x_t₀ = 0.28 x_0 + 0.96 ε: the upsampled image's layout (its low frequencies) survives, the
            detail is generated anew at the target size.
    """

    t0: int | None = None

    def __post_init__(self) -> None:
        if self.t0 is not None and self.t0 < 0:
            raise ValueError(f"re-denoising needs t0 >= 0, got {self.t0}")

    def sample(self, pipeline: DiffusionPipeline, seeds: Sequence[int], height: int, width: int, *,
               sampling: SamplingSettings, time_cond: Any = None, **kwargs: Any) -> Tensor:
        """The plain samples at R, upsampled, noised to t₀ and denoised at height × width."""
        schedule, side = pipeline.schedule, pipeline.train_resolution
        t0 = schedule.num_timesteps // 2 if self.t0 is None else self.t0
        if t0 >= schedule.num_timesteps:
            raise ValueError(f"re-denoising needs t0 <= {schedule.num_timesteps - 1} (T − 1), got {t0}")
        x0 = upsample(pipeline.sample(seeds, side, side, sampling=sampling, **kwargs), height, width)
        visited = [t for t in sampling.timesteps(schedule) if t <= t0] if t0 > 0 else []
        if not visited:
            return x0
        noise = PerSampleNoise(seeds, pipeline.device)  # plain sampling's x_T at the target, then its step noise
        start = torch.full((len(seeds),), visited[0], device=pipeline.device)
        x = schedule.q_sample(x0.to(pipeline.device), start, noise.randn_like(x0))
        return denoise(pipeline, pipeline.canvas_eps(height, width), x, noise, sampling, start=visited[0],
                       time_cond=time_cond, **kwargs)


METHODS: dict[str, type] = {"redilation": Redilation, "window_fusion": WindowFusion, "redenoise": Redenoise}


def parse_value(text: str, hint: Any) -> Any:
    """A field's value from text: int, float, None ('none'), or a tuple of ints ('1/2')."""
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    if typing.get_origin(hint) is tuple:
        return tuple(int(part) for part in text.split("/"))
    return float(text) if float in (hint, *typing.get_args(hint)) else int(text)


def parse_method_args(text: str) -> dict[str, dict[str, Any]]:
    """'redenoise.t0=400,window_fusion.stride=8,redilation.levels=1/2' → {method: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, _, value = item.partition("=")
        name, _, field = key.strip().partition(".")
        hints = typing.get_type_hints(METHODS[name]) if name in METHODS else {}
        if field not in hints or not value:
            fields = ", ".join(f"{n}.{f.name}" for n, cls in METHODS.items() for f in dataclasses.fields(cls))
            raise ValueError(f"bad method argument {item!r}: write METHOD.FIELD=VALUE with one of {fields}")
        out.setdefault(name, {})[field] = parse_value(value.strip(), hints[field])
    return out


def method_args_for(text: str, methods: Sequence[str], what: str, where: str) -> dict[str, dict[str, Any]]:
    """parse_method_args(text) for an option `what` whose arguments may only name `methods`: one ValueError
    starting with `what` for a bad item, or '<what> sets [...], <where>' for a method outside them."""
    try:
        args = parse_method_args(text)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    if set(args) - set(methods):
        raise ValueError(f"{what} sets {sorted(set(args) - set(methods))}, {where}")
    return args


def method(name: str, **overrides: Any) -> Redilation | WindowFusion | Redenoise:
    """The method `name` (a key of METHODS) with its defaults, some overridden."""
    return METHODS[name](**overrides)
