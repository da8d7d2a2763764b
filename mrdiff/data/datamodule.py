"""MultiResDataModule: synthetic scenes, a folder of images, or CelebA; multi-resolution or fixed."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mrdiff.data.images import CelebAImages, ImageFolder
from mrdiff.data.synthetic import sample_scene
from mrdiff.data.transforms import PatchCollate, PatchSampler, prepare_full
from mrdiff.nn.coords import CoordMode

Source = Literal["synthetic", "folder", "celeba"]


class Indexed(Dataset):
    """Wraps a dataset of items as (index, item) pairs (the collate seeds validation draws by index)."""

    def __init__(self, dataset: Dataset, indices: range | list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.indices[i], self.dataset[self.indices[i]]


class MultiResDataModule(L.LightningDataModule):
    """Batches of {"image": patch in [−1, 1], "grid": [B, 2, p, p], "scale": [B] or [1]}."""

    def __init__(
        self,
        *,
        source: Source = "synthetic",
        root: str | None = None,  # image folder, or the directory holding celeba/
        image_size: int = 64,  # base size images are prepared at (fixed mode: the training resolution)
        multires: bool = True,  # False: fixed-resolution baseline (whole images at image_size)
        s_min: int = 32,
        s_max: int = 64,
        patch_size: int = 32,
        p_min: float = 0.5,  # probability of rescaling to s_min
        per_batch_scale: bool = False,  # draw one scale per batch instead of per sample
        coord_mode: CoordMode = "normalized",
        batch_size: int = 32,  # per device
        num_workers: int = 2,
        num_val: int = 256,  # images held out for validation
        num_scenes: int = 20000,  # synthetic source: scenes in the training set
        celeba_crop: int = 140,  # CelebA: centre crop (pixels) before resizing to image_size
        on_corrupt: Literal["error", "skip"] = "error",  # folder: unreadable images stop the run, or are skipped
        upscale_small: bool = False,  # folder: upscale images smaller than needed instead of failing
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sampler = PatchSampler(s_min, s_max, patch_size, p_min, coord_mode) if multires else None
        if multires and image_size < s_max and source != "synthetic":
            raise ValueError(f"image_size {image_size} < s_max {s_max}: images would be upscaled to s_max; "
                             f"set data.image_size >= data.s_max")
        if source != "synthetic" and root is None:
            raise ValueError(f"data.source={source!r} needs data.root (the folder with the images)")
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def train_resolution(self) -> int:
        """Largest image the model sees in training: s_max (multi-res) or image_size (fixed)."""
        return self.hparams.s_max if self.hparams.multires else self.hparams.image_size

    @property
    def patch_pixels(self) -> int:
        """Pixels of one training input (the m of the analytic resolution shift)."""
        side = self.hparams.patch_size if self.hparams.multires else self.hparams.image_size
        return side * side

    def base_dataset(self) -> Dataset:
        """The source's items (image tensors at image_size, or Scenes), unsplit."""
        h = self.hparams
        if h.source == "synthetic":
            return Scenes(h.num_scenes + h.num_val, h.seed)
        if h.source == "folder":
            return ImageFolder(h.root, size=h.image_size, on_corrupt=h.on_corrupt, upscale_small=h.upscale_small)
        if h.source == "celeba":
            return CelebAImages(h.root, size=h.image_size, crop=h.celeba_crop)
        raise ValueError(f"unknown data.source {h.source!r}: use synthetic, folder or celeba")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        base = self.base_dataset()
        n = len(base)
        num_val = min(self.hparams.num_val, max(n // 10, 1))
        if n < 2:
            raise ValueError(f"the data set has {n} image(s); mrdiff needs at least 2 (one for validation)")
        self.val_set = Indexed(base, range(n - num_val, n))
        self.train_set = Indexed(base, range(n - num_val))

    def collate(self, seed: int | None) -> PatchCollate:
        h = self.hparams
        return PatchCollate(self.sampler, size=h.image_size, per_batch_scale=h.per_batch_scale,
                            coord_mode=h.coord_mode, seed=seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, seed=None, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, seed=self.hparams.seed + 1, drop_last=False)

    def _loader(self, dataset: Dataset | None, *, shuffle: bool, seed: int | None, drop_last: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        h = self.hparams
        batch_size = min(h.batch_size, len(dataset)) if drop_last else h.batch_size
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=h.num_workers,
            collate_fn=self.collate(seed), persistent_workers=h.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader:
        """One placeholder batch per rank: evaluation callbacks (FID, structure) draw their own samples."""
        return DataLoader([0], batch_size=1)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -- evaluation ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What identifies the data for caches and tables (source, root, preparation)."""
        h = self.hparams
        root = str(Path(h.root).resolve()) if h.root else None
        return {"source": h.source, "root": root, "image_size": h.image_size, "seed": h.seed,
                "num_scenes": h.num_scenes if h.source == "synthetic" else None,
                "celeba_crop": h.celeba_crop if h.source == "celeba" else None}

    def reference_images(self, height: int, width: int, num: int, batch_size: int = 64) -> Iterator[Tensor]:
        """Batches of `num` whole dataset images prepared at height × width, as the pipeline makes them."""
        self.setup()
        dataset = self.train_set
        if num > len(dataset):
            warnings.warn(f"asked for {num} reference images, the training set has {len(dataset)}", stacklevel=2)
            num = len(dataset)
        for start in range(0, num, batch_size):
            items = [dataset[i][1] for i in range(start, min(start + batch_size, num))]
            yield torch.stack([prepare_full(item, height, width) for item in items])


class Scenes(Dataset):
    """Synthetic scenes as Scene objects, rendered later at whatever scale the collate draws."""

    def __init__(self, num: int, seed: int) -> None:
        self.num, self.seed = num, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> Any:
        return sample_scene(self.seed + index)
