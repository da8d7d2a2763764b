#!/usr/bin/env bash
# The pure-Python packages mrdiff needs that the GPU machines' image lacks (its python3 holds torch, lightning,
# torchmetrics, pytest, huggingface_hub, safetensors, ...: /work/.library/device/KINDS.md lists them), fetched here
# as wheels into .whl/ (git-ignored) for the device call to carry: `carry: [".whl"]`. scripts/gpu_check.sh installs
# them there with `pip install --no-index --no-deps --target`. The versions are the ones the tests ran with here.
#   bash scripts/gpu_wheels.sh            # then: du -sh .whl  (it travels with the working tree: 64 MiB in all)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
WHEELS=(
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0  # mrdiff.cli (LightningCLI), tests/test_gpu.py
  torch-fidelity==0.4.0                                                   # FID's feature extractor (torchmetrics imports it)
  diffusers==0.42.1                                                       # the bench's UNet2DModel rows
)
mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
