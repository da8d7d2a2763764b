"""FID: the metric against a NumPy/SciPy reference, the Inception path, the real-statistics cache, weights."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import Tensor, nn

from mrdiff.metrics.fid import (
    FID,
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    WEIGHTS_URL,
    InceptionWeightsError,
    RealStatsCache,
    frechet_distance,
    inception,
    real_statistics,
    to_uint8,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class ProjectedPixels(nn.Module):
    """Deterministic features: tanh of a fixed projection of 4x4-pooled pixels; counts its calls."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(48, self.num_features, generator=generator) / 4)
        self.calls = 0

    def forward(self, images: Tensor) -> Tensor:
        assert images.dtype == torch.uint8
        self.calls += 1
        pooled = nn.functional.adaptive_avg_pool2d(images.float() / 127.5 - 1, 4).flatten(1)
        return torch.tanh(pooled @ self.projection)


def images(num: int, seed: int, size: int = 16, shift: float = 0.0) -> Tensor:
    """Random images in [−1, 1] with a smooth component, so pooled features vary across images."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 3, 4, 4, generator=generator) * 2 - 1
    fine = torch.rand(num, 3, size, size, generator=generator) * 0.2
    upsampled = nn.functional.interpolate(coarse, size=size, mode="nearest")
    return (0.8 * upsampled + fine + shift).clamp(-1, 1)


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def test_reference_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 4 + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # ‖Δμ‖² + Σ (σ1 − σ2)²
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_fid_equals_the_scipy_reference_on_the_same_features():
    extractor = ProjectedPixels()
    real, fake = images(64, seed=1), images(48, seed=2, shift=0.15)
    metric = FID(extractor)
    for chunk in real.split(20):  # uneven batches: the sums must not care
        metric.update_images(chunk, real=True)
    metric.update_images(fake, real=False)
    fid = float(metric.compute())
    with torch.no_grad():
        f_real = extractor(to_uint8(real)).double().numpy()
        f_fake = extractor(to_uint8(fake)).double().numpy()
    expected = frechet_distance(*gaussian(f_real), *gaussian(f_fake))
    assert expected > 0.01
    assert fid == pytest.approx(expected, rel=1e-5)
    metric.reset()  # keeps the reals: the same fakes give the same FID, other fakes another
    metric.update_images(real[:32], real=False)
    f_half = extractor(to_uint8(real[:32])).double().numpy()
    expected = frechet_distance(*gaussian(f_real), *gaussian(f_half))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5)


def test_to_uint8_rounds_like_a_saved_png():
    x = torch.tensor([-1.5, -1.0, -0.002, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 127, 128, 191, 255, 255]  # floor(255·(x+1)/2 + 0.5), clamped


# -- the Inception path ---------------------------------------------------------------------------
def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's InceptionV3 with random (He-initialised) weights, saved without any download."""

    class Unloaded(tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):  # noqa: ARG002
            return super().load_state_dict(state_dict, strict=False)

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.mark.slow
def test_inception_fid_end_to_end_with_local_random_weights(tmp_path, monkeypatch, no_downloads):
    weights = random_inception_weights(tmp_path / WEIGHTS_FILE)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    extractor = inception()  # from the env var
    real, fake = images(4, seed=3, size=32), images(4, seed=4, size=32, shift=0.3)
    metric = FID(extractor)
    metric.update_images(real, real=True)
    metric.update_images(fake, real=False)
    fid = float(metric.compute())
    with torch.no_grad():
        f_real = extractor(to_uint8(real)).double()
        f_fake = extractor(to_uint8(fake)).double()
        # antialias=False: the same features as torch-fidelity's own extractor (TF1-style resize)
        reference = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                             feature_extractor_weights_path=str(weights))
        (original,) = reference(to_uint8(real[:1]))
        torch.testing.assert_close(original.double(), f_real[:1], rtol=1e-5, atol=1e-6)
    assert metric.real_features_sum.shape == (2048,)
    # N < D: tr (Σ1 Σ2)^½ = ‖A1ᵀ A2‖_* / √((n1 − 1)(n2 − 1)) with centred feature matrices A
    a_real, a_fake = f_real - f_real.mean(0), f_fake - f_fake.mean(0)
    trace_sqrt = torch.linalg.matrix_norm(a_real @ a_fake.T, ord="nuc") / 3.0
    traces = (a_real.square().sum() + a_fake.square().sum()) / 3
    expected = (f_real.mean(0) - f_fake.mean(0)).square().sum() + traces - 2 * trace_sqrt
    assert expected > 0
    assert fid == pytest.approx(float(expected), rel=1e-6)


