"""FID and structure per resolution: the callback behind `mrdiff test`, reporting the paper's Table 1.

Rows are the model and its variants (+ NoiseShift, + analytic shift, + upsample, the training-free methods of
mrdiff.baselines), columns the resolutions. Fake i is
sampled from seed + i at every resolution and in every row, and each DDP rank samples seeds[rank::world],
so the numbers do not depend on the number of GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from tqdm import tqdm

from mrdiff.baselines import method_args_for, upsample
from mrdiff.callbacks.ema import ema_weights
from mrdiff.callbacks.media import log_figure, log_table
from mrdiff.checkpoint import run_dir_of
from mrdiff.console import info
from mrdiff.data.synthetic import reference_radii
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.evaluation.cells import TRAINING_FREE, Variant, above_training_size, gather, generate, training_free
from mrdiff.evaluation.scores import InceptionScores, SharedFeatures, score_cell
from mrdiff.evaluation.table import EvalTable, finite, plot_eval_table
from mrdiff.metrics.fid import (
    FID,
    RealStatsCache,
    configured_weights,
    extractor_id,
    inception,
    rank_and_world,
    real_statistics,
    require_weights,
)
from mrdiff.module import DiffusionModule
from mrdiff.noiseshift.conditioning import time_conditionings
from mrdiff.resolution import parse_resolution, resolution_key
from mrdiff.utils import atomic_write, unused_path


def checkpoint_step(path: str) -> int | None:
    """The global step a checkpoint was saved at (memory-mapped: the weights are not read)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("global_step")
    except Exception:  # an old-format file cannot be memory-mapped; the step is only informative
        return None


