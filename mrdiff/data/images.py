"""Image datasets from disk: any folder of images, and CelebA (aligned) from a local root.

Items are float tensors [3, size, size] in [−1, 1]: the shorter side resized to `size` (antialiased)
and centre-cropped. Every image mode PIL reads (grayscale, RGBA, palette, CMYK, 16-bit) becomes RGB.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from mrdiff.console import info
from mrdiff.utils import atomic_write, cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SCAN_CACHE_ENV = "MRDIFF_SCAN_CACHE"
SCAN_CACHE_VERSION = 2  # 2: files carry their pixel size


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image; 16-bit and 32-bit integer images are rescaled to 8 bits first."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def usable_side(width: int, height: int, crop: int | None) -> int:
    """The shorter side left to resize from: the centre crop's side, or the image's shorter side.

    A crop larger than the image would pad it with black, so such an image counts as its shorter side.
    """
    return min(width, height, crop) if crop else min(width, height)


def load_image(path: Path, size: int, *, crop: int | None = None, upscale: bool = False) -> Tensor:
    """[3, size, size] in [−1, 1]: optional centre crop, shorter side → size, centre crop to a square."""
    with Image.open(path) as raw:
        image = to_rgb(raw)
    x = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True) * 2 - 1
    if usable_side(x.shape[-1], x.shape[-2], crop) < size and not upscale:
        raise ValueError(
            f"{path} is {x.shape[-1]}x{x.shape[-2]} pixels, smaller than the {size} pixels needed: remove it, "
            f"lower data.image_size, or set data.upscale_small=true"
        )
    if crop is not None:
        x = TF.center_crop(x, [min(crop, *x.shape[-2:])] * 2)
    x = TF.resize(x, size, antialias=True)
    return TF.center_crop(x, [size, size]).clamp(-1, 1)


def find_images(root: str | Path) -> tuple[list[Path], int]:
    """Image files under root at any depth (sorted) and the number of other files ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a folder): check data.root")
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}: check data.root")
    return images, len(files) - len(images)