def test_missing_weights_name_the_file_the_url_and_the_env_var(tmp_path, monkeypatch, no_downloads):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError) as unset:
        inception()
    missing = tmp_path / "nowhere" / WEIGHTS_FILE
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(InceptionWeightsError) as from_env:
        inception()
    for message in (str(unset.value), str(from_env.value)):
        assert WEIGHTS_FILE in message and WEIGHTS_URL in message and WEIGHTS_ENV in message
    assert str(missing) in str(from_env.value)
    (tmp_path / "garbage.pth").write_text("<html>not weights</html>")
    with pytest.raises(InceptionWeightsError, match="could not be loaded"):
        inception(tmp_path / "garbage.pth")


# -- cached real statistics -----------------------------------------------------------------------
def batches(num: int, size: int) -> Iterator[Tensor]:
    data = images(num, seed=size, size=size)
    yield from data.split(8)


def fill(extractor: ProjectedPixels, cache: RealStatsCache, num: int, size: int) -> tuple[FID, bool, int]:
    """A FID metric with reals for (num, size) through the cache; (metric, cache hit, extractor calls)."""
    metric, before = FID(extractor), extractor.calls
    key = cache.key({"source": "test"}, size, size, num, "projected-pixels")
    hit = real_statistics(metric, lambda: batches(num, size), cache=cache, key=key, progress=False)
    return metric, hit, extractor.calls - before


def test_real_statistics_are_cached_and_keyed_by_n_and_resolution(tmp_path, capsys):
    extractor, cache = ProjectedPixels(), RealStatsCache(tmp_path / "cache")
    first, hit, calls = fill(extractor, cache, 24, 16)
    assert not hit and calls == 3 and len(list(cache.directory.glob("*.npz"))) == 1
    second, hit, calls = fill(extractor, cache, 24, 16)
    assert hit and calls == 0 and "loaded from cache" in capsys.readouterr().out
    for metric in (first, second):
        metric.update_images(images(16, seed=9, shift=0.2), real=False)
    assert float(second.compute()) == pytest.approx(float(first.compute()), rel=1e-9)
    assert fill(extractor, cache, 16, 16)[1:] == (False, 2)  # other N
    assert fill(extractor, cache, 24, 8)[1:] == (False, 3)  # other resolution
    assert len(list(cache.directory.glob("*.npz"))) == 3


def test_a_corrupt_cache_file_is_recomputed(tmp_path, capsys):
    extractor, cache = ProjectedPixels(), RealStatsCache(tmp_path)
    reference, _, _ = fill(extractor, cache, 16, 16)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    metric, hit, calls = fill(extractor, cache, 16, 16)
    assert not hit and calls == 2 and "unusable" in capsys.readouterr().out
    torch.testing.assert_close(metric.real_features_cov_sum, reference.real_features_cov_sum)
    assert fill(extractor, cache, 16, 16)[1:] == (True, 0)  # rewritten whole


def test_evidence_fid_and_kid_match_reference_formulas_on_the_features():
    """FID against scipy's Fréchet distance, KID against the unbiased MMD² with the cubic kernel, both
    computed here directly from the extractor's features (subset = the whole set, so KID is exact). The
    reference features are extracted once for all the rows scored against them."""
    from mrdiff.evaluation.scores import InceptionScores

    extractor, seen = ProjectedPixels(), []
    extractor.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    fake, real = images(60, seed=1, shift=0.15), images(60, seed=2)
    scores = InceptionScores(real, extractor, num_fakes=60)
    extracted = sum(seen)
    got = scores(fake)
    assert extracted == 60 and sum(seen) - extracted == 60  # one pass over the reals for both metrics; the fakes
    f_fake = extractor(to_uint8(fake)).double().numpy()
    f_real = extractor(to_uint8(real)).double().numpy()
    assert got["fid"] == pytest.approx(frechet_distance(*gaussian(f_real), *gaussian(f_fake)), rel=1e-4)
    d = f_fake.shape[1]

    def mean_kernel(a: np.ndarray, b: np.ndarray, same: bool) -> float:
        k = (a @ b.T / d + 1) ** 3
        return (k.sum() - np.trace(k)) / (len(a) * (len(a) - 1)) if same else k.mean()

    mmd = mean_kernel(f_fake, f_fake, True) + mean_kernel(f_real, f_real, True) - 2 * mean_kernel(f_fake, f_real, False)
    assert got["kid"] == pytest.approx(mmd, rel=1e-4, abs=1e-7)
    assert math.isnan(got["kid_lo"]) and math.isnan(got["kid_hi"])  # every subset is the whole set: no band
    assert got["fid"] > 0.05 and mmd > 0  # the shift is seen
    before = sum(seen)
    same = scores(real)  # a second row: its own fakes, the same reals
    assert abs(same["fid"]) < 1e-6 and same["kid"] < 0  # unbiased MMD² of a set with itself is below 0
    assert sum(seen) - before == 60  # only the row's own images, once: the reference is not extracted again