class ResolutionEvaluation(L.Callback):
    """FID and structure score per resolution with and without NoiseShift: `mrdiff test` (and during fit).

    Writes eval_table.{md,csv,json} and eval_plot.png into the run directory, prints the Markdown table,
    logs the table and plot to W&B and scalars such as test/fid_64, test/fid_64_noiseshift.

    Args:
        resolutions: Sizes to evaluate, N or "HxW".
        num_samples: Fakes per resolution and row.
        num_reference: Real images for the FID statistics (default: num_samples).
        sampling: Sampler, steps and η of the fakes (default: DDIM-50, η = 0).
        seed: Fake i uses seed + i at every resolution and in every row.
        noiseshift: A NoiseShift table (JSON) for a "+ NoiseShift" row; "auto": <run dir>/noiseshift.json
            when it exists.
        analytic_shift: Add a "+ analytic shift" row (SD3-style log-SNR shift).
        upsample: Add a "+ upsample" row above the training size: the plain samples at the training size,
            bicubic-upsampled (the trivial baseline a multi-resolution model must beat).
        training_free: Add a row per training-free method above the training size (mrdiff.baselines and
            docs/baselines.md): scaled_attention, redilation, window_fusion, redenoise.
        training_free_args: Their parameters other than the defaults, METHOD.FIELD=VALUE,... (e.g.
            "redilation.share=0.8,window_fusion.stride=8,redenoise.t0=300", the settings tuned at 2R).
        fid: FID on or off; None: on when Inception weights are configured.
        structure: The sun-structure score; None: on when data.source is synthetic.
        inception_weights: The Inception weights file (default: $MRDIFF_INCEPTION_WEIGHTS).
        feature_extractor: Features instead of Inception's: uint8 [N, 3, H, W] → [N, D].
        cache_dir: Where real statistics are cached (default: $MRDIFF_FID_CACHE or ~/.cache/mrdiff/fid).
        batch_size: Per device, for sampling and reference features.
        every_n_epochs: Also evaluate during fit, with the EMA weights; 0: only in `mrdiff test`.
        name: Row label of the plain model.
        progress: One progress bar over the evaluation's network calls (rank 0).
    """

    def __init__(
        self,
        resolutions: list[int | str] = [64],  # noqa: B006
        num_samples: int = 1000,
        num_reference: int | None = None,
        sampling: SamplingSettings | None = None,
        seed: int = 0,
        noiseshift: str | None = None,
        analytic_shift: bool = False,
        upsample: bool = False,
        training_free: list[Literal["scaled_attention", "redilation", "window_fusion", "redenoise"]] = [],  # noqa: B006
        training_free_args: str = "",
        fid: bool | None = None,
        structure: bool | None = None,
        inception_weights: str | None = None,
        feature_extractor: nn.Module | None = None,
        cache_dir: str | None = None,
        batch_size: int = 64,
        every_n_epochs: int = 0,
        name: str = "mrdiff",
        progress: bool = True,
    ) -> None:
        if num_samples < 2 or (num_reference is not None and num_reference < 2):
            raise ValueError("ResolutionEvaluation needs num_samples (and num_reference) >= 2")
        self.resolutions = [parse_resolution(r) for r in resolutions]
        self.num_samples, self.num_reference = num_samples, num_reference or num_samples
        self.sampling, self.seed = sampling or SamplingSettings(), seed
        self.noiseshift, self.analytic_shift, self.upsample = noiseshift, analytic_shift, upsample
        self.training_free = list(training_free)
        self.training_free_args = method_args_for(training_free_args, self.training_free, "training_free_args",
                                                  f"not among training_free {self.training_free}: add them there "
                                                  "or drop their args")
        self.fid, self.structure, self.inception_weights = fid, structure, inception_weights
        self.feature_extractor, self.cache_dir, self.batch_size = feature_extractor, cache_dir, batch_size
        self.every_n_epochs, self.name, self.progress = every_n_epochs, name, progress
        self._extractor: nn.Module | None = None
        self._fid_skip_said = False
        self._radii: list[float] | None = None

    # -- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before any work: bad resolutions, missing weights or NoiseShift table."""
        if stage != "test" and not (stage == "fit" and self.every_n_epochs):
            return
        for height, width in self.resolutions:
            pl_module.net.check_size(height, width)
        self._fid_on(trainer)
        self._noiseshift_path = self._resolve_noiseshift(trainer)
        if self._noiseshift_path and not Path(self._noiseshift_path).is_file():
            raise FileNotFoundError(f"NoiseShift table {self._noiseshift_path} does not exist: run `mrdiff calibrate`")

    def _resolve_noiseshift(self, trainer: L.Trainer) -> str | None:
        """The table path; "auto" means the run dir's noiseshift.json when it exists (else no such row)."""
        if self.noiseshift != "auto":
            return self.noiseshift
        ckpt = str(trainer.ckpt_path) if trainer.ckpt_path else None
        path = run_dir_of(ckpt, trainer.default_root_dir) / "noiseshift.json"
        if path.is_file():
            return str(path)
        info(f"mrdiff: no NoiseShift table at {path}: the '+ NoiseShift' row is left out (`mrdiff calibrate`)")
        return None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`mrdiff test`: the whole evaluation (the test dataloader is a placeholder)."""
        self.evaluate(trainer, pl_module, "test")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """During fit, every `every_n_epochs` epochs, with the EMA weights."""
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            with ema_weights(trainer, pl_module):
                self.evaluate(trainer, pl_module, "val")

    # -- evaluation ---------------------------------------------------------------------------------
    def variants(self) -> list[Variant]:
        """The table's rows: the model, then + NoiseShift, + analytic shift and + upsample when configured."""
        rows = [Variant(self.name)]
        path = getattr(self, "_noiseshift_path", None if self.noiseshift == "auto" else self.noiseshift)
        if path:
            rows.append(Variant(f"{self.name} + NoiseShift", "noiseshift", "noiseshift", noiseshift=path))
        if self.analytic_shift:
            rows.append(Variant(f"{self.name} + analytic shift", "analytic", "analytic"))
        if self.upsample:
            rows.append(Variant(f"{self.name} + upsample", "upsample", "upsample"))
        return rows + [Variant.of(self.name, kind) for kind in self.training_free]

    def evaluate(self, trainer: L.Trainer, pl_module: DiffusionModule, stage: str) -> EvalTable:
        """Sample and score every (variant, resolution); report the table. Collective under DDP."""
        ckpt = str(trainer.ckpt_path) if stage == "test" and trainer.ckpt_path else None
        table = EvalTable([resolution_key(h, w) for h, w in self.resolutions], self.variants(),
                          settings=self._settings(trainer, pl_module, stage, ckpt))
        pipeline = pl_module.pipeline
        conds = {(v, hw): cond for v in table.variants  # a bad table fails before sampling
                 for hw, cond in time_conditionings(pipeline, self.resolutions, noiseshift=v.noiseshift,
                                                    shift="analytic" if v.kind == "analytic" else "none",
                                                    ckpt_path=ckpt).items()}
        was_training = pl_module.training
        pl_module.eval()
        rank, world = rank_and_world()
        batches = math.ceil(len(range(rank, self.num_samples, world)) / self.batch_size)
        cells = sum(v.kind != "upsample" and (v.kind not in TRAINING_FREE or above_training_size(pipeline, h, w))
                    for v in table.variants for h, w in self.resolutions) + bool(self.upsample)
        calls = len(self.sampling.timesteps(pipeline.schedule))
        bar = tqdm(total=cells * batches * calls, unit="call", smoothing=0.1,
                   desc=f"{stage} evaluation ({self.sampling}, network calls)", dynamic_ncols=True,
                   disable=not self.progress or rank != 0)
        context = trainer.precision_plugin.forward_context
        seeds = range(self.seed, self.seed + self.num_samples)
        try:
            base = None  # the plain samples at the training size: the upsample row's source
            if self.upsample:
                side = pipeline.train_resolution
                base = generate(pipeline, seeds, side, side, sampling=self.sampling, batch_size=self.batch_size,
                                context=context, progress=bar)
            for height, width in self.resolutions:
                self._evaluate_resolution(trainer, pl_module, table, (height, width), conds, base, context, bar)
        finally:
            bar.close()
            pl_module.train(was_training)
        self._report(trainer, pl_module, table, stage, ckpt)
        return table

    def _evaluate_resolution(self, trainer: L.Trainer, pl_module: DiffusionModule, table: EvalTable,
                             hw: tuple[int, int], conds: dict, base: Tensor | None, context, bar: tqdm) -> None:
        """Reference images (and FID statistics) once, then every variant's cell at one size."""
        key, pipeline = resolution_key(*hw), pl_module.pipeline
        reference = torch.cat(list(trainer.datamodule.reference_images(*hw, self.num_reference, self.batch_size)))
        scores = self._inception_scores(trainer, pl_module, hw, reference)
        radii = self._reference_radii(trainer) if self._structure_on(trainer) else None
        above = above_training_size(pipeline, *hw)
        for variant in table.variants:
            bar.set_postfix_str(f"{variant.label} {key}", refresh=False)
            if variant.kind in ("upsample", *TRAINING_FREE) and not above:
                continue  # the baselines above the training size only
            if variant.kind == "upsample":
                if base is None:
                    continue
                local = upsample(base, *hw)
            else:
                sampling, method = training_free(variant.kind, self.sampling, self.training_free_args.get(variant.kind))
                local = generate(pipeline, range(self.seed, self.seed + self.num_samples), *hw,
                                 sampling=sampling, time_cond=conds[(variant, hw)], batch_size=self.batch_size,
                                 context=context, progress=bar, method=method)
            table.cells[(variant.label, key)] = score_cell(gather(local), reference, key, radii=radii,
                                                           inception=scores, local=local)

    def _inception_scores(self, trainer: L.Trainer, pl_module: DiffusionModule, hw: tuple[int, int],
                          reference: Tensor) -> InceptionScores | None:
        """FID (real statistics from the cache or the data) and KID against the reference images."""
        if not self._fid_on(trainer):
            return None
        if self._extractor is None:
            self._extractor = (self.feature_extractor or inception(self.inception_weights)).eval()
        extractor = self._extractor.to(pl_module.device)
        shared = SharedFeatures(extractor)  # FID and KID: one Inception pass per batch of fakes
        metric = FID(shared).to(pl_module.device)
        data = trainer.datamodule
        cache = RealStatsCache(self.cache_dir)
        key = cache.key(data.describe(), *hw, self.num_reference, extractor_id(extractor))
        real_statistics(metric, lambda: reference.split(self.batch_size), cache=cache, key=key,
                        progress=self.progress, total=math.ceil(self.num_reference / self.batch_size))
        return InceptionScores(reference, shared, self.num_samples, fid=metric, batch_size=self.batch_size)

    # -- switches -----------------------------------------------------------------------------------
    def _fid_on(self, trainer: L.Trainer) -> bool:
        """FID when asked or when weights are configured; fid=True without weights is an error."""
        if self.fid is False:
            return False
        if self.feature_extractor is not None:
            return True
        if configured_weights(self.inception_weights) is None and not self.fid:
            if not self._fid_skip_said and trainer.is_global_zero:
                info("mrdiff: FID and KID skipped: no Inception weights (`make fid-weights` installs the standard "
                     "ones; or set MRDIFF_INCEPTION_WEIGHTS or the evaluation callback's inception_weights)")
            self._fid_skip_said = True
            return False
        require_weights(self.inception_weights)
        return True

    def _structure_on(self, trainer: L.Trainer) -> bool:
        """The structure score when asked, by default for synthetic scenes (which have one sun)."""
        if self.structure is not None:
            return self.structure
        hparams = getattr(trainer.datamodule, "hparams", {})
        return hparams.get("source") == "synthetic"

    def _reference_radii(self, trainer: L.Trainer) -> list[float]:
        """Ground-truth sun radii of 1000 training-distribution scenes."""
        if self._radii is None:
            self._radii = reference_radii(1000, seed=trainer.datamodule.hparams.get("seed", 0))
        return self._radii

    # -- output -------------------------------------------------------------------------------------
    def _settings(self, trainer: L.Trainer, pl_module: DiffusionModule, stage: str, ckpt: str | None) -> dict:
        """What produced the table (stored in its JSON)."""
        data = trainer.datamodule.describe() if hasattr(trainer.datamodule, "describe") else None
        step = trainer.global_step if ckpt is None else checkpoint_step(ckpt)
        return {"stage": stage, "checkpoint": ckpt, "global_step": step, "name": self.name,
                "num_samples": self.num_samples, "num_reference": self.num_reference,
                **dataclasses.asdict(self.sampling), "seed": self.seed, "noiseshift": self.noiseshift,
                "training_free": self.training_free, "training_free_args": self.training_free_args,
                "world_size": rank_and_world()[1], "data": data,
                "train_resolution": pl_module.hparams.get("train_resolution"), "inception": self._weights_said()}

    def _weights_said(self) -> str | None:
        """Which Inception weights FID and KID used (a file, or the given extractor), None without FID."""
        if self.fid is False:
            return None
        if self.feature_extractor is not None:
            return type(self.feature_extractor).__name__
        path = configured_weights(self.inception_weights)
        return str(path) if path else None

    def _report(self, trainer: L.Trainer, pl_module: DiffusionModule, table: EvalTable, stage: str,
                ckpt: str | None) -> None:
        """Scalars on every rank; files, printout, W&B table and plot on rank 0."""
        self._log_scalars(pl_module, table, stage)
        if not trainer.is_global_zero:
            return
        run_dir = run_dir_of(ckpt, trainer.default_root_dir)
        suffix = "" if stage == "test" else f"_step{trainer.global_step}"
        run_dir.mkdir(parents=True, exist_ok=True)
        table_md = unused_path(run_dir / f"eval_table{suffix}.md", (".csv", ".json"))  # earlier tables are kept
        stem, number = table_md.with_suffix(""), table_md.stem[len(f"eval_table{suffix}"):]
        texts = {"md": table.markdown(), "csv": table.csv(), "json": json.dumps(table.as_json(), indent=1)}
        for ext, text in texts.items():
            with atomic_write(stem.with_suffix(f".{ext}"), "w") as f:  # a full disk leaves the last table whole
                f.write(text)
        weights = table.settings.get("inception")
        said = f"; FID/KID on {weights}" if weights and "fid" in table.metrics() else ""
        info(f"mrdiff: {stage} evaluation ({self.num_samples} samples per cell{said}) → {stem}.{{md,csv,json}}\n")
        info(table.markdown())
        log_table(trainer, f"{stage}/eval_table", table.columns(), finite(table.rows()))
        plot = plot_eval_table(table, run_dir / f"eval_plot{suffix}{number}.png")
        if plot is not None:
            log_figure(trainer, f"{stage}/eval_plot", plot)

    @staticmethod
    def _log_scalars(pl_module: DiffusionModule, table: EvalTable, stage: str) -> None:
        """`<stage>/<metric>_<res>[_<variant>]` for every finite cell (same values on every rank)."""
        for (label, res), cell in table.cells.items():
            slug = next(v.slug for v in table.variants if v.label == label)
            for metric, value in cell.items():
                if math.isfinite(value) and not metric.endswith(("_lo", "_hi", "_n")):
                    name = f"{stage}/{metric}_{res}" + (f"_{slug}" if slug else "")
                    pl_module.log(name, value, sync_dist=True)
