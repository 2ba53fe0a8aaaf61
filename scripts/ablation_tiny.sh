#!/usr/bin/env bash
# The distillation recipes side by side on the CPU demo (about an hour on 2 cores): each distils
# the tiny teacher (python teacher.py --preset tiny) to k = 4 at about the same CPU time, then
# bench.py scores its samples; scripts/ablation.py gathers results/ablation_tiny.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
out=out/ablation_tiny
for recipe in paper onpolicy cdf cdf_seq; do
  steps=600; [ "$recipe" = paper ] && steps=250   # the paper's recipe: three stages of 250
  $PY distill.py --preset tiny --recipe "$recipe" --steps_per_stage "$steps" \
      --out_dir "$out/$recipe" --overwrite
  $PY bench.py --teacher out/teacher_tiny/best.pt --student "$out/$recipe/student_k4.pt" \
      --data_dir data/shakespeare_char --no-speed --quality_samples 128 --name "$recipe" \
      --out_dir "$out/$recipe"
done
for lever in "high:--noise_features high" "ema:--ema 0.99"; do   # levers on top of the default
  name=${lever%%:*}
  OMP_NUM_THREADS=1 $PY distill.py --preset tiny ${lever#*:} --out_dir "out/lever_$name" --overwrite
  OMP_NUM_THREADS=1 $PY bench.py --teacher out/teacher_tiny/best.pt \
      --student "out/lever_$name/student_k4.pt" --data_dir data/shakespeare_char --no-speed \
      --quality_samples 128 --name "$name" --out_dir "out/lever_$name"
done
$PY scripts/ablation.py "$out" results/ablation_tiny
