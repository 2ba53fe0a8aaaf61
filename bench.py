"""
Benchmark K-Forcing against AR decoding: speed (tokens/s, speedup, memory-bandwidth utilisation) and quality
(gen-PPL, entropy, same-noise agreement, repetition). Writes results/<name>.json, and a CSV and a plot for each of
speed and quality that it ran (--name: a rerun under a name replaces that name's files).

    python bench.py                               # CPU: tiny preset, a small grid (about a minute)
    python bench.py --preset small                # one GPU: the full grid, paper shape + the trained model
    python bench.py --preset small --no-quality --batch_sizes 1,64 --seq_lens 128   # speed only (tiny: 64 at most)
    python bench.py --no-trained                  # speed of the paper shape only: no checkpoint needed
    python bench.py --no-trained --resume         # the same grid, continued after Ctrl-C, a time limit or a crash
    python bench.py --no-trained --profile --batch_sizes 1,512 --seq_lens 1024   # where a decode step's time goes
    python bench.py --no-trained --roofline H100  # the grid's ceilings on an H100, computed (any machine, seconds)

Speed (METHOD.md §4): fixed-length generation from 6-token prefixes to a total of --seq_lens tokens, bf16 weights
and KV cache on both sides, and ONE decode path for both: model.generate with a static KV cache and, on CUDA,
each decode step replayed from a CUDA graph (model.CUDAGraphStep); --attention picks how a cached pass
attends (model.KVCache), the same for both sides. AR is the teacher (k = 1, one token per pass, sampled by
the inverse CDF, summed in float32 for bf16 weights as a server would: model.inverse_cdf); K-Forcing is the
student with k tokens per pass (its argmax readout; a k=4 student decodes k = 2, 3 with its first slots).
tokens/s counts new tokens over the whole generation (prefill included); warm-up and graph capture are not
timed; AR and every k are timed back to back in each repeat and the medians over --repeats are reported.
Two models: the paper's shape (12 x 768, 12 heads, block 1024) with RANDOM weights (speed does not depend
on the weights) and the trained teacher/student.

Roofline (on a GPU whose peaks are known, and for any GPU with --roofline): the tokens/s that each side could
not exceed, from the bytes and FLOPs of each phase of a generation (generation_phases) at the GPU's peaks: in
sequence (each phase bound by its bytes or its FLOPs, one after another, as the kernels here run) and
overlapped (compute hidden under memory traffic: the bound for any implementation). A K-Forcing pass reads the
weights and the cache once for k tokens, but runs 2k rows through the dense layers (the k committed tokens and
the k noise slots) where AR runs k rows over k passes: where bytes bind (small batch, long cache) the ceiling
is k x AR's; where the dense layers turn compute-bound it falls below that.

Quality (METHOD.md §7): --quality_samples continuations of 6-token val prefixes, decoded in float32 by the
teacher (AR) and by the student at k = 1..max_k from the SAME noise, temperature 1, no penalty. Same-noise
agreement per slot twice: free-running (`agreement`: both decode their own tokens, so they part at the first
difference) and on the teacher's context (`window_agreement`: every window of k slots starts from the teacher's
sample so far, model.window_agreement), the measure to compare with the 59/33/20/16% that a third-party study
measured for the paper's released k = 4 model; and, to read them against, the agreement of a student blind to the
noise (`agreement_without_noise`: an independent draw from the teacher, or always its most likely token).
"""
import argparse
import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (ArgumentParser, StopFlag, UserError, atomic_write, device_name, draw_noise_blind, ensure_writable,
                    git_commit, load_checkpoint, load_split, model_from_checkpoint, noise_blind, out_of_memory, pyplot,
                    resolve_device, run_cli, sample_windows, save_figure, write_json)
from model import (GPT, GPTConfig, NOISE_CHUNK, PEAK_FLOPS, CUDAGraphStep, KVCache, agreement_without_noise,
                   continuation_logits, device_peak, generate, same_noise_agreement, window_agreement)
from sample import find_checkpoints, load_models
from teacher import PRESETS   # the presets' names, as teacher.py and distill.py take them

