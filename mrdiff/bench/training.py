"""Training-step rows: forward, backward and fused AdamW of L_simple, eager and under torch.compile."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from mrdiff.bench.common import Row, count_flops, unet_kwargs
from mrdiff.console import info
from mrdiff.diffusion.loss import simple_loss
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.grids import crop_grid
from mrdiff.nn.unet import UNet

# --rows names → (row name, multi-resolution U-Net?, scales); None: diffusers' UNet2DModel
TRAINING_ROWS = {
    "fixed": ("fixed U-Net", False, "shared"),
    "multires": ("multi-res, per-sample scales", True, "sample"),
    "multires-batch": ("multi-res, per-batch scale", True, "shared"),
    "channels-last": ("fixed U-Net", False, "channels_last"),
    "diffusers": ("diffusers UNet2DModel", None, "shared"),
}
COMPILED = ("multires", "diffusers", "fixed")  # the rows --compile adds in bf16, in the order they compile


def diffusers_unet(preset: dict) -> torch.nn.Module:
    """diffusers' UNet2DModel at the matched configuration (channels, levels, blocks, attention)."""
    from diffusers import UNet2DModel

    levels = len(preset["channel_mult"])
    attn = set(preset["attention_levels"])
    down = tuple("AttnDownBlock2D" if lv in attn else "DownBlock2D" for lv in range(levels))
    up = tuple("AttnUpBlock2D" if lv in attn else "UpBlock2D" for lv in reversed(range(levels)))
    return UNet2DModel(block_out_channels=tuple(preset["base_channels"] * m for m in preset["channel_mult"]),
                       layers_per_block=preset["num_res_blocks"], down_block_types=down, up_block_types=up,
                       attention_head_dim=preset.get("head_channels", 64),
                       norm_num_groups=math.gcd(32, preset["base_channels"]))


def train_step(net: torch.nn.Module, inputs: dict, *, bf16: bool, device: torch.device,
               diffusers: bool = False, channels_last: bool = False) -> Callable[[], None]:
    """One forward + backward + AdamW step of L_simple (diffusion/loss.py, as training computes it) on fixed inputs."""
    schedule = NoiseSchedule()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    x0 = inputs["image"]
    if channels_last:
        net.to_channels_last() if isinstance(net, UNet) else net.to(memory_format=torch.channels_last)
        x0 = x0.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if diffusers:
            return net(x_t, t).sample
        return net(x_t, t, inputs.get("grid"), inputs.get("scale"))

    def step() -> None:
        with autocast:
            loss = simple_loss(eps, schedule, x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch_inputs(preset: dict, device: torch.device, scale_mode: str) -> dict:
    """A batch of patches with grids and scales (per sample, or one shared scale)."""
    b, p = preset["batch"], preset["patch"]
    gen = torch.Generator().manual_seed(0)
    scales = torch.randint(p, 2 * p + 1, (b,), generator=gen)
    grids = torch.stack([crop_grid(int(s), int(s), 0, 0, p, p) for s in scales])
    scale = scales.float()[:1] if scale_mode in ("shared", "channels_last") else scales.float()
    return {"image": torch.randn(b, 3, p, p, generator=gen).to(device), "grid": grids.to(device),
            "scale": scale.to(device)}


def build(preset: dict, key: str, device: torch.device, *, bf16: bool, compile: bool = False) -> tuple[str, Callable]:
    """The row name's stem and the training step of one --rows entry."""
    name, multires, scale_mode = TRAINING_ROWS[key]
    torch.manual_seed(0)
    net = (diffusers_unet(preset) if multires is None else UNet(**unet_kwargs(preset, multires))).to(device)
    if compile:
        net.compile(dynamic=False)  # in place and static, as model.compile does
    step = train_step(net, batch_inputs(preset, device, scale_mode), bf16=bf16, device=device,
                      diffusers=multires is None, channels_last=scale_mode == "channels_last")
    tag = "bf16" if bf16 else "fp32"
    return f"train {name} {tag}" + (" channels_last" if scale_mode == "channels_last" else ""), step


def training_rows(preset: dict, device: torch.device, compile: bool, keys: Sequence[str] = tuple(TRAINING_ROWS),
                  precisions: Sequence[str] = ("fp32", "bf16")) -> list[Row]:
    """Eager rows of `keys` in each precision; with `compile`, the bf16 rows of the fixed, multi-resolution and
    diffusers networks again under torch.compile (after every eager row, so a time budget drops those first)."""
    rows, batch = [], preset["batch"]
    for tag in ("fp32", "bf16"):
        if tag not in precisions:
            continue
        for key in keys:
            try:
                name, step = build(preset, key, device, bf16=tag == "bf16")
            except ImportError:
                info("mrdiff.bench: diffusers not installed (pip install -e '.[bench]'): no reference rows")
                continue
            same_flops = next((r.flops for r in rows if r.name == name.removesuffix(" channels_last")), None)
            rows.append(Row(name, step, batch, [], same_flops or count_flops(step)))
    if compile:
        eager = {r.name: r for r in rows}
        for key in COMPILED:
            stem = f"train {TRAINING_ROWS[key][0]} bf16"
            if key in keys and stem in eager:
                _, step = build(preset, key, device, bf16=True, compile=True)
                rows.append(Row(f"{stem} compiled", step, batch, [], eager[stem].flops))
    return rows
