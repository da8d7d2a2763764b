"""The `mrdiff` command line: help, fit, sample, and every shipped config."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mrdiff.cli import MrdiffCLI, main
from mrdiff.resolution import parse_resolution
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "mrdiff", "--help"], capture_output=True, text=True, check=True)
    assert "{fit,validate,test,sample,calibrate}" in out.stdout  # no `predict`: it did nothing


def test_parse_resolution():
    assert parse_resolution(64) == (64, 64) and parse_resolution("96x128") == (96, 128)
    assert parse_resolution((96, 128)) == (96, 128)  # a parsed pair passes (callbacks hold pairs)
    with pytest.raises(ValueError, match="neither N nor HxW"):
        parse_resolution("big")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "data"
    (root / "celeba" / "img_align_celeba").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (178, 218), (i * 40, 90, 200)).save(root / "celeba" / "img_align_celeba" / f"{i}.jpg")
        Image.new("RGB", (256, 256), (i * 40, 90, 200)).save(root / f"{i}.png")
    cli = MrdiffCLI(args=["--config", str(config), f"--data.root={root}", "--trainer.logger=false"], run=False)
    data = cli.datamodule.hparams
    assert data.source in ("synthetic", "folder", "celeba")
    # the U-Net takes the training input and the largest canvas the config samples at without a size error
    for side in (cli.model.hparams.train_resolution, data.s_max):
        cli.model.net.check_size(side, side)


@pytest.mark.parametrize("model", ["fixed", "multires", "canvases", "no_coords", "no_safa", "pixel"])
def test_evidence_matrix_configs_build_the_model_they_name(model):
    base, overlay = ROOT / "configs/evidence/base.yaml", ROOT / f"configs/evidence/{model}.yaml"
    cli = MrdiffCLI(args=["--config", str(base), "--config", str(overlay), "--trainer.logger=false"], run=False)
    net, data = cli.model.net, cli.datamodule.hparams
    assert (net.coords is not None) == (model not in ("fixed", "no_coords"))
    assert net.uses_scale == (model not in ("fixed", "no_safa"))
    assert data.multires == (model != "fixed") and data.coord_mode == ("pixel" if model == "pixel" else "normalized")
    assert cli.model.hparams.train_scales == ([32, 32] if model == "fixed" else [32, 64])
    assert cli.model.hparams.train_resolution == 32
    assert (data.canvas_fraction, data.canvas_sizes) == ((0.25, [64]) if model == "canvases" else (0.0, None))


@pytest.mark.parametrize(("model", "params"), [("fixed", 0.28e6), ("multires", 0.51e6)])  # as cpu.yaml says
def test_cpu_overlay_shrinks_the_evidence_network_and_keeps_the_model(model, params):
    """configs/evidence/cpu.yaml after a model's overlay: the CPU-sized U-Net, the same data and conditioning."""
    configs = [ROOT / "configs/evidence" / f for f in ("base.yaml", f"{model}.yaml", "cpu.yaml")]
    cli = MrdiffCLI(args=[a for c in configs for a in ("--config", str(c))] + ["--trainer.logger=false"], run=False)
    assert sum(p.numel() for p in cli.model.net.parameters()) == pytest.approx(params, abs=0.005e6)
    assert (cli.model.net.coords is not None, cli.model.net.uses_scale) == ((model == "multires",) * 2)
    assert cli.datamodule.hparams.multires == (model == "multires") and cli.datamodule.hparams.batch_size == 32
    assert cli.model.hparams.train_scales == ([32, 32] if model == "fixed" else [32, 64])


def test_fit_then_sample_at_three_resolutions(tiny_config_file, tmp_path):
    config = tiny_config_file()
    main(["fit", "--config", str(config)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 4 and "current_model_state" in state  # EMA weights in state_dict
    out = tmp_path / "samples"
    main(["sample", "--config", str(config), f"--ckpt_path={ckpt}", "--resolutions=[16,24,16x32]",
          "--num_samples=4", "--steps=3", f"--out_dir={out}"])
    for name, size in [("samples_16.png", (16, 16)), ("samples_24.png", (24, 24)), ("samples_16x32.png", (16, 32))]:
        with Image.open(out / name) as grid:
            assert grid.size == (2 * size[1] + 6, 2 * size[0] + 6)  # 2x2 grid, 2-pixel padding


def test_a_callback_option_from_before_the_settings_groups_gets_one_line_naming_its_group(tmp_path, capsys):
    """Run configs saved by an older mrdiff have `steps:` directly under SampleGrid's init_args."""
    config = tiny_config(tmp_path / "run")
    config["trainer"]["callbacks"].append({"class_path": "mrdiff.callbacks.sample_grid.SampleGrid",
                                           "init_args": {"resolutions": [16], "steps": 2}})
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(tmp_path / "old.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and err == [
        "mrdiff: error: SampleGrid takes steps inside `sampling:` now (a config from an older mrdiff): write "
        "`sampling: {steps: ...}` under its init_args, as configs/quickstart.yaml does"]
    # an option no version took (SampleGrid never searched) keeps jsonargparse's own message
    config["trainer"]["callbacks"][-1]["init_args"] = {"resolutions": [16], "num_images": 2}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "old.yaml")])
    err = capsys.readouterr().err
    assert "Option 'num_images' is not accepted" in err and "inside `search:`" not in err


