#!/usr/bin/env bash
# Which recipe keeps the teacher's distribution, confirmed on the small preset on one GPU (at most
# 9 minutes, one device command): the small teacher once, then three distillations to k = 4 of
# 600 steps each, scored by bench.py (quality only, on 256 prefixes). The arms:
#   paper           the paper's recipe, its three stages 200 steps each (as on the H100 before:
#                   lr 3e-4, no weight average, inverse CDF; but the preset's 32 anchors, not 128)
#   frozen_forward  distill.py's small preset, what won on the CPU (cdf_seq on a frozen trunk, a
#                   weight average, a 3-layer slot MLP, Gumbel-max), learning by forward KL
#   frozen          the same by the mean of the forward and reverse KL (the default)
# Each distillation stops at 100 s and is then scored on what it saved. They run eager, all three
# alike: under torch.compile each of the paper's stages would compile anew (tens of seconds each,
# unmeasured) within that limit, which its 600 steps fill by a third at the H100's compiled
# 35 / 18 / 11.5 steps/s, so it might stop before k = 4 and be unscorable; and a failing compile
# would lose an arm.
# Summaries, quality JSON and logs go into ${OUT:-gpu_out}/gpu_quality.tgz (checkpoints stay in
# out/gpu_quality/), summary.log beside it.
#     bash scripts/gpu_quality.sh                                         # on the GPU
#     PRESET=tiny STEPS=9 TEACHER_STEPS=20 PREFIXES=8 bash scripts/gpu_quality.sh   # CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
runs=out/gpu_quality
res=$runs/results   # everything that goes back, packed at the end
logs=$res
preset=${PRESET:-small}
steps=${STEPS:-600}   # a stage of cdf_seq; the paper's three stages get a third each
mkdir -p "$out" "$res"
export PYTHONUNBUFFERED=1
source scripts/timed_run.sh
run teacher 130 python teacher.py --preset "$preset" --out_dir "$runs/teacher" --overwrite \
    ${TEACHER_STEPS:+--max_steps "$TEACHER_STEPS" --eval_interval "$TEACHER_STEPS"}
distill() {   # distill NAME FLAGS...: distil the teacher into $runs/NAME, then score its samples
  local name=$1
  shift
  run "distill_$name" 100 python distill.py --preset "$preset" --teacher "$runs/teacher/best.pt" \
      --out_dir "$runs/$name" --overwrite --no-compile "$@"
  cp "$runs/$name/log.jsonl" "$res/log_$name.jsonl"   # the curve, even if stopped
  cp "$runs/$name/distill_$preset.json" "$res/distill_$name.json" 2>/dev/null   # (none if stopped)
  local student=$runs/$name/student_k4.pt
  if [ ! -f "$student" ]; then   # stopped at its time limit: score the weight average it saved
    student=$runs/$name/stopped.pt
    python - "$runs/$name/last.pt" "$student" <<'PY'
import sys, torch
ckpt = torch.load(sys.argv[1], weights_only=False)
ckpt["model"] = (ckpt.get("ema") or ckpt)["model"]   # raw where the run keeps no average
torch.save(ckpt, sys.argv[2])
PY
  fi
  run "bench_$name" 35 python bench.py --teacher "$runs/teacher/best.pt" --no-speed \
      --student "$student" --quality_samples "${PREFIXES:-256}" --name "$name" --out_dir "$res"
}
distill paper --recipe paper --steps_per_stage $((steps / 3)) --no-freeze_trunk --lr 3e-4 --ema 0
distill frozen_forward --steps_per_stage "$steps" --kl forward
distill frozen --steps_per_stage "$steps"
cp "$runs/teacher/teacher_$preset.json" "$res/"
ls -la "$res" >> "$out/summary.log"
tar czf "$out/gpu_quality.tgz" -C "$res" .
