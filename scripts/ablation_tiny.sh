#!/usr/bin/env bash
# The distillation recipes side by side on the CPU demo (about an hour on 2 cores): each distils
# the tiny teacher (python teacher.py --preset tiny) to k = 4 at about the same CPU time, then
# bench.py scores its samples; scripts/ablation.py gathers results/ablation_tiny.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
out=out/ablation_tiny
run() {   # run DIR NAME DISTILL_FLAGS...: distil into DIR, then score the student's samples
  local dir=$1 name=$2
  shift 2
  $PY distill.py --preset tiny "$@" --out_dir "$dir" --overwrite
  $PY bench.py --teacher out/teacher_tiny/best.pt --student "$dir/student_k4.pt" \
      --data_dir data/shakespeare_char --no-speed --quality_samples 128 --name "$name" \
      --out_dir "$dir"
}
# the recipes ran before the tiny preset took lr 2e-3 and ema 0.99, then a frozen trunk at 5e-3
old=(--lr 1e-3 --ema 0 --no-freeze_trunk)
for recipe in paper onpolicy cdf cdf_seq; do
  steps=600; [ "$recipe" = paper ] && steps=250   # the paper's recipe: three stages of 250
  run "$out/$recipe" "$recipe" --recipe "$recipe" --steps_per_stage "$steps" "${old[@]}"
done
run "$out/preset" preset   # the tiny preset as it stands: cdf_seq on a frozen trunk
run out/lever_seed seed --seed 1   # the same with other batches, noise and initial weights
export OMP_NUM_THREADS=1   # the levers on top of cdf_seq ran on one thread each, two at a time
run out/lever_high high --noise_features high "${old[@]}"
run out/lever_ema ema --lr 1e-3 --ema 0.99 --no-freeze_trunk
run out/lever_lr lr --lr 2e-3 --ema 0 --no-freeze_trunk
run out/lever_paper_lr paper_lr --recipe paper --steps_per_stage 250 --lr 2e-3 --ema 0 \
    --no-freeze_trunk
run out/lever_lr_ema lr_ema --lr 2e-3 --ema 0.99 --no-freeze_trunk   # the preset until frozen
run out/lever_anchors anchors --anchors 64 --lr 2e-3 --ema 0 --no-freeze_trunk
run out/lever_long long --steps_per_stage 1200 --lr 2e-3 --no-freeze_trunk   # twice the compute
run out/lever_paper_long paper_long --recipe paper --steps_per_stage 500 "${old[@]}"
run out/lever_lr5_ema lr5_ema --lr 5e-3 --no-freeze_trunk   # the preset's lr, every weight
run out/lever_frozen frozen --lr 2e-3   # a frozen trunk at the earlier preset's lr
run out/lever_frozen_long frozen_long --steps_per_stage 1200   # twice the compute, each side
run out/lever_lr5_long lr5_long --steps_per_stage 1200 --lr 5e-3 --no-freeze_trunk
$PY scripts/ablation.py "$out" results/ablation_tiny
