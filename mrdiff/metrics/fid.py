"""Fréchet Inception Distance (Heusel et al. 2017) per resolution, with real statistics cached on disk.

FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½) over 2048-d pool features of torch-fidelity's Inception
(the TF-ported weights that published FIDs use), fed uint8 images resized with TF1-style bilinear
interpolation (torchmetrics' ``antialias=False``). The weights come from a local file only: an argument,
``$MRDIFF_INCEPTION_WEIGHTS``, or else the file ``make fid-weights`` wrote to the cache
(mrdiff.metrics.inception_weights); nothing here downloads.

torchmetrics keeps the sufficient statistics (feature sums, Σ xxᵀ and counts) as states summed over DDP
ranks, so every rank extracts features of its own share of the images and ``compute`` sees all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from tqdm import tqdm

from mrdiff.console import info
from mrdiff.metrics.inception_weights import default_weights_path
from mrdiff.utils import atomic_write, cache_dir, file_hash

WEIGHTS_ENV = "MRDIFF_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
CACHE_ENV = "MRDIFF_FID_CACHE"
INCEPTION_FEATURES = 2048
PREPROCESSING = "uint8 round(255·(x+1)/2), TF1 bilinear resize to 299, no antialias"


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is not configured, missing or unreadable."""


# -- weights ------------------------------------------------------------------------------------------
def weights_help(problem: str) -> str:
    """An error message: what is wrong with the weights, and how to get and configure the file."""
    return (
        f"{problem}. FID needs torch-fidelity's Inception weights {WEIGHTS_FILE} (about 92 MB); mrdiff never "
        f"downloads them inside a job. Run `make fid-weights` (or `python -m mrdiff.metrics.inception_weights`) "
        f"once: it writes {default_weights_path()}, used when nothing else is configured. Or, on a machine "
        f"with internet access, run\n"
        f"  curl -L -o ~/.cache/mrdiff/{WEIGHTS_FILE} {WEIGHTS_URL}\n"
        f"(or copy ~/.cache/torch/hub/checkpoints/{WEIGHTS_FILE} if torch-fidelity downloaded it before), "
        f"then point mrdiff at it: `export {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}`, or set the evaluation "
        f"callback's init_args.inception_weights"
    )


def configured_weights(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The weights path from the argument, else from $MRDIFF_INCEPTION_WEIGHTS, else the file `make fid-weights`
    wrote (mrdiff.metrics.inception_weights.default_weights_path) when it exists; None when there is none."""
    value = path if path not in (None, "") else os.environ.get(WEIGHTS_ENV) or None
    if value is not None:
        return Path(value).expanduser()
    cached = default_weights_path()
    return cached if cached.is_file() else None


def require_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The configured weights file, or InceptionWeightsError naming the file, the URL and the env var."""
    weights = configured_weights(path)
    if weights is None:
        problem = f"No Inception weights configured (argument, ${WEIGHTS_ENV} or `make fid-weights`)"
        raise InceptionWeightsError(weights_help(problem))
    if not weights.is_file():
        source = "argument" if path not in (None, "") else f"${WEIGHTS_ENV}"
        problem = f"Inception weights file {weights} (from the {source}) does not exist"
        raise InceptionWeightsError(weights_help(problem))
    return weights


def inception(weights: str | os.PathLike[str] | None = None) -> NoTrainInceptionV3:
    """torch-fidelity's InceptionV3 (2048-d pool features, antialias=False) loaded from a local file."""
    path = require_weights(weights)
    try:
        extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                       feature_extractor_weights_path=str(path), antialias=False)
    except Exception as err:  # a truncated download, an HTML page, another network's weights
        problem = f"Inception weights file {path} could not be loaded ({err})"
        raise InceptionWeightsError(weights_help(problem)) from err
    extractor.num_features = INCEPTION_FEATURES
    extractor.cache_id = f"inception-v3-{INCEPTION_FEATURES}-{file_hash(path)}"
    return extractor


def extractor_id(extractor: nn.Module) -> str:
    """What identifies a feature extractor in cache keys: its `cache_id`, else class and weights hash."""
    if getattr(extractor, "cache_id", None):
        return str(extractor.cache_id)
    digest = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(extractor).__module__}.{type(extractor).__qualname__}-{digest.hexdigest()[:16]}"


