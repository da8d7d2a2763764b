#!/usr/bin/env bash
# Issue 35 on one GPU machine, in one call of at most 9 minutes (docs/performance.md, "On a GPU (issue 35)"):
#   (a) the GPU test tier, tests/test_gpu.py, once;
#   (b) the training bench of the celeba preset in bf16: multi-resolution (per-sample scales), fixed and diffusers'
#       UNet2DModel, eager and compiled, round-robin in one run;
#   (c) the sampling bench: DDIM-50 and DPM-Solver++(2M)-10 at 64² at two batch sizes, eager and captured
#       (the per-step network call replayed as a CUDA graph).
# Each stage runs under its own timeout (with setup, 540 s in all) and the benches under a time budget a little
# shorter, so they drop what they cannot compile in time and still write their report. A stage that fails or
# times out does not stop the next: $OUT/stages.txt records each one's exit code and seconds.
#
# On the device machine its image's python3 holds torch, lightning, torchmetrics and pytest; the pure-Python rest
# (jsonargparse for mrdiff's CLI, diffusers for the reference rows) travels as wheels: run
# `bash scripts/gpu_wheels.sh` here first and carry .whl. Elsewhere, a venv from `make install` does: set
# PYTHON=.venv/bin/python. Outputs (8 files) go to $OUT, which the device runner sets; default ./gpu_out/<UTC time>/.
# A rerun of some stages only: ONLY=train,sampling bash scripts/gpu_check.sh (setup always runs); the timeouts
# (T_TESTS, T_TRAIN, T_SAMPLE) and the bench arguments (TRAIN_ARGS, SAMPLE_ARGS) can be set the same way.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out/$(date -u +%Y%m%d-%H%M%S)}  # a new folder per run: an earlier one is kept
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T_SETUP=${T_SETUP:-30} T_TESTS=${T_TESTS:-130} T_TRAIN=${T_TRAIN:-160} T_SAMPLE=${T_SAMPLE:-140}
T_EAGER=${T_EAGER:-40}  # each bench first runs its eager rows alone: their report survives a compile that overruns
# 30 + 130 + 40 + 160 + 40 + 140 = 540 s in all
MARGIN=35  # a bench's time budget is its stage's timeout less this: imports, the report, the last round's overrun
TRAIN_ARGS=${TRAIN_ARGS:-"--preset celeba --rows multires,fixed,diffusers --precision bf16 --compile --repeats 10"}
SAMPLE_ARGS=${SAMPLE_ARGS:-"--preset celeba --rows sampling --samplers ddim-50,dpmpp_2m-10 --sample-resolutions 64 \
--sample-batches 128,256 --capture --repeats 3"}
# A persistent compile cache in the repo (git-ignored): a second run on the same warm machine compiles from it.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.gpu_cache/inductor}
ONLY=,${ONLY:-tests,train,sampling},
STAGES=$OUT/stages.txt
for file in stages.txt tests.log train.log sampling.log; do : >"$OUT/$file"; done

stage() {  # stage NAME SECONDS LOG COMMAND...: the command under timeout, its output added to $OUT/LOG, its rc in
  # stages.txt (NAME-eager runs with NAME; setup's output goes to stages.txt too: the runner brings back 8 files)
  local name=$1 limit=$2 log=$OUT/$3 began=$SECONDS rc
  shift 3
  if [ "$name" != setup ] && [[ $ONLY != *",${name%-eager},"* ]]; then
    echo "$name skipped (ONLY=${ONLY:1:-1})" | tee -a "$STAGES" "$log"
    return
  fi
  echo "== $name (timeout ${limit} s): $*" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - began))$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (timed out)')" | tee -a "$STAGES"
}

setup() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mrdiff-site \
      .whl/*.whl || return 1
  fi
  "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
missing = []
for name in ("lightning", "torchmetrics", "jsonargparse", "diffusers", "pytest", "triton", "mrdiff.cli", "mrdiff.bench"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as error:  # noqa: BLE001 - report every import that fails, then fail the stage
        missing.append(f"{name}: {error}")
sys.exit("\n".join(missing) or None)
EOF
}

export PYTHONPATH=/tmp/mrdiff-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export -f setup
export PY
stage setup "$T_SETUP" stages.txt bash -c setup
pytest_args=(-v -p no:cacheprovider -rfEs --durations=15)
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=100)
stage tests "$T_TESTS" tests.log "$PY" -m pytest "${pytest_args[@]}" tests/test_gpu.py
# shellcheck disable=SC2086  # the argument strings split into words on purpose
stage train-eager "$T_EAGER" train.log "$PY" -m mrdiff.bench ${TRAIN_ARGS/--compile/} --out "$OUT/train_eager.json"
# shellcheck disable=SC2086
stage train "$T_TRAIN" train.log "$PY" -m mrdiff.bench $TRAIN_ARGS --time-budget $((T_TRAIN - MARGIN)) \
  --cache-dir "$TORCHINDUCTOR_CACHE_DIR" --out "$OUT/train.json"
# shellcheck disable=SC2086
stage sampling-eager "$T_EAGER" sampling.log "$PY" -m mrdiff.bench ${SAMPLE_ARGS/--capture/} \
  --out "$OUT/sampling_eager.json"
# shellcheck disable=SC2086
stage sampling "$T_SAMPLE" sampling.log "$PY" -m mrdiff.bench $SAMPLE_ARGS --time-budget $((T_SAMPLE - MARGIN)) \
  --cache-dir "$TORCHINDUCTOR_CACHE_DIR" --out "$OUT/sampling.json"

# What the caller sees of the output: each stage's result, then the reports (the files in $OUT hold the rest).
echo
tail -n 25 "$OUT/tests.log"
for log in train sampling; do
  echo "-- $log"
  sed -n '/^mrdiff bench/,$p' "$OUT/$log.log" | grep -v '^$' || tail -n 30 "$OUT/$log.log"
done
echo "-- stages"
cat "$STAGES"
