"""Which weights a NoiseShift table belongs to: the one place that names a model's weights.

A table records two names and is checked against them on load: the hash of the checkpoint file it was
calibrated from (for a pretrained diffusers UNet without a checkpoint, the hash of its model folder), and
the hash of the weights themselves, which is the same whichever file holds them (the end-of-fit table and
the final last.ckpt, or a checkpoint and its export).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from mrdiff.utils import file_hash


def weights_hash(model: nn.Module | object) -> str:
    """First 16 hex digits of a SHA-256 over the network's state_dict (names, dtypes, shapes, bytes).

    `model` is a network, or anything holding one as `.net` (a DiffusionModule, a DiffusionPipeline): the
    names are then prefixed `net.` as in the module's state_dict, so a pipeline and its module agree.
    """
    net = getattr(model, "net", None)
    state = {f"net.{k}": v for k, v in net.state_dict().items()} if net is not None else model.state_dict()
    digest = hashlib.sha256()
    for name, value in sorted(state.items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


checkpoint_hash = file_hash  # a table records the checkpoint file it was calibrated from by this hash


@dataclass(frozen=True)
class WeightsId:
    """The names a table stores (and is checked against): `checkpoint` file hash and `weights` hash."""

    checkpoint: str | None
    weights: str | None


def identify(model: object, ckpt_path: str | os.PathLike | None) -> WeightsId:
    """The weights `model` (a module or pipeline) holds, loaded from `ckpt_path` or, for a diffusers UNet, its
    model folder. Without either (fresh weights) nothing names them and both are None."""
    if ckpt_path:
        return WeightsId(checkpoint_hash(ckpt_path), weights_hash(model))
    return WeightsId(getattr(model.net, "fingerprint", None), None)
