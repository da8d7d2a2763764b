"""A pretrained diffusers `UNet2DModel` (a pixel-space ε-prediction DDPM) as mrdiff's network.

    --model.net=mrdiff.nn.diffusers_unet.DiffusersUNet --model.net.init_args.path=/local/ddpm-celebahq-256

`path` is a local folder in diffusers' layout (config.json and the weights, as `save_pretrained` writes them;
or a pipeline folder with unet/ and scheduler/), or a single weights file (.safetensors, .bin, .pt) with
config.json beside it. Nothing is downloaded. The β schedule comes from the scheduler_config.json beside the
model; DiffusionModule refuses schedule settings that disagree with it. The network has no coordinate or
scale inputs: the grid and scale mrdiff passes are ignored (said once), and the resolution reaches it only
through the image size. diffusers is an optional extra (`pip install 'mrdiff[diffusers]'`), imported here
only when such a network is built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mrdiff.console import info
from mrdiff.utils import file_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SCHEDULE_KINDS = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' beta_schedule → mrdiff's


class OptionalDependencyError(ImportError):
    """An optional extra that this feature needs is not installed."""


class DiffusersUNet(nn.Module):
    """ε(x, t) of a diffusers UNet2DModel behind mrdiff's network interface (check_size, prepare, forward)."""

    def __init__(self, path: str) -> None:  # local diffusers model folder or weights file; never downloaded
        super().__init__()
        model_dir, weights = locate(Path(path))
        self.path, self.model_dir = str(path), model_dir
        self.scheduler_config_path = scheduler_config_path(model_dir)
        self.unet = load_unet(model_dir, weights)
        config = self.unet.config
        if config.out_channels != config.in_channels:
            raise ValueError(f"diffusers model {path} predicts {config.out_channels} channels from "
                             f"{config.in_channels}: only ε-prediction UNets (as many out as in) are supported")
        if config.num_class_embeds or config.class_embed_type:
            raise ValueError(f"diffusers model {path} is class-conditional: only unconditional UNets are supported")
        self.trained_schedule = read_schedule(self.scheduler_config_path)
        files = [model_dir / "config.json", *(weights or weight_files(model_dir)), self.scheduler_config_path]
        self._files = sorted(set(files))
        self._fingerprint: str | None = None
        self._said_ignored = False

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int | None:
        """The square side the UNet was trained at, where its config says (None for a non-square one)."""
        size = self.unet.config.sample_size
        if isinstance(size, list | tuple):
            return int(size[0]) if len(set(size)) == 1 else None
        return int(size) if size else None

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming the model files (UNet config, weights, scheduler config): NoiseShift tables
        record it as their checkpoint, as they record a checkpoint file's hash for mrdiff's own models."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for file in self._files:
                digest.update(f"{file.relative_to(self.model_dir.parent)}:{file_hash(file)}\n".encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    @property
    def downsampling_factor(self) -> int:
        """H and W must be multiples of this: every down block but the last halves the size."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_training_size(self, train_resolution: int) -> None:
        """An error when mrdiff's training size (the analytic shift's reference) is not the one the UNet had."""
        if self.sample_size is not None and self.sample_size != train_resolution:
            raise ValueError(f"the diffusers UNet was trained at {self.sample_size}x{self.sample_size} (sample_size "
                             f"in its config.json) but model.train_resolution, linked from the data settings, is "
                             f"{train_resolution}: set --data.multires=false --data.train_size={self.sample_size} "
                             f"(the analytic shift and the size warnings use it)")

    def check_size(self, height: int, width: int) -> None:
        """Clear error for a resolution the UNet cannot take."""
        f = self.downsampling_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"resolution {height}x{width} is not divisible by the diffusers UNet's downsampling "
                             f"factor {f}: use a multiple of {f}, e.g. {max(f, round(height / f) * f)}")

    def prepare(self, grid: Tensor | None, scale: Tensor | float | None) -> None:
        """Nothing to prepare: the UNet takes neither grid nor scale (said once)."""
        self._say_ignored(grid, scale)

    def forward(self, x: Tensor, t: Tensor, grid: Tensor | None = None, scale: Tensor | float | None = None, *,
                prepared: Any = None) -> Tensor:
        """ε̂ = UNet2DModel(x, t).sample; t may be fractional (NoiseShift) and of shape [] or [B]."""
        self._say_ignored(grid, scale)
        self.check_size(*x.shape[-2:])
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        return self.unet(x, t).sample

    def to_channels_last(self) -> DiffusersUNet:
        self.unet.to(memory_format=torch.channels_last)
        return self

    def _say_ignored(self, grid: Tensor | None, scale: Tensor | float | None) -> None:
        if self._said_ignored or (grid is None and scale is None):
            return
        self._said_ignored = True
        info(f"mrdiff: the diffusers UNet ({self.path}) has no coordinate or scale inputs: it ignores the grid "
             f"and the scale, and sees the resolution only through the image size")


def import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise OptionalDependencyError("diffusers models need the diffusers package: pip install 'mrdiff[diffusers]'"
                                      ) from None
    return diffusers


def locate(path: Path) -> tuple[Path, list[Path] | None]:
    """(folder holding the UNet's config.json, the weights file when `path` names one)."""
    if not path.exists():
        raise FileNotFoundError(
            f"diffusers model {path} does not exist: mrdiff never downloads weights; download the model once "
            f"where there is network (e.g. `huggingface-cli download google/ddpm-celebahq-256 --local-dir "
            f"models/ddpm-celebahq-256`) and pass that folder as model.net.init_args.path")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"diffusers model {path} is neither a folder nor a weights file "
                             f"({', '.join(WEIGHT_SUFFIXES)})")
        if not (path.parent / "config.json").is_file():
            raise FileNotFoundError(f"no config.json beside the weights file {path}: put the UNet's config.json "
                                    f"(from the model's folder) next to it")
        return path.parent, [path]
    if (path / "unet" / "config.json").is_file():  # a pipeline folder
        return path / "unet", None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in the diffusers model folder {path} (nor in {path / 'unet'}): "
                                f"pass the folder `save_pretrained` wrote, or the pipeline folder")
    if not weight_files(path):
        raise FileNotFoundError(f"no weights ({', '.join(WEIGHT_SUFFIXES)}) in the diffusers model folder {path}")
    return path, None


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def load_unet(model_dir: Path, weights: list[Path] | None) -> nn.Module:
    """UNet2DModel from a folder (from_pretrained, local files only) or from config.json + one weights file."""
    diffusers = import_diffusers()
    cls = diffusers.UNet2DModel
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{model_dir / 'config.json'} describes a {config['_class_name']}, not a UNet2DModel: "
                         "only pixel-space DDPM UNets are supported")
    if weights is None:
        return cls.from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    unet = cls.from_config(cls.load_config(model_dir))
    file = weights[0]
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    try:
        unet.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"weights {file} do not fit the UNet described by {model_dir / 'config.json'}: "
                         f"{str(error).splitlines()[0]}") from None
    return unet.eval()


