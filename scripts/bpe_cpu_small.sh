#!/usr/bin/env bash
# bpe_cpu.sh at the small preset's width (about 130 minutes on 2 cores): is the small preset's
# distillation recipe, which the GPU run will use, as good at width 384 as at the tiny shape's 128?
# A teacher of the small preset's shape (6 x 384) on the offline corpus (64-token context, 1,000
# steps), then distill.py --preset small (lr 2e-3; two seeds; and in bf16 autocast, as on a GPU)
# and the same at the tiny preset's lr 5e-3, each to k = 4 at batch 8 x 16 anchors, scored by
# bench.py. Needs data/offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000   # as in bpe_cpu.sh
out=out/bpe_cpu_small
$PY teacher.py --preset small --block_size 64 --batch_size 16 --max_steps 1000 --eval_iters 5 \
    --out_dir $out/teacher --overwrite
run() {   # run NAME DISTILL_FLAGS...: distil into $out/NAME, then score the student's samples
  local name=$1
  shift
  $PY distill.py --preset small --teacher $out/teacher/best.pt --block_size 64 --batch_size 8 \
      --anchors 16 --eval_samples 128 "$@" --out_dir "$out/$name" --overwrite
  $PY bench.py --teacher $out/teacher/best.pt --student "$out/$name/student_k4.pt" \
      --no-speed --quality_samples 512 --name "$name" --out_dir "$out/$name"
}
run small --steps_per_stage 600
run small_seed1 --steps_per_stage 600 --seed 1   # other batches, noise and initial weights
run lr5e3 --steps_per_stage 600 --lr 5e-3
run bf16 --steps_per_stage 600 --dtype bfloat16   # the GPU's autocast; every other run fp32
cp $out/teacher/teacher_small.json results/bpe_cpu_small_teacher.json
$PY scripts/ablation.py $out results/bpe_cpu_small small small_seed1 lr5e3 bf16