PROMPT_LEN = 6   # the paper's 6-token prefixes
PAPER_SHAPE = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_embeddings=False)
PAPER_BAND = (2.4, 3.5)   # the abstract's k = 4 speedup "across batch sizes" on an H100
# Peak HBM bandwidth (bytes/s), matched in order against torch.cuda.get_device_name. GH200 ships with 4.0 or
# 4.9 TB/s under one name: None (unknown) rather than H200's figure.
PEAK_BANDWIDTH = [("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("GH200", None), ("H200", 4.8e12),
                  ("A100-SXM4-40GB", 1.555e12), ("A100-PCIE-40GB", 1.555e12), ("A100", 2.0e12)]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="trained checkpoints: out/teacher_<preset>/best.pt and the highest "
                        "out/distill_<preset>/student_k*.pt (default: small if trained, else tiny, as sample.py)")
    p.add_argument("--teacher", default=None, help="AR teacher checkpoint (overrides --preset)")
    p.add_argument("--student", default=None, help="K-Forcing student checkpoint (overrides --preset)")
    p.add_argument("--judge", default=None, help="AR checkpoint that scores gen-PPL (default: the teacher)")
    p.add_argument("--batch_sizes", default=None,
                   help="comma list (default: 1,8,32,64,128,256,512 on CUDA, 1,8 on CPU)")
    p.add_argument("--seq_lens", default=None, help="total tokens (prefix + generated), comma list; each model "
                   "runs those that fit its block size (default: 128,1024 on CUDA, 64 on CPU)")
    p.add_argument("--ks", default=None, help="student tokens per pass, comma list of 2..max_k; AR (k = 1) is "
                   "always measured (default: 2,3,4, up to the student's max_k)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per point, median reported (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--paper_shape", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the paper's 12 x 768 shape with random weights (default: on for CUDA, off on CPU)")
    p.add_argument("--trained", action=argparse.BooleanOptionalAction, default=True,
                   help="time and score the trained teacher and student (default: on); --no-trained times only "
                        "the paper's shape with random weights, needs no checkpoint and implies --no-quality")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                   help="run the speed grid (default: on)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                   help="run the quality metrics of the trained models (default: on, off with --no-trained)")
    p.add_argument("--profile", action="store_true",
                   help="instead of the speed grid and quality: profile ONE decode step per point and k (cache half "
                        "full): its time, the kernels it launches and the heaviest ones (torch.profiler); writes "
                        "<name>.json with a `profile` list (default name: bench_<preset>_profile, or "
                        "bench_paper_shape_profile with --no-trained)")
    p.add_argument("--roofline", metavar="GPU", default=None,
                   help="instead of timing: the roofline ceiling of every point of the speed grid on that GPU (H100, "
                        "H200, A100, ...: a name in the peak tables), computed from the bytes and FLOPs a generation "
                        "needs, on any machine in seconds; writes <name>.json with a `roofline` list and <name>.csv "
                        "(default name: bench_<preset>_roofline_<gpu>, or bench_paper_shape_roofline_<gpu> with "
                        "--no-trained)")
    p.add_argument("--quality_samples", type=int, default=256,
                   help="val prefixes, one continuation each (default: 256)")
    p.add_argument("--quality_tokens", type=int, default=None,
                   help="continuation length (default: 96, or less where the block size requires)")
    p.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa",
                   help="attention of the cached decode passes, both sides: sdpa (a mask over the whole "
                        "cache) or flex (FlexAttention over the written blocks only, compiled per shape: the faster "
                        "on a GPU, see model.KVCache) (default: sdpa)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decode step before capturing it (experimental; the compile "
                        "time of every new shape goes into warmup_s, not into the timings)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="weights and KV cache of the speed runs, both sides (default: bfloat16; with float32, "
                        "AR's sampler sums its softmax in float64, as the quality runs need, so AR runs slower than "
                        "a server's would and the speedups are not comparable); quality always decodes in float32")
    p.add_argument("--data_dir", default="data/offline",
                   help="where val.bin lives, for the quality prefixes (default: data/offline)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the prefixes, the noise and the random paper-shape weights (default: 0)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto: cuda if available)")
    p.add_argument("--name", default=None,
                   help="output file stem; a rerun under a name replaces all of that name's files (default: "
                        "bench_<preset>, bench_trained with --teacher/--student, bench_paper_shape with --no-trained; "
                        "then _speed_only with --no-quality, _quality_only with --no-speed, _profile with --profile, "
                        "_roofline_<gpu> with --roofline)")
    p.add_argument("--out_dir", default="results", help="where the JSON, CSVs and plots go (default: results)")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished speed or profile grid (interrupted, killed or crashed) from "
                        "<out_dir>/<name>.partial.json, which every point updates: the same command and machine, "
                        "plus --resume; the points done are kept, the rest run")
    return p.parse_args(argv)


def int_list(text, flag, example):
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--{flag} {text!r} is not a comma list of integers, e.g. {example}") from None


# ----------------------------------------------------------------------------------------------------
# Speed

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)   # kernels run asynchronously: wait before reading a timer


def weight_bytes(model, part=""):
    """Bytes of the weights of `part` (a module name prefix) that a pass reads. parameters() counts a tied
    embedding once; an untied input embedding is only gathered (a few rows), so it does not count."""
    n = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name.startswith(part))
    if not model.config.tie_embeddings and not part:
        n -= model.wte.weight.numel() * model.wte.weight.element_size()
    return n


def linear_weights(model, part):
    """Weights of the nn.Linear layers under `part` (a module name prefix): 2 FLOPs each for every row."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if name.startswith(part) and isinstance(m, torch.nn.Linear))


def generation_phases(model, B, P, n_new, k, cache_elem):
    """What a whole generation must at least move and compute, as (bytes, FLOPs) per phase, in the order they run:
    the noise encoder once per call (model.generate runs it before its loop, NOISE_CHUNK positions a call), then per
    pass the trunk's dense layers (weights read once, 2 FLOPs per weight for each of the pass's rows), the LM head (the
    same, for the rows read out only) and attention (the KV cache read up to the current length and the K/V of the
    committed tokens written; 4 FLOPs per query, key and channel). Activations, norms and the sampler not counted."""
    cfg = model.config
    kv_token = 2 * cfg.n_layer * cfg.n_embd * cache_elem   # K and V of one token, all layers
    slots = k if cfg.max_k else 0                          # AR: no noise slots; it reads out its last row
    readout = slots or 1
    encoder = weight_bytes(model, "noise_encoder.")
    w = model.lm_head.weight   # (tied or not: weight_bytes names a tied tensor after the embedding)
    head, head_bytes = w.numel(), w.numel() * w.element_size()
    trunk, trunk_bytes = linear_weights(model, "blocks."), weight_bytes(model) - encoder - head_bytes   # + final norm
    phases = []
    if cfg.max_k:
        encoder_flops = 2 * B * linear_weights(model, "noise_encoder.")   # per position
        phases += [(encoder, encoder_flops * min(NOISE_CHUNK, n_new - i)) for i in range(0, n_new, NOISE_CHUNK)]
    length = 0
    for s in range(0, n_new, k):
        written = P if s == 0 else k                       # the prompt at prefill, then the last k tokens
        rows = written + slots
        length += written
        phases += [(trunk_bytes, 2 * B * rows * trunk), (head_bytes, 2 * B * readout * head),
                   (B * kv_token * (length + written), 4 * B * cfg.n_layer * cfg.n_embd * rows * (length + slots))]
    return phases


def bytes_moved(model, B, P, n_new, k, cache_elem):
    """MBU's numerator: the bytes of generation_phases."""
    return sum(b for b, _ in generation_phases(model, B, P, n_new, k, cache_elem))


ROOFLINE_FIELDS = ("roofline_tokens_per_s", "roofline_speedup", "roofline_overlapped_speedup")


