"""A locally made diffusers UNet2DModel as mrdiff's network: ε, loading, errors, and sample → calibrate → test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mrdiff.cli import error_line, main
from mrdiff.diffusion.samplers import SamplingSettings, dpm_solver_timesteps
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.module import DiffusionModule
from mrdiff.nn.diffusers_unet import DiffusersUNet
from tests.conftest import ROOT

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
NET = "mrdiff.nn.diffusers_unet.DiffusersUNet"
T = 100  # the tiny model's training schedule: linear, 100 steps


def tiny_unet(seed: int) -> torch.nn.Module:
    """A randomly initialised 2-level UNet2DModel with attention, trained (nominally) at 16²."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8).eval()


def save_model(unet: torch.nn.Module, folder: Path) -> Path:
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    unet = tiny_unet(0)
    return unet, save_model(unet, tmp_path_factory.mktemp("ddpm") / "tiny-ddpm")


def test_wrapper_eps_equals_the_raw_diffusers_call(model_dir, capsys):
    unet, folder = model_dir
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 24, generator=gen)
    t = torch.tensor([3.5, 70.0])  # fractional t, as NoiseShift feeds it
    with torch.no_grad():
        raw = unet(x, t).sample
        module = DiffusionModule(DiffusersUNet(str(folder)), num_timesteps=T, train_resolution=16).eval()
        grid, scale = module.pipeline.canvas_inputs(16, 24)
        eps = module.pipeline.eps_fn(grid, scale)
        assert torch.allclose(eps(x, t), raw, atol=1e-6, rtol=0)
        assert torch.allclose(module.net(x, t, grid, scale), raw, atol=1e-6, rtol=0)
        assert torch.allclose(module.net(x, t), raw, atol=1e-6, rtol=0)  # grid and scale change nothing
        assert (eps(x, torch.tensor([60.0, 70.0])) - raw)[0].abs().max() > 1e-3  # and t does matter
    assert capsys.readouterr().out.count("ignores the grid and the scale") == 1


def test_a_single_weights_file_with_its_config_loads_the_same_weights(model_dir, tmp_path):
    unet, folder = model_dir
    single = tmp_path / "single"
    single.mkdir()
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(folder / name, single / name)
    weights = single / "ema.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", weights)
    net = DiffusersUNet(str(weights))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([42.0])
    with torch.no_grad():
        assert torch.allclose(net(x, t), unet(x, t).sample, atol=1e-6, rtol=0)
    assert net.fingerprint == DiffusersUNet(str(weights)).fingerprint
    other = save_model(tiny_unet(1), tmp_path / "other")
    assert DiffusersUNet(str(other)).fingerprint != DiffusersUNet(str(folder)).fingerprint


def error_of(args: list[str]) -> str:
    """The one line `mrdiff` prints for the error these arguments cause."""
    with pytest.raises(Exception) as info:
        main(args)
    line = error_line(info.value)
    assert line is not None, repr(info.value)
    return line


