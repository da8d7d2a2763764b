"""Sampling outside the LightningModule: (network, schedule) → images at any resolution.

A `DiffusionPipeline` is what every consumer of a trained model holds: `mrdiff sample`, the evaluation stack,
NoiseShift calibration, the benchmark and the evidence commands. It builds the canvas inputs (the coordinate
grid of the whole canvas and its scale), wraps the network as ε(x, t) for the samplers, and runs a
`SamplingSettings`. The LightningModule owns one for its own weights; exported weights load straight into one
(`mrdiff.exported.load`), so nothing that only samples needs Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from mrdiff.console import info
from mrdiff.diffusion.samplers import EpsFn, PerSampleNoise, Progress, SamplingSettings, TimeCond
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.grids import CoordMode, canvas_grid

CompileMode = Literal["none", "default", "reduce-overhead"]  # reduce-overhead: Inductor with CUDA graphs


class SamplingMethod(Protocol):
    """A training-free way of sampling above the training size (mrdiff.baselines): it draws the images itself
    from the pipeline's parts (canvas_eps, scaled_attention, the settings' sampler)."""

    def sample(self, pipeline: DiffusionPipeline, seeds: Sequence[int], height: int, width: int, *,
               sampling: SamplingSettings, time_cond: TimeCond | None, clip_denoised: bool,
               progress: Progress) -> Tensor: ...


class DiffusionPipeline:
    """An ε-prediction network and its noise schedule, ready to sample.

    Args:
        net: mrdiff's U-Net or a diffusers adapter: net(x, t, grid, scale) → ε, with `prepare` and `check_size`.
        schedule: The β schedule the network was trained with.
        coord_mode: How the canvas grid is built (the data's coord_mode at training).
        train_resolution: Side of the training inputs: the pixel unit of pixel coordinates, the analytic
            shift's reference, and the side scaled attention is calibrated at.
        train_scales: [min, max] canvas side seen in training; sampling beyond it says so once per size.
        channels_last: Feed the network channels_last inputs (as it was trained).
        compile: How `sample` runs the per-step network call over a whole canvas: eager ("none"), or
            compiled once per canvas size and batch with static shapes ("default"; "reduce-overhead" also
            replays it as a CUDA graph). See `captured_eps`.
        compile_backend: torch.compile's backend; the mode is passed to Inductor only (tests on a CPU use
            "aot_eager", whose samples equal the eager ones bit for bit).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        *,
        coord_mode: CoordMode = "normalized",
        train_resolution: int = 64,
        train_scales: Sequence[int] | None = None,
        channels_last: bool = False,
        compile: CompileMode = "none",
        compile_backend: str | Callable = "inductor",
    ) -> None:
        self.net, self.schedule = net, schedule
        self.coord_mode, self.train_resolution = coord_mode, train_resolution
        self.train_scales = list(train_scales) if train_scales else None
        self.channels_last = channels_last
        self.compile, self.compile_backend = compile, compile_backend
        self._warned: set[tuple[int, int]] = set()  # sizes already warned about
        self._captured: dict[tuple, tuple[object, Callable]] = {}  # canvas → static conditioning, compiled call

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    def layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def canvas_inputs(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Grid of the full canvas ([1, 2, H, W]) and its scale ([1]: √(H·W), the side for a square)."""
        self.net.check_size(height, width)
        self.warn_outside_training_scales(height, width)
        grid = canvas_grid(height, width, self.coord_mode, pixel_unit=self.train_resolution)
        scale = torch.tensor([math.sqrt(height * width)], device=self.device)
        return grid[None].to(self.device), scale

    def eps_fn(self, grid: Tensor | None, scale: Tensor | None) -> EpsFn:
        """ε(x, t) for the samplers, closing over one shared grid and scale (their features mixed once).

        Call it where the forward passes will run (no_grad, the precision context): the prepared
        conditioning is computed here.
        """
        prepared = self.net.prepare(grid, scale)

        def eps(x: Tensor, t: Tensor) -> Tensor:
            # .forward: the eager network even when model.compile compiled its __call__ for training
            return self.net.forward(self.layout(x), t.to(x.device, torch.float32), prepared=prepared).float()

        return eps

    def captured_eps(self, grid: Tensor | None, scale: Tensor | None) -> EpsFn:
        """eps_fn compiled with static shapes: one graph per canvas size and batch, reused by every later call.

        The conditioning is prepared as in eps_fn, then copied into tensors kept per canvas and marked as
        static addresses, so the compiled graph (and its CUDA graph, under "reduce-overhead") reads it in
        place; the weights are read in place too, so it follows in-place updates of both. x and t are the
        graph's only inputs: t is the [B] tensor the samplers build, so a new timestep replays the graph
        rather than recording another. Each output is cloned, since a CUDA graph's next replay overwrites it.
        One canvas is live at a time: a second call at the same size rewrites the conditioning the first
        returned function reads, which is why only `sample`'s whole-canvas path uses this.
        """
        prepared = self.net.prepare(grid, scale)
        key = (self.compile, self.compile_backend, self.channels_last,
               *((tuple(t.shape), t.dtype, t.device) for t in _tensors(prepared)))
        if key in self._captured:
            static, step = self._captured[key]
            for old, new in zip(_tensors(static), _tensors(prepared)):
                old.copy_(new)
        else:
            static = prepared
            for t in _tensors(static):
                torch._dynamo.mark_static_address(t)

            def forward(x: Tensor, t: Tensor) -> Tensor:
                return self.net.forward(self.layout(x), t, prepared=static).float()

            kwargs = {"mode": self.compile} if self.compile_backend == "inductor" else {}
            step = torch.compile(forward, backend=self.compile_backend, fullgraph=True, dynamic=False, **kwargs)
            self._captured[key] = static, step
        graphs = self.compile == "reduce-overhead"

        def eps(x: Tensor, t: Tensor) -> Tensor:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = step(x, t.to(x.device, torch.float32))
            return out.clone() if graphs else out

        return eps

    def canvas_eps(self, height: int, width: int) -> EpsFn:
        """eps_fn over the whole canvas of one size."""
        return self.eps_fn(*self.canvas_inputs(height, width))

    def warn_outside_training_scales(self, height: int, width: int) -> bool:
        """Say once per size when a canvas is larger than any the model was trained on (tiling is likely there)."""
        side = max(height, width)
        if not self.train_scales or side <= max(self.train_scales) or (height, width) in self._warned:
            return False
        self._warned.add((height, width))
        low, high = self.train_scales
        info(f"mrdiff: warning: sampling {height}x{width}, larger than the canvases this model was trained on "
             f"({low}..{high} px): expect repeated structure (several suns, tiled horizons) there")
        return True

    @torch.no_grad()
    def sample(
        self,
        seeds: Sequence[int],
        height: int,
        width: int | None = None,
        *,
        sampling: SamplingSettings | None = None,  # default: DDIM-50, η = 0
        time_cond: TimeCond | None = None,
        clip_denoised: bool = True,
        progress: Progress = False,
        method: SamplingMethod | None = None,  # None: the whole canvas through the network
    ) -> Tensor:
        """Images [len(seeds), C, H, W] in [−1, 1]; sample i depends only on seeds[i]. `method`: a training-free
        baseline (mrdiff.baselines: Redilation, WindowFusion, Redenoise) draws them instead."""
        width = width or height
        sampling = sampling or SamplingSettings()
        if method is not None:
            return method.sample(self, seeds, height, width, sampling=sampling, time_cond=time_cond,
                                 clip_denoised=clip_denoised, progress=progress)
        grid, scale = self.canvas_inputs(height, width)
        noise = PerSampleNoise(seeds, self.device)
        x_T = noise.randn((self.in_channels, height, width))
        with self.scaled_attention(sampling.attention_scaling):
            eps = self.eps_fn(grid, scale) if self.compile == "none" else self.captured_eps(grid, scale)
            x0 = sampling.run(eps, self.schedule, x_T, noise=noise, time_cond=time_cond,
                              clip_denoised=clip_denoised, progress=progress)
        return x0.clamp(-1, 1)

    def scaled_attention(self, enabled: bool) -> contextlib.AbstractContextManager:
        """The network's scaled attention at the training side when enabled (a no-op for networks without it)."""
        if not enabled or not hasattr(self.net, "scaled_attention"):
            return contextlib.nullcontext()
        return self.net.scaled_attention(self.train_resolution)


def _tensors(prepared: object) -> Iterator[Tensor]:
    """The tensors of a network's prepared conditioning (mrdiff.nn.unet.Prepared, or None), in a fixed order."""
    if isinstance(prepared, Tensor):
        yield prepared
    elif dataclasses.is_dataclass(prepared):
        for field in dataclasses.fields(prepared):
            yield from _tensors(getattr(prepared, field.name))
    elif isinstance(prepared, dict):
        for value in prepared.values():
            yield from _tensors(value)
    elif isinstance(prepared, list | tuple):
        for value in prepared:
            yield from _tensors(value)
