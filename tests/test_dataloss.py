"""Issue 16: no mrdiff command destroys or silently corrupts a previous run; known errors are one line.

Every test goes through the real entry point (`mrdiff.cli.main([...])` or `python -m mrdiff`).
"""

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

from mrdiff.checkpoint import CheckpointError, load_checkpoint
from mrdiff.cli import OVERWRITE_ENV, MrdiffCLI, main
from mrdiff.diffusion.noiseshift import weights_hash
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = {"class_path": "mrdiff.callbacks.noiseshift.NoiseShiftCalibration",
               "init_args": {"resolutions": [16], "steps": 3, "num_images": 2, "coarse_stride": 0.05,
                             "fine_window": 0.01, "fine_stride": 0.005, "max_batch": 64}}


def write_config(path: Path, run_dir: Path, *callbacks: dict, **overrides) -> Path:
    config = tiny_config(run_dir, **overrides)
    config["trainer"]["callbacks"] += list(callbacks)
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A 3-step fit (checkpoints at step 2 by validation, 3 at the end) with a NoiseShift table at fit end."""
    tmp = tmp_path_factory.mktemp("fitted")
    config = write_config(tmp / "fit.yaml", tmp / "run", CALIBRATION, **{"trainer.max_steps": 3})
    main(["fit", "--config", str(config)])
    return tmp / "run"


@pytest.fixture
def run(fitted, tmp_path) -> Path:
    """A private copy of the fitted run; tmp_path/fit.yaml is its config (as fit.yaml was for the original)."""
    run_dir = Path(shutil.copytree(fitted, tmp_path / "run"))
    write_config(tmp_path / "fit.yaml", run_dir, CALIBRATION, **{"trainer.max_steps": 3})
    return run_dir


# -- 1. --ckpt_path last resumes with any logger -----------------------------------------------------------


LOGGERS = {
    "csv": lambda run_dir: {"class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": str(run_dir), "name": "logs"}},
    "wandb": lambda run_dir: {"class_path": "mrdiff.loggers.WandbRun", "init_args": {"project": "mrdiff-test"}},
}


@pytest.mark.parametrize("logger", sorted(LOGGERS))
def test_ckpt_path_last_resumes_the_quickstart_config_with_its_logger(tmp_path, logger):
    """configs/quickstart.yaml (CSVLogger) shrunk by a second config; and the same with WandbRun.

    In subprocesses: a wandb session (here WANDB_MODE=disabled) would outlive the test in this process.
    """
    run_dir = tmp_path / "run"
    tiny = tiny_config(run_dir, **{"trainer.max_steps": 2, "trainer.precision": "32-true",
                                   "trainer.logger": LOGGERS[logger](run_dir)})
    tiny["trainer"]["callbacks"].append({"class_path": "tests.helpers.RecordBatches"})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(tmp_path / "tiny.yaml")]
    starts = []
    for extra in ([], ["--trainer.max_steps=4", "--ckpt_path=last"]):
        done = mrdiff(*args, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        (record,) = run_dir.glob("batches_rank0_*.json")  # RecordBatches, one per fit (removed below)
        starts.append(json.loads(record.read_text())["start_step"])
        record.unlink()
    assert starts == [0, 2]  # the second fit resumed at step 2 instead of starting over
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4


# -- 2. a second fit into a run dir that holds checkpoints ----------------------------------------------


def test_second_fit_into_a_run_dir_is_refused_before_writing(run, monkeypatch):
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=rf"already holds checkpoints .*last.ckpt.*--ckpt_path last.*"
                                              rf"{OVERWRITE_ENV}=1"):
        main(["fit", "--config", str(run.parent / "fit.yaml")])
    assert snapshot(run) == before  # last.ckpt and config.yaml byte-identical
    monkeypatch.setenv(OVERWRITE_ENV, "1")
    main(["fit", "--config", str(run.parent / "fit.yaml"), "--trainer.max_steps=1"])
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 1  # asked for: written over


# -- 3. resuming with a config that does not fit the checkpoint -----------------------------------------


def test_resume_with_another_model_fails_before_config_yaml_is_written(run):
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"last.ckpt does not fit this model: net.time_embed.0.weight is "
                                              r"\(64, 16\) in the checkpoint, \(32, 8\) in the model \(and \d+ "
                                              r"more\).*nothing was written"):
        main(["fit", "--config", str(run.parent / "fit.yaml"), "--model.net.init_args.base_channels=8",
              "--trainer.max_steps=5", "--ckpt_path=last"])
    assert snapshot(run) == before


# -- 4. NoiseShift tables with impossible values --------------------------------------------------------


def test_sample_refuses_a_table_with_nan_before_writing_samples(run, tmp_path):
    doc = json.loads((run / "noiseshift.json").read_text())
    doc["resolutions"]["16"]["t_hat"][1] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"nan.json is malformed .*resolution 16: calibration t_hat holds "
                                         r"non-finite"):
        main(["sample", "--config", str(run.parent / "fit.yaml"), f"--ckpt_path={run}/checkpoints/last.ckpt",
              "--resolutions=[16]", "--num_samples=1", "--steps=2", f"--noiseshift={tmp_path / 'nan.json'}"])
    assert not (run / "samples").exists()


# -- 5. `mrdiff test` leaves the fit's config.yaml alone ------------------------------------------------


def test_mrdiff_test_keeps_the_fits_config_yaml(run, tmp_path):
    evaluation = {"class_path": "mrdiff.callbacks.evaluation.ResolutionEvaluation",
                  "init_args": {"resolutions": [16], "num_samples": 2, "steps": 2, "batch_size": 2,
                                "fid": False, "progress": False}}
    config = write_config(tmp_path / "test.yaml", run, evaluation)
    before = (run / "config.yaml").read_bytes()
    main(["test", "--config", str(config), f"--ckpt_path={run}/checkpoints/last.ckpt"])
    assert (run / "eval_table.json").is_file()  # the test ran and wrote its table into the run dir
    assert (run / "config.yaml").read_bytes() == before


# -- 6. the end-of-fit table names the weights of the final last.ckpt -----------------------------------


def test_end_of_fit_table_names_the_final_weights_and_only_they_accept_it(run, tmp_path):
    last = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 3  # saved at the end, after the step-2 validation checkpoint
    cli = MrdiffCLI(args=["--config", str(run.parent / "fit.yaml")], run=False)
    cli.model.load_state_dict(ckpt["state_dict"])
    table = json.loads((run / "noiseshift.json").read_text())
    assert table["weights"] == weights_hash(cli.model)
    sample = ["sample", "--config", str(run.parent / "fit.yaml"), "--resolutions=[16]", "--num_samples=1",
              "--steps=2", f"--noiseshift={run / 'noiseshift.json'}"]
    main([*sample, f"--ckpt_path={last}", f"--out_dir={tmp_path / 'ok'}"])
    assert (tmp_path / "ok" / "samples_16_noiseshift.png").is_file()
    ckpt["state_dict"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    other = tmp_path / "other" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    torch.save(ckpt, other)
    with pytest.raises(ValueError, match=rf"calibrated for weights {table['weights']} but the model's weights "
                                         r"hash is [0-9a-f]{16}"):
        main([*sample, f"--ckpt_path={other}", f"--out_dir={tmp_path / 'refused'}"])
    assert not (tmp_path / "refused").exists()


# -- every resolution is checked against the table before any sampling -----------------------------------


def test_sample_checks_every_resolution_against_the_table_before_sampling(run, tmp_path):
    with pytest.raises(ValueError, match=r"no NoiseShift calibration for resolution 16x32; present: \['16'\]"):
        main(["sample", "--config", str(run.parent / "fit.yaml"), f"--ckpt_path={run}/checkpoints/last.ckpt",
              "--resolutions=[16,16x32]", "--num_samples=1", "--steps=2", f"--noiseshift={run / 'noiseshift.json'}",
              f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()  # 16 was not written before 16x32 failed


# -- one clear line --------------------------------------------------------------------------------------


def mrdiff(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mrdiff", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def nan_table(run: Path) -> str:
    doc = json.loads((run / "noiseshift.json").read_text())
    doc["resolutions"]["16"]["t_hat"][0] = float("nan")
    (run / "nan.json").write_text(json.dumps(doc))
    return str(run / "nan.json")


def truncated(run: Path) -> str:
    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "truncated.ckpt").write_bytes(whole[: len(whole) // 3])
    return str(run / "truncated.ckpt")


LAST = "--ckpt_path={run}/checkpoints/last.ckpt"
SAMPLE = ["sample", "--config={run}/../fit.yaml", "--resolutions=[16]", "--num_samples=1", "--steps=2"]
BAD_INPUTS = {  # name: (arguments, the message it must print)
    "second fit into a run": (["fit", "--config={run}/../fit.yaml"], "already holds checkpoints"),
    "resume with another model": (["fit", "--config={run}/../fit.yaml", "--ckpt_path=last",
                                   "--model.net.init_args.base_channels=8"], "does not fit this model"),
    "table with NaN": ([*SAMPLE, LAST, "--noiseshift={nan_table}"], "t_hat holds non-finite"),
    "resolution missing from the table": ([*SAMPLE, LAST, "--resolutions=[16,16x32]",
                                           "--noiseshift={run}/noiseshift.json"],
                                          "no NoiseShift calibration for resolution 16x32"),
    "missing checkpoint": ([*SAMPLE, "--ckpt_path={run}/nope.ckpt"], "nope.ckpt does not exist"),
    "truncated checkpoint": ([*SAMPLE, "--ckpt_path={truncated}"], "truncated or corrupt"),
    "sample without checkpoint": (SAMPLE, "needs a trained model: pass --ckpt_path"),
    "missing table": ([*SAMPLE, LAST, "--noiseshift={run}/none.json"], "none.json does not exist"),
    "no samples asked for": ([*SAMPLE, LAST, "--num_samples=0"], "--num_samples must be at least 1"),
    "resolution with a missing width": ([*SAMPLE, LAST, '--resolutions=["64x"]'], "is neither N nor HxW"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(run, case):
    args, message = BAD_INPUTS[case]
    values = {"run": run, "nan_table": nan_table(run), "truncated": truncated(run)}
    before = snapshot(run)
    done = mrdiff(*(a.format(**values) for a in args))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) <= 3 and lines[-1].startswith("mrdiff: error: ") and message in lines[-1], lines
    assert "Traceback" not in done.stderr
    assert snapshot(run) == before


def test_mrdiff_debug_shows_the_traceback(run):
    done = mrdiff(*(a.format(run=run) for a in SAMPLE), env={"MRDIFF_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "needs a trained model" in done.stderr