def scheduler_config_path(model_dir: Path) -> Path:
    """The scheduler_config.json beside the model (its folder, a scheduler/ subfolder, or the pipeline's)."""
    candidates = [model_dir / "scheduler_config.json", model_dir / "scheduler" / "scheduler_config.json",
                  model_dir.parent / "scheduler" / "scheduler_config.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no scheduler_config.json beside the diffusers model in {model_dir}: mrdiff takes the "
                            f"β schedule from it; copy the model's scheduler_config.json into that folder")


def read_schedule(path: Path) -> dict[str, Any]:
    """NoiseSchedule settings (kind, num_timesteps, beta_start, beta_end) of a DDPM scheduler config."""
    config = json.loads(path.read_text())
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{path}: prediction_type is {prediction!r}: mrdiff samples ε-prediction models only")
    if config.get("trained_betas") is not None:
        raise ValueError(f"{path}: a custom trained_betas schedule is not supported (linear or squaredcos_cap_v2)")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in SCHEDULE_KINDS:
        raise ValueError(f"{path}: beta_schedule {beta_schedule!r} is not supported: mrdiff has "
                         f"{', '.join(SCHEDULE_KINDS)}")
    return {"kind": SCHEDULE_KINDS[beta_schedule], "num_timesteps": int(config.get("num_train_timesteps", 1000)),
            "beta_start": float(config.get("beta_start", 1e-4)), "beta_end": float(config.get("beta_end", 0.02))}
