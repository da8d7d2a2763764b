"""One writer per run dir: the lock on <run dir>/.mrdiff.lock, and the stale temp files a killed writer left."""

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mrdiff import runlock
from mrdiff.cli import error_line, main
from mrdiff.runlock import ATOMIC_TEMP, LOCK_NAME, RunDirInUse, RunLock, holding, remove_stale_temps
from mrdiff.utils import atomic_write
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
FIXED_TIME, FIXED_SINCE = 1_800_000_000.0, "2027-01-15 08:00:00 UTC"
CSV_LOGGER = {"class_path": "mrdiff.loggers.CSVRun", "init_args": {"name": "logs"}}


def in_use(run_dir, pid, host=HOST, since=FIXED_SINCE) -> str:
    return (f"run dir {run_dir} is in use by another mrdiff process (pid {pid} on host {host}, since {since}): "
            f"wait for it, or pick another --trainer.default_root_dir")


@pytest.fixture
def hold(monkeypatch):
    """hold(run_dir): the run dir's lock, held by this (test) process since FIXED_TIME until the test ends."""
    held = []

    def acquire(run_dir: Path) -> RunLock:
        held.append(lock := RunLock(run_dir))
        with monkeypatch.context() as patch:
            patch.setattr(runlock.time, "time", lambda: FIXED_TIME)
            assert lock.acquire()
        return lock

    yield acquire
    for lock in held:
        lock.release()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: (mtime in ns, size)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def write_config(path: Path, run_dir: Path, *callbacks: dict, **overrides) -> Path:
    config = tiny_config(run_dir, **overrides)
    config["trainer"]["callbacks"] += list(callbacks)
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(go: Path) -> dict:
    return {"class_path": "tests.helpers.WaitForFile", "init_args": {"path": str(go)}}


