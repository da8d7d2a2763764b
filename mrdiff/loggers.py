"""Weights & Biases from the YAML config: offline without credentials, one run across SLURM requeues."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from mrdiff.console import info
from mrdiff.utils import atomic_write


def wandb_credentials() -> bool:
    """True when W&B could authenticate: WANDB_API_KEY or a netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def stable_run_id(prefix: str = "mrdiff") -> str | None:
    """MRDIFF_RUN_ID, else one id per SLURM job (array task included), so a requeued job continues its run."""
    if os.environ.get("MRDIFF_RUN_ID"):
        return os.environ["MRDIFF_RUN_ID"]
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    return f"{prefix}-{job}" if job else None


class WandbRun(WandbLogger):
    """WandbLogger that resumes the same run after a requeue and goes offline when it cannot log in.

    The mode follows WANDB_MODE when it is set; otherwise the run is offline when no credentials are
    found, and a one-line hint says how to upload it later.
    """

    def __init__(
        self,
        project: str = "mrdiff",
        name: str | None = None,
        save_dir: str | None = None,  # default: the trainer's run dir (trainer.default_root_dir)
        id: str | None = None,  # default: MRDIFF_RUN_ID or the SLURM job id
        offline: bool | None = None,  # default: WANDB_MODE, else offline without credentials
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode in ("offline", "dryrun") if mode else not wandb_credentials()
            if offline and not mode:
                info("mrdiff: no W&B credentials found: logging offline; upload later with "
                     "`wandb sync <run dir>/wandb/offline-run-*` (or set WANDB_API_KEY / run `wandb login`)")
        run_id = id or stable_run_id(project)
        super().__init__(project=project, name=name, save_dir=save_dir, id=run_id, offline=offline,
                         log_model=log_model, resume="allow" if run_id else None, **kwargs)
        self.dir_from_trainer = save_dir is None

    def use_run_dir(self, run_dir: str | os.PathLike) -> None:
        """Write under the trainer's run dir (called by MrdiffTrainer before the run starts)."""
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._save_dir = str(run_dir)
        self._wandb_init["dir"] = str(run_dir)


class CSVRun(CSVLogger):
    """CSVLogger whose folder follows the run: <trainer.default_root_dir>/<name>/version_N by default.

    Lightning's CSVLogger needs a save_dir in the config, so `--trainer.default_root_dir=X` alone would still
    log under the config's folder.
    """

    def __init__(self, save_dir: str | None = None, name: str = "logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir or ".", name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.dir_from_trainer = save_dir is None

    def use_run_dir(self, run_dir: str | os.PathLike) -> None:
        """Write under the trainer's run dir (called by MrdiffTrainer before the run starts)."""
        self._save_dir = self._root_dir = os.fspath(run_dir)  # lightning.pytorch's and lightning.fabric's


LAUNCH_KEYS = ("ckpt_path", "weights_only")  # how this fit was started, not what the run is


class SaveConfig(SaveConfigCallback):
    """Writes the fit's resolved config to <run dir>/config.yaml (overwritten on requeue) and sends it to W&B.

    Only `fit` writes it: `test` and `validate` leave the fit's config.yaml as it is. The file
    holds what the run is (seed, trainer, model, data), not how this fit was launched: `ckpt_path` and
    `weights_only` become a comment. So the same file configures `fit`, `test`, `sample` and `calibrate`
    (`sample` has no `weights_only`), and `fit --config config.yaml --ckpt_path last` resumes the run.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or stage != "fit":
            return
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            config = self.config.clone()
            launch = {key: config.pop(key) for key in LAUNCH_KEYS if key in config}
            header = "".join(f"# this fit was started with {key}: {value}\n"
                             for key, value in launch.items() if value is not None)
            text = self.parser.dump(config, skip_none=False, skip_validation=True)
            with atomic_write(run_dir / self.config_filename, "w") as f:
                f.write(header + text)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)