def roofline(runs, B, seq_len, peaks):
    """The roofline at one point, {k: {field: value}} (runs: {k: model}, AR is k = 1). roofline_tokens_per_s: what a
    generation could not exceed with the phases of generation_phases run one after another, as every kernel here
    runs, each at the peak bandwidth or the peak FLOP/s, whichever binds it, with no launch overhead; roofline_speedup:
    its ratio to AR's. roofline_overlapped_speedup: the same ratio if compute and memory traffic overlapped perfectly
    (all bytes / bandwidth against all FLOPs / peak; splitting the batch across streams would approach it, which
    nothing here does): the bound for any implementation. None where a peak is unknown (CPU) or the weights are not
    bf16 (the FLOP/s peaks are bf16's). Ceilings, not forecasts: a measured speedup exceeds the ceilings' ratio where
    AR runs further below its own ceiling than K-Forcing."""
    bandwidth, flops = peaks
    if not (bandwidth and flops) or any(next(m.parameters()).dtype != torch.bfloat16 for m in runs.values()):
        return {k: dict.fromkeys(ROOFLINE_FIELDS) for k in runs}
    in_sequence, overlapped = {}, {}
    for k, model in runs.items():
        n = new_tokens(seq_len, k)
        phases = generation_phases(model, B, PROMPT_LEN, n, k, next(model.parameters()).element_size())
        in_sequence[k] = B * n / sum(max(b / bandwidth, f / flops) for b, f in phases)
        overlapped[k] = B * n / max(sum(b for b, _ in phases) / bandwidth, sum(f for _, f in phases) / flops)
    return {k: dict(zip(ROOFLINE_FIELDS, (in_sequence[k], in_sequence[k] / in_sequence[1],
                                          overlapped[k] / overlapped[1]))) for k in runs}


def new_tokens(seq_len, k):
    return (seq_len - PROMPT_LEN) // k * k   # whole passes that fit seq_len


def by_k(teacher, student, ks):
    return {1: teacher, **{k: student for k in ks}}   # AR is k = 1


def sized_to(model, length):
    """The same model (shared weights) whose static KV cache holds `length` entries instead of block_size,
    as a server sizes it to its longest request: a 128-token generation should not attend over 1024 masked
    slots. RoPE has no table, so nothing else depends on the block size."""
    m = copy.copy(model)
    m.config = replace(model.config, block_size=length)
    return m


def point_setup(teacher, student, ks, B, seq_len, device, attention, compile):
    """What every k at one (batch, seq_len) point shares: {k: model sized to seq_len} (AR is k = 1), one static
    cache and one CUDAGraphStep, whose graphs serve the whole point."""
    teacher, student = sized_to(teacher, seq_len), sized_to(student, seq_len)
    cache = KVCache(student.config, B, device, next(teacher.parameters()).dtype, attention)
    return by_k(teacher, student, ks), cache, CUDAGraphStep(compile=compile)


def time_point(teacher, student, ks, B, seq_len, repeats, device, gen, attention, compile):
    """Time AR and every k at one (batch, seq_len) on the same prompts and noise. Returns
    {k: (new tokens, [seconds per repeat], warm-up seconds)}."""
    runs, cache, step = point_setup(teacher, student, ks, B, seq_len, device, attention, compile)
    prompt = torch.randint(teacher.config.vocab_size, (B, PROMPT_LEN), generator=gen).to(device)
    noise = torch.rand(B, seq_len - PROMPT_LEN, generator=gen, dtype=torch.float64).to(device)
    n_new = {k: new_tokens(seq_len, k) for k in runs}

    def run(k, n):
        sync(device)
        t0 = time.perf_counter()
        generate(runs[k], prompt, noise[:, :n], k, cache=cache, step_fn=step)
        sync(device)
        return time.perf_counter() - t0

    # Warm-up, not timed: prefill + one decode step compiles the attention kernels, captures the step's
    # graph (every decode step of a generation has the same shape) and lets cuBLAS pick its kernels.
    warmup = {k: run(k, min(2 * k, n_new[k])) for k in runs}
    times = {k: [] for k in runs}
    for _ in range(repeats):   # AR and K-Forcing back to back, so that each speedup compares one moment
        for k in runs:
            times[k].append(run(k, n_new[k]))
    return {k: (n_new[k], times[k], warmup[k]) for k in runs}


