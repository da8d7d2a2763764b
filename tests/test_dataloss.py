"""Issue 16: no mrdiff command destroys or silently corrupts a previous run; known errors are one line.

Every test goes through the real entry point (`mrdiff.cli.main([...])` or `python -m mrdiff`).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mrdiff.checkpoint import CheckpointError, load_checkpoint
from mrdiff.cli import MrdiffCLI, main
from mrdiff.noiseshift.weights import weights_hash
from mrdiff.rundir import OVERWRITE_ENV
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = {"class_path": "mrdiff.callbacks.noiseshift.NoiseShiftCalibration",
               "init_args": {"resolutions": [16], "sampling": {"steps": 3},
                             "search": {"num_images": 2, "coarse_stride": 0.05, "fine_window": 0.01,
                                        "fine_stride": 0.005, "max_batch": 64}}}


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


@pytest.mark.slow
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
                  "init_args": {"resolutions": [16], "num_samples": 2, "sampling": {"steps": 2}, "batch_size": 2,
                                "fid": False, "progress": False}}
    config = write_config(tmp_path / "test.yaml", run, evaluation)
    before = (run / "config.yaml").read_bytes()
    main(["test", "--config", str(config), f"--ckpt_path={run}/checkpoints/last.ckpt"])
    assert (run / "eval_table.json").is_file()  # the test ran and wrote its table into the run dir
    assert (run / "config.yaml").read_bytes() == before


def test_a_second_mrdiff_test_keeps_the_first_evaluation_table(run, tmp_path):
    evaluation = {"class_path": "mrdiff.callbacks.evaluation.ResolutionEvaluation",
                  "init_args": {"resolutions": [16], "num_samples": 2, "sampling": {"steps": 2}, "batch_size": 2,
                                "fid": False, "progress": False}}
    config = write_config(tmp_path / "test.yaml", run, evaluation)
    args = ["test", "--config", str(config), f"--ckpt_path={run}/checkpoints/last.ckpt"]
    main(args)
    first = {ext: (run / f"eval_table.{ext}").read_bytes() for ext in ("md", "csv", "json")}
    main(args)
    assert {ext: (run / f"eval_table.{ext}").read_bytes() for ext in ("md", "csv", "json")} == first
    assert all((run / f"eval_table-2.{ext}").is_file() for ext in ("md", "csv", "json"))
    assert (run / "eval_plot.png").is_file() and (run / "eval_plot-2.png").is_file()


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


def mrdiff(*args: str, env: dict[str, str] | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    """`python -m mrdiff args` in a subprocess; `fsize` limits the size of any file it writes (RLIMIT_FSIZE)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           **(env or {})}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    return subprocess.run([sys.executable, "-m", "mrdiff", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, preexec_fn=limit)


def edited_table(run: Path, name: str, edit) -> str:
    """A copy of the run's NoiseShift table with `edit(doc)` applied, in run/<name>."""
    doc = json.loads((run / "noiseshift.json").read_text())
    edit(doc)
    (run / name).write_text(json.dumps(doc))
    return str(run / name)


def bad_inputs(run: Path) -> dict[str, str]:
    """The broken files and folders the table refers to, made beside the run (inside the snapshot)."""
    root = run.parent
    for name in ("empty", "corrupt", "small"):
        (root / name).mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    for folder, size in (("corrupt", (40, 40)), ("small", (40, 40))):
        for i in range(3):
            Image.new("RGB", size, (200, 30, 60)).save(root / folder / f"ok{i}.png")
    (root / "corrupt" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (20, 24), (200, 30, 60)).save(root / "small" / "tiny.png")
    (root / "bad.yaml").write_text("trainer: {max_steps: 3\n  bad")
    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "truncated.ckpt").write_bytes(whole[: len(whole) // 3])
    torch.save({"weights": torch.ones(2)}, run / "foreign.ckpt")
    (run / "torn.json").write_text((run / "noiseshift.json").read_text()[:50])

    def t_hat(value):
        return lambda doc: doc["resolutions"]["16"]["t_hat"].__setitem__(1, value)

    return {
        "run": str(run), "root": str(root), "truncated": str(run / "truncated.ckpt"),
        "nan_table": edited_table(run, "nan.json", t_hat(float("nan"))),
        "past_end": edited_table(run, "past_end.json", t_hat(10_000.0)),
        "decreasing": edited_table(run, "decreasing.json",
                                   lambda doc: doc["resolutions"]["16"]["t_hat"].reverse()),
        "other_weights": edited_table(run, "other_weights.json", lambda doc: doc.update(weights="0" * 16)),
        "other_schedule": edited_table(run, "other_schedule.json",
                                       lambda doc: doc["schedule"].update(num_timesteps=1000)),
    }


LAST = "--ckpt_path={run}/checkpoints/last.ckpt"
FIT = ["fit", "--config={root}/fit.yaml"]
FRESH = "--trainer.default_root_dir={root}/fresh"  # a fit that would start a new run (nothing may appear)
FOLDER = [*FIT, FRESH, "--data.source=folder", "--data.image_size=32"]
SAMPLE = ["sample", "--config={root}/fit.yaml", "--resolutions=[16]", "--num_samples=1", "--steps=2"]
CALIBRATE = ["calibrate", "--config={root}/fit.yaml", LAST, "--resolutions=[16]", "--steps=3", "--num_images=2",
             "--coarse_stride=0.05", "--fine_window=0.01", "--fine_stride=0.005"]
BAD_INPUTS = {  # name: (arguments, the message it must print[, a file-size limit in bytes: a full disk])
    # folders and images
    "data folder missing": ([*FOLDER, "--data.root={root}/nope"], "image folder {root}/nope does not exist"),
    "folder without images": ([*FOLDER, "--data.root={root}/empty"], "no images (.jpg"),
    "unreadable image": ([*FOLDER, "--data.root={root}/corrupt"], "1 of 4 images under {root}/corrupt cannot "
                                                                    "be read: {root}/corrupt/broken.jpg"),
    "image smaller than the training size": ([*FOLDER, "--data.root={root}/small"],
                                             "1 of 4 images under {root}/small are smaller than the 32 pixels"),
    "CelebA not where data.root says": ([*FIT, FRESH, "--data.source=celeba", "--data.root={root}",
                                         "--data.image_size=32"], "CelebA not found"),
    # configuration
    "unknown key": ([*FIT, "--model.learning_rate=1"], "unrecognized arguments: --model.learning_rate=1"),
    "wrong type": ([*FIT, "--data.batch_size=many"], 'Parser key "data.batch_size"'),
    "missing config file": (["fit", "--config={root}/nope.yaml"], "File does not exist: '{root}/nope.yaml'"),
    "malformed YAML": (["fit", "--config={root}/bad.yaml"], "Problems parsing config"),
    "patch larger than the smallest scale": ([*FIT, FRESH, "--data.patch_size=48"], "patch_size <= s_min <= s_max"),
    "negative max_steps": ([*FIT, FRESH, "--trainer.max_steps=-4"], "max_steps` must be a non-negative integer"),
    "no samples asked for": ([*SAMPLE, LAST, "--num_samples=0"], "--num_samples must be at least 1"),
    # resolutions
    "resolution with a missing width": ([*SAMPLE, LAST, '--resolutions=["64x"]'], "is neither N nor HxW"),
    "resolution that is not a size": ([*SAMPLE, LAST, '--resolutions=["abc"]'], "'abc' is neither N nor HxW"),
    "resolution zero": ([*SAMPLE, LAST, '--resolutions=["0"]'], "resolution 0 must be positive"),
    "resolution the U-Net cannot halve": ([*SAMPLE, LAST, "--resolutions=[16,25]"],
                                          "resolution 25x25 is not divisible"),
    # checkpoints and runs
    "second fit into a run": (FIT, "already holds checkpoints"),
    "resume with another model": ([*FIT, "--ckpt_path=last", "--model.net.init_args.base_channels=8"],
                                  "does not fit this model"),
    "sample with another model": ([*SAMPLE, LAST, "--model.net.init_args.base_channels=8"],
                                  "does not fit this model"),
    "missing checkpoint": ([*SAMPLE, "--ckpt_path={run}/nope.ckpt"], "nope.ckpt does not exist"),
    "resume from a missing checkpoint": ([*FIT, "--ckpt_path={run}/nope.ckpt"], "nope.ckpt does not exist"),
    "truncated checkpoint": ([*SAMPLE, "--ckpt_path={truncated}"], "truncated or corrupt"),
    "foreign checkpoint": ([*SAMPLE, "--ckpt_path={run}/foreign.ckpt"], "not a Lightning checkpoint"),
    "sample without checkpoint": (SAMPLE, "needs a trained model: pass --ckpt_path"),
    # NoiseShift tables
    "missing table": ([*SAMPLE, LAST, "--noiseshift={run}/none.json"], "none.json does not exist"),
    "table with NaN": ([*SAMPLE, LAST, "--noiseshift={nan_table}"], "t_hat holds non-finite"),
    "table past the last timestep": ([*SAMPLE, LAST, "--noiseshift={past_end}"], "past_end.json is malformed"),
    "table with t̂ decreasing": ([*SAMPLE, LAST, "--noiseshift={decreasing}"], "must be non-decreasing"),
    "torn table": ([*SAMPLE, LAST, "--noiseshift={run}/torn.json"], "torn.json is not valid JSON"),
    "table for other weights": ([*SAMPLE, LAST, "--noiseshift={other_weights}"],
                                "calibrated for weights 0000000000000000"),
    "table for another schedule": ([*SAMPLE, LAST, "--noiseshift={other_schedule}"], "T=1000"),
    "resolution missing from the table": ([*SAMPLE, LAST, "--resolutions=[16,16x32]",
                                           "--noiseshift={run}/noiseshift.json"],
                                          "no NoiseShift calibration for resolution 16x32"),
    # a full disk (a file-size limit makes the write fail in the kernel, as a full disk does)
    "disk full writing samples": ([*SAMPLE, LAST, "--out_dir={run}/samples"],
                                  "cannot write {run}/samples/samples_16.png: the file-size limit", 200),
    "disk full merging a table": ([*CALIBRATE, "--out={run}/noiseshift.json"],
                                  "cannot write {run}/noiseshift.json: the file-size limit (ulimit -f) is reached "
                                  "(", 300),
}


PROGRESS = re.compile(r"\d+/\d+ \[|^\s*$")  # tqdm's bars (calibration's search) are progress, not error output


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(run, case):
    args, message, *fsize = BAD_INPUTS[case]
    values = bad_inputs(run)
    before = snapshot(run.parent)
    done = mrdiff(*(a.format(**values) for a in args), fsize=fsize[0] if fsize else None)
    lines = [line for line in done.stderr.strip().splitlines() if not PROGRESS.search(line)]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) <= 3 and lines[-1].startswith("mrdiff: error: "), lines
    assert message.format(**values) in lines[-1], lines[-1]
    assert "Traceback" not in done.stderr
    assert snapshot(run.parent) == before  # every earlier file byte-identical, and no new file anywhere


@pytest.mark.slow
def test_mrdiff_debug_shows_the_traceback(run):
    done = mrdiff(*(a.format(root=run.parent) for a in SAMPLE), env={"MRDIFF_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "needs a trained model" in done.stderr


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_says_how_much_is_needed(run):
    """A resumed fit whose checkpoint write fails in the kernel (a 1 MB file-size limit, as a full disk would)."""
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    done = mrdiff("fit", f"--config={run.parent}/fit.yaml", "--ckpt_path=last", "--trainer.max_steps=5",
                  fsize=2**20)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert re.fullmatch(rf"mrdiff: error: cannot write {run}/checkpoints/\S+\.ckpt: the file-size limit \(ulimit "
                        r"-f\) is reached \(it needs about [1-9][\d.]* MB and [\d.]+ MB are free on its file "
                        r"system\); .*Free some space or write elsewhere, then run again", lines[-1]), lines[-1]
    assert last.read_bytes() == before  # the previous checkpoint is intact
    assert not list(run.rglob("*.tmp"))  # and no partial write stays behind


@pytest.mark.slow
def test_an_interrupted_sample_leaves_no_partial_grid_and_one_line(run, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "mrdiff", "sample", f"--config={run.parent}/fit.yaml",
         f"--ckpt_path={run}/checkpoints/last.ckpt", "--resolutions=[32]", "--num_samples=64", "--steps=100",
         f"--out_dir={tmp_path / 'out'}"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a suite started in the background (`nohup pytest &`) hands SIGINT down as ignored: undo that here
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stderr:  # the progress bar shows that sampling has begun (64 samples outlast a busy CPU)
        if "DDIM-100" in line:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("mrdiff: interrupted")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_the_runs_config_yaml_configures_sample_calibrate_test_and_resume(run, tmp_path):
    """config.yaml holds what the run is; how the fit was launched (ckpt_path, weights_only) is a comment."""
    config, last = str(run / "config.yaml"), f"--ckpt_path={run}/checkpoints/last.ckpt"
    main(["sample", "--config", config, last, "--resolutions=[16]", "--num_samples=1", "--steps=2",
          f"--out_dir={tmp_path / 'out'}"])
    main(["calibrate", "--config", config, last, "--resolutions=[16]", "--steps=3", "--num_images=2",
          "--coarse_stride=0.05", "--fine_window=0.01", "--fine_stride=0.005", f"--out={tmp_path / 't.json'}"])
    # (the copy's config.yaml names the original run dir: resume the copy)
    main(["fit", "--config", config, f"--trainer.default_root_dir={run}", "--trainer.max_steps=4",
          "--ckpt_path=last"])
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    text = (run / "config.yaml").read_text()
    assert text.startswith("# this fit was started with ckpt_path: last\n")
    assert not re.search(r"^(ckpt_path|weights_only):", text, re.MULTILINE)


def test_sample_keeps_the_grids_an_earlier_run_wrote(run, tmp_path, capsys):
    args = ["sample", "--config", str(run.parent / "fit.yaml"), f"--ckpt_path={run}/checkpoints/last.ckpt",
            "--resolutions=[16]", "--num_samples=1", "--steps=2", f"--out_dir={tmp_path / 'out'}"]
    main(args)
    first = (tmp_path / "out" / "samples_16.png").read_bytes()
    main([*args, "--seed=5"])
    main([*args, "--seed=6"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples_16-2.png", "samples_16-3.png",
                                                                    "samples_16.png"]
    assert (tmp_path / "out" / "samples_16.png").read_bytes() == first
    assert "samples_16.png from an earlier run is kept" in capsys.readouterr().out
