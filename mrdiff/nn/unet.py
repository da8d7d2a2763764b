"""The ε-prediction U-Net of DDPM (Ho et al. 2020, appendix B) with coordinate and scale conditioning.

Level l of the U-Net works at H/2^l × W/2^l. Two optional conditionings (the multi-resolution method):
- coordinates: Fourier features of the grid, average-pooled to each level's size (exact for pixel
  centres), computed once per level per forward and concatenated to the features in every ResBlock;
- scale: ResBlocks at `safa_levels` use a ScaleAwareConv2d for their second conv, its kernel mixed
  from log2(scale / scale_ref).
The network knows nothing of the diffusion schedule: it maps (x_t, t, grid, scale) to ε̂.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrdiff.nn.blocks import Attention, ResBlock, group_norm, norm_groups, timestep_embedding, zero_init
from mrdiff.nn.coords import FourierFeatures
from mrdiff.nn.safa import MixedKernels, SafaMode, ScaleAwareConv2d


@dataclass
class Prepared:
    """The conditioning of one fixed (grid, scale) for many forward passes: see UNet.prepare."""

    coords: list[Tensor | None]  # Fourier features per level
    scale: MixedKernels | None  # every SAFA layer's kernel for the scale


class Level(nn.Module):
    """The ResBlocks (and attention) of one U-Net level on one path."""

    def __init__(self, blocks: Sequence[ResBlock], attention: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(attention)


class UNet(nn.Module):
    """DDPM U-Net; forward(x, t, grid=None, scale=None) → ε̂ of x's shape.

    Args:
        in_channels: Image channels in.
        out_channels: Channels of ε̂.
        base_channels: Channels at level 0.
        channel_mult: Level l has base_channels × channel_mult[l] channels and runs at H/2^l.
        num_res_blocks: ResBlocks per level on the down path (one more on the up path).
        attention_levels: Levels with self-attention.
        head_channels: Channels per attention head.
        dropout: Dropout inside the ResBlocks.
        coord_frequencies: Fourier frequencies of the coordinate grid, added in every ResBlock; 0: none.
        coord_max_frequency: Highest frequency, in cycles per canvas half-width (normalised coordinates).
        coord_min_frequency: Lowest frequency; below 0.5 the features tell every canvas point apart (docs/evidence.md).
        coord_basis: log-spaced frequencies, or random gaussian ones.
        coord_antialias: Damp the frequencies a level cannot resolve at its pixel spacing.
        safa_levels: Levels whose ResBlocks use a scale-aware second convolution (SAFA).
        safa_kernels: K, the kernels SAFA mixes per scale.
        safa_mode: How SAFA applies per-sample kernels: grouped, experts or stacked (auto picks by feature-map size).
        scale_ref: SAFA sees log2(scale / scale_ref).
        norm_group_channels: GroupNorms keep at least this many channels per group (DDPM: 4, its 32 groups on
            128 channels). 1 is the rule before this setting existed (gcd(32, channels) groups), which on
            32 channels or fewer erases the time embedding: only for weights trained that way.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        head_channels: int = 64,
        dropout: float = 0.1,
        coord_frequencies: int = 0,
        coord_max_frequency: float = 16.0,
        coord_min_frequency: float = 1.0,
        coord_basis: Literal["log", "gaussian"] = "log",
        coord_antialias: bool = True,
        safa_levels: Sequence[int] = (),
        safa_kernels: int = 4,
        safa_mode: SafaMode = "auto",
        scale_ref: float = 64.0,
        norm_group_channels: int = 4,
    ) -> None:
        super().__init__()
        self.norm_group_channels = norm_group_channels
        levels = len(channel_mult)
        for name, values in (("attention_levels", attention_levels), ("safa_levels", safa_levels)):
            bad = [v for v in values if not 0 <= v < levels]
            if bad:
                raise ValueError(
                    f"{name} {list(bad)} do not exist: this U-Net has levels 0..{levels - 1} "
                    f"(one per channel_mult entry {list(channel_mult)}; level l runs at H/2^l)"
                )
        if min(channel_mult) < 1 or base_channels < 1 or num_res_blocks < 1:
            raise ValueError("base_channels, num_res_blocks and every channel_mult must be positive")
        self.num_levels, self.scale_ref = levels, scale_ref
        self.coords = (
            FourierFeatures(num_frequencies=coord_frequencies, max_frequency=coord_max_frequency,
                            min_frequency=coord_min_frequency,
                            basis=coord_basis, antialias=coord_antialias)
            if coord_frequencies > 0 else None
        )
        self.uses_scale = len(safa_levels) > 0
        coord_ch = self.coords.out_channels if self.coords else 0
        emb_ch = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.base_channels = base_channels

        def block(cin: int, cout: int, level: int) -> ResBlock:
            k = safa_kernels if level in safa_levels else 0
            return ResBlock(cin, cout, emb_ch, dropout, coord_ch, k, safa_mode, norm_group_channels)

        def attn(level: int, ch: int, n: int) -> list[nn.Module]:
            return [Attention(ch, head_channels, norm_group_channels) if level in attention_levels else nn.Identity()
                    for _ in range(n)]

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        chans = [base_channels * m for m in channel_mult]
        skips, ch = [base_channels], base_channels
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, cout in enumerate(chans):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, cout, level))
                ch = cout
                skips.append(ch)
            self.down.append(Level(blocks, attn(level, ch, num_res_blocks)))
            if level < levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = Level([block(ch, ch, levels - 1), block(ch, ch, levels - 1)],
                         [Attention(ch, head_channels, norm_group_channels)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), chans[level], level))
                ch = chans[level]
            self.up.append(Level(blocks, attn(level, ch, num_res_blocks + 1)))
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out = nn.Sequential(group_norm(ch, norm_group_channels), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def to_channels_last(self) -> UNet:
        """Store the 4-D conv kernels channels_last (the 5-D SAFA kernel banks stay as they are)."""
        for param in self.parameters():
            if param.ndim == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)
        return self

    @property
    def in_channels(self) -> int:
        return self.stem.in_channels

    def attention_layers(self) -> Iterator[tuple[int, Attention]]:
        """(level, layer) of every attention layer."""
        top = self.num_levels - 1
        stages = [*enumerate(self.down), (top, self.mid), *((top - i, lv) for i, lv in enumerate(self.up))]
        for level, stage in stages:
            for layer in stage.attention:
                if isinstance(layer, Attention):
                    yield level, layer

    @contextmanager
    def scaled_attention(self, train_size: int | None) -> Iterator[UNet]:
        """Inside the block, attention at level l rescales its logits for inputs whose token count differs
        from the (train_size / 2^l)² it was trained at (see Attention); None leaves attention unchanged."""
        previous = [(layer, layer.reference_tokens) for _, layer in self.attention_layers()]
        if train_size is not None:
            for level, layer in self.attention_layers():
                layer.reference_tokens = max(2, (train_size // 2**level) ** 2)
        try:
            yield self
        finally:
            for layer, tokens in previous:
                layer.reference_tokens = tokens

    def dilatable_convs(self, levels: Sequence[int]) -> Iterator[nn.Conv2d | ScaleAwareConv2d]:
        """The stride-1 3×3 convolutions of `levels` (negative counts from the deepest): both convs of every ResBlock
        there, the middle blocks' with the deepest level's, and the conv after the upsampling that leaves an up
        level (ScaleCrafter dilates its up block's upsampler too). Never the stem, the output or the downsamplers."""
        top = self.num_levels - 1
        if any(not -self.num_levels <= level <= top for level in levels):
            raise ValueError(f"re-dilation levels {list(levels)} do not exist: this U-Net has levels 0..{top}")
        chosen = {level % self.num_levels for level in levels}
        stages = [*enumerate(self.down), (top, self.mid), *((top - i, lv) for i, lv in enumerate(self.up))]
        for level, stage in stages:
            for block in stage.blocks if level in chosen else ():
                yield from (block.conv1, block.conv2)
        yield from (conv for i, conv in enumerate(self.upsample) if top - i in chosen)

    @contextmanager
    def redilated(self, levels: Sequence[int], dilation: tuple[int, int]) -> Iterator[UNet]:
        """Inside the block the convolutions of `levels` (dilatable_convs) run with dilation d = (d_h, d_w) and
        padding d (re-dilation, ScaleCrafter, He et al. 2023, §3.2): on a canvas d× the training size each keeps
        its receptive field in canvas units. d = (1, 1) changes nothing."""
        convs = list(self.dilatable_convs(levels)) if tuple(dilation) != (1, 1) else []
        previous = [(conv, conv.dilation, conv.padding) for conv in convs]
        for conv in convs:
            conv.dilation = conv.padding = tuple(dilation)  # a 3×3 kernel: padding d keeps the size
        try:
            yield self
        finally:
            for conv, dilation_was, padding_was in previous:
                conv.dilation, conv.padding = dilation_was, padding_was

    @property
    def downsampling_factor(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (self.num_levels - 1)

    def check_size(self, height: int, width: int) -> None:
        """Clear error for a resolution the U-Net cannot take."""
        f = self.downsampling_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(
                f"resolution {height}x{width} is not divisible by the U-Net's downsampling factor {f} "
                f"({self.num_levels} levels): use a multiple of {f}, e.g. {max(f, round(height / f) * f)}"
            )

    def check_trained_norm_groups(self, trained: int) -> None:
        """ValueError when weights trained with norm_group_channels=`trained` would meet other GroupNorm groups
        here: the shapes match, so loading would succeed and silently change what the network computes."""
        norms = [m for m in self.modules() if isinstance(m, nn.GroupNorm)]
        if all(norm_groups(m.num_channels, trained) == m.num_groups for m in norms):
            return
        raise ValueError(
            f"was trained with GroupNorm groups of norm_group_channels={trained}, but this U-Net has "
            f"norm_group_channels={self.norm_group_channels}: set --model.net.init_args.norm_group_channels="
            f"{trained} to use these weights"
            + (" (they predate the setting: with 32 channels or fewer per level the network did not see t)"
               if trained == 1 else ""))

    def level_coords(self, grid: Tensor | None) -> list[Tensor | None]:
        """Fourier features of the grid at every level, computed once per forward."""
        if self.coords is None:
            return [None] * self.num_levels
        if grid is None:
            raise ValueError("this U-Net conditions on coordinates (coord_frequencies > 0): pass grid=")
        grid = grid if grid.ndim == 4 else grid[None]
        out = []
        for level in range(self.num_levels):
            pooled = F.avg_pool2d(grid, 2**level) if level else grid
            out.append(self.coords(pooled.float()))
        return out

    def normalised_scale(self, scale: Tensor | float | None, device: torch.device) -> Tensor | None:
        if not self.uses_scale:
            return None
        if scale is None:
            raise ValueError("this U-Net has SAFA layers (safa_levels): pass scale= (the image resolution)")
        scale = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1)
        return torch.log2(scale / self.scale_ref)

    def prepare(self, grid: Tensor | None, scale: Tensor | float | None) -> Prepared:
        """Per-level Fourier features and mixed SAFA kernels for one shared grid and scale, computed once.

        `forward(x, t, prepared=net.prepare(grid, scale))` equals `forward(x, t, grid, scale)`. The samplers
        and NoiseShift calibration use it: their many calls share the canvas grid and the resolution.
        """
        s = self.normalised_scale(scale, next(self.parameters()).device)
        if s is not None and s.numel() != 1:
            raise ValueError(f"prepare takes one scale shared by the batch, got {s.numel()}")
        mixed = None if s is None else MixedKernels(
            (m, m.mix(s)) for m in self.modules() if isinstance(m, ScaleAwareConv2d))
        return Prepared(self.level_coords(grid), mixed)

    def forward(
        self, x: Tensor, t: Tensor, grid: Tensor | None = None, scale: Tensor | float | None = None, *,
        prepared: Prepared | None = None,
    ) -> Tensor:
        self.check_size(*x.shape[-2:])
        if prepared is not None:
            coords, s = prepared.coords, prepared.scale
        else:
            coords, s = self.level_coords(grid), self.normalised_scale(scale, x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        h = self.stem(x)
        skips = [h]
        for level, stage in enumerate(self.down):
            for blk, att in zip(stage.blocks, stage.attention):
                h = att(blk(h, emb, coords[level], s))
                skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid.attention[0](self.mid.blocks[0](h, emb, coords[-1], s))
        h = self.mid.blocks[1](h, emb, coords[-1], s)
        for i, stage in enumerate(self.up):
            level = self.num_levels - 1 - i
            for blk, att in zip(stage.blocks, stage.attention):
                h = att(blk(torch.cat([h, skips.pop()], dim=1), emb, coords[level], s))
            if level > 0:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)