class Progress:
    """The rows of the grid points done so far, saved to <name>.partial.json after every point: a run that is
    interrupted (Ctrl-C or SIGTERM: it stops after the current point), killed or crashed loses at most the point it
    was on, and --resume continues it. Only the same command with the same code on the same machine may continue it
    (`identity`: the flags, source_digest, the GPU, torch, the models' shapes), so that a table never mixes
    machines or versions. Deleted once the run's outputs are written."""

    def __init__(self, path, identity, resume):
        self.path, self.identity = path, identity
        self.done, self.rows, self.skipped = [], [], []   # done: the (model, seq_len, batch) points finished
        if not os.path.exists(path):
            if resume:
                raise UserError(f"--resume: there is no unfinished run to continue ({path} does not exist)")
            return
        try:
            with open(path) as f:
                state = json.load(f)
            done, rows, skipped, made_by = state["done"], state["rows"], state["skipped"], state["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a bench.py progress file; move or delete it") from None
        if not resume:
            raise UserError(f"{path} holds an unfinished run ({len(done)} points done): continue it with --resume, "
                            "or delete that file to start afresh")
        changed = sorted(key for key in {**identity, **made_by} if identity.get(key) != made_by.get(key))
        if changed:
            raise UserError(f"--resume: {path} was made by another command, code or machine (it differs in "
                            f"{', '.join(changed)}); run that command, or delete the file to start afresh")
        self.done, self.rows, self.skipped = [tuple(p) for p in done], rows, skipped

    def add(self, point, rows=(), skipped=None):
        self.done.append(point)
        self.rows += rows
        self.skipped += [skipped] if skipped else []
        write_json(self.path, {"identity": self.identity, "done": self.done, "rows": self.rows,
                               "skipped": self.skipped})

    def finish(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def source_digest():
    """A digest of the code that a timing depends on: a resumed grid never mixes rows of two versions of it."""
    h = hashlib.sha256()
    for name in ("model.py", "common.py", "bench.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def run_grid(models, batch_sizes, device, desc, point, progress, seed):
    """Call point(label, teacher, student, seq_len, batch, generator) -> rows at every point of the grid not yet in
    progress (a Progress), with a progress bar. Each point draws its prompts and noise from a generator of its own,
    so that a resumed grid times the same inputs as an uninterrupted one. A point that runs out of memory is
    skipped (and listed), and the grid goes on. models: [(label, teacher, student, seq_lens)].
    Returns (rows, skipped)."""
    grid = [(m, s, B) for m in models for s in m[3] for B in batch_sizes]
    stop, bar = StopFlag(), tqdm(total=len(grid), initial=len(progress.done), desc=desc, dynamic_ncols=True)
    try:
        for i, ((label, teacher, student, _), seq_len, B) in enumerate(grid):
            where = (label, seq_len, B)
            if where in progress.done:
                continue
            try:
                progress.add(where, point(label, teacher, student, seq_len, B,
                                          torch.Generator().manual_seed(seed * len(grid) + i)))
            except Exception as e:
                if not out_of_memory(e):
                    raise
                progress.add(where, skipped={"model": label, "seq_len": seq_len, "batch_size": B,
                                             "reason": "out of memory"})
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()   # give the point's cache and graph pools back before the next one
            bar.update(1)
            if stop.should_stop() and len(progress.done) < len(grid):
                raise UserError(f"interrupted after {len(progress.done)} of {len(grid)} points; saved "
                                f"{progress.path}; continue with the same command and --resume")
    finally:
        bar.close()   # so that an error starts on a line of its own
        stop.restore()
    return progress.rows, progress.skipped


def peaks_of(device, gpu_name=None):
    """(peak HBM bandwidth, peak dense bf16 FLOP/s) of this device, or of the GPU named gpu_name (--roofline)."""
    return device_peak(device, PEAK_BANDWIDTH, gpu_name), device_peak(device, PEAK_FLOPS, gpu_name)


def run_speed(models, ks, batch_sizes, repeats, device, seed, attention, compile, peaks, progress):
    def point(label, teacher, student, seq_len, B, gen):
        res = time_point(teacher, student, ks, B, seq_len, repeats, device, gen, attention, compile)
        runs = by_k(teacher, student, ks)
        roof = roofline(runs, B, seq_len, peaks)
        ar_n, ar_t, _ = res[1]
        rows = []
        for k, (n, ts, warm) in res.items():
            model = runs[k]
            speedups = [(B * n / t) / (B * ar_n / t_ar) for t, t_ar in zip(ts, ar_t)]
            t = statistics.median(ts)
            mbu = bytes_moved(model, B, PROMPT_LEN, n, k, next(model.parameters()).element_size()) / t / peaks[0] \
                if peaks[0] else None
            tokens_per_s = statistics.median(B * n / t for t in ts)
            rows.append({"model": label, "seq_len": seq_len, "batch_size": B, "k": k, "new_tokens": n,
                         "tokens_per_s": tokens_per_s, "tokens_per_s_per_sequence": tokens_per_s / B,
                         "speedup": 1.0 if k == 1 else statistics.median(speedups), "mbu": mbu,
                         **roof[k], "warmup_s": warm, "times_s": ts})
        return rows
    return run_grid(models, batch_sizes, device, "speed", point, progress, seed)


def run_roofline(models, ks, batch_sizes, peaks):
    """The speed grid's roofline ceilings for a GPU's peaks, computed instead of timed (on any machine)."""
    return [{"model": label, "seq_len": seq_len, "batch_size": B, "k": k, "new_tokens": new_tokens(seq_len, k), **roof}
            for label, teacher, student, seq_lens in models for seq_len in seq_lens for B in batch_sizes
            for k, roof in roofline(by_k(teacher, student, ks), B, seq_len, peaks).items()]


def run_profile(models, ks, batch_sizes, device, seed, attention, compile, progress, steps=5, top=8):
    """What ONE decode step costs and launches, at each point and k, with the cache half full (a generation's
    average): the step's time as the speed grid runs it (replayed from a CUDA graph on CUDA), then `steps` steps
    under torch.profiler, not replayed, so that it sees each kernel: the kernels a step launches (on CPU: the
    operators it calls, views included) and the heaviest by self time. At small batch a decode step is bound by
    how many kernels it launches, at large batch by the bytes they move: this says which, and where. (--compile:
    the compiled step, fused kernels.)"""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"

    @torch.no_grad()   # the noise encoder below runs outside decode_step, which has its own
    def point(label, teacher, student, seq_len, B, gen):
        runs, cache, graph_step = point_setup(teacher, student, ks, B, seq_len, device, attention, compile)
        rows = []
        for k, model in runs.items():
            # a step as generate makes it: k tokens to commit; AR then draws with u, a student adds k noise slots
            tokens = torch.randint(model.config.vocab_size, (B, k), generator=gen).to(device)
            u = torch.rand(B, k, generator=gen, dtype=torch.float64).to(device)
            n_in = k if model.config.max_k == 0 else 2 * k
            start = min(seq_len // 2, seq_len - n_in)   # (a short cache: the pass must still fit in it)
            pos = torch.arange(start, start + n_in, device=device)
            if model.config.max_k:
                u = model.noise_encoder(u)   # generate encodes the noise before its loop, outside the step
            for _ in range(3):   # capture and warm up
                graph_step(model, tokens, pos, u, cache)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(4 * steps):
                graph_step(model, tokens, pos, u, cache)
            sync(device)
            step_s = (time.perf_counter() - t0) / (4 * steps)
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    graph_step.step(model, tokens, pos, u, cache)   # not replayed: the profiler sees each kernel
                sync(device)
            events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if cuda else "CPU")]
            self_us = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total  # noqa: E731
            events.sort(key=self_us, reverse=True)
            rows.append({"model": label, "seq_len": seq_len, "batch_size": B, "k": k, "step_ms": step_s * 1e3,
                         "tokens_per_s": B * k / step_s,
                         "launches": "CUDA kernels" if cuda else "CPU operators (views included)",
                         "launches_per_step": sum(e.count for e in events) / steps,
                         "busy_ms_per_step": sum(map(self_us, events)) / steps / 1e3,
                         "top": [{"name": e.key[:160], "ms_per_step": self_us(e) / steps / 1e3,
                                  "per_step": e.count / steps} for e in events[:top]]})
        return rows
    return run_grid(models, batch_sizes, device, "profile", point, progress, seed)


# ----------------------------------------------------------------------------------------------------
# Quality

@torch.no_grad()
def gen_ppl(judge, prompts, samples, batch=32):
    """exp(mean NLL) of the continuation tokens under the judge (float32), given prompt + previous tokens."""
    nll = 0.0
    for logits, tokens in continuation_logits(judge, prompts, samples, batch):
        nll -= F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).sum().item()
    return math.exp(nll / samples.numel())