def to_uint8(images: Tensor) -> Tensor:
    """[−1, 1] floats → uint8 as a PNG would store them (torchvision's save_image rounding); uint8 passes."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)


# -- Fréchet distance ---------------------------------------------------------------------------------
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) with SciPy's sqrtm: the reference (pytorch-fid's formula)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean).real)


def psd_sqrt(sigma: Tensor) -> Tensor:
    """Σ^½ of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    eigenvalues, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T


def trace_sqrt_product(sqrt_sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """tr (Σ1 Σ2)^½ = Σ √λ(Σ1^½ Σ2 Σ1^½): a symmetric eigenproblem, faster and steadier than eig(Σ1 Σ2)."""
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    return torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set: count, mean [D] and unbiased covariance [D, D], float64."""

    num: int
    mean: np.ndarray
    cov: np.ndarray

    def save(self, path: Path, key: dict[str, Any]) -> None:
        """Write an .npz atomically (temporary file + rename), with the key stored inside."""
        with atomic_write(path) as f:
            np.savez(f, num=np.int64(self.num), mean=self.mean, cov=self.cov, key=np.array(_canonical(key)))

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> FeatureStats:
        """Read an .npz written by save; ValueError when it is malformed or was made for another key."""
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != _canonical(key):
                raise ValueError("its key differs from this evaluation's")
            stats = cls(int(data["num"]), data["mean"].astype(np.float64), data["cov"].astype(np.float64))
        dim = stats.mean.shape
        if len(dim) != 1 or stats.cov.shape != dim * 2 or stats.num < 2:
            raise ValueError(f"shapes mean {stats.mean.shape}, cov {stats.cov.shape}, num {stats.num}")
        if not (np.isfinite(stats.mean).all() and np.isfinite(stats.cov).all()):
            raise ValueError("non-finite values")
        return stats


def _canonical(key: dict[str, Any]) -> str:
    """The key as sorted, compact JSON."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


# -- the metric ---------------------------------------------------------------------------------------
class FID(FrechetInceptionDistance):
    """torchmetrics' FID on a shared feature extractor, fed [−1, 1] images, with loadable real statistics.

    Real statistics survive ``reset()`` (one reference, several sets of fakes); ``compute`` uses the
    symmetric form of tr (Σ_r Σ_f)^½ with Σ_r^½ cached, so the 2048² eigenproblem of the reals runs once.
    """

    def __init__(self, extractor: nn.Module, **kwargs: Any) -> None:
        super().__init__(feature=extractor, reset_real_features=False, normalize=False, **kwargs)
        self._sqrt_real: tuple[tuple[int, float, str], Tensor] | None = None

    @property
    def num_features(self) -> int:
        """Feature dimension D."""
        return self.real_features_sum.numel()

    @torch.no_grad()
    def update_images(self, images: Tensor, real: bool) -> None:
        """Add images ([−1, 1] floats or uint8) to the real or the fake statistics."""
        self.update(to_uint8(images).to(self.real_features_sum.device), real=real)

    def _stats(self, real: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(n, μ, Σ) of the real or the fake features from the (synced) sums."""
        prefix = "real" if real else "fake"
        n = getattr(self, f"{prefix}_features_num_samples")
        mean = getattr(self, f"{prefix}_features_sum") / n
        cov = (getattr(self, f"{prefix}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
        return n, mean, cov

    def compute(self) -> Tensor:
        """FID of the fakes against the reals (states already summed over ranks by torchmetrics)."""
        if self.real_features_num_samples < 2 or self.fake_features_num_samples < 2:
            raise RuntimeError("FID needs at least 2 real and 2 fake images")
        n_real, mean_real, cov_real = self._stats(real=True)
        _, mean_fake, cov_fake = self._stats(real=False)
        signature = (int(n_real), float(self.real_features_sum.sum()), str(self.real_features_sum.device))
        if self._sqrt_real is None or self._sqrt_real[0] != signature:
            self._sqrt_real = (signature, psd_sqrt(cov_real))
        trace_sqrt = trace_sqrt_product(self._sqrt_real[1], cov_fake)
        return (mean_real - mean_fake).square().sum() + cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt

    def real_stats(self) -> FeatureStats:
        """The real statistics summed over all ranks (a collective call under DDP)."""
        with self.sync_context():
            n, mean, cov = self._stats(real=True)
            return FeatureStats(int(n), mean.cpu().numpy(), cov.cpu().numpy())

    def load_real_stats(self, stats: FeatureStats | None) -> None:
        """Set the real sums from statistics (None: zeros, for ranks other than the one that holds them)."""
        device = self.real_features_sum.device
        self.real_features_sum.zero_()
        self.real_features_cov_sum.zero_()
        self.real_features_num_samples.zero_()
        if stats is None:
            return
        if stats.mean.shape != (self.num_features,):
            raise ValueError(f"real statistics have {stats.mean.shape[0]} features, "
                             f"the extractor {self.num_features}")
        mean = torch.as_tensor(stats.mean, dtype=torch.float64, device=device)
        cov = torch.as_tensor(stats.cov, dtype=torch.float64, device=device)
        self.real_features_sum.copy_(stats.num * mean)
        self.real_features_cov_sum.copy_((stats.num - 1) * cov + stats.num * torch.outer(mean, mean))
        self.real_features_num_samples.fill_(stats.num)


# -- cached real statistics ---------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$MRDIFF_FID_CACHE, else $XDG_CACHE_HOME/mrdiff/fid, else ~/.cache/mrdiff/fid."""
    return cache_dir(CACHE_ENV, "fid")


class RealStatsCache:
    """Real-image feature statistics on disk, one .npz per (data, resolution, N, extractor)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()

    @staticmethod
    def key(data: dict[str, Any], height: int, width: int, num: int, extractor: str) -> dict[str, Any]:
        """Everything the statistics depend on."""
        return {"data": data, "height": height, "width": width, "num": num, "extractor": extractor,
                "preprocessing": PREPROCESSING}

    def path(self, key: dict[str, Any]) -> Path:
        """real_<H>x<W>_n<N>_<hash of the whole key>.npz in the cache directory."""
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]
        return self.directory / f"real_{key['height']}x{key['width']}_n{key['num']}_{digest}.npz"

    def load(self, key: dict[str, Any]) -> FeatureStats | None:
        """Cached statistics, or None when absent; a corrupt file is reported and treated as absent."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return FeatureStats.load(path, key)
        except Exception as err:  # truncated, not an npz, wrong key or shapes: recompute and overwrite
            info(f"mrdiff: FID cache {path} is unusable ({err}); recomputing the real statistics")
            return None

    def save(self, key: dict[str, Any], stats: FeatureStats) -> Path:
        """Write the statistics atomically; returns the file."""
        path = self.path(key)
        stats.save(path, key)
        return path


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's value on every rank (identity without torch.distributed)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def real_statistics(
    metric: FID,
    batches: Callable[[], Iterable[Tensor]],
    *,
    cache: RealStatsCache | None,
    key: dict[str, Any],
    progress: bool = True,
    total: int | None = None,  # number of batches, for the progress bar
) -> bool:
    """Fill the metric's real statistics from the cache (rank 0 holds them) or from `batches` (shared
    round-robin between ranks); returns whether the cache was used. Collective under DDP."""
    rank, world = rank_and_world()
    cached = cache.load(key) if cache is not None and rank == 0 else None
    if broadcast_from_rank_zero(cached is not None):
        metric.load_real_stats(cached)
        if rank == 0:
            info(f"mrdiff: FID real statistics for {key['height']}x{key['width']} (N={key['num']}) "
                 f"loaded from cache {cache.path(key)}")
        return True
    metric.load_real_stats(None)
    label = f"FID reference {key['height']}x{key['width']}"
    bar = tqdm(batches(), desc=label, total=total, leave=False, disable=not progress or rank != 0)
    for i, batch in enumerate(bar):
        if i % world == rank:
            metric.update_images(batch, real=True)
    stats = metric.real_stats()
    if cache is not None and rank == 0:
        path = cache.save(key, stats)
        size = f"{key['height']}x{key['width']}"
        info(f"mrdiff: FID real statistics for {size} (N={stats.num}) cached in {path}")
    return False
