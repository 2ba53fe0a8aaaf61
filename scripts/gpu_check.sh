#!/usr/bin/env bash
# The H200 speed check (issue: speed on the H200 against the strongest AR baseline), in one go:
# the GPU tests of the fast path, then the paper shape (12 x 768, random weights) against batch
# size, AR and k = 2, 3, 4 on the same compiled, CUDA-graph-replayed decode path (the paper's argmax
# student; then distill.py's default: the cdf_seq readout with the tiny preset's 3-layer slot MLP,
# AR and student drawing by Gumbel-max, at three batch sizes), then a per-step
# profile. Everything lands in ${OUT:-gpu_out}/ (logs, JSON, plots); each part has its own time
# limit, and an unfinished grid continues with --resume.
#     bash scripts/gpu_check.sh            # about 12 minutes on one H200
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
logs=$out   # each part's log beside the results
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source scripts/timed_run.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/device.txt" 2>&1
run gpu_tests 120 python -m pytest -q tests/test_fast.py
run roofline 30 python bench.py --no-trained --roofline H200 --out_dir "$out"
run speed_1024 330 python bench.py --no-trained --attention flex --compile --seq_lens 1024 \
    --name paper_shape_flex_compile --out_dir "$out"
run speed_cdf_seq 120 python bench.py --no-trained --attention flex --compile --seq_lens 1024 \
    --readout cdf_seq --readout_layers 3 --coupling gumbel --batch_sizes 1,64,512 \
    --name paper_shape_cdf_seq --out_dir "$out"
run profile 90 python bench.py --no-trained --attention flex --compile --profile \
    --batch_sizes 1,512 --seq_lens 1024 --out_dir "$out"
ls -la "$out" >> "$out/summary.log"
