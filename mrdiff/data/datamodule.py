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
from mrdiff.data.order import ResumableSampler
from mrdiff.data.patches import PatchCollate, PatchSampler, prepare_full
from mrdiff.data.synthetic import sample_scene
from mrdiff.grids import CoordMode

Source = Literal["synthetic", "folder", "celeba"]


class Subset(Dataset):
    """Part of a dataset, indexed by (i, item_seed) from ResumableSampler: returns (item_seed, item)."""

    def __init__(self, dataset: Dataset, indices: range | list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        i, seed = key
        return seed, self.dataset[self.indices[i]]

    def item(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


class MultiResDataModule(L.LightningDataModule):
    """Batches of {"image": patch in [−1, 1], "grid": [B, 2, p, p], "scale": [B] or [1]}.

    Args:
        source: synthetic (built-in scenes, rendered at any size), folder (images under root) or celeba.
        root: The image folder, or the directory holding celeba/.
        image_size: Side the images are loaded at (the FID reference is made from these).
        multires: Multi-resolution patches; false: the fixed-resolution baseline (whole images at train_size).
        train_size: Fixed mode's training side (default image_size).
        s_min: Smallest side an image is rescaled to before a patch is cut.
        s_max: Largest side an image is rescaled to.
        patch_size: Side of the training patches.
        p_min: Probability of rescaling to exactly s_min (otherwise s ~ U{s_min, ..., s_max}).
        canvas_fraction: Share of training batches made of whole canvases instead of patches (docs/evidence.md):
            the only way the loss sees a layout constraint wider than a patch. 0: the paper's recipe.
        canvas_sizes: Sides of those whole canvases, in [s_min, s_max] and divisible by the U-Net's factor.
        per_batch_scale: Draw one scale per batch instead of one per sample.
        coord_mode: Coordinates normalised to the canvas ([-1, 1]), or in units of patch_size pixels.
        batch_size: Per device.
        num_workers: DataLoader worker processes per device.
        num_val: Images held out for validation.
        num_scenes: Synthetic source: scenes in the training set.
        celeba_crop: CelebA: side of the centre crop (pixels) before resizing to image_size.
        on_corrupt: Folder: unreadable images stop the run (error), or are skipped and counted (skip).
        upscale_small: Folder: upscale images smaller than needed instead of failing.
        seed: Seed of the split, the data order and the patch draws.
    """

    def __init__(
        self,
        *,
        source: Source = "synthetic",
        root: str | None = None,
        image_size: int = 64,
        multires: bool = True,
        train_size: int | None = None,
        s_min: int = 32,
        s_max: int = 64,
        patch_size: int = 32,
        p_min: float = 0.5,
        canvas_fraction: float = 0.0,
        canvas_sizes: list[int] | None = None,
        per_batch_scale: bool = False,
        coord_mode: CoordMode = "normalized",
        batch_size: int = 32,
        num_workers: int = 2,
        num_val: int = 256,
        num_scenes: int = 20000,
        celeba_crop: int = 140,
        on_corrupt: Literal["error", "skip"] = "error",
        upscale_small: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name in ("image_size", "batch_size", "num_val", "num_scenes"):
            if getattr(self.hparams, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self.hparams, name)}")
        if train_size is not None and train_size <= 0:
            raise ValueError(f"data.train_size must be positive, got {train_size}")
        self.sampler = PatchSampler(s_min, s_max, patch_size, p_min, coord_mode, canvas_fraction,
                                    tuple(canvas_sizes or ())) if multires else None
        if multires and image_size < s_max and source != "synthetic":
            raise ValueError(f"image_size {image_size} < s_max {s_max}: images would be upscaled to s_max; "
                             f"set data.image_size >= data.s_max")
        if source != "synthetic" and root is None:
            raise ValueError(f"data.source={source!r} needs data.root (the folder with the images)")
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._resume: dict[str, int] | None = None

    @property
    def fixed_size(self) -> int:
        return self.hparams.train_size or self.hparams.image_size

    def base_dataset(self) -> Dataset:
        """The source's items (image tensors at image_size, or Scenes), unsplit."""
        h = self.hparams
        if h.source == "synthetic":
            return Scenes(h.num_scenes + h.num_val, h.seed)
        if h.source == "folder":
            return ImageFolder(h.root, size=h.image_size, on_corrupt=h.on_corrupt, upscale_small=h.upscale_small)
        if h.source == "celeba":
            return CelebAImages(h.root, size=h.image_size, crop=h.celeba_crop, on_corrupt=h.on_corrupt,
                                upscale_small=h.upscale_small)
        raise ValueError(f"unknown data.source {h.source!r}: use synthetic, folder or celeba")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        base = self.base_dataset()
        n = len(base)
        num_val = min(self.hparams.num_val, max(n // 10, 1))
        if n < 2:
            raise ValueError(f"the data set has {n} image(s); mrdiff needs at least 2 (one for validation)")
        self.val_set = Subset(base, range(n - num_val, n))
        self.train_set = Subset(base, range(n - num_val))

    def collate(self) -> PatchCollate:
        h = self.hparams
        return PatchCollate(self.sampler, size=self.fixed_size, per_batch_scale=h.per_batch_scale,
                            coord_mode=h.coord_mode)

    def train_dataloader(self) -> DataLoader:
        sampler = self._sampler(self.train_set, train=True)
        if self._resume is not None:
            sampler.skip(**self._resume)
            self._resume = None
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self._sampler(self.val_set, train=False))

    def _sampler(self, dataset: Dataset | None, *, train: bool) -> ResumableSampler:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        h = self.hparams
        batch_size = min(h.batch_size, len(dataset)) if train else h.batch_size
        return ResumableSampler(dataset, batch_size=batch_size, seed=h.seed + (0 if train else 1),
                                shuffle=train, drop_last=train, vary_with_epoch=train)

    def _loader(self, dataset: Dataset, sampler: ResumableSampler) -> DataLoader:
        h = self.hparams
        return DataLoader(
            dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=sampler.drop_last,
            num_workers=h.num_workers, collate_fn=self.collate(), persistent_workers=h.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    # -- exact resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: epoch and batches processed in it (saved in checkpoints)."""
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        return {"epoch": loop.epoch_progress.current.processed,
                "batches": loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume mid-epoch: the next train dataloader skips the batches already trained on."""
        if state_dict:
            self._resume = {"epoch": state_dict["epoch"], "batches": state_dict["batches"]}

    def test_dataloader(self) -> DataLoader:
        """One placeholder batch per rank: evaluation callbacks (FID, structure) draw their own samples."""
        return DataLoader([0], batch_size=1)

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
            items = [dataset.item(i) for i in range(start, min(start + batch_size, num))]
            yield torch.stack([prepare_full(item, height, width) for item in items])


class Scenes(Dataset):
    """Synthetic scenes as Scene objects, rendered later at whatever scale the collate draws."""

    def __init__(self, num: int, seed: int) -> None:
        self.num, self.seed = num, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> Any:
        return sample_scene(self.seed + index)
