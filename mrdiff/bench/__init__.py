"""`make bench`: training and sampling throughput (python -m mrdiff.bench; the command's help says more)."""

from mrdiff.bench.cli import main
from mrdiff.bench.common import MULTIRES, PEAK_BF16_TFLOPS, PRESETS, Row, count_flops, measure, peak_tflops, unet_kwargs
from mrdiff.bench.report import ratio, report, sampling_summary
from mrdiff.bench.sampling import calibration_seconds, parse_sampler, sampling_rows
from mrdiff.bench.training import TRAINING_ROWS, batch_inputs, diffusers_unet, train_step, training_rows

__all__ = ["MULTIRES", "PEAK_BF16_TFLOPS", "PRESETS", "TRAINING_ROWS", "Row", "batch_inputs", "calibration_seconds",
           "count_flops", "diffusers_unet", "main", "measure", "parse_sampler", "peak_tflops", "ratio", "report",
           "sampling_rows", "sampling_summary", "train_step", "training_rows", "unet_kwargs"]
