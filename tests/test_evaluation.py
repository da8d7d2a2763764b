"""`mrdiff test` with ResolutionEvaluation (table, NoiseShift row, DDP = single process) and SampleGrid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mrdiff.cli import MrdiffCLI, main
from mrdiff.data.synthetic import reference_radii
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.metrics.fid import WEIGHTS_ENV, InceptionWeightsError
from mrdiff.metrics.structure import structure_score
from tests.conftest import ROOT, tiny_config

EVALUATION = "mrdiff.callbacks.evaluation.ResolutionEvaluation"
MOCK_FEATURES = '''
import torch
from torch import nn


class ColourFeatures(nn.Module):
    """Per-channel mean and std, and the mean of the top and bottom halves: 12 features in [0, 1]."""

    num_features = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        half = x.shape[-2] // 2
        parts = [x.mean((2, 3)), x.std((2, 3)), x[..., :half, :].mean((2, 3)), x[..., half:, :].mean((2, 3))]
        return torch.cat(parts, dim=1)
'''


def write_config(path: Path, run_dir: Path, *callbacks: dict) -> Path:
    """The tiny config with extra callbacks after EMA and checkpointing."""
    config = tiny_config(run_dir)
    config["trainer"]["callbacks"] += list(callbacks)
    path.write_text(yaml.safe_dump(config))
    return path


def evaluation(**init_args) -> dict:
    args = {"resolutions": [16, 24], "num_samples": 4, "sampling": {"steps": 3}, "batch_size": 4, "progress": False,
            **init_args}
    return {"class_path": EVALUATION, "init_args": args}


def copy_checkpoint(ckpt: Path, run_dir: Path) -> Path:
    """The checkpoint under a fresh run directory (<run>/checkpoints/last.ckpt), so outputs do not mix."""
    (run_dir / "checkpoints").mkdir(parents=True)
    return Path(shutil.copy(ckpt, run_dir / "checkpoints" / "last.ckpt"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-step fit with sample grids every 2 steps and an in-fit evaluation every epoch: (run dir, ckpt)."""
    tmp = tmp_path_factory.mktemp("fit")
    grid = {"class_path": "mrdiff.callbacks.sample_grid.SampleGrid",
            "init_args": {"resolutions": [16, "16x24"], "num_samples": 4, "every_n_steps": 2, "sampling": {"steps": 2}}}
    during_fit = evaluation(resolutions=[16], num_samples=2, sampling={"steps": 2}, fid=False, every_n_epochs=1)
    config = write_config(tmp / "fit.yaml", tmp / "run", grid, during_fit)
    main(["fit", "--config", str(config)])
    return tmp / "run", tmp / "run" / "checkpoints" / "last.ckpt"


def test_sample_grid_writes_a_png_per_resolution_at_the_configured_steps(trained):
    run_dir, _ = trained
    names = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert names == ["step_2_16.png", "step_2_16x24.png", "step_4_16.png", "step_4_16x24.png"]
    for step in (2, 4):
        with Image.open(run_dir / "samples" / f"step_{step}_16x24.png") as grid:
            assert grid.size == (2 * 24 + 6, 2 * 16 + 6)  # 2x2 grid of 16x24 samples, 2-pixel padding
    assert (run_dir / "eval_table_step4.json").is_file()  # the in-fit evaluation after epoch 1 (4 batches)


def load_model(config: Path, ckpt: Path):
    from mrdiff.checkpoint import load_weights

    cli = MrdiffCLI(args=["--config", str(config)], run=False)
    load_weights(cli.model, str(ckpt))
    return cli.model.eval(), cli.datamodule