def start_mrdiff(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mrdiff", *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# -- the lock itself ------------------------------------------------------------------------------------------


def test_the_lock_is_exclusive_names_its_holder_and_is_free_once_released(tmp_path, hold):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text('{"pid": 1, "host": "a killed holder"}' + " " * 500)  # (no lock on it)
    first = hold(run_dir)
    holder = json.loads((run_dir / LOCK_NAME).read_text())  # the whole old line replaced
    assert holder == {"pid": os.getpid(), "host": HOST, "since": FIXED_SINCE}
    second = RunLock(run_dir)
    with pytest.raises(RunDirInUse) as refused:  # a second open file description is refused, even in one process
        second.acquire()
    assert str(refused.value) == in_use(run_dir, os.getpid())
    assert error_line(refused.value) == "mrdiff: error: " + in_use(run_dir, os.getpid())
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    (run_dir / "config.yaml").write_text("written while locked")
    first.release()
    assert (run_dir / LOCK_NAME).read_text() == ""  # released: no holder named
    assert second.acquire()  # and free at once
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    second.release()


def test_a_command_that_wrote_nothing_leaves_no_lock_file_and_no_folder(tmp_path):
    lock = RunLock(tmp_path / "runs" / "new")
    assert lock.acquire() and (tmp_path / "runs" / "new" / LOCK_NAME).is_file()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # both folders it made are gone again
    (tmp_path / "kept").mkdir()
    lock = RunLock(tmp_path / "kept")
    assert lock.acquire()
    lock.release()
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_a_lock_file_removed_under_an_opener_is_not_mistaken_for_the_lock(tmp_path, monkeypatch):
    first = RunLock(tmp_path)
    assert first.acquire()
    stale = os.open(tmp_path / LOCK_NAME, os.O_RDWR)  # a second process opened it just before the release removed it
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    third = RunLock(tmp_path)
    assert third.acquire()  # a new lock file, held
    real_open, opened = os.open, []

    def stale_first(path, *args):
        opened.append(path)
        return stale if len(opened) == 1 else real_open(path, *args)

    with monkeypatch.context() as patch, pytest.raises(RunDirInUse, match=f"pid {os.getpid()} on host"):
        patch.setattr(runlock.os, "open", stale_first)
        RunLock(tmp_path).acquire()  # the unlinked file's lock is free: it must open the file again, and be refused
    assert opened == [tmp_path / LOCK_NAME] * 2
    third.release()


def test_a_holder_that_wrote_nothing_is_named_unknown(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunDirInUse, match=re.escape("(pid ? on host ?, since ?)")):
            RunLock(tmp_path).acquire()
    finally:
        os.close(fd)


def test_only_global_rank_zero_takes_the_lock(tmp_path, hold):
    hold(tmp_path / "run")
    with holding(tmp_path / "run", global_zero=False):  # rank 1 of the holder's own DDP job: no refusal
        pass
    with holding(tmp_path / "fresh", global_zero=False):
        pass
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(RunDirInUse), holding(tmp_path / "run", global_zero=True):
        pass


def test_without_working_locks_it_says_so_once_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    stale = tmp_path / ".last.ckpt.abcd1234.tmp"
    stale.write_bytes(b"x")
    ran = False
    with holding(tmp_path):
        ran = True
    captured = capsys.readouterr()
    assert ran and captured.out == ""
    assert captured.err.splitlines() == [
        f"mrdiff: warning: file locks do not work in {tmp_path} ({os.strerror(errno.ENOLCK)}): going on without "
        "the one-writer check, and without removing stale temporary files"]
    assert stale.exists()  # without a lock another writer may own it


# -- stale temporary files ------------------------------------------------------------------------------------


def killed_while_writing(path: Path) -> None:
    """A child process SIGKILLed inside atomic_write(path), as a pre-empted job is while saving."""
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_write(path) as f:
                f.write(b"half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


FOREIGN = ["notes.tmp", ".last.ckpt.tmp", ".last.ckpt.ABCD1234.tmp", ".last.ckpt.abc123.tmp",
           "last.ckpt.abcd1234.tmp", ".last.ckpt.abcd1234.tmp.bak", ".abcd1234.tmp"]


def test_the_temp_pattern_is_exactly_atomic_writes_names(tmp_path):
    killed_while_writing(tmp_path / "epoch=0-step=1.ckpt")
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".epoch=0-step=1.ckpt.") and ATOMIC_TEMP.fullmatch(left[0])
    assert [name for name in FOREIGN if ATOMIC_TEMP.fullmatch(name)] == []


def test_a_fit_removes_the_stale_temps_counts_them_and_keeps_foreign_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    killed_while_writing(run_dir / "checkpoints" / "last.ckpt")
    killed_while_writing(run_dir / "checkpoints" / "epoch=0-step=1.ckpt")
    killed_while_writing(run_dir / "config.yaml")
    assert len(list(run_dir.rglob("*.tmp"))) == 3
    for name in FOREIGN:
        (run_dir / "checkpoints" / name).write_text("not mrdiff's")
    config = write_config(tmp_path / "fit.yaml", run_dir, **{"trainer.max_steps": 1})
    main(["fit", "--config", str(config)])
    said = f"mrdiff: removed 3 stale temporary file(s) that a killed process left in {run_dir}\n"
    assert capsys.readouterr().out.count(said) == 1
    assert sorted(p.name for p in run_dir.rglob("*.tmp*")) == sorted(FOREIGN)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted([*FOREIGN, "last.ckpt"])
    assert remove_stale_temps(run_dir) == 0


# -- the commands ---------------------------------------------------------------------------------------------


def test_a_fit_into_a_locked_run_dir_is_refused_before_it_writes(tmp_path, hold):
    run_dir = tmp_path / "run"
    hold(run_dir)
    config = write_config(tmp_path / "fit.yaml", run_dir, **{"trainer.logger": CSV_LOGGER})
    before = snapshot(run_dir)
    with pytest.raises(RunDirInUse) as refused:
        main(["fit", "--config", str(config)])
    assert str(refused.value) == in_use(run_dir, os.getpid())
    assert snapshot(run_dir) == before == {LOCK_NAME: before[LOCK_NAME]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(config, checkpoint) of a one-step fit."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "fit.yaml", root / "run", **{"trainer.max_steps": 1})
    main(["fit", "--config", str(config)])
    return config, root / "run" / "checkpoints" / "last.ckpt"


def test_sample_into_another_folder_needs_no_lock(trained, tmp_path, hold):
    config, ckpt = trained
    hold(ckpt.parent.parent)
    main(["sample", "--config", str(config), f"--ckpt_path={ckpt}", "--resolutions=[16]", "--num_samples=1",
          "--steps=2", f"--out_dir={tmp_path / 'out'}"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["samples_16.png"]


@pytest.mark.parametrize("command", ["test", "calibrate"])
def test_test_and_calibrate_lock_the_checkpoints_run_dir(trained, tmp_path, hold, command):
    config, ckpt = trained
    run_dir = ckpt.parent.parent
    hold(run_dir)
    before = snapshot(run_dir)
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(RunDirInUse) as refused:
        main([command, "--config", str(config), f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={elsewhere}"])
    assert str(refused.value) == in_use(run_dir.resolve(), os.getpid())
    assert snapshot(run_dir) == before and not elsewhere.exists()


@pytest.mark.slow
def test_a_second_fit_exits_2_with_one_line_and_changes_nothing(tmp_path, hold):
    run_dir = tmp_path / "run"
    hold(run_dir)
    config = write_config(tmp_path / "fit.yaml", run_dir, **{"trainer.logger": CSV_LOGGER})
    before = snapshot(run_dir)
    out, err = (process := start_mrdiff("fit", "--config", str(config))).communicate(timeout=300)
    assert process.returncode == 2, err[-3000:]
    assert err.splitlines() == ["mrdiff: error: " + in_use(run_dir, os.getpid())]
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_two_fits_started_together_one_trains_and_the_other_exits_2(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    config = write_config(tmp_path / "fit.yaml", run_dir, wait_for(go), **{"trainer.max_steps": 2,
                                                                                     "trainer.logger": CSV_LOGGER})
    processes = [start_mrdiff("fit", "--config", str(config)) for _ in range(2)]
    deadline = time.monotonic() + 120  # (WaitForFile's own limit)
    while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)  # the winner waits in on_train_start (WaitForFile) until the loser has gone
    go.touch()
    errs = [p.communicate(timeout=300)[1] for p in processes]
    assert sorted(p.returncode for p in processes) == [0, 2], [err[-2000:] for err in errs]
    winner, loser_err = (processes[0], errs[1]) if processes[0].returncode == 0 else (processes[1], errs[0])
    assert len(loser_err.splitlines()) == 1, loser_err[-3000:]
    since = re.search(r"since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC)\)", loser_err).group(1)
    assert loser_err.strip() == "mrdiff: error: " + in_use(run_dir, winner.pid, since=since)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert len(list((run_dir / "logs").iterdir())) == 1  # one writer's logs (version_0)


@pytest.mark.slow
def test_a_killed_writers_lock_is_free_for_the_next_fit(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    config = write_config(tmp_path / "fit.yaml", run_dir, wait_for(go), **{"trainer.max_steps": 1})
    process = start_mrdiff("fit", "--config", str(config))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:  # until it holds the lock and waits
        if (run_dir / "config.yaml").exists():
            break
        time.sleep(0.2)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == process.pid
    with pytest.raises(RunDirInUse):
        RunLock(run_dir).acquire()
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    go.touch()
    main(["fit", "--config", str(config)])  # no checkpoint was saved yet: a new run, not a resume
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert (run_dir / LOCK_NAME).read_text() == ""  # released at the end


@pytest.mark.slow
def test_a_ddp_fit_locks_on_rank_zero_and_a_second_one_is_refused_without_hanging(tmp_path, hold):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    config = write_config(tmp_path / "fit.yaml", run_dir, wait_for(go), **{"trainer.max_steps": 2})
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    process = start_mrdiff("fit", "--config", str(config), *ddp)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not (run_dir / "config.yaml").exists():
        time.sleep(0.2)  # both ranks then wait in on_train_start (WaitForFile)
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    go.touch()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert holder["pid"] == process.pid  # rank 0 (the process started here), not the rank it launched
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    other = tmp_path / "other"
    hold(other)
    config = write_config(tmp_path / "other.yaml", other, **{"trainer.max_steps": 2})
    out, err = (process := start_mrdiff("fit", "--config", str(config), *ddp)).communicate(timeout=300)
    assert process.returncode == 2 and err.splitlines() == ["mrdiff: error: " + in_use(other, os.getpid())]
    assert sorted(p.name for p in other.iterdir()) == [LOCK_NAME]
