"""Shared fixtures: a tiny quickstart-like config that trains in seconds on a CPU."""

from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_scan_cache(tmp_path_factory, monkeypatch):
    """Image-folder scan caches go to a per-test folder, not ~/.cache (subprocesses inherit it)."""
    monkeypatch.setenv("MRDIFF_SCAN_CACHE", str(tmp_path_factory.mktemp("scan-cache")))


@pytest.fixture(autouse=True)
def private_inception_cache(tmp_path_factory, monkeypatch):
    """`make fid-weights`' cache is an empty per-test folder: weights a developer fetched never switch FID on."""
    monkeypatch.setenv("MRDIFF_INCEPTION_CACHE", str(tmp_path_factory.mktemp("inception-cache")))


def tiny_config(run_dir: Path, **overrides) -> dict:
    """A multi-resolution config on synthetic scenes small enough for tests."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "limit_val_batches": 1,
            "val_check_interval": 2, "check_val_every_n_epoch": None, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run_dir),
            "callbacks": [
                {"class_path": "mrdiff.callbacks.ema.EMA", "init_args": {"decay": 0.9}},
                {"class_path": "mrdiff.callbacks.checkpoint.RunCheckpoint", "init_args": {"save_last": True}},
            ],
        },
        "model": {
            "net": {"class_path": "mrdiff.nn.unet.UNet", "init_args": {
                "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                "head_channels": 16, "dropout": 0.0, "coord_frequencies": 2, "safa_levels": [0, 1],
                "scale_ref": 16.0}},
            "num_timesteps": 100, "warmup_steps": 2,
        },
        "data": {"source": "synthetic", "s_min": 16, "s_max": 32, "patch_size": 16, "batch_size": 4,
                 "num_workers": 0, "num_scenes": 16, "num_val": 4},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models are latency-bound, and 2 threads on 2 shared cores thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config_file(tmp_path):
    """Factory: write a tiny config (with dotted-key overrides) and return its path."""

    def make(**overrides) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", **overrides)))
        return path

    return make