def test_mrdiff_test_prints_and_writes_the_table(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    _, ckpt = trained
    ckpt = copy_checkpoint(ckpt, tmp_path / "run")
    config = write_config(tmp_path / "test.yaml", tmp_path / "other", evaluation(analytic_shift=True))
    cli = MrdiffCLI(args=["test", "--config", str(config), f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert "FID and KID skipped" in out and "| mrdiff + analytic shift |" in out and "one-sun rate" in out
    table = json.loads((tmp_path / "run" / "eval_table.json").read_text())  # the checkpoint's run dir
    assert table["columns"] == ["16", "24"]
    assert table["metrics"] == ["one_sun_rate", "stacked_horizon_rate", "radius_error", "spectrum_distance"]
    assert table["settings"]["global_step"] == 4 and table["settings"]["checkpoint"] == str(ckpt)
    assert [row["variant"] for row in table["rows"]] == ["mrdiff", "mrdiff + analytic shift"]
    assert {p.name for p in (tmp_path / "run").glob("eval_*")} >= {"eval_table.md", "eval_table.csv",
                                                                    "eval_plot.png"}
    # the cell is the structure score of seeds 0..3 sampled from the checkpoint
    model, data = load_model(config, ckpt)
    images = model.pipeline.sample([0, 1, 2, 3], 24, 24, sampling=SamplingSettings(steps=3))
    radii = reference_radii(1000, data.hparams.seed)
    expected = structure_score(images, reference_radii=radii, resolution="24")
    cell = table["rows"][0]["cells"]["24"]
    assert cell["one_sun_rate"] == pytest.approx(expected.one_sun_rate)
    assert cell["stacked_horizon_rate"] == pytest.approx(expected.stacked_horizon_rate)
    assert cell["mean_num_suns"] == pytest.approx(expected.mean_num_suns)
    assert cell["one_sun_rate_lo"] <= cell["one_sun_rate"] <= cell["one_sun_rate_hi"]  # Wilson, n = 4
    assert "| mrdiff | " in out and " [" in out  # the printed cells carry their intervals
    metrics = cli.trainer.callback_metrics
    assert float(metrics["test/one_sun_rate_24"]) == pytest.approx(expected.one_sun_rate)
    # a radius error is logged exactly when the cell has one (nan, no sun found, is left out of the metrics)
    has_radius = table["rows"][1]["cells"]["16"]["radius_error"] is not None
    assert ("test/radius_error_16_analytic" in metrics) == has_radius


def test_mrdiff_test_and_the_evidence_report_score_the_same_cell_the_same(trained, tmp_path):
    """One cell code: `mrdiff test` (ResolutionEvaluation) and the evidence matrix, given the same weights,
    seeds, sampler and size, report the same structure numbers with the same intervals, and the upsample row
    (now in both) is the plain samples at R upsampled."""
    from mrdiff.evaluation.matrix import Matrix, Settings

    _, ckpt = trained
    ckpt = copy_checkpoint(ckpt, tmp_path / "run")
    config = write_config(tmp_path / "test.yaml", tmp_path / "other", evaluation(resolutions=[24], upsample=True))
    main(["test", "--config", str(config), f"--ckpt_path={ckpt}"])
    table = json.loads((tmp_path / "run" / "eval_table.json").read_text())
    by_row = {row["variant"]: row["cells"]["24"] for row in table["rows"]}
    model, data = load_model(config, ckpt)
    matrix = Matrix(Settings(resolutions=[(24, 24)], num_samples=4, sampling=SamplingSettings(steps=3),
                             batch_size=4, num_reference=8, variants=("plain",), upsample=("mrdiff",)))
    matrix.radii = reference_radii(1000, data.hparams.seed)  # the data's scenes: the radii `mrdiff test` uses
    matrix.model("mrdiff", model.pipeline, {"global_step": 4})
    for row in ("mrdiff", "mrdiff + upsample"):
        evidence = matrix.cells[row]["24"]
        for metric in ("one_sun_rate", "mean_num_suns", "stacked_horizon_rate"):
            for suffix in ("", "_lo", "_hi"):
                assert by_row[row][metric + suffix] == pytest.approx(evidence[metric + suffix]), (row, metric)


def test_mrdiff_test_has_the_training_free_rows_above_r_scored_as_the_evidence_report_scores_them(trained, tmp_path):
    """`training_free` adds a row per method above the training size only; re-denoising from t₀ = 0 is the
    upsample row, image for image; re-dilation's cell equals the evidence matrix's for the same seeds."""
    from mrdiff.evaluation.matrix import Matrix, Settings

    _, ckpt = trained
    ckpt = copy_checkpoint(ckpt, tmp_path / "run")
    config = write_config(tmp_path / "test.yaml", tmp_path / "other",
                          evaluation(resolutions=[16, 32], upsample=True, training_free=["redilation", "redenoise"],
                                     training_free_args="redilation.share=1.0,redenoise.t0=0"))
    main(["test", "--config", str(config), f"--ckpt_path={ckpt}"])
    table = json.loads((tmp_path / "run" / "eval_table.json").read_text())
    cells = {row["variant"]: row["cells"] for row in table["rows"]}
    assert list(cells) == ["mrdiff", "mrdiff + upsample", "mrdiff + redilation", "mrdiff + redenoise"]
    assert table["settings"]["training_free_args"] == {"redilation": {"share": 1.0}, "redenoise": {"t0": 0}}
    for row in ("mrdiff + upsample", "mrdiff + redilation", "mrdiff + redenoise"):
        assert cells[row]["16"].get("one_sun_rate") is None and cells[row]["32"]["one_sun_rate"] is not None
    for metric in ("one_sun_rate", "mean_num_suns", "spectrum_distance", "neighbour_difference"):
        assert cells["mrdiff + redenoise"]["32"][metric] == cells["mrdiff + upsample"]["32"][metric], metric
    model, data = load_model(config, ckpt)
    matrix = Matrix(Settings(resolutions=[(32, 32)], num_samples=4, sampling=SamplingSettings(steps=3),
                             batch_size=4, num_reference=8, variants=("redilation",),
                             variant_args={"redilation": {"share": 1.0}}))
    matrix.radii = reference_radii(1000, data.hparams.seed)
    matrix.model("mrdiff", model.pipeline, {"global_step": 4})
    evidence = matrix.cells["mrdiff + redilation"]["32"]
    for metric in ("one_sun_rate", "mean_num_suns", "stacked_horizon_rate"):  # detail: other reference sets
        for suffix in ("", "_lo", "_hi"):
            assert cells["mrdiff + redilation"]["32"][metric + suffix] == pytest.approx(evidence[metric + suffix])
    plain = cells["mrdiff"]["32"]["spectrum_distance"]  # re-dilated samples are other samples than plain ones
    assert cells["mrdiff + redilation"]["32"]["spectrum_distance"] != pytest.approx(plain, rel=1e-6)


def test_training_free_args_for_a_method_not_asked_for_fail_in_one_line(trained, tmp_path, capsys):
    config = write_config(tmp_path / "test.yaml", tmp_path / "run",
                          evaluation(training_free=["redilation"], training_free_args="redenoise.t0=300"))
    with pytest.raises(SystemExit) as raised:
        main(["test", "--config", str(config), f"--ckpt_path={trained[1]}"], exit_on_error=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and err[0].startswith("mrdiff: error:"), err
    assert "training_free_args sets ['redenoise'], not among training_free ['redilation']" in err[0]
    assert not (tmp_path / "run" / "eval_table.json").exists()


def calibrated_run(ckpt: Path, run_dir: Path, resolutions: str) -> tuple[Path, Path]:
    """The checkpoint copied into run_dir and a CPU-sized `mrdiff calibrate` of it: (ckpt, table path)."""
    ckpt = copy_checkpoint(ckpt, run_dir)
    config = write_config(run_dir.parent / "fit.yaml", run_dir)
    main(["calibrate", "--config", str(config), f"--ckpt_path={ckpt}", f"--resolutions={resolutions}", "--steps=3",
          "--num_images=2", "--coarse_stride=0.05", "--fine_window=0.01", "--fine_stride=0.005"])
    return ckpt, run_dir / "noiseshift.json"


def test_a_noiseshift_table_adds_a_row(trained, tmp_path):
    ckpt, table_path = calibrated_run(trained[1], tmp_path / "run", "[16,24]")
    config = write_config(tmp_path / "test.yaml", tmp_path / "run",
                          evaluation(noiseshift=str(table_path), fid=False))
    main(["test", "--config", str(config), f"--ckpt_path={ckpt}"])
    table = json.loads((tmp_path / "run" / "eval_table.json").read_text())
    assert [row["variant"] for row in table["rows"]] == ["mrdiff", "mrdiff + NoiseShift"]
    assert table["columns"] == ["16", "24"] and table["settings"]["noiseshift"] == str(table_path)
    assert all(0 <= row["cells"][r]["one_sun_rate"] <= 1 for row in table["rows"] for r in ("16", "24"))


def test_the_noiseshift_row_feeds_the_tables_t_hat_and_auto_finds_the_run_dirs_table(trained, tmp_path,
                                                                                      monkeypatch):
    """noiseshift: auto picks up <run dir>/noiseshift.json, and that row's network calls get t̂, not t."""
    from mrdiff.pipeline import DiffusionPipeline

    ckpt, path = calibrated_run(trained[1], tmp_path / "run", "[16]")
    doc = json.loads(path.read_text())
    row = doc["resolutions"]["16"]
    row["t_hat"] = [max(t - 7.0, 0.0) for t in row["t"]]  # a shift the row must show (same weights named)
    row["band_lo"], row["band_hi"] = row["t_hat"], [t + 1 for t in row["t_hat"]]
    path.write_text(json.dumps(doc))
    fed: dict[str, list[float]] = {}
    original = DiffusionPipeline.sample

    def recording(self, seeds, height, width=None, *, time_cond=None, **kwargs):
        t = torch.tensor(row["t"])
        fed["plain" if time_cond is None else "noiseshift"] = (t if time_cond is None else time_cond(t)).tolist()
        return original(self, seeds, height, width, time_cond=time_cond, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "sample", recording)
    config = write_config(tmp_path / "test.yaml", tmp_path / "run",
                          evaluation(resolutions=[16], noiseshift="auto", fid=False))
    main(["test", "--config", str(config), f"--ckpt_path={ckpt}"])
    table = json.loads((tmp_path / "run" / "eval_table.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["mrdiff", "mrdiff + NoiseShift"]
    assert fed["plain"] == row["t"] and fed["noiseshift"] == pytest.approx(row["t_hat"])
    assert fed["noiseshift"] != fed["plain"]


def test_calibrate_and_sample_take_unset_options_from_the_configs_callbacks(trained, tmp_path, capsys):
    """`calibrate --config X` searches as X's NoiseShiftCalibration does, and `sample --config X` draws as X's
    SampleGrid does; an option given on the command line wins over the config's."""
    from mrdiff.diffusion.samplers import dpm_solver_timesteps
    from mrdiff.noiseshift.table import NoiseShiftTable

    ckpt = copy_checkpoint(trained[1], tmp_path / "run")
    search = {"resolutions": ["16x24"], "sampling": {"sampler": "dpmpp_2m", "steps": 3},
              "search": {"num_images": 2, "coarse_window": 0.04, "coarse_stride": 0.02, "fine_window": 0.01,
                         "fine_stride": 0.005, "k": 1.5}}
    grid = {"resolutions": [24], "num_samples": 1, "sampling": {"sampler": "dpmpp_2m", "steps": 2}}
    config = write_config(tmp_path / "fit.yaml", tmp_path / "run",
                          {"class_path": "mrdiff.callbacks.noiseshift.NoiseShiftCalibration", "init_args": search},
                          {"class_path": "mrdiff.callbacks.sample_grid.SampleGrid", "init_args": grid})
    main(["calibrate", "--config", str(config), f"--ckpt_path={ckpt}", "--fine_stride=0.01"])
    table = NoiseShiftTable.load(tmp_path / "run" / "noiseshift.json")
    assert table.resolutions() == ["16x24"]
    assert {k: table.settings[k] for k in ("num_images", "coarse_window", "coarse_stride", "fine_stride", "k")} == {
        "num_images": 2, "coarse_window": 0.04, "coarse_stride": 0.02, "fine_stride": 0.01, "k": 1.5}
    model, _ = load_model(config, ckpt)
    assert sorted(table["16x24"].t) == sorted(dpm_solver_timesteps(model.schedule, 3))  # not DDIM-50
    main(["sample", "--config", str(config), f"--ckpt_path={ckpt}", "--steps=1"])
    assert "wrote 16 samples at 24x24" in capsys.readouterr().out
    assert Image.open(tmp_path / "run" / "samples" / "samples_24.png").size == (4 * 24 + 10, 4 * 24 + 10)
    # 24² is not in the table: an error names the option, and --noiseshift_fallback nearest uses 16x24's row
    table_args = [f"--noiseshift={tmp_path / 'run' / 'noiseshift.json'}", "--num_samples=1"]
    with pytest.raises(ValueError, match="no NoiseShift calibration for resolution 24.*--noiseshift_fallback"):
        main(["sample", "--config", str(config), f"--ckpt_path={ckpt}", *table_args])
    main(["sample", "--config", str(config), f"--ckpt_path={ckpt}", *table_args, "--noiseshift_fallback=nearest"])
    assert (tmp_path / "run" / "samples" / "samples_24_noiseshift.png").is_file()


def test_one_progress_bar_counts_every_network_call_of_the_evaluation(trained, tmp_path, capsys):
    """2 rows × 2 sizes × 2 batches × 3 DDIM calls = 24 ticks on one bar, not a 0/1 bar per cell."""
    ckpt = copy_checkpoint(trained[1], tmp_path / "run")
    config = write_config(tmp_path / "test.yaml", tmp_path / "run",
                          evaluation(progress=True, analytic_shift=True, num_samples=3, batch_size=2, fid=False))
    # Lightning's bars on, as users run it (the tiny config turns them off)
    main(["test", "--config", str(config), f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=true"])
    err = capsys.readouterr().err
    assert "24/24" in err and "test evaluation (ddim-3, network calls)" in err
    assert "/1 [" not in err and "\x1b[A" not in err  # no per-cell bars, no cursor-up remnants


def test_fid_on_without_weights_fails_before_sampling(trained, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    config = write_config(tmp_path / "test.yaml", tmp_path / "run", evaluation(fid=True))
    with pytest.raises(InceptionWeightsError, match=WEIGHTS_ENV):
        main(["test", "--config", str(config), f"--ckpt_path={trained[1]}"])
    assert not list(tmp_path.rglob("eval_table*"))


def run_test(world: int, tmp_path: Path, trained_ckpt: Path) -> tuple[dict, str]:
    """`mrdiff test` at 16² and 24² with mock features, in-process (1) or as a 2-process CPU DDP run (2)."""
    ckpt = copy_checkpoint(trained_ckpt, tmp_path / f"run{world}")
    callback = evaluation(num_samples=6, batch_size=2, sampling={"steps": 2}, cache_dir=str(tmp_path / f"cache{world}"),
                          feature_extractor={"class_path": "mock_features.ColourFeatures"})
    config = write_config(tmp_path / f"test{world}.yaml", tmp_path / f"run{world}", callback)
    args = ["test", "--config", str(config), f"--ckpt_path={ckpt}"]
    stdout = ""
    if world == 1:
        main(args)
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
        ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
        done = subprocess.run([sys.executable, "-m", "mrdiff", *args, *ddp], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        stdout = done.stdout
    return json.loads((tmp_path / f"run{world}" / "eval_table.json").read_text()), stdout


@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_numbers(trained, tmp_path, monkeypatch):
    (tmp_path / "mock_features.py").write_text(MOCK_FEATURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    single, _ = run_test(1, tmp_path, trained[1])
    # DDP finds the 16² real statistics in its cache (rank 0 loads them) and computes 24² on both ranks
    (tmp_path / "cache2").mkdir()
    for cached in (tmp_path / "cache1").glob("real_16x16_*.npz"):
        shutil.copy(cached, tmp_path / "cache2")
    ddp, stdout = run_test(2, tmp_path, trained[1])
    assert ddp["settings"]["world_size"] == 2
    assert "16x16 (N=6) loaded from cache" in stdout and "24x24 (N=6) cached in" in stdout
    for res in ("16", "24"):
        one, two = single["rows"][0]["cells"][res], ddp["rows"][0]["cells"][res]
        assert one["fid"] > 0 and two["fid"] == pytest.approx(one["fid"], rel=1e-4)
        assert two["fid_n"] == one["fid_n"] == 6
        assert two["mean_num_suns"] == one["mean_num_suns"]
        assert two["spectrum_distance"] == pytest.approx(one["spectrum_distance"])  # seed order kept by gather
        assert two["one_sun_rate"] == one["one_sun_rate"]


def test_sample_grid_leaves_the_raw_training_weights_and_train_mode(tiny_config_file):
    """SampleGrid samples with the EMA weights in eval mode mid-fit, then restores the raw weights and train mode."""
    from mrdiff.cli import MrdiffCLI
    from tests.helpers import WeightProbe

    grid = {"class_path": "mrdiff.callbacks.sample_grid.SampleGrid",
            "init_args": {"resolutions": [16], "num_samples": 2, "sampling": {"steps": 2}, "every_n_steps": 2}}
    config = tiny_config_file(**{"trainer.max_steps": 4, "trainer.limit_val_batches": 0})
    cli = MrdiffCLI(args=["--config", str(config), f"--trainer.callbacks+={json.dumps(grid)}"], run=False)
    before, after = WeightProbe(), WeightProbe()
    sampling = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "SampleGrid"]
    index = cli.trainer.callbacks.index(sampling[0])
    cli.trainer.callbacks[index:index + 1] = [before, sampling[0], after]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(before.seen) == len(after.seen) == 4
    for (state_before, training_before), (state_after, training_after) in zip(before.seen, after.seen):
        assert training_before and training_after
        assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    # and the EMA weights really differ from the raw ones, so a missing swap-back would have been seen
    ema = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EMA")
    averaged = ema._average_model.module.state_dict()
    assert any(not torch.equal(averaged[k], before.seen[-1][0][k]) for k in averaged if k in before.seen[-1][0])


def test_in_fit_evaluation_leaves_the_raw_training_weights_and_train_mode(tiny_config_file, tmp_path):
    """ResolutionEvaluation every epoch mid-fit: EMA weights in eval mode for sampling, then the raw weights
    and train mode back, exactly (probes on either side of it in the callback list)."""
    from tests.helpers import WeightProbe

    callback = evaluation(resolutions=[16], num_samples=2, sampling={"steps": 2}, batch_size=2, every_n_epochs=1,
                          fid=False)
    config = tiny_config_file(**{"trainer.max_steps": 6, "trainer.limit_val_batches": 0})
    cli = MrdiffCLI(args=["--config", str(config), f"--trainer.callbacks+={json.dumps(callback)}"], run=False)
    before, after = WeightProbe(), WeightProbe()
    index = next(i for i, cb in enumerate(cli.trainer.callbacks) if type(cb).__name__ == "ResolutionEvaluation")
    cli.trainer.callbacks[index:index + 1] = [before, cli.trainer.callbacks[index], after]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(before.seen_at_epoch_end) == len(after.seen_at_epoch_end) == 2  # 3 steps per epoch
    assert len(list((tmp_path / "run").glob("eval_table_step*.md"))) == 2  # it did evaluate, twice
    for (state_before, training_before), (state_after, training_after) in zip(before.seen_at_epoch_end,
                                                                              after.seen_at_epoch_end):
        assert training_before and training_after
        assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
