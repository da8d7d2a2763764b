"""The U-Net's building blocks (DDPM, Ho et al. 2020, appendix B): time embedding, GroupNorm, ResBlock, attention.

A ResBlock takes the time embedding, and optionally the level's coordinate features (concatenated to its
input) and a SAFA kernel mix for its second convolution; mrdiff.nn.unet assembles them into levels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrdiff.nn.safa import MixedKernels, SafaMode, ScaleAwareConv2d


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a (possibly fractional) timestep, [B] → [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (output layers start as identity / zero residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def norm_groups(channels: int, min_group_channels: int) -> int:
    """DDPM's 32 groups where the channels allow, halved until each group holds min_group_channels or more.

    A ResBlock adds the time embedding as one constant per channel before its second GroupNorm, which removes
    each group's mean: with one channel per group (32 groups on ≤ 32 channels) the norm erases the embedding
    and the network never sees t. DDPM's own U-Net has 4 channels per group (32 groups on 128 channels).
    """
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < min_group_channels:
        groups //= 2
    return groups


def group_norm(channels: int, min_group_channels: int = 4) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels, min_group_channels), channels)


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv ×2 with the time embedding added in between and the coordinates joined at conv1.

    conv1 sees [h, γ(g)] concatenated, with a 1×1 kernel on the Fourier channels: for a uniform grid a
    3×3 kernel on sin/cos features is itself a 1×1 mix of them (sin(ω(x+δ)) = sin ωx cos ωδ + cos ωx sin ωδ),
    but with weights that depend on the grid spacing δ, i.e. on the resolution. The 1×1 form is the
    resolution-independent part and costs 1/9 of the FLOPs.

    Args:
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, dropout: float,
        coord_channels: int = 0, safa_kernels: int = 0, safa_mode: SafaMode = "auto", norm_group_channels: int = 4,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.coords = nn.Conv2d(coord_channels, out_channels, 1, bias=False) if coord_channels else None
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))  # DDPM: dense(swish(temb))
        self.norm2 = group_norm(out_channels, norm_group_channels)
        self.dropout = nn.Dropout(dropout)
        if safa_kernels:
            self.conv2 = ScaleAwareConv2d(out_channels, out_channels, num_kernels=safa_kernels, mode=safa_mode)
            nn.init.zeros_(self.conv2.weight)  # residual branch starts at zero; the mixer stays random
            nn.init.zeros_(self.conv2.bias)
        else:
            self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, coords: Tensor | None, scale: Tensor | MixedKernels | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None].to(h.dtype)
        if self.coords is not None and coords is not None:
            h = h + self.coords(coords.to(h.dtype))  # a shared [1, C, h, w] grid broadcasts over the batch
        h = self.dropout(F.silu(self.norm2(h)))
        h = self.conv2(h, scale) if isinstance(self.conv2, ScaleAwareConv2d) else self.conv2(h)
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all positions, pre-GroupNorm, zero-initialised output."""

    def __init__(self, channels: int, head_channels: int = 64, norm_group_channels: int = 4) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels, norm_group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))
        self.reference_tokens: int | None = None
        """Token count the softmax was trained at; when set, other counts rescale the logits (UNet.scaled_attention)."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        scale = None  # SDPA's default, 1/sqrt(head dim)
        if self.reference_tokens is not None and h * w != self.reference_tokens:
            # Entropy-preserving temperature (Jin et al. 2023): with n tokens the logits are multiplied by
            # log n / log n_train, so a query spreads its attention as it did over the training count.
            scale = math.log(h * w) / math.log(self.reference_tokens) / math.sqrt(c // self.heads)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2),
                                             scale=scale)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
