"""Scale-out and operations: DDP, SLURM requeue, exact resume, bf16 on CPU, W&B offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mrdiff.cli import MrdiffCLI, main
from mrdiff.diffusion.samplers import SamplingSettings
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def run_mrdiff(args, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **(env_extra or {})}
    result = subprocess.run([sys.executable, "-m", "mrdiff", *args], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_config(path: Path, run_dir: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(run_dir, **overrides)))
    return path


def test_resume_gives_the_same_weights_and_ema_as_a_straight_run(tmp_path):
    """4 steps straight vs 2 steps + resume to 4 (mid-epoch: 16 scenes / batch 4 = 4 batches per epoch)."""
    straight = write_config(tmp_path / "a.yaml", tmp_path / "a", **{"trainer.max_steps": 3,
                                                                   "trainer.val_check_interval": 1})
    main(["fit", "--config", str(straight)])
    first = write_config(tmp_path / "b.yaml", tmp_path / "b", **{"trainer.max_steps": 1,
                                                                "trainer.val_check_interval": 1})
    main(["fit", "--config", str(first)])
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    main(["fit", "--config", str(first), "--trainer.max_steps=3", f"--ckpt_path={ckpt}"])
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["global_step"] == b["global_step"] == 3
    for key in ("state_dict", "current_model_state"):  # EMA weights, then the raw weights
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}/{name} differs after resume"


@pytest.mark.slow
def test_ddp_two_cpu_processes_see_different_data(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", run_dir, **{"trainer.max_steps": 2})
    run_mrdiff(["fit", "--config", str(config), "--trainer.strategy=ddp", "--trainer.devices=2",
                "--trainer.accelerator=cpu", "--trainer.callbacks+=tests.helpers.RecordBatches"])
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("batches_rank*.json"))]
    assert len(records) == 2 and all(r["world_size"] == 2 for r in records)
    sums = [[b["sum"] for b in r["batches"]] for r in records]
    assert len(sums[0]) == len(sums[1]) == 2 and not set(sums[0]) & set(sums[1])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_slurm_requeue_saves_requeues_and_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mrdiff", "SLURM_NODELIST": "n1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "s.yaml", run_dir, **{"trainer.max_steps": 6, "trainer.val_check_interval": 100})
    run_mrdiff(["fit", "--config", str(config), "--trainer.callbacks+=tests.helpers.SignalAt",
                "--trainer.callbacks+=tests.helpers.RecordBatches"], slurm)
    assert log.read_text().split() == ["requeue", "4242"]
    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and torch.load(hpc[0], weights_only=False)["global_step"] == 3
    run_mrdiff(["fit", "--config", str(config), "--trainer.callbacks+=tests.helpers.RecordBatches"], slurm)
    starts = sorted(json.loads(p.read_text())["start_step"] for p in run_dir.glob("batches_rank0_*.json"))
    assert starts == [0, 3]  # the requeued job picked up the HPC checkpoint by itself
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_bf16_mixed_fit_on_cpu_with_gradient_clipping(tiny_config_file, tmp_path):
    main(["fit", "--config", str(tiny_config_file(**{"trainer.precision": "bf16-mixed",
                                                       "trainer.gradient_clip_val": 1.0}))])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_module_gradient_clipping_matches_lightnings_and_keeps_the_fused_optimizer(tmp_path):
    """model.grad_clip_norm (fused AdamW, device-side NaN skip) trains like trainer.gradient_clip_val."""
    runs = {"module": {"model.grad_clip_norm": 0.01}, "lightning": {"trainer.gradient_clip_val": 0.01}, "none": {}}
    weights = {}
    for name, overrides in runs.items():
        config = write_config(tmp_path / f"{name}.yaml", tmp_path / name, **{"trainer.max_steps": 3, **overrides})
        cli = MrdiffCLI(args=["fit", "--config", str(config)])
        fused = cli.model.trainer.optimizers[0].defaults["fused"]
        assert fused == (name != "lightning") and (cli.model.nonfinite.guard is not None) == fused
        weights[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)[
            "current_model_state"]
    for key, value in weights["lightning"].items():
        assert torch.allclose(weights["module"][key], value, atol=1e-6), key
    assert any(not torch.allclose(weights["none"][k], v, atol=1e-4) for k, v in weights["lightning"].items())
    with pytest.raises(ValueError, match="cannot be combined with trainer.gradient_clip_val"):
        config = write_config(tmp_path / "both.yaml", tmp_path / "both", **{"model.grad_clip_norm": 1.0,
                                                                           "trainer.gradient_clip_val": 1.0})
        main(["fit", "--config", str(config)])


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MRDIFF_RUN_ID", "test-run-1")
    config = write_config(tmp_path / "w.yaml", tmp_path / "run", **{
        "trainer.logger": {"class_path": "mrdiff.loggers.WandbRun", "init_args": {"project": "mrdiff-test"}}})
    main(["fit", "--config", str(config)])
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*-test-run-1"))
    assert len(runs) == 1 and list(runs[0].glob("run-test-run-1.wandb"))
    assert (tmp_path / "run" / "config.yaml").is_file()


@pytest.mark.slow
def test_compiled_module_computes_the_eager_loss_and_gradients_and_keeps_checkpoint_names():
    from mrdiff.grids import crop_grid
    from mrdiff.module import DiffusionModule
    from mrdiff.nn.unet import UNet

    def build(compile):
        torch.manual_seed(0)
        net = UNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=16,
                   dropout=0.0, coord_frequencies=2, safa_levels=(1,), scale_ref=16.0)
        for p in net.parameters():  # move off the zero-initialised output layers so gradients flow everywhere
            p.data.add_(0.05 * torch.randn_like(p))
        return DiffusionModule(net, num_timesteps=100, compile=compile)

    eager, compiled = build(False), build(True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefixes
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "scale": torch.tensor([16.0, 20.0, 24.0, 32.0]),
             "grid": torch.stack([crop_grid(s, s, 0, 0, 16, 16) for s in (16, 20, 24, 32)])}
    losses = []
    for module in (eager, compiled):
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for (name, p), q in zip(eager.net.named_parameters(), compiled.net.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    # sampling at another resolution runs the eager forward: no recompilation, the same images
    ddim3 = SamplingSettings(steps=3)
    assert torch.allclose(eager.pipeline.sample([0, 1], 24, sampling=ddim3),
                          compiled.pipeline.sample([0, 1], 24, sampling=ddim3), atol=1e-5)