def config_file(tmp_path: Path, run_dir: Path, *callbacks: dict) -> Path:
    """Data and trainer for a pretrained 16² model: fixed-resolution synthetic scenes, CPU, no logger."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(run_dir), "callbacks": list(callbacks)},
        "model": {"num_timesteps": T},
        "data": {"source": "synthetic", "multires": False, "image_size": 16, "train_size": 16, "batch_size": 4,
                 "num_workers": 0, "num_scenes": 16, "num_val": 4},
    }
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_user_errors_are_one_line(model_dir, tmp_path):
    _, folder = model_dir
    config = str(config_file(tmp_path, tmp_path / "run"))
    base = ["sample", "--config", config, f"--model.net={NET}"]
    line = error_of([*base, f"--model.net.init_args.path={tmp_path / 'nowhere'}"])
    assert "does not exist" in line and "never downloads" in line and "\n" not in line
    line = error_of([*base, f"--model.net.init_args.path={folder}", "--model.num_timesteps=1000"])
    assert "--model.num_timesteps=100 " in line and "--model.num_timesteps=1000 " in line
    line = error_of([*base, f"--model.net.init_args.path={folder}", "--data.train_size=32"])
    assert "trained at 16x16" in line and "--data.train_size=16" in line
    line = error_of(["fit", "--config", config, f"--model.net={NET}", f"--model.net.init_args.path={folder}",
                     "--trainer.max_steps=1"])
    assert "fine-tuning a diffusers UNet" in line


def mrdiff(*args: str, cwd: Path) -> str:
    """`python -m mrdiff ...` as a user runs it; returns stdout (fails the test with stderr otherwise)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mrdiff", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_sample_calibrate_test_through_the_cli(model_dir, tmp_path):
    """A pretrained UNet2DModel folder, no checkpoint: sample, calibrate and test at 16² and 24² with DPM-Solver++."""
    _, folder = model_dir
    run = tmp_path / "run"
    evaluation = {"class_path": "mrdiff.callbacks.evaluation.ResolutionEvaluation", "init_args": {
        "resolutions": [16, 24], "num_samples": 4, "batch_size": 4, "sampling": {"sampler": "dpmpp_2m", "steps": 3},
        "noiseshift": "auto", "analytic_shift": True, "fid": False, "structure": True, "progress": False}}
    net = [f"--model.net={NET}", f"--model.net.init_args.path={folder}"]
    config = ["--config", str(config_file(tmp_path, run, evaluation))]

    out = mrdiff("sample", *config, *net, "--resolutions=[16,24]", "--num_samples=2", "--sampler=dpmpp_2m",
                 "--steps=3", cwd=tmp_path)
    assert out.count("ignores the grid and the scale") == 1
    module = DiffusionModule(DiffusersUNet(str(folder)), num_timesteps=T, train_resolution=16).eval()
    for side in (16, 24):
        with Image.open(run / "samples" / f"samples_{side}.png") as png:
            grid = np.asarray(png.convert("RGB")).astype(int)
        assert grid.shape == (2 * side + 6, side + 4, 3)  # two samples in one column, 2-pixel padding
        expected = module.pipeline.sample([0, 1], side, sampling=SamplingSettings("dpmpp_2m", 3))
        expected = (expected * 0.5 + 0.5).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        first = grid[2:2 + side, 2:2 + side]
        assert np.abs(first - expected[0].numpy().astype(int)).max() <= 1  # the CLI sampled these weights

    mrdiff("calibrate", *config, *net, "--resolutions=[16,24]", "--sampler=dpmpp_2m", "--steps=3",
           "--num_images=2", "--coarse_stride=0.05", "--fine_window=0.01", "--fine_stride=0.005", cwd=tmp_path)
    table = json.loads((run / "noiseshift.json").read_text())
    assert table["checkpoint"] == module.net.fingerprint  # the model folder's hash names the weights
    assert set(table["resolutions"]) == {"16", "24"}
    visited = dpm_solver_timesteps(NoiseSchedule(num_timesteps=T), 3)
    assert all(sorted(cal["t"]) == sorted(visited) for cal in table["resolutions"].values())

    out = mrdiff("test", *config, *net, cwd=tmp_path)
    result = json.loads((run / "eval_table.json").read_text())
    assert [row["variant"] for row in result["rows"]] == ["mrdiff", "mrdiff + NoiseShift", "mrdiff + analytic shift"]
    assert result["columns"] == ["16", "24"] and result["settings"]["sampler"] == "dpmpp_2m"
    assert all(0 <= row["cells"][r]["one_sun_rate"] <= 1 for row in result["rows"] for r in ("16", "24"))
    assert "| mrdiff + NoiseShift |" in out

    # the table names this model folder: another model's folder is refused with it
    other = save_model(tiny_unet(1), tmp_path / "other")
    line = error_of(["sample", *config, f"--model.net={NET}", f"--model.net.init_args.path={other}",
                     f"--noiseshift={run / 'noiseshift.json'}", "--steps=3", "--sampler=dpmpp_2m"])
    assert "was calibrated for checkpoint" in line and module.net.fingerprint in line


def test_the_shipped_pretrained_config_builds_with_a_model_folder(tmp_path):
    """configs/pretrained/diffusers_ddpm.yaml with a stand-in folder (T = 1000, sample_size 256) instantiates."""
    from mrdiff.cli import MrdiffCLI

    unet = diffusers.UNet2DModel(sample_size=256, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path / "ddpm"
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (256, 256), (i * 40, 90, 200)).save(images / f"{i}.png")
    cli = MrdiffCLI(args=["--config", str(ROOT / "configs/pretrained/diffusers_ddpm.yaml"),
                          f"--model.net.init_args.path={folder}", f"--data.root={images}"], run=False)
    assert isinstance(cli.model.net, DiffusersUNet) and cli.model.hparams.train_resolution == 256
    evaluation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ResolutionEvaluation")
    assert evaluation.sampling == SamplingSettings("dpmpp_2m", 20)
