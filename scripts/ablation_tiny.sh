#!/usr/bin/env bash
# The distillation recipes side by side on the CPU demo (30 runs, one after another; their training
# alone took 3 hours on 2 cores, the one-thread levers two at a time): each distils the tiny
# teacher (python teacher.py --preset tiny) to k = 4 at about the same CPU time, then bench.py
# scores its samples; scripts/ablation.py gathers results/ablation_tiny.{json,png}.
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
# the tiny preset's earlier shape: a 1-layer slot MLP on 128-character windows, 600 steps; the runs
# before `gumbel` draw by the inverse CDF, as they did before the Gumbel-max coupling, and those
# before `kl_reverse` learn by forward KL, as they did before --kl
fw=(--kl forward)
iv=(--coupling inverse_cdf "${fw[@]}")
before=(--readout_layers 1 --block_size 128 --steps_per_stage 600 "${iv[@]}")
# the recipes ran before the tiny preset took lr 2e-3 and ema 0.99, then a frozen trunk at 5e-3
old=("${before[@]}" --lr 1e-3 --ema 0 --no-freeze_trunk)
for recipe in paper onpolicy cdf cdf_seq; do
  steps=600; [ "$recipe" = paper ] && steps=250   # the paper's recipe: three stages of 250
  run "$out/$recipe" "$recipe" "${old[@]}" --recipe "$recipe" --steps_per_stage "$steps"
done
run "$out/preset" preset "${iv[@]}"   # the tiny preset: cdf_seq on a frozen trunk
lever() {   # lever NAME FLAGS...: the tiny preset's earlier shape, then FLAGS, into out/lever_NAME
  local name=$1
  shift
  run "out/lever_$name" "$name" "${before[@]}" "$@"
}
lever layers1   # the tiny preset before its 3-layer slot MLP
lever seed --seed 1   # the same with other batches, noise and initial weights
export OMP_NUM_THREADS=1   # the levers on top of cdf_seq ran on one thread each, two at a time
lever high --noise_features high "${old[@]}"
lever ema --lr 1e-3 --ema 0.99 --no-freeze_trunk
lever lr --lr 2e-3 --ema 0 --no-freeze_trunk
lever paper_lr --recipe paper --steps_per_stage 250 --lr 2e-3 --ema 0 --no-freeze_trunk
lever lr_ema --lr 2e-3 --ema 0.99 --no-freeze_trunk   # the preset until frozen
lever anchors --anchors 64 --lr 2e-3 --ema 0 --no-freeze_trunk
lever long --steps_per_stage 1200 --lr 2e-3 --no-freeze_trunk   # twice the compute
lever paper_long --recipe paper --steps_per_stage 500 --lr 1e-3 --ema 0 --no-freeze_trunk
lever lr5_ema --lr 5e-3 --no-freeze_trunk   # the preset's lr, every weight
lever frozen --lr 2e-3   # a frozen trunk at the earlier preset's lr
lever frozen_long --steps_per_stage 1200   # twice the compute, each side
lever lr5_long --steps_per_stage 1200 --lr 5e-3 --no-freeze_trunk
lever layers2 --readout_layers 2   # a deeper slot MLP
lever layers3 --readout_layers 3
lever b64 --block_size 64   # windows as long as the evaluation's contexts (<= 54 characters)
run out/lever_layers5 layers5 --readout_layers 5 "${iv[@]}"   # on top of the tiny preset
run out/lever_preset_long preset_long --steps_per_stage 1500 "${iv[@]}"
unset OMP_NUM_THREADS
run out/lever_gumbel gumbel "${fw[@]}"   # the Gumbel-max coupling
# the loss: KL(student || teacher) per slot; then the tiny preset as it stands (--kl both, the two
# KLs' mean). These two ran side by side, one thread each
OMP_NUM_THREADS=1 run out/lever_kl_reverse kl_reverse --kl reverse
OMP_NUM_THREADS=1 run out/lever_kl_both kl_both
run out/lever_kl_both_long kl_both_long --steps_per_stage 1500   # twice the compute
run out/lever_bf16 bf16 --dtype bfloat16   # the GPU's autocast
run out/lever_anchors16 anchors16 --anchors 16 --steps_per_stage 1000   # fewer anchors, more steps
$PY scripts/ablation.py "$out" results/ablation_tiny
