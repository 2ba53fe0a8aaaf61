#!/usr/bin/env bash
# gpu_quality.sh's comparison on the CPU, on GPT-2 tokens instead of characters (120 minutes on 2
# cores): does what won on characters hold over a 50,257-token vocabulary? A teacher of the tiny
# shape on the offline corpus (64-token context), then the paper's recipe (three stages, at about
# the time of the others' one) and the default, by forward KL and by the mean of both KLs (the
# latter on two seeds and at the small preset's lr, there also at twice the anchors for half the
# steps), each distilled to k = 4 and scored by bench.py.
# scripts/ablation.py gathers their results into results/bpe_cpu.{json,png}; sample.py shows the
# default's text beside the teacher's. Needs data/offline (python prepare_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# glibc hands each freed 100 MB logits tensor back to the OS and faults it in again: much slower
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000
out=out/bpe_cpu
data=(--data_dir data/offline)
$PY teacher.py --preset tiny "${data[@]}" --block_size 64 --max_steps 1500 --eval_iters 5 \
    --out_dir $out/teacher --overwrite
run() {   # run NAME DISTILL_FLAGS...: distil into $out/NAME, then score the student's samples
  local name=$1
  shift
  $PY distill.py --preset tiny "${data[@]}" --teacher $out/teacher/best.pt --batch_size 8 \
      --anchors 16 "$@" --out_dir "$out/$name" --overwrite
  $PY bench.py --teacher $out/teacher/best.pt --student "$out/$name/student_k4.pt" \
      --no-speed --quality_samples 512 --name "$name" --out_dir "$out/$name"
}
run paper --recipe paper --steps_per_stage 600 --no-freeze_trunk --lr 1e-3 --ema 0
run forward --steps_per_stage 600 --kl forward
run both --steps_per_stage 600
run both_seed1 --steps_per_stage 600 --seed 1   # other batches, noise and initial weights
run lr2e3 --steps_per_stage 600 --lr 2e-3   # the small preset's learning rate
run lr2e3_anchors32 --steps_per_stage 300 --lr 2e-3 --anchors 32   # as many windows, half the steps
cp $out/teacher/teacher_tiny.json results/bpe_cpu_teacher.json
$PY sample.py --teacher $out/teacher/best.pt --student $out/both/student_k4.pt --num_samples 2 \
    --max_new_tokens 24 > results/bpe_cpu_sample.txt
$PY scripts/ablation.py $out results/bpe_cpu paper forward both both_seed1 lr2e3 lr2e3_anchors32
