"""Checkpoint files: atomic writes and loads that fail with a clear message."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mrdiff.utils import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not an mrdiff/Lightning checkpoint."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then os.replace.

    A job killed while saving (preemption, OOM, SIGKILL) leaves the previous checkpoint intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        with atomic_write(path, size_hint=tensor_bytes(checkpoint)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None):
        return load_checkpoint(path)


def run_dir_of(ckpt_path: str | os.PathLike | None, fallback: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to (<run>/checkpoints/x.ckpt → <run>), else `fallback`."""
    if ckpt_path:
        path = Path(ckpt_path).resolve()
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return Path(fallback)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list (most of a checkpoint file's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict on CPU; CheckpointError naming the file and the problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check --ckpt_path (runs keep them in "
                              f"<run dir>/checkpoints/, e.g. last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:200]}): the file is "
            f"truncated or corrupt (was the job killed while copying it?) — use another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict'): pass a .ckpt written by "
                              f"`mrdiff fit`")
    return ckpt


def load_weights(module: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's state_dict (the EMA weights when EMA was on) into module; returns the checkpoint."""
    ckpt = load_checkpoint(path)
    check_norm_groups(module, ckpt, path)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {str(error).splitlines()[0]} … "
            f"Use the config the checkpoint was trained with (its run dir holds config.yaml)."
        ) from None
    return ckpt


def check_fits(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """CheckpointError unless the checkpoint's state_dict has the module's keys and shapes (reads, writes nothing)."""
    ckpt = load_checkpoint(path)
    check_norm_groups(module, ckpt, path)
    state = ckpt["state_dict"]
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    problems = [f"{k} is {found[k]} in the checkpoint, {shape} in the model"
                for k, shape in expected.items() if k in found and found[k] != shape]
    problems += [f"{k} is missing from the checkpoint" for k in expected if k not in found]
    problems += [f"{k} is in the checkpoint but not in the model" for k in found if k not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problems[0]}{more}. Use the config "
                              f"the checkpoint was trained with (its run dir holds config.yaml); nothing was written")


def trained_norm_group_channels(ckpt: dict[str, Any]) -> int:
    """The U-Net's norm_group_channels the weights were trained with: stamped into checkpoints (and exported
    with the net's settings) since the setting exists; weights from before it used the rule it names 1."""
    exported = ckpt.get("net") if isinstance(ckpt.get("net"), dict) else {}
    return int(ckpt.get("mrdiff", {}).get("norm_group_channels", exported.get("norm_group_channels", 1)))


def check_norm_groups(module: torch.nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError when the weights were trained with other GroupNorm groups than the network has (for
    networks that can tell: `check_trained_norm_groups`, mrdiff's U-Net)."""
    check = getattr(getattr(module, "net", module), "check_trained_norm_groups", None)
    if check is None:
        return
    try:
        check(trained_norm_group_channels(ckpt))
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} {error}") from None
