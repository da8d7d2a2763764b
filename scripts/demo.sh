#!/usr/bin/env bash
# `make demo`: (1) the shipped CPU evidence models sampled at R, 2R and R x 2R, next to their evaluation
# reports: fixed-resolution and multi-resolution (models/fixed_97min/seed0.pt, models/multires/seed0.pt) and multi-resolution with a quarter
# of its batches whole 2R canvases (models/canvases/seed0.pt), each trained at R = 32 for 97 minutes
# on one thread of a 2-core CPU; (2) a short quickstart fit on synthetic scenes, calibrated with NoiseShift and
# evaluated per resolution, to show the whole pipeline end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
MRDIFF=${MRDIFF:-.venv/bin/mrdiff}
CONFIG=configs/quickstart.yaml
RUN=runs/quickstart
CKPT=$RUN/checkpoints/last.ckpt
DEMO=runs/demo
export WANDB_MODE=${WANDB_MODE:-offline} MRDIFF_OVERWRITE=1  # the demo owns runs/quickstart and runs/demo

rm -rf "$DEMO"
echo "== 1/4 shipped models: fixed-resolution DDPM, multi-resolution, + whole canvases; at 32, 64 and 32x64 =="
for entry in fixed=models/fixed_97min/seed0.pt multires=models/multires/seed0.pt \
             canvases=models/canvases/seed0.pt; do  # stochastic DDIM-25, as their evaluation
  model=${entry%%=*} weights=${entry#*=}
  $MRDIFF sample --config configs/evidence/base.yaml --config configs/evidence/$model.yaml \
    --config configs/evidence/cpu.yaml --ckpt_path $weights \
    --resolutions "[32,64,32x64]" --num_samples 16 --sampler ddim --steps 25 --eta 1 --out_dir $DEMO/$model
done
echo
echo "Their evaluation (400 samples per cell, 95% intervals; docs/evidence.md):"
sed -n '1,14p' results/evidence/cpu_matrix_v2_97min/table.md  # the shipped 97-minute weights' 400-sample report
echo "The canvases model (models/canvases/seed0.pt), same seeds and sampler (cpu_matrix_remedy/table.md):"
sed -n '9p' results/evidence/cpu_matrix_remedy/table.md
echo "At matched compute (937 M training pixels), two fixed and three canvases seeds at 2R: the fixed models tile"
echo "the landscape (stacked horizons), the canvases models do not (results/evidence/matched_seeds_kid/):"
sed -n '3,$p' results/evidence/matched_seeds_kid/summary_64.md
rm -rf "$RUN"
echo "== 2/4 quickstart training, 150 steps (NoiseShift is calibrated at the end of fit) =="
$MRDIFF fit --config $CONFIG --trainer.max_steps=150 --trainer.val_check_interval=150
echo "== 3/4 sampling at 32, 48 and 64 with NoiseShift (trained on 32² patches) =="
$MRDIFF sample --config $CONFIG --ckpt_path $CKPT --resolutions "[32,48,64]" --num_samples 16 \
  --sampler dpmpp_2m --steps 10 --noiseshift $RUN/noiseshift.json  # the sampler the table was calibrated for
echo "== 4/4 evaluation per resolution =="
$MRDIFF test --config $CONFIG --ckpt_path $CKPT --trainer.logger=false
echo
echo "mrdiff demo: shipped-model grids in $DEMO/{fixed,multires,canvases}/, their reports in"
echo "             results/evidence/cpu_matrix_v2_97min/ and cpu_matrix_remedy/;"
echo "             quickstart grids in $RUN/samples/, NoiseShift table $RUN/noiseshift.json (plot .png),"
echo "             evaluation table $RUN/eval_table.md (also .csv, .json)"