def test_sample_takes_the_training_free_methods(tiny_config_file, tmp_path, capsys):
    """--method window_fusion with one window over the whole canvas is plain sampling, pixel for pixel; the grid
    is named after the method; --method_args for another method is refused before any sampling."""
    config = tiny_config_file(**{"trainer.max_steps": 2})
    main(["fit", "--config", str(config)])
    ckpt, out = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "samples"
    base = ["sample", "--config", str(config), f"--ckpt_path={ckpt}", "--resolutions=[24]", "--num_samples=4",
            "--steps=3", f"--out_dir={out}"]
    main(base)
    main([*base, "--method=window_fusion", "--method_args=window_fusion.window=24"])
    main([*base, "--method=redilation"])
    main([*base, "--method=redilation", "--attention_scaling=true"])
    assert (out / "samples_24_redilation_scaled_attention.png").is_file()
    with Image.open(out / "samples_24.png") as plain, Image.open(out / "samples_24_window_fusion.png") as fused:
        assert np.array_equal(np.asarray(plain), np.asarray(fused))
    with Image.open(out / "samples_24.png") as plain, Image.open(out / "samples_24_redilation.png") as dilated:
        assert not np.array_equal(np.asarray(plain), np.asarray(dilated))  # 24 / 16 rounds to a dilation of 2
    with pytest.raises(ValueError, match="sets \\['redenoise'\\], not --method redilation"):
        main([*base, "--method=redilation", "--method_args=redenoise.t0=300"])


def test_sample_without_checkpoint_says_what_is_missing(tiny_config_file):
    with pytest.raises(ValueError, match="needs a trained model: pass --ckpt_path"):
        main(["sample", "--config", str(tiny_config_file())])


def test_fit_on_a_folder_of_images(tiny_config_file, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 100, 50)).save(root / f"{i}.png")
    config = tiny_config_file(**{"data.source": "folder", "data.root": str(root), "data.image_size": 32,
                                 "trainer.max_steps": 2})
    main(["fit", "--config", str(config)])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_the_csv_log_follows_default_root_dir(tiny_config_file, tmp_path, monkeypatch):
    """The quickstart's logger (CSVRun without save_dir) writes under --trainer.default_root_dir, not ./runs."""
    monkeypatch.chdir(tmp_path)
    logger = {"class_path": "mrdiff.loggers.CSVRun", "init_args": {"name": "logs"}}
    config = tiny_config_file(**{"trainer.logger": logger, "trainer.max_steps": 2, "trainer.log_every_n_steps": 1})
    main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'elsewhere'}"])
    metrics = (tmp_path / "elsewhere" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith(("epoch", "lr", "step", "train")) and len(metrics) >= 3  # header + 2 steps
    assert not (tmp_path / "logs").exists()  # nothing under the working directory


def test_console_lines_come_from_rank_zero_only(capsys, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from mrdiff.console import info

    info("mrdiff: on rank zero")
    info("mrdiff: warning: to stderr", stderr=True)
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning sets in every other DDP process
    info("mrdiff: on rank one")
    out, err = capsys.readouterr()
    assert out == "mrdiff: on rank zero\n" and err == "mrdiff: warning: to stderr\n"


def test_a_fit_on_a_celeba_tree_trains_on_the_cropped_resized_faces(tmp_path):
    """data.source=celeba through `mrdiff fit`: JPEGs under root/celeba/img_align_celeba, centre-cropped to
    celeba_crop and resized; the training patches come from those images (a known colour per file)."""
    from mrdiff.checkpoint import load_checkpoint

    root = tmp_path / "data"
    (root / "celeba" / "img_align_celeba").mkdir(parents=True)
    for i in range(8):  # a red border outside the 140-pixel centre crop must never reach training
        image = Image.new("RGB", (178, 218), (250, 0, 0))
        image.paste(Image.new("RGB", (140, 140), (0, 30 * i, 200)), (19, 39))
        image.save(root / "celeba" / "img_align_celeba" / f"{i:06d}.jpg", quality=95)
    config = tmp_path / "celeba.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", **{
        "data.source": "celeba", "data.root": str(root), "data.image_size": 32, "data.num_scenes": 1,
        "data.num_val": 2})))
    cli = MrdiffCLI(args=["fit", "--config", str(config)])
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert ckpt["global_step"] == 4
    batch = next(iter(cli.datamodule.train_dataloader()))
    red = batch["image"][:, 0]  # [−1, 1]: the crop holds red 0 (−1); the border's 250 would be near +1
    assert batch["image"].shape[-2:] == (16, 16) and red.max() < -0.5  # JPEG chroma bleeds a little at the edge
    assert torch.allclose(batch["image"][:, 2].mean(), torch.tensor(200 / 127.5 - 1), atol=0.05)
