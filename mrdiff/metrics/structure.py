"""Structure score: detects structural collapse of generated landscapes without a pretrained network.

The synthetic scenes of :mod:`mrdiff.data.synthetic` contain exactly one sun, a warm hard-edged disk whose
radius (relative to the canvas) follows a known distribution. A diffusion model that collapses when sampled
above its training resolution typically repeats content at the training pixel scale: it draws several suns,
each too small relative to the canvas. The score counts sun-coloured blobs per image and compares their
radii with the ground-truth distribution, plus a few cheap shape and layout checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

SUN_MIN_RED: float = 0.55
SUN_MIN_GREEN: float = 0.45
SUN_MIN_RED_MINUS_BLUE: float = 0.17
SUN_MIN_GREEN_MINUS_BLUE: float = 0.05
SUN_MAX_RED_MINUS_GREEN: float = 0.4
"""Colour thresholds (RGB in [0, 1]): bright, warm (yellow-orange, not red), blue well below red and green.

The red-minus-blue cut, the tightest one, sits half way between the sun and sky colours of the scenes, so
anti-aliased edge pixels count when at least about half covered by the sun.
"""
ROUND_MIN_FILL: float = 0.8
ROUND_MAX_ASPECT: float = 1.5
"""A blob is round when its area fills its moment-equivalent disk and its axes are balanced."""
HORIZON_MIN_CONTRAST: float = 0.05
"""Minimal luminance gap between the top quarter (sky) and the bottom fifth (mountains) of a canvas."""
HORIZON_DROP: float = 0.08
"""Luma fall from the brightest pixel above that marks a column's first ridge (its horizon)."""
HORIZON_REBOUND: float = 0.10
"""Luma rise above the darkest pixel since the horizon that counts as sky again: a second horizon below."""
STACKED_COLUMNS: float = 0.25
"""An image stacks horizons when more than this share of its columns brighten again below their horizon
(ground-truth renders: at most 0.20 of an image's columns, none over the cut)."""
RADIUS_RANGE_SLACK: float = 0.1
"""Relative widening of the reference radius range when checking whether a sun has a plausible size."""

_CONNECT_8 = np.zeros((3, 3, 3), dtype=bool)
_CONNECT_8[1] = True  # 8-connectivity inside each image, never across images of a batch
_SQUARE = np.zeros((3, 3, 3), dtype=np.uint8)
_SQUARE[1] = 1  # a full 3x3 block inside one image
_ROUNDED = np.zeros((3, 4, 4), dtype=np.uint8)
_ROUNDED[1] = 1
_ROUNDED[1, ::3, ::3] = 0  # a 4x4 block without its corners, the core of a disk centred on a pixel corner