def inspect_image(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(why PIL cannot fully decode the file, None) or (None, (width, height)).

    A full load, so truncation is found too; the size comes from the same decode.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return None, image.size
    except Exception as error:  # noqa: BLE001 - any decoding failure makes the file unusable
        return f"{type(error).__name__}: {error}", None


def scan_cache_path(root: Path) -> Path:
    """$MRDIFF_SCAN_CACHE, else $XDG_CACHE_HOME/mrdiff/scans, else ~/.cache/mrdiff/scans; one file per root."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir(SCAN_CACHE_ENV, "scans") / f"{root.name}-{digest}.json"


def _load_verified(cache: Path, root: Path) -> dict[str, list[int]]:
    """Files (relative to root) known to decode: [file size, mtime_ns, width, height] when last checked."""
    if not cache.exists():
        return {}
    try:
        data = json.loads(cache.read_text())
        if data.get("version") != SCAN_CACHE_VERSION or data.get("root") != str(root.resolve()):
            return {}
        return {name: list(sig) for name, sig in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        info(f"mrdiff: image scan cache {cache} is unreadable ({error}); checking every image again")
        return {}


class Scan(NamedTuple):
    """What a folder scan found: the files that cannot be decoded (with why), and every other file's size."""

    corrupt: list[tuple[Path, str]]
    sizes: dict[Path, tuple[int, int]]  # (width, height)


def scan_images(
    paths: list[Path], progress: bool = True, *, root: Path | None = None, cache: Path | None = None,
    workers: int | None = None,
) -> Scan:
    """Decode every file once: the ones PIL cannot read, with the reason, and the pixel size of the rest.

    Files are decoded in a thread pool (PIL releases the GIL while decoding). With a `cache` (and the
    `root` the paths lie under) the files that decoded before and still have the same size and mtime are
    not decoded again: a second run over 200k CelebA images costs a stat per file, not a decode.
    """
    verified = _load_verified(cache, root) if cache and root else {}
    signatures = {p: [(st := p.stat()).st_size, st.st_mtime_ns] for p in paths} if cache and root else {}
    name = (lambda p: p.relative_to(root).as_posix()) if root else (lambda p: str(p))
    sizes: dict[Path, tuple[int, int]] = {}
    todo = []
    for p in paths:
        known = verified.get(name(p)) if signatures else None
        if known is not None and len(known) == 4 and known[:2] == signatures[p]:
            sizes[p] = (known[2], known[3])
        else:
            todo.append(p)
    reasons: dict[Path, str] = {}
    if todo:
        workers = workers or min(8, os.cpu_count() or 1)
        chunks = [todo[i : i + 64] for i in range(0, len(todo), 64)]
        bar = tqdm(total=len(todo), desc="checking images", disable=not progress or len(todo) < 500, leave=False)
        with ThreadPoolExecutor(workers) as pool:
            for chunk, found in zip(chunks, pool.map(lambda c: [inspect_image(p) for p in c], chunks)):
                for p, (why, size) in zip(chunk, found):
                    if why is not None:
                        reasons[p] = why
                    else:
                        sizes[p] = size
                bar.update(len(chunk))
        bar.close()
        if cache and root:
            files = {name(p): [*signatures[p], *sizes[p]] for p in paths if p in sizes}
            try:
                with atomic_write(cache, "w") as f:
                    json.dump({"version": SCAN_CACHE_VERSION, "root": str(root.resolve()), "files": files}, f)
            except OSError as error:  # a read-only home must not stop training
                info(f"mrdiff: could not write the image scan cache {cache} ({error}); the next run checks again")
    return Scan([(p, reasons[p]) for p in paths if p in reasons], {p: sizes[p] for p in paths if p in sizes})


def listing(items: list[str], limit: int = 20) -> str:
    """Up to `limit` items, one per indented line, and how many more."""
    more = f"\n  … and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  " + "\n  ".join(items[:limit]) + more


class ImageFolder(Dataset):
    """Every image under a folder (jpg/png/webp/bmp at any depth), checked once at construction."""

    def __init__(
        self, root: str | Path, *, size: int, on_corrupt: Literal["error", "skip"] = "error",
        upscale_small: bool = False, crop: int | None = None,
    ) -> None:
        paths, ignored = find_images(root)
        scan = scan_images(paths, root=Path(root), cache=scan_cache_path(Path(root)))
        bad = scan.corrupt
        if bad and on_corrupt == "error":
            raise ValueError(
                f"{len(bad)} of {len(paths)} images under {root} cannot be read:"
                f"{listing([f'{p}: {why}' for p, why in bad])}\n"
                f"remove them, or set data.on_corrupt=skip to train without them"
            )
        if bad:
            info(f"mrdiff: skipping {len(bad)} unreadable image(s) of {len(paths)} under {root}")
        if not upscale_small:  # found here, once, not in a DataLoader worker in the middle of training
            small = [f"{p}: {w}x{h}" for p, (w, h) in scan.sizes.items() if usable_side(w, h, crop) < size]
            if small:
                raise ValueError(
                    f"{len(small)} of {len(paths)} images under {root} are smaller than the {size} pixels "
                    f"needed{f' after the centre crop to {crop}' if crop else ''}:{listing(small)}\n"
                    f"remove them, lower data.image_size, or set data.upscale_small=true"
                )
        self.paths = list(scan.sizes)
        self.ignored_files, self.skipped = ignored, len(bad)
        self.size, self.crop, self.upscale = size, crop, upscale_small

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.paths[index], self.size, crop=self.crop, upscale=self.upscale)


class CelebAImages(ImageFolder):
    """CelebA's aligned images (root/celeba/img_align_celeba/*.jpg), centre-cropped then resized.

    The folder layout is torchvision's CelebA; nothing is downloaded. The paper's preparation is a
    centre crop followed by a resize to 128².
    """

    def __init__(
        self, root: str | Path, *, size: int, crop: int = 140, on_corrupt: Literal["error", "skip"] = "error",
        upscale_small: bool = False,
    ) -> None:
        folder = Path(root) / "celeba" / "img_align_celeba"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CelebA not found: expected {folder} with the aligned JPEGs. Download img_align_celeba.zip "
                f"from the CelebA site (or torchvision.datasets.CelebA(root, download=True) on a machine "
                f"with network), unzip it there, and set data.root={root}"
            )
        super().__init__(folder, size=size, crop=crop, on_corrupt=on_corrupt, upscale_small=upscale_small)