def unigram_entropy(row):
    """Entropy (nats) of the empirical token distribution within one sample."""
    n = len(row)
    return -sum(c / n * math.log(c / n) for c in Counter(row).values())


def repeat4(row):
    """Fraction of the sample's 4-grams that already occurred earlier in the same sample."""
    seen, repeats = set(), 0
    for i in range(len(row) - 3):
        gram = tuple(row[i:i + 4])
        repeats += gram in seen
        seen.add(gram)
    return repeats / (len(row) - 3)


def quality_row(model, k, samples, prompts, judge, ar_samples, window):
    rows = samples.tolist()
    return {"model": model, "k": k, "gen_ppl": gen_ppl(judge, prompts, samples),
            "entropy": statistics.mean(map(unigram_entropy, rows)),
            "agreement": same_noise_agreement(ar_samples.cpu(), samples.cpu(), k), "window_agreement": window,
            "repeat4": statistics.mean(map(repeat4, rows))}


def quality_tokens(args, teacher, student, judge):
    """The continuation length: --quality_tokens, or 96 if it fits. Every k generates whole passes
    (ceil(T / k) * k tokens, then cut to T), so the longest run must fit each model's block size."""
    max_k = student.config.max_k
    block = min(teacher.config.block_size, student.config.block_size, judge.config.block_size)
    fits = lambda T: all(PROMPT_LEN + -(-T // k) * k <= block for k in range(1, max_k + 1))  # noqa: E731
    if args.quality_tokens is None:
        T = max((T for T in range(4, 97) if fits(T)), default=None)
        if T is None:
            raise UserError(f"the block size {block} leaves no room for a continuation of 4 tokens or more")
        return T
    if args.quality_tokens < 4:
        raise UserError(f"--quality_tokens must be at least 4 (repeat4 counts 4-grams), not {args.quality_tokens}")
    if not fits(args.quality_tokens):
        raise UserError(f"--quality_tokens {args.quality_tokens} + the {PROMPT_LEN}-token prefix (rounded up to whole "
                        f"passes of k <= {max_k}) exceed the block size {block}")
    return args.quality_tokens


def run_quality(teacher, student, judge, T, val, args, device):
    gen = torch.Generator().manual_seed(args.seed)
    prompts = sample_windows(val, args.quality_samples, PROMPT_LEN, gen)[0].to(device)
    max_k = student.config.max_k
    # ONE noise tensor for everything: sample j of every model and k is decoded from the same u
    noise = torch.rand(args.quality_samples, T + max_k - 1, generator=gen, dtype=torch.float64).to(device)
    ar = generate(teacher, prompts, noise[:, :T], 1)
    rows = [quality_row("ar", 1, ar, prompts, judge, ar, [1.0])]
    for k in tqdm(range(1, max_k + 1), desc="quality", dynamic_ncols=True):
        samples = generate(student, prompts, noise[:, :-(-T // k) * k], k)[:, :T]
        window = window_agreement(student, prompts, ar, noise[:, :T], k)
        rows.append(quality_row("student", k, samples, prompts, judge, ar, window))
    # the agreement a student blind to the noise would reach: what every row's agreement is to be read against
    blind = agreement_without_noise(teacher, prompts, ar)
    for r in rows:   # ratios to the AR teacher's own samples (None if the teacher's entropy is 0)
        r["gen_ppl_ratio"] = r["gen_ppl"] / rows[0]["gen_ppl"]
        r["entropy_ratio"] = r["entropy"] / rows[0]["entropy"] if rows[0]["entropy"] > 0 else None
        r["agreement_without_noise"] = blind
    return rows


# ----------------------------------------------------------------------------------------------------
# Outputs

def write_csv(path, rows, columns):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue()), binary=False)


def plot_speed(rows, device, path):
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        ax.axhspan(*PAPER_BAND, color="tab:green", alpha=0.15, label="paper, k = 4, H100: 2.4-3.5x")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        lines = sorted({(r["k"], r["seq_len"]) for r in rows if r["model"] == m and r["k"] > 1})
        for k, s in lines:
            line = [r for r in rows if (r["model"], r["k"], r["seq_len"]) == (m, k, s)]
            pts = sorted((r["batch_size"], r["speedup"]) for r in line if r["speedup"] is not None)
            drawn = ax.plot(*zip(*pts), marker="o", ls="-" if s == max(l[1] for l in lines) else "--",
                            label=f"k = {k}, {s} tokens")
            roof = sorted((r["batch_size"], r["roofline_speedup"]) for r in line if r["roofline_speedup"] is not None)
            if roof and k == max(l[0] for l in lines):   # the largest k's ceiling: what this layout could reach
                ax.plot(*zip(*roof), ls=":", color=drawn[0].get_color(), label=f"k = {k}, {s} tokens: roofline")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="speedup over AR (tokens/s ratio)", title=m)
        ax.legend(fontsize=8)
    fig.suptitle(f"K-Forcing speedup over AR decoding on {device}")
    save_figure(fig, path)


def plot_quality(rows, path):
    plt = pyplot()
    ar = rows[0]
    st = [r for r in rows if r["model"] == "student"]
    ks = [r["k"] for r in st]
    panels = [("gen-PPL ratio to AR", "gen_ppl_ratio"), ("entropy ratio to AR", "entropy_ratio"),
              ("slot-1 same-noise agreement", None), ("repeated 4-grams", "repeat4")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (title, key) in zip(axes, panels):
        if key is None:
            ax.plot(ks, [r["window_agreement"][0] for r in st], marker="o", label="on the teacher's context")
            ax.plot(ks, [r["agreement"][0] for r in st], marker="s", ls="--", label="free-running")
            draw_noise_blind(ax, ar["agreement_without_noise"], ls=":")
        else:
            ax.plot(ks, [r[key] for r in st], marker="o", label="student")
        ax.axhline(ar["repeat4"] if key == "repeat4" else 1.0, color="gray", ls="--", label="AR teacher")
        ax.set(xlabel="k (tokens per pass)", title=title, xticks=ks)
        ax.legend(fontsize=8)
    fig.suptitle("K-Forcing quality against k (float32 decoding, same noise, temperature 1, no penalty)", y=1.03)
    save_figure(fig, path)


def print_tables(speed, skipped, quality, profile, roof, device):
    opt = lambda x, spec, unit="": "-" if x is None else format(x, spec) + unit  # noqa: E731
    print(f"\ndevice: {device}")
    for r in profile:
        print(f"\n{r['model']}, {r['seq_len']} tokens (cache half full), batch {r['batch_size']}, k = {r['k']}: "
              f"{r['step_ms']:.3f} ms a step ({r['tokens_per_s']:,.0f} tokens/s); not replayed from a graph, under the "
              f"profiler: {r['launches_per_step']:.0f} {r['launches']}, {r['busy_ms_per_step']:.3f} ms busy")
        for t in r["top"]:
            print(f"  {t['ms_per_step']:8.3f} ms  x{t['per_step']:<4.0f} {t['name'][:100]}")
    if speed:   # roofline: the speedup's ceiling; of roof: tokens/s as a fraction of their ceiling
        print(f"{'model':<20}{'seq':>6}{'batch':>7}{'k':>3}{'tokens/s':>12}{'per seq':>9}{'speedup':>9}{'MBU':>7}"
              f"{'roofline':>10}{'of roof':>9}")
        for r in speed:
            roof_frac = r["roofline_tokens_per_s"] and r["tokens_per_s"] / r["roofline_tokens_per_s"]
            print(f"{r['model']:<20}{r['seq_len']:>6}{r['batch_size']:>7}{r['k']:>3}{r['tokens_per_s']:>12,.0f}"
                  f"{r['tokens_per_s_per_sequence']:>9,.0f}"
                  f"{opt(r['speedup'], '.2f', 'x'):>9}{opt(r['mbu'], '.1%'):>7}"
                  f"{opt(r['roofline_speedup'], '.2f', 'x'):>10}{opt(roof_frac, '.1%'):>9}")
    if roof:
        print(f"{'model':<20}{'seq':>6}{'batch':>7}{'k':>3}{'ceiling tokens/s':>18}{'ceiling speedup':>17}"
              f"{'overlapped':>12}")
        for r in roof:
            print(f"{r['model']:<20}{r['seq_len']:>6}{r['batch_size']:>7}{r['k']:>3}"
                  f"{r['roofline_tokens_per_s']:>18,.0f}{r['roofline_speedup']:>16.2f}x"
                  f"{r['roofline_overlapped_speedup']:>11.2f}x")
    for s in skipped:
        print(f"skipped: {s['model']} seq_len {s['seq_len']} batch {s['batch_size']} ({s['reason']})")
    if quality:
        print(f"\n{'model':<9}{'k':>2}{'gen-PPL':>9}{'ratio':>7}{'entropy':>9}{'ratio':>7}{'repeat4':>9}"
              "  agreement per slot: on the teacher's context | free-running")
        for r in quality:
            er = f"{r['entropy_ratio']:.2f}" if r["entropy_ratio"] is not None else "-"
            print(f"{r['model']:<9}{r['k']:>2}{r['gen_ppl']:>9.1f}{r['gen_ppl_ratio']:>7.2f}{r['entropy']:>9.2f}"
                  f"{er:>7}{r['repeat4']:>9.3f}  " + " / ".join(f"{a:.0%}" for a in r["window_agreement"])
                  + " | " + " / ".join(f"{a:.0%}" for a in r["agreement"]))
        print(f"({noise_blind(quality[0]['agreement_without_noise'])})")


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    roofline_only = args.roofline is not None
    gpu = device.type == "cuda" or roofline_only   # (a roofline is a GPU's: the GPU grid)
    # Defaults: the full grid on a GPU, a small one that finishes in a minute or two on a CPU
    batch_sizes = int_list(args.batch_sizes or ("1,8,32,64,128,256,512" if gpu else "1,8"), "batch_sizes", "1,8,32")
    seq_lens = int_list(args.seq_lens or ("128,1024" if gpu else "64"), "seq_lens", "128,1024")
    repeats = args.repeats if args.repeats is not None else (3 if gpu else 1)
    paper_shape = args.paper_shape if args.paper_shape is not None else gpu or not args.trained
    if args.profile and roofline_only:
        raise UserError("--profile times one step, --roofline computes ceilings: pick one")
    alone = "--profile" if args.profile else "--roofline" if roofline_only else None   # instead of the speed grid
    do_quality = args.quality if args.quality is not None else args.trained and not alone
    if alone and (do_quality or not args.speed):
        raise UserError(f"{alone} replaces the speed grid and the quality metrics: drop --quality / --no-speed")
    peaks = peaks_of(device, args.roofline)   # this GPU's (None on CPU), or the --roofline GPU's
    if roofline_only and not all(peaks):
        raise UserError(f"--roofline {args.roofline!r}: no peak bandwidth and FLOP/s for that GPU; known: "
                        + ", ".join(name for name, _ in PEAK_BANDWIDTH if device_peak(device, PEAK_FLOPS, name)))
    if roofline_only and args.dtype != "bfloat16":
        raise UserError("--roofline computes bf16 ceilings (the peak FLOP/s known are bf16's): drop --dtype")
    if min(batch_sizes) < 1 or repeats < 1 or args.quality_samples < 1:
        raise UserError("--batch_sizes, --repeats and --quality_samples must be at least 1")
    if not args.trained and (do_quality or not paper_shape or not args.speed or args.teacher or args.student
                             or args.judge or args.preset):
        raise UserError("--no-trained times the paper shape only: it takes no --quality, --no-paper_shape, "
                        "--no-speed, --preset, --teacher, --student or --judge")
    if not (args.speed or do_quality):
        raise UserError("nothing to do: both --no-speed and --no-quality were given")
    if args.resume and (roofline_only or not args.speed):
        raise UserError("--resume continues a speed or profile grid: drop it with --roofline or --no-speed")
    torch.set_float32_matmul_precision("highest")   # float32 quality decoding must not silently use TF32

    label = teacher_path = student_path = teacher = student = None
    ks = int_list(args.ks, "ks", "2,3,4") if args.ks else None
    max_k = max([4] + (ks or []))   # --no-trained: the paper shape's student, with 4 slots or the largest k timed
    if args.trained:
        label, teacher_path, student_path = find_checkpoints(args.preset, args.teacher, args.student)
        teacher, student = load_models(teacher_path, student_path, device)
        max_k = student.config.max_k
    ks = ks or [k for k in (2, 3, 4) if k <= max_k]
    for k in ks:
        if not 2 <= k <= max_k:
            raise UserError(f"--ks: k = {k} is not between 2 and the student's max_k ({max_k}) "
                            "(AR, k = 1, is always measured)")
    # a partial run gets a name of its own: it never replaces (or deletes the files of) a whole run's results
    part = ""
    if args.profile:
        part = "_profile"
    elif roofline_only:
        part = "_roofline_" + re.sub(r"\W+", "_", args.roofline).lower()
    elif not args.speed:
        part = "_quality_only"
    elif args.trained and not do_quality:
        part = "_speed_only"
    name = args.name or (f"bench_{label}" if args.trained else "bench_paper_shape") + part
    ensure_writable(args.out_dir)

    # The models to time: (label, AR teacher, student, the seq_lens that fit), weights cast to --dtype
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    models, ps_config = [], None
    if args.speed:
        if not ks:
            raise UserError(f"the student's max_k is {max_k}: no k >= 2 to time against AR; use --no-speed")
        if min(seq_lens) < PROMPT_LEN + max(ks, default=1):
            raise UserError(f"--seq_lens must be at least the {PROMPT_LEN}-token prefix + the largest k")
        candidates = [(label, teacher, student)] if args.trained else []
        if paper_shape:   # random weights: the speed of a pass does not depend on them
            torch.manual_seed(args.seed)
            ps_teacher = GPT(PAPER_SHAPE)
            candidates.insert(0, ("paper_shape_random", ps_teacher, GPT.student_from(ps_teacher, max(ks))))
            ps_config = asdict(candidates[0][2].config)
        for m, t, s in candidates:
            fit = [L for L in seq_lens if L <= t.config.block_size]
            if args.seq_lens is None and not fit:   # default lengths too long for this model: use its block
                fit = [t.config.block_size]
            if fit:   # copies: the float32 originals decode the quality samples
                cast = lambda model: copy.deepcopy(model).to(device, dtype).eval()  # noqa: E731
                models.append((m, cast(t), cast(s), fit))
            else:
                print(f"note: {m} (block size {t.config.block_size}) is not timed: no --seq_lens fits it")
        if not models:
            raise UserError(f"--seq_lens {args.seq_lens}: every length exceeds the block size of every model")

    stem = os.path.join(args.out_dir, name)
    code = source_digest()
    progress = None
    if args.speed and not roofline_only:   # a grid to time: saved point by point, resumable
        identity = {**{key: v for key, v in vars(args).items() if key != "resume"}, "code": code,
                    "machine": device_name(device),
                    "torch": torch.__version__, "models": [(m, asdict(t.config), asdict(s.config), fit)
                                                           for m, t, s, fit in models]}
        # (through JSON: tuples become lists, as they come back from the file)
        progress = Progress(stem + ".partial.json", json.loads(json.dumps(identity)), args.resume)

    judge = teacher
    if args.judge:
        judge = model_from_checkpoint(load_checkpoint(args.judge, kind="teacher"), device).eval()
    T = quality_tokens(args, teacher, student, judge) if do_quality else None
    val = load_split(args.data_dir, "val") if do_quality else None   # now, not after the speed grid

    print(f"bench on {device_name(device)}: "
          + (f"teacher {teacher_path}, student {student_path} (max_k {max_k})" if args.trained else "no trained model")
          + (", paper shape with random weights" if paper_shape and args.speed else ""))
    speed, profile, roof, skipped = [], [], [], []
    if roofline_only:
        roof = run_roofline(models, ks, batch_sizes, peaks)
    elif args.profile:
        profile, skipped = run_profile(models, ks, batch_sizes, device, args.seed, args.attention, args.compile,
                                       progress)
    elif args.speed:
        speed, skipped = run_speed(models, ks, batch_sizes, repeats, device, args.seed, args.attention, args.compile,
                                   peaks, progress)
    quality = run_quality(teacher, student, judge, T, val, args, device) if do_quality else []

    grid, timed = args.speed and not roofline_only and not args.profile, args.speed and not roofline_only
    notes = {"paper_shape_random has random weights: its speed is real, its tokens are meaningless":
             bool(paper_shape and args.speed),
             "speed: static KV cache sized to seq_len (as a server sizes it to its longest request), shared by AR and "
             "K-Forcing; prompts and noise random": timed,
             "tokens_per_s: new tokens / whole generation (prefill included), median over repeats (per_sequence: / "
             "batch size, the speed each request sees); speedup: median "
             "over repeats of K-Forcing tokens/s / AR tokens/s timed back to back; times_s: each repeat's whole "
             "generation in seconds": grid,
             "speed_dtype float32: AR's sampler sums its softmax in float64, so AR is slower than a server's and the "
             "speedups are not comparable with bfloat16 runs": grid and args.dtype == "float32",
             "profile: one decode step with the cache half full, timed as the speed grid runs it; tokens_per_s: batch "
             "x k / that step's time (no prefill: not the speed grid's measure); launches and top kernels from "
             "torch.profiler over steps run without the CUDA graph": bool(args.profile),
             "mbu: (weights + KV cache read up to the current length + KV written) per pass, summed, plus the noise "
             f"encoder's weights once per {NOISE_CHUNK} positions (generate encodes the noise in calls of that many "
             "before its loop), / time / peak HBM bandwidth; None where the peak is unknown (CPU). It counts the bytes "
             "a pass needs, not what this implementation moves: flex reads the cache up to the last written "
             "128-entry block, sdpa the whole static cache (seq_len entries, stale ones masked)": grid,
             "roofline_tokens_per_s: the ceiling if every phase of a generation (the noise encoder; per pass the "
             "trunk's dense layers, the LM head, attention) ran at peak bandwidth or peak dense bf16 FLOP/s, whichever "
             "binds it, one after another, with no launch overhead; roofline_speedup: its ratio to AR's ceiling; "
             "roofline_overlapped_speedup: the same ratio if compute and memory traffic overlapped perfectly (the "
             "bound for any implementation). Bounds on each side's tokens/s, not on a measured speedup, which exceeds "
             "their ratio where AR runs further below its ceiling than K-Forcing. None where a peak is unknown (CPU) "
             "or the weights are not bf16": args.speed and not args.profile,
             "warmup_s: the untimed first prefill + decode step of each k at a point (kernel compilation and "
             "CUDA-graph capture)": grid,
             "resumed (--resume): the points come from more than one process of the same command and code on this "
             "machine; "
             "AR and every k of a point were timed in one process, back to back": args.resume,
             "quality: samples decoded in float32 from one shared noise tensor, temperature 1, no penalty; gen-PPL "
             "under the judge in float32; entropy and repeat4 over the continuation only; agreement_without_noise: "
             "over the positions of the teacher's samples, the mean of sum p^2 (an independent draw from the teacher) "
             "and of max p (its most likely token), p the teacher's distribution there": do_quality}
    config = {**vars(args), "batch_sizes": batch_sizes, "seq_lens": seq_lens, "ks": ks,
              "repeats": repeats if grid else None, "compile": args.compile if timed else None,
              "seq_lens_timed": {m: fit for m, _, _, fit in models},   # those of seq_lens that fit each model
              "paper_shape": paper_shape, "quality": do_quality, "attention": args.attention if timed else None,
              "quality_tokens": T, "device": str(device), "model_label": label,
              "peaks": {"gpu": args.roofline or device_name(device),
                        **dict(zip(("hbm_bytes_per_s", "dense_flops_per_s"), peaks))},
              "code": code, "teacher": teacher_path, "student": student_path,
              "judge": args.judge or teacher_path, "prompt_len": PROMPT_LEN,
              "speed_dtype": args.dtype, "quality_dtype": "float32",
              "model_configs": {"trained_teacher": teacher and asdict(teacher.config),
                                "trained_student": student and asdict(student.config),
                                "judge": judge and asdict(judge.config), "paper_shape_random": ps_config},
              "notes": [note for note, applies in notes.items() if applies]}
    out = {"device": device_name(device), "torch": torch.__version__, "git": git_commit(), "config": config,
           "speed": speed, "skipped": skipped, "quality": quality, **({"profile": profile} if args.profile else {}),
           **({"roofline": roof} if roofline_only else {})}
    write_json(stem + ".json", out)
    # an earlier run's files under this name go: a name's files all come from one run (but not <name>.csv, a
    # roofline's: it may be another name's, e.g. bench_tiny_speed.csv is bench_tiny's speed CSV)
    for suffix, made in (("_speed.csv", speed), ("_speedup_vs_batch.png", speed),
                         ("_quality.csv", quality), ("_quality_vs_k.png", quality)):
        if not made and os.path.exists(stem + suffix):
            os.remove(stem + suffix)
    if roof:
        write_csv(stem + ".csv", roof, list(roof[0]))
    if speed:
        write_csv(stem + "_speed.csv", speed, ["model", "seq_len", "batch_size", "k", "new_tokens", "tokens_per_s",
                                               "tokens_per_s_per_sequence", "speedup", "mbu", *ROOFLINE_FIELDS])
        plot_speed(speed, device_name(device), stem + "_speedup_vs_batch.png")
    if quality:
        slots = lambda key: [f"{key}_slot{i + 1}" for i in range(max_k)]  # noqa: E731
        blind = [f"agreement_without_noise_{b}" for b in quality[0]["agreement_without_noise"]]
        flat = [{**r, **dict(zip(slots("agreement"), r["agreement"])),
                 **dict(zip(slots("window_agreement"), r["window_agreement"])),
                 **dict(zip(blind, r["agreement_without_noise"].values()))} for r in quality]
        write_csv(stem + "_quality.csv", flat, ["model", "k", "gen_ppl", "gen_ppl_ratio", "entropy", "entropy_ratio",
                                                "repeat4"] + slots("window_agreement") + slots("agreement") + blind)
        plot_quality(quality, stem + "_quality_vs_k.png")
    if progress:
        progress.finish()   # the outputs are written: nothing left to resume
    print_tables(speed, skipped, quality, profile, roof, device_name(device))
    print(f"\nwrote {stem}.json" + (f", {name}.csv" if roof else "")
          + (", _speed.csv, _speedup_vs_batch.png" if speed else "")
          + (", _quality.csv, _quality_vs_k.png" if quality else ""))


if __name__ == "__main__":
    run_cli(main)