@dataclass(frozen=True)
class Sun:
    """A detected sun: centre (x, y) and radius in canvas units, area in pixels, and shape descriptors."""

    center: tuple[float, float]
    radius: float
    area: int
    fill: float
    """Area over the area of the disk with the same second moments (1 for a disk, lower for spread blobs)."""
    aspect: float
    """Square root of the ratio of the principal second moments (1 for a disk); shape measures are taken in
    canvas units, so a canvas-round sun on a non-square canvas counts as round."""

    @property
    def is_round(self) -> bool:
        """Whether the blob looks like a disk."""
        return self.fill >= ROUND_MIN_FILL and self.aspect <= ROUND_MAX_ASPECT


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as float tensors in [0, 1]: uint8 is divided by 255, floats are mapped from [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    """Check the shape and add a batch dimension to a single ``[3, H, W]`` image."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W] or [3, H, W], got {tuple(images.shape)}")
    return images


def _unit_sun_mask(rgb: torch.Tensor) -> torch.Tensor:
    """Sun mask ``[N, H, W]`` of images ``[N, 3, H, W]`` already in [0, 1]."""
    red, green, blue = rgb.unbind(dim=1)
    bright = (red > SUN_MIN_RED) & (green > SUN_MIN_GREEN)
    warm = (red - blue > SUN_MIN_RED_MINUS_BLUE) & (green - blue > SUN_MIN_GREEN_MINUS_BLUE)
    return bright & warm & (red - green < SUN_MAX_RED_MINUS_GREEN)


def sun_mask(images: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` bool mask of sun-like pixels (bright, warm, saturated) of ``[N, 3, H, W]`` images."""
    return _unit_sun_mask(_to_unit(_as_batch(images).detach()))


def _component_moments(labels: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """Per-component pixel count, image index and raw moments of row/column coordinates."""
    image, rows, cols = (axis.astype(np.float64) for axis in np.nonzero(labels))
    ids = labels[labels > 0]  # same C order as np.nonzero

    def mean(values: np.ndarray) -> np.ndarray:
        """Per-component mean of ``values`` over the labelled pixels."""
        return np.bincount(ids, weights=values, minlength=count + 1)[1:] / area

    area = np.bincount(ids, minlength=count + 1)[1:].astype(np.float64)
    moments = {"r": mean(rows), "c": mean(cols), "rr": mean(rows**2), "cc": mean(cols**2)}
    return {"area": area, "image": mean(image), "rc": mean(rows * cols), **moments}


def _blob_shape(m: dict[str, np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill and aspect ratios of each component from its second moments, in canvas units.

    A disk of radius ``r`` has both principal variances ``r**2 / 4``; pixel moments are corrected by the
    variance ``1/12`` of a uniform pixel footprint and scaled by the pixel size ``(2/W, 2/H)``.
    """
    sy, sx = 2.0 / height, 2.0 / width
    var_r = (m["rr"] - m["r"] ** 2 + 1.0 / 12.0) * sy**2
    var_c = (m["cc"] - m["c"] ** 2 + 1.0 / 12.0) * sx**2
    cov = (m["rc"] - m["r"] * m["c"]) * sx * sy
    half_trace, det = 0.5 * (var_r + var_c), var_r * var_c - cov**2
    root = np.sqrt(np.maximum(half_trace**2 - det, 0.0))
    major, minor = half_trace + root, np.maximum(half_trace - root, 1e-18)
    fill = m["area"] * sx * sy / (2.0 * math.pi * (var_r + var_c))
    return fill, np.sqrt(major / minor)


def _solid_core(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``[N, H, W]`` masks at the heart of a full 3x3 block or of a 4x4 block without corners.

    Every disk of radius at least 1.9 pixels contains one of the two patterns, while random speckle almost
    never does (probability ``p**9`` per pixel for a mask density ``p``).
    """
    as_int = mask.astype(np.uint8)
    square = ndimage.correlate(as_int, _SQUARE, mode="constant") == _SQUARE.sum()
    rounded = ndimage.correlate(as_int, _ROUNDED, mode="constant") == _ROUNDED.sum()
    return square | rounded


def _detect_in_mask(mask: np.ndarray, min_area_frac: float) -> list[list[Sun]]:
    """Detected suns of each image of a batch of sun masks ``[N, H, W]``."""
    num, height, width = mask.shape
    labels, count = ndimage.label(mask, structure=_CONNECT_8)
    suns: list[list[Sun]] = [[] for _ in range(num)]
    if count == 0:
        return suns
    core = _solid_core(mask)
    has_core = np.bincount(labels[core], minlength=count + 1)[1:] > 0
    m = _component_moments(labels, count)
    fill, aspect = _blob_shape(m, height, width)
    scale = math.sqrt(height * width) / 2.0
    keep = has_core & (m["area"] >= max(min_area_frac * height * width, 1.0))
    for k in np.flatnonzero(keep):
        center = (float((2.0 * m["c"][k] + 1.0) / width - 1.0), float((2.0 * m["r"][k] + 1.0) / height - 1.0))
        radius = math.sqrt(m["area"][k] / math.pi) / scale
        sun = Sun(center, radius, int(m["area"][k]), float(fill[k]), float(aspect[k]))
        suns[int(round(m["image"][k]))].append(sun)
    return suns


def detect_suns(image: torch.Tensor, min_area_frac: float = 1e-4) -> list[Sun]:
    """Suns in one ``[3, H, W]`` image: 8-connected sun-coloured blobs with a solid core and some area.

    A blob counts when it covers at least ``min_area_frac`` of the canvas and has a solid core (see
    ``_solid_core``), which rejects speckle and noise; suns under about 1.9 pixels in radius may be missed.
    """
    if image.ndim != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    return _detect_in_mask(sun_mask(image).cpu().numpy(), min_area_frac)[0]


def _unit_horizon_present(rgb: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool for images in [0, 1]: top quarter (sky) brighter than bottom fifth (mountains)."""
    luma = _unit_luma(rgb)
    height = luma.shape[1]
    top = luma[:, : max(height // 4, 1)].mean(dim=(1, 2))
    bottom = luma[:, height - max(height // 5, 1) :].mean(dim=(1, 2))
    return top - bottom > HORIZON_MIN_CONTRAST


def _unit_luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def stacked_horizons(images: torch.Tensor) -> torch.Tensor:
    """``[N]`` share of each image's columns that brighten again below their horizon.

    In a scene the ridges are painted far to near, nearer ones darker, so going down a column the luma
    falls at the horizon (the first ridge) and hardly rises again (renders: no image over a quarter of its
    columns; a nearer ridge is sometimes a little lighter than a farther one). A model that tiles the
    landscape stacks horizons: sky-bright bands below a ridge. A column counts when, below its first fall of
    HORIZON_DROP from the brightest pixel above, some pixel is HORIZON_REBOUND above the darkest one since.
    Rows are averaged in threes first (speckle), and sun pixels are skipped."""
    return _unit_stacked_horizons(_to_unit(_as_batch(images).detach()))


def _unit_stacked_horizons(rgb: torch.Tensor) -> torch.Tensor:
    land = ~_unit_sun_mask(rgb)  # sky and ridges: every pixel but the sun's
    luma = F.avg_pool2d(_unit_luma(rgb)[:, None], (3, 1), stride=1, padding=(1, 0), count_include_pad=False)[:, 0]
    brightest = torch.cummax(torch.where(land, luma, -1.0), dim=1).values
    below = torch.cummax((land & (luma < brightest - HORIZON_DROP)).int(), dim=1).values.bool() & land
    darkest = torch.cummin(torch.where(below, luma, 2.0), dim=1).values
    rebound = torch.where(below, luma - darkest, 0.0).amax(dim=1)
    return (rebound > HORIZON_REBOUND).float().mean(dim=1)


@dataclass
class StructureScore:
    """Structural statistics of a set of generated images; rates are shares in [0, 1], nan when undefined."""

    resolution: str
    num_images: int
    one_sun_rate: float
    no_sun_rate: float
    mean_num_suns: float
    radius_mean: float
    radius_std: float
    radius_ref_mean: float
    radius_ref_std: float
    radius_error: float
    """``|radius_mean - radius_ref_mean| / radius_ref_mean``."""
    radius_in_range_rate: float
    """Share of detected suns whose radius lies in the reference range widened by ``RADIUS_RANGE_SLACK``."""
    round_rate: float
    """Share of detected suns that are round."""
    sun_in_sky_rate: float
    """Share of detected suns centred in the upper half of the canvas (all ground-truth suns are)."""
    horizon_rate: float
    """Share of images whose top quarter is brighter than their bottom fifth."""
    stacked_horizon_rate: float
    """Share of images with stacked horizons (a tiled landscape): more than STACKED_COLUMNS of their columns
    brighten again below their horizon (see stacked_horizons)."""

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat dictionary of all fields, for logging."""
        return asdict(self)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation, nan for an empty array."""
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std())


def _share(flags: Sequence[bool] | np.ndarray) -> float:
    """Share of true flags, nan when there are none."""
    flags = np.asarray(flags, dtype=bool)
    return float(flags.mean()) if flags.size else math.nan


@dataclass
class ImageScan:
    """What one pass over ``[N, 3, H, W]`` images finds, per image: the inputs of structure_score, kept so
    that callers who also need per-image values (intervals) do not scan the images again."""

    suns: list[list[Sun]]
    horizon: np.ndarray
    """``[N]`` bool: the top quarter is brighter than the bottom fifth."""
    stacked: np.ndarray
    """``[N]`` bool: more than STACKED_COLUMNS of the columns brighten again below their horizon."""

    @property
    def counts(self) -> np.ndarray:
        """``[N]`` number of detected suns per image."""
        return np.array([len(s) for s in self.suns], dtype=np.int64)


def scan(images: torch.Tensor, min_area_frac: float = 1e-4) -> ImageScan:
    """Suns, horizon and stacked-horizon flags of images (float in [-1, 1] or uint8), in chunks of about 4M
    pixels."""
    images = _as_batch(images)
    chunk = max(1, (1 << 22) // (images.shape[-2] * images.shape[-1]))
    suns: list[list[Sun]] = []
    horizon: list[torch.Tensor] = []
    stacked: list[torch.Tensor] = []
    for start in range(0, images.shape[0], chunk):
        rgb = _to_unit(images[start : start + chunk].detach())
        suns += _detect_in_mask(_unit_sun_mask(rgb).cpu().numpy(), min_area_frac)
        horizon.append(_unit_horizon_present(rgb).cpu())
        stacked.append((_unit_stacked_horizons(rgb) > STACKED_COLUMNS).cpu())
    return ImageScan(suns, _cat_flags(horizon), _cat_flags(stacked))


def _cat_flags(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=bool)


def sun_counts(images: torch.Tensor, min_area_frac: float = 1e-4) -> np.ndarray:
    """[N] number of detected suns per image."""
    return scan(images, min_area_frac).counts


def structure_score(
    images: torch.Tensor | ImageScan,
    *,
    reference_radii: Sequence[float] | torch.Tensor,
    resolution: str,
    min_area_frac: float = 1e-4,
) -> StructureScore:
    """Score ``[N, 3, H, W]`` images (float in [-1, 1] or uint8), or their scan, against ground-truth sun
    radii."""
    found = images if isinstance(images, ImageScan) else scan(images, min_area_frac)
    ref = torch.as_tensor(reference_radii, dtype=torch.float64).cpu().numpy().ravel()
    if ref.size == 0 or not found.suns:
        raise ValueError("structure_score needs at least one image and one reference radius")
    counts = found.counts
    flat = [sun for image_suns in found.suns for sun in image_suns]
    radii = np.array([sun.radius for sun in flat], dtype=np.float64)
    radius_mean, radius_std = _mean_std(radii)
    ref_mean, ref_std = _mean_std(ref)
    low, high = ref.min() * (1 - RADIUS_RANGE_SLACK), ref.max() * (1 + RADIUS_RANGE_SLACK)
    return StructureScore(
        resolution=resolution,
        num_images=int(counts.size),
        one_sun_rate=_share(counts == 1),
        no_sun_rate=_share(counts == 0),
        mean_num_suns=float(counts.mean()),
        radius_mean=radius_mean,
        radius_std=radius_std,
        radius_ref_mean=ref_mean,
        radius_ref_std=ref_std,
        radius_error=abs(radius_mean - ref_mean) / ref_mean,
        radius_in_range_rate=_share((radii >= low) & (radii <= high)),
        round_rate=_share([sun.is_round for sun in flat]),
        sun_in_sky_rate=_share([sun.center[1] < 0.0 for sun in flat]),
        horizon_rate=_share(found.horizon),
        stacked_horizon_rate=_share(found.stacked),
    )
