"""Scale-Aware Feature Adaption: a convolution whose kernel is a scale-dependent mixture.

φ(s) = Σ_k w_k(s) φ_k with K learnable kernels and w(s) = softmax(MLP(s)) (the scale-aware
convolution of scale-arbitrary super-resolution, Wang et al. 2021). Convolution is linear in its
kernel, so per-sample scales can be served without a loop over samples:

- "shared": the whole batch has one scale → mix once, one ordinary conv (the fast path);
- "grouped": mix one kernel per sample and run a grouped conv with groups = B (same FLOPs as a conv);
- "experts": one conv with K·C_out outputs, then the per-sample weighted sum over K (K× the FLOPs,
  but a dense conv, which some backends run faster than a grouped one);
- "stacked": one conv over the K·C_in channels [w_1 x, …, w_K x] with the K kernels stacked along the
  input axis. Also K× the FLOPs, but it never materialises a kernel per sample: the grouped path
  writes B·C_out·C_in·k² mixed weights (and reads them back in the backward pass), which at the low
  resolutions where SAFA usually sits is more memory traffic than the convolution itself.

"auto" takes "stacked" on feature maps of at most 64 positions (8×8) and "grouped" on larger ones. On
this project's 2-core CPU in bf16 autocast (forward + backward, B = 16, 128 channels, K = 4) stacked
took 6.0 / 13.6 ms at 4×4 / 8×8 against 25.6 / 22.3 ms grouped, and grouped won from 12×12 up
(24.8 vs 33.8 ms; 30.1 vs 44.6 ms at 16×16). `python -m mrdiff.bench` measures the whole network.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SafaMode = Literal["auto", "grouped", "experts", "stacked"]
STACKED_MAX_POSITIONS = 64  # "auto": feature maps up to 8×8 take the stacked path


class MixedKernels(dict):
    """Kernel and bias of every ScaleAwareConv2d for one fixed scale, mixed once (see UNet.prepare).

    Passed in place of the scale, it makes each layer run a plain conv with its entry: sampling and
    NoiseShift calibration call the U-Net tens of times at one scale, and re-mixing the K kernel banks
    on every call is memory traffic worth 5–10% of a forward pass at low resolution.
    """


class ScaleAwareConv2d(nn.Module):
    """Conv2d with kernel Σ_k softmax(MLP(s))_k φ_k; `scale` is [B] (per sample) or [1] (shared)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        num_kernels: int = 4,  # K
        hidden: int = 64,  # width of the MLP of the scale
        mode: SafaMode = "auto",  # path for per-sample scales; "auto" picks by feature-map size
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.padding: int | tuple[int, int] = kernel_size // 2
        self.dilation: int | tuple[int, int] = 1  # UNet.redilated sets it (and the padding) while re-dilation is on
        self.mode = mode
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_channels))
        for k in range(num_kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        self.mixer = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, num_kernels))

    @property
    def num_kernels(self) -> int:
        return self.weight.shape[0]

    def mixing_weights(self, scale: Tensor) -> Tensor:
        """[B or 1, K] softmax weights for the normalised scale."""
        return torch.softmax(self.mixer(scale.reshape(-1, 1).to(self.weight.dtype)), dim=-1)

    def mix(self, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel [C_out, C_in, k, k] and bias [C_out] for one normalised scale ([1] or scalar)."""
        w = self.mixing_weights(scale)
        if w.shape[0] != 1:
            raise ValueError(f"mix takes one scale, got {w.shape[0]}")
        return self._mixed(w[0])

    def _mixed(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Σ_k w_k φ_k and Σ_k w_k b_k for weights [K]."""
        return (w @ self.weight.flatten(1)).view(self.weight.shape[1:]), w @ self.bias

    def _conv(self, x: Tensor, kernel: Tensor, bias: Tensor) -> Tensor:
        return F.conv2d(x, kernel.to(x.dtype), bias.to(x.dtype), padding=self.padding, dilation=self.dilation)

    def forward(self, x: Tensor, scale: Tensor | MixedKernels) -> Tensor:
        if isinstance(scale, MixedKernels):
            return self._conv(x, *scale[self])
        w = self.mixing_weights(scale)
        if w.shape[0] == 1:
            return self._conv(x, *self._mixed(w[0]))  # one scale for the batch: mix once, plain conv
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"scale has {w.shape[0]} entries for a batch of {x.shape[0]}: give [B] or [1]")
        mode = self.mode
        if mode == "auto":
            mode = "stacked" if x.shape[-2] * x.shape[-1] <= STACKED_MAX_POSITIONS else "grouped"
        return getattr(self, f"_{mode}")(x, w)

    def _grouped(self, x: Tensor, w: Tensor) -> Tensor:
        """Per-sample kernels through a grouped conv (groups = B)."""
        b, _, h, width = x.shape
        kernel = (w @ self.weight.flatten(1)).view(-1, *self.weight.shape[2:])  # [B·C_out, C_in, k, k]
        out = F.conv2d(x.reshape(1, -1, h, width), kernel.to(x.dtype), padding=self.padding, dilation=self.dilation,
                       groups=b)
        return out.reshape(b, self.out_channels, h, width) + (w @ self.bias).to(x.dtype)[:, :, None, None]

    def _experts(self, x: Tensor, w: Tensor) -> Tensor:
        """Per-sample mixture of K convolutions, run as one conv with K·C_out outputs."""
        b, _, h, width = x.shape
        kernel = self.weight.reshape(-1, *self.weight.shape[2:]).to(x.dtype)
        out = F.conv2d(x, kernel, self.bias.reshape(-1).to(x.dtype), padding=self.padding, dilation=self.dilation)
        out = out.reshape(b, self.num_kernels, self.out_channels, h, width)
        return torch.einsum("bk,bkohw->bohw", w.to(x.dtype), out)

    def _stacked(self, x: Tensor, w: Tensor) -> Tensor:
        """Σ_k w_k conv(x, φ_k) as one conv over [w_1 x, …, w_K x] with the kernels stacked along C_in."""
        b, c, h, width = x.shape
        k = self.num_kernels
        stacked = (w.to(x.dtype)[:, :, None, None, None] * x[:, None]).reshape(b, k * c, h, width)
        kernel = self.weight.transpose(0, 1).reshape(self.out_channels, k * c, *self.weight.shape[3:])
        out = F.conv2d(stacked, kernel.to(x.dtype), padding=self.padding, dilation=self.dilation)
        return out + (w @ self.bias).to(x.dtype)[:, :, None, None]
