"""Benchmark K-Forcing against AR decoding: speed (tokens/s, speedup, roofline) and quality
(gen-PPL, entropy, repetition, same-noise agreement, the distribution per slot). Each part that
measured something writes <out_dir>/<name>_<part>.json (speed, quality, profile, roofline_<gpu>) and
a plot (speed, quality): a rerun under a name replaces only the files of the parts it runs.

    python bench.py                               # the newest trained pair in out/: speed + quality
    python bench.py --no-trained                  # the paper's shape, random weights: no checkpoint
    python bench.py --no-trained --resume         # the same grid, continued after Ctrl-C or a crash
    python bench.py --no-trained --profile --batch_sizes 1,512 --seq_lens 1024   # a step's kernels
    python bench.py --no-trained --roofline H200  # the grid's ceilings on that GPU, on any machine

Speed: AR (the teacher, k = 1) and the student at each k by ONE decode path (CUDA graphs on CUDA),
back to back in each repeat, medians kept; tokens/s counts new tokens, prefill included, warm-up
not; both sides pay for their draws (AR from the vocabulary, a distribution readout too; the
argmax student takes an argmax). A speedup above k or repeats that disagree mark a point
`suspect`. Quality: float32 continuations of 6-token val prefixes by the teacher and the student
from the SAME noise."""
import argparse
import copy
import json
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (ArgumentParser, UserError, device_name, git_commit, load_split, out_of_memory,
                    pyplot, resolve_device, run_cli, sample_sequences, save_figure, write_json)
from fast import PEAK_BANDWIDTH, PEAK_FLOPS, CUDAGraphStep, device_peak, make_cache
from model import (GPT, GPTConfig, agreement_without_noise, continuation_logits,
                   generate, same_noise_agreement, window_agreement)
from prepare_data import get_tokenizer
from sample import find_checkpoints, load_models

PROMPT_LEN = 6   # the paper's 6-token prefixes
PAPER_SHAPE = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_embeddings=False)
SPREAD_LIMIT = 1.5   # slowest over fastest repeat beyond which a point's timings disagree


def int_list(text):
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    flag = lambda name, **kw: p.add_argument("--" + name, **kw)  # noqa: E731
    on_off = argparse.BooleanOptionalAction
    flag("preset", help="the pair in out/ as sample.py picks it (default: the newest teacher)")
    flag("teacher", help="AR teacher checkpoint (instead of the preset's); it also scores gen-PPL")
    flag("student", help="K-Forcing student checkpoint (instead of the preset's)")
    flag("batch_sizes", type=int_list, help="comma list (default: 1,8,...,512 on CUDA or with "
         "--roofline, else 1,8)")
    flag("seq_lens", type=int_list, help="prefix + new tokens, comma list, those within a model's "
         "block (default: 128,1024 on CUDA or with --roofline, else 64)")
    flag("ks", type=int_list, help="the student's k in the speed grid, comma list of 2..max_k; AR "
         "always runs, quality scores every k (default: 2,3,4 up to max_k)")
    flag("repeats", type=int, help="timed runs a point, median kept (default: 3 on CUDA, 5 on CPU)")
    flag("paper_shape", action=on_off, help="also time the 12 x 768 paper shape (default: for a "
         "GPU; always with --no-trained)")
    flag("trained", action=on_off, default=True, help="time and score the trained pair (default)")
    flag("speed", action=on_off, default=True, help="the speed grid, which --profile and "
         "--roofline also use (default: on)")
    flag("quality", action=on_off, help="score the pair (default: unless --profile, --roofline)")
    flag("profile", action="store_true", help="one decode step a point and k, under torch.profiler")
    flag("roofline", metavar="GPU", help="the grid's ceilings on that GPU (e.g. H200), not timed")
    flag("quality_samples", type=int, default=256, help="val prefixes sampled once (default: 256)")
    flag("quality_tokens", type=int, help="sample length (default: 96 or what the block allows)")
    flag("readout", choices=["argmax", "cdf", "cdf_seq"], default="argmax",
         help="the paper shape student's readout (default: argmax, the paper's)")
    flag("readout_layers", type=int, default=1, help="its slot MLP's layers (cdf_seq; default 1)")
    flag("coupling", choices=["inverse_cdf", "gumbel"], default="inverse_cdf",
         help="how the paper shape's AR and student draw a token from u (default: inverse_cdf)")
    flag("attention", choices=["sdpa", "flex"], default="sdpa", help="how a cached pass attends, "
         "both sides: a mask over the whole cache, or FlexAttention's blocks (default: sdpa)")
    flag("compile", action="store_true", help="compile each pass after the prefill, both sides")
    flag("dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the speed runs' dtype "
         "(default: bfloat16)")
    flag("data_dir", help="val.bin for the quality prefixes (default: the teacher's training data)")
    flag("seed", type=int, default=0, help="seeds prefixes, noise and random weights (default: 0)")
    flag("device", default="auto", help="cuda, cpu or auto (default: auto)")
    flag("name", help="output file stem (default: bench_<preset>, _trained or _paper_shape)")
    flag("out_dir", default="results", help="where outputs go (default: results)")
    flag("resume", action="store_true", help="continue a stopped grid (<name>_*.partial.jsonl)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Speed

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)   # kernels run asynchronously: wait before reading a timer


def seconds(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def generation_phases(model, B, P, n_new, k, cache_elem):
    """(bytes, FLOPs) of each phase of a generation, pass by pass: a student's noise slots, the
    trunk (2 FLOPs a weight a row), the LM head's rows, attention (4 FLOPs a query, key and channel;
    the K/V committed, the cache's valid prefix read as FlexAttention does: SDPA reads it all)."""
    cfg, w, slot_parts = model.config, model.lm_head.weight, ("noise_encoder.", "slot_readout.")
    size = lambda *parts: sum(p.numel() * p.element_size() for name, p  # noqa: E731
                              in model.named_parameters() if name.startswith(parts))
    dense = lambda *parts: sum(m.weight.numel() for name, m in model.named_modules()  # noqa: E731
                               if name.startswith(parts) and isinstance(m, torch.nn.Linear))
    # noise slots per pass: the argmax readout k, the cdf readout k - 1, AR none
    slots = 0 if not cfg.max_k else k if cfg.readout == "argmax" else k - 1
    slot_phase = (size(*slot_parts), 2 * B * slots * dense(*slot_parts))
    head = (w.numel() * w.element_size(), 2 * B * (k if cfg.max_k else 1) * w.numel())   # AR: 1 row
    # an input embedding is only gathered (a few rows), so it does not count; the final norm does
    trunk_bytes, trunk = size("") - size("wte.", "lm_head.", *slot_parts), dense("blocks.")
    phases, length = [], 0
    for s in range(0, n_new, k):
        written = P if s == 0 else k   # the prompt at prefill, then the last k tokens
        rows, length = written + slots, length + written
        if slots:
            phases.append(slot_phase)
        phases += [(trunk_bytes, 2 * B * rows * trunk), head,
                   (B * 2 * cfg.n_layer * cfg.n_embd * cache_elem * (length + written),   # K, V
                    4 * B * cfg.n_layer * cfg.n_embd * rows * (length + slots))]
    return phases


def bytes_moved(model, B, P, n_new, k, cache_elem):
    """MBU's numerator: the bytes of generation_phases."""
    return sum(b for b, _ in generation_phases(model, B, P, n_new, k, cache_elem))


ROOFLINE_FIELDS = ("roofline_tokens_per_s", "roofline_speedup", "roofline_overlapped_speedup")


def roofline(runs, B, seq_len, peaks):
    """{k: ceilings}: tokens/s, phases in sequence, its ratio to AR's, the ratio overlapped."""
    bw, fl = peaks   # bytes/s, FLOP/s
    # no ceilings (None) without peaks or bf16 weights: the peaks are bf16 FLOP/s
    if not (bw and fl) or any(next(m.parameters()).dtype != torch.bfloat16 for m in runs.values()):
        return {k: dict.fromkeys(ROOFLINE_FIELDS) for k in runs}
    seq, over = {}, {}
    for k, model in runs.items():
        n, elem = new_tokens(seq_len, k), next(model.parameters()).element_size()
        phases = generation_phases(model, B, PROMPT_LEN, n, k, elem)
        seq[k] = B * n / sum(max(b / bw, f / fl) for b, f in phases)
        over[k] = B * n / max(sum(b for b, _ in phases) / bw, sum(f for _, f in phases) / fl)
    return {k: dict(zip(ROOFLINE_FIELDS, (seq[k], seq[k] / seq[1], over[k] / over[1])))
            for k in runs}


def new_tokens(seq_len, k):
    return (seq_len - PROMPT_LEN) // k * k   # whole passes that fit seq_len


def by_k(teacher, student, ks):
    return {1: teacher, **{k: student for k in ks}}   # AR is k = 1


def point_setup(teacher, student, ks, seq_len, B, device, attention, compile):
    """{k: model}, a cache sized to the generation and one step for every k: ONE decode path."""
    cfg = replace(teacher.config, block_size=seq_len)
    cache = make_cache(cfg, B, device, next(teacher.parameters()).dtype, attention)
    return by_k(teacher, student, ks), cache, CUDAGraphStep(compile=compile)


def time_point(teacher, student, ks, B, seq_len, repeats, device, gen, attention, compile):
    """{k: (new tokens, [seconds per repeat], warm-up seconds)}, AR and every k on one input."""
    runs, cache, step = point_setup(teacher, student, ks, seq_len, B, device, attention, compile)
    prompt = torch.randint(teacher.config.vocab_size, (B, PROMPT_LEN), generator=gen).to(device)
    noise = torch.rand(B, seq_len - PROMPT_LEN, generator=gen, dtype=torch.float64).to(device)
    run = lambda k, n: seconds(lambda: generate(  # noqa: E731
        runs[k], prompt, noise[:, :n], k, cache=cache, step_fn=step), device)
    # warm-up, not in tokens/s (its seconds kept as warmup_s): prefill + one pass compiles kernels
    # and captures the pass's graph
    warm = {k: run(k, min(2 * k, new_tokens(seq_len, k))) for k in runs}
    # a round per repeat, AR and K-Forcing back to back in it: each speedup compares one moment
    rounds = [{k: run(k, new_tokens(seq_len, k)) for k in runs} for _ in range(repeats)]
    return {k: (new_tokens(seq_len, k), [r[k] for r in rounds], warm[k]) for k in runs}


def speed_rows(label, runs, B, seq_len, timed, peaks):
    """A timed point's rows: the speedup the median per-repeat ratio, `suspect` why it is none."""
    roof, (ar_n, ar_t, _), rows = roofline(runs, B, seq_len, peaks), timed[1], []
    for k, (n, ts, warm) in timed.items():
        elem = next(runs[k].parameters()).element_size()
        tps, t = statistics.median(B * n / t for t in ts), statistics.median(ts)
        speedup = statistics.median((n / t) / (ar_n / t_ar) for t, t_ar in zip(ts, ar_t))
        spread = max(max(ts) / min(ts), max(ar_t) / min(ar_t))
        suspect = (f"speedup {speedup:.2f}x above the k-fold bound {k}x" if speedup > k else
                   f"repeats disagree (slowest / fastest {spread:.1f})" if spread > SPREAD_LIMIT
                   else None)
        mbu = bytes_moved(runs[k], B, PROMPT_LEN, n, k, elem) / t / peaks[0] if peaks[0] else None
        rows.append({"model": label, "seq_len": seq_len, "batch_size": B, "k": k, "new_tokens": n,
                     "tokens_per_s": tps, "tokens_per_s_per_sequence": tps / B, "speedup": speedup,
                     "suspect": suspect, "mbu": mbu, **roof[k], "warmup_s": warm, "times_s": ts})
    return rows


def profile_point(label, teacher, student, ks, B, seq_len, device, gen, attention, compile,
                  steps=5, top=8):
    """ONE decode step per k, the cache half full: its time, then its kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    runs, cache, step = point_setup(teacher, student, ks, seq_len, B, device, attention, compile)
    cuda, rows = device.type == "cuda", []
    kind = "CUDA" if cuda else "CPU"
    self_us = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total  # noqa: E731
    for k, model in runs.items():
        tokens = torch.randint(model.config.vocab_size, (B, k), generator=gen).to(device)
        u = torch.rand(B, k, generator=gen, dtype=torch.float64).to(device)
        start = min(seq_len // 2, seq_len - 2 * k)   # k tokens, then up to k noise slots
        args = (model, tokens, torch.arange(start, start + 2 * k, device=device), u, cache)
        for _ in range(3):   # capture and warm up
            step(*args)
        step_s = seconds(lambda: [step(*args) for _ in range(4 * steps)], device) / (4 * steps)
        with profile(activities=[getattr(ProfilerActivity, kind)]) as prof:
            for _ in range(steps):   # eager, not a graph replay: the profiler sees each kernel
                step.step(*args)
            sync(device)
        events = sorted((e for e in prof.key_averages() if e.device_type.name == kind),
                        key=self_us, reverse=True)
        rows.append({"model": label, "seq_len": seq_len, "batch_size": B, "k": k,
                     "step_ms": step_s * 1e3, "tokens_per_s": B * k / step_s,
                     "launches": "CUDA kernels" if cuda else "CPU operators (views included)",
                     "launches_per_step": sum(e.count for e in events) / steps,
                     "busy_ms_per_step": sum(map(self_us, events)) / steps / 1e3,
                     "top": [{"name": e.key[:160], "ms_per_step": self_us(e) / steps / 1e3,
                              "per_step": e.count / steps} for e in events[:top]]})
    return rows


def run_grid(points, point, path, resume, seed, made_by):
    """(rows, skipped): point(label, teacher, student, seq_len, B, generator) at each point, a line
    per point in `path`: --resume (same made_by only) skips those done; out of memory skips one."""
    made_by, done = json.loads(json.dumps(made_by)), {}   # as the file gives it back
    if resume:
        if not os.path.exists(path):
            raise UserError(f"--resume: {path} does not exist; there is nothing to continue")
        with open(path, "rb+") as f:   # a line torn by a kill has no newline yet: cut it off
            whole = f.read().rpartition(b"\n")[0]
            f.truncate(len(whole) + 1 if whole else 0)
        done = {tuple(row["point"]): row for row in map(json.loads, whole.splitlines())}
        other = next((r["made_by"] for r in done.values() if r["made_by"] != made_by), None)
        if other:
            diff = ", ".join(f"{k} {v!r}" for k, v in other.items() if made_by.get(k) != v)
            raise UserError(f"--resume: {path} holds rows made with {diff}; rerun without "
                            "--resume to start afresh")
    with open(path, "a" if resume else "w") as f:
        for i, (label, teacher, student, seq_len, B) in enumerate(tqdm(points, dynamic_ncols=True)):
            key = (label, seq_len, B)
            if key in done:
                continue
            row = {"point": key, "made_by": made_by, "rows": [], "skipped": None}
            try:   # a generator per point: a resumed grid times what an uninterrupted one would
                row["rows"] = point(label, teacher, student, seq_len, B,
                                    torch.Generator().manual_seed(seed * len(points) + i))
            except Exception as e:
                if not out_of_memory(e):
                    raise
                row["skipped"] = "out of memory"
            torch.cuda.empty_cache()   # the point's cache and graphs go before the next
            print(json.dumps(row), file=f, flush=True)
            done[key] = json.loads(json.dumps(row))   # as a resumed grid reads it
    rows = [done[(lb, s, b)] for lb, _, _, s, b in points]
    return ([r for row in rows for r in row["rows"]],
            [dict(zip(("model", "seq_len", "batch_size"), r["point"]), reason=r["skipped"])
             for r in rows if r["skipped"]])


# ------------------------------------------------------------------------------------------------
# Quality

@torch.no_grad()
def nll_per_position(judge, prompts, samples, batch=32):
    """(T,): the judge's mean NLL over the samples of each token given all before it (float64)."""
    total = torch.zeros(samples.size(1), dtype=torch.float64)
    for logits, tokens in continuation_logits(judge, prompts, samples, batch):
        nll = -F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        total += nll.double().sum(0).cpu()
    return total / samples.size(0)


def gen_ppl(nll, k=1):
    """exp(mean NLL) over all positions, and per slot: over the positions j mod k."""
    return math.exp(nll.mean()), [math.exp(nll[j::k].mean()) for j in range(k)]


def repeated_4grams(seqs):
    """Fraction of 4-grams seen earlier in the same sequence, pooled; None if there are none."""
    grams = [[tuple(seq[i:i + 4]) for i in range(len(seq) - 3)] for seq in seqs]
    total = sum(map(len, grams))
    return sum(len(g) - len(set(g)) for g in grams) / total if total else None


def quality_row(model, k, samples, nll, ar_nll, ar, window, tok):
    rows = samples.tolist()
    (ppl, slot), (ar_ppl, ar_slot) = gen_ppl(nll, k), gen_ppl(ar_nll, k)   # ar: the teacher's
    # entropy (nats) of the empirical token distribution within each sample
    entropy = [-sum(c / len(r) * math.log(c / len(r)) for c in Counter(r).values()) for r in rows]
    return {"model": model, "k": k, "gen_ppl": ppl, "gen_ppl_ratio": ppl / ar_ppl,
            "gen_ppl_per_slot": slot,
            "gen_ppl_per_slot_ratio": [a / b for a, b in zip(slot, ar_slot)],
            "entropy": statistics.mean(entropy), "repeat4_tokens": repeated_4grams(rows),
            "repeat4_words": repeated_4grams([tok.decode(r).split() for r in rows]),
            "agreement": same_noise_agreement(ar.cpu(), samples.cpu(), k),
            "window_agreement": window}


@torch.no_grad()
def distribution_per_slot(teacher, student, k, prompts, gen, draws=128, batch=4):
    """Does the student sample the teacher's distribution? Per slot i, the noises of slots < i
    fixed, `draws` draws of u_i: its token i's histogram against the teacher's distribution after
    its tokens < i: total variation, its floor (as many draws of the teacher), entropy ratio."""
    (n, L), V = prompts.shape, teacher.config.vocab_size
    entropy = lambda h: -(h * torch.where(h > 0, h.log(), 0.0)).sum(-1)  # noqa: E731
    fixed = torch.rand(n, k, generator=gen, dtype=torch.float64)
    u_i = torch.rand(draws, generator=gen, dtype=torch.float64)
    out = {"tv_per_slot": [], "tv_floor_per_slot": [], "draw_entropy_ratio_per_slot": []}
    for i in range(k):
        stats = []
        for b in range(0, n, batch):
            x = prompts[b:b + batch]
            u = fixed[b:b + batch].repeat_interleave(draws, 0)
            u[:, i] = u_i.repeat(len(x))
            anchors = torch.full((len(u), 1), L - 1, device=x.device)
            y = student.window_tokens(x.repeat_interleave(draws, 0), anchors,
                                      u[:, None].to(x.device))[:, 0].view(len(x), draws, k)
            own = y[:, :1, :i]   # the tokens before slot i: the same for every draw of u_i
            p = teacher.forward_window(x, anchors[:len(x)], own)[:, 0, -1].float().softmax(-1)
            hist = F.one_hot(y[:, :, i], V).float().mean(1)
            ref = F.one_hot(torch.multinomial(p.cpu(), draws, replacement=True, generator=gen)
                            .to(p.device), V).float().mean(1)
            stats.append(torch.stack([(hist - p).abs().sum(-1) / 2, (ref - p).abs().sum(-1) / 2,
                                      entropy(hist), entropy(ref)], 1))
        tv, floor, h_student, h_teacher = torch.cat(stats).mean(0).tolist()
        for key, value in zip(out, (tv, floor, h_student / h_teacher)):
            out[key].append(value)
    return out


@torch.no_grad()
def run_quality(teacher, student, tok, T, val, n_samples, seed, device):
    """The quality rows (AR, then the student at every k) and the noise-blind baselines."""
    gen = torch.Generator().manual_seed(seed)
    prompts = sample_sequences(val, n_samples, PROMPT_LEN, gen)[0].to(device)
    max_k = student.config.max_k   # ONE noise tensor: sample j of every model and k decodes it
    noise = torch.rand(n_samples, T + max_k - 1, generator=gen, dtype=torch.float64).to(device)
    ar = generate(teacher, prompts, noise[:, :T], 1)
    ar_nll = nll_per_position(teacher, prompts, ar)
    rows = [quality_row("ar", 1, ar, ar_nll, ar_nll, ar, [1.0], tok)]
    for k in tqdm(range(1, max_k + 1), desc="quality", dynamic_ncols=True):
        samples = generate(student, prompts, noise[:, :-(-T // k) * k], k)[:, :T]
        window = window_agreement(student, prompts, ar, noise[:, :T], k)
        rows.append(quality_row("student", k, samples, nll_per_position(teacher, prompts, samples),
                                ar_nll, ar, window, tok))
        rows[-1].update(distribution_per_slot(teacher, student, k, prompts[:32], gen))
    for r in rows:
        r["entropy_ratio"] = r["entropy"] / rows[0]["entropy"] if rows[0]["entropy"] else None
    return rows, agreement_without_noise(teacher, prompts, ar)


# ------------------------------------------------------------------------------------------------
# Outputs

def plot_speed(rows, device, path):
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = pyplot().subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        # the abstract's k = 4 speedup "across batch sizes" on an H100
        ax.axhspan(2.4, 3.5, color="tab:green", alpha=0.15, label="paper, k = 4, H100: 2.4-3.5x")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        lines = sorted({(r["k"], r["seq_len"]) for r in rows if r["model"] == m and r["k"] > 1})
        for k, s in lines:
            line = [r for r in rows if (r["model"], r["k"], r["seq_len"]) == (m, k, s)]
            pts = sorted((r["batch_size"], r["speedup"]) for r in line if not r["suspect"])
            if not pts:   # suspect points are no result: not drawn
                continue
            drawn = ax.plot(*zip(*pts), marker="o", label=f"k = {k}, {s} tokens",
                            ls="-" if s == max(x[1] for x in lines) else "--")
            if k == max(x[0] for x in lines) and line[0]["roofline_speedup"]:   # its ceiling
                roof = sorted((r["batch_size"], r["roofline_speedup"]) for r in line)
                ax.plot(*zip(*roof), ls=":", color=drawn[0].get_color(), label=f"k = {k}: roofline")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="speedup over AR (tokens/s ratio)", title=m)
        ax.legend(fontsize=8)
    fig.suptitle(f"K-Forcing speedup over AR decoding on {device} (suspect points left out)")
    save_figure(fig, path)


def plot_quality(rows, blind, path):
    fig, (ppl, agree) = pyplot().subplots(1, 2, figsize=(11, 4))
    for r in rows[1:]:
        for ax, key in ((ppl, "gen_ppl_per_slot_ratio"), (agree, "window_agreement")):
            ax.plot(range(1, r["k"] + 1), r[key], marker="o", label=f"k = {r['k']}")
    ppl.axhline(1.0, color="gray", ls="--", label="AR teacher")
    for (key, value), color in zip(blind.items(), ("tab:purple", "tab:red")):
        agree.axhline(value, ls=":", color=color, label="blind: " + key.replace("_", " "))
    top = max([*blind.values()] + [a for r in rows[1:] for a in r["window_agreement"]])
    agree.set_ylim(0, 1.1 * top)   # scaled to the data: small agreements stay readable
    ppl.set(title="gen-PPL ratio to AR, per slot", xlabel="slot")
    agree.set(title="same-noise agreement on the teacher's context", xlabel="slot")
    for ax in (ppl, agree):
        ax.legend(fontsize=7)
    fig.suptitle("K-Forcing quality (float32, the AR teacher's noise, temperature 1)", y=1.02)
    save_figure(fig, path)


def print_tables(speed, skipped, quality, blind, profile, roof, device):
    fmt = lambda x, spec, unit="": "-" if x is None else format(x, spec) + unit  # noqa: E731
    print(f"\ndevice: {device}")
    for r in profile:
        print(f"\n{r['model']}, {r['seq_len']} tokens, batch {r['batch_size']}, k = {r['k']}: "
              f"{r['step_ms']:.3f} ms a step; under the profiler {r['launches_per_step']:.0f} "
              f"{r['launches']}, {r['busy_ms_per_step']:.3f} ms busy")
        for t in r["top"]:
            print(f"  {t['ms_per_step']:8.3f} ms  x{t['per_step']:<4.0f} {t['name'][:80]}")
    if speed:   # of roof: tokens/s as a fraction of the side's own ceiling
        print("model                  seq  batch  k    tokens/s  speedup    MBU  roofline  of roof")
        for r in speed:
            frac = r["roofline_tokens_per_s"] and r["tokens_per_s"] / r["roofline_tokens_per_s"]
            print(f"{r['model']:<20}{r['seq_len']:>6}{r['batch_size']:>7}{r['k']:>3}"
                  f"{r['tokens_per_s']:>12,.0f}{fmt(r['speedup'], '.2f', 'x'):>9}"
                  f"{fmt(r['mbu'], '.1%'):>7}{fmt(r['roofline_speedup'], '.2f', 'x'):>10}"
                  f"{fmt(frac, '.1%'):>9}" + (f"  suspect: {r['suspect']}" if r["suspect"] else ""))
    for r in roof:
        print(f"{r['model']:<20} seq {r['seq_len']:>5} batch {r['batch_size']:>4} k {r['k']}: "
              f"ceiling {r['roofline_tokens_per_s']:>12,.0f} tokens/s, ceiling speedup "
              f"{r['roofline_speedup']:.2f}x (overlapped {r['roofline_overlapped_speedup']:.2f}x)")
    for s in skipped:
        print("skipped: {model} seq_len {seq_len} batch {batch_size}: {reason}".format(**s))
    if quality:
        print(f"\n{'model':<9}{'k':>2}{'gen-PPL':>9}{'ratio':>7}{'ratio per slot':>24}"
              f"{'H ratio':>8}{'rep4 tok/word':>15}  agreement: teacher's context | free-running")
        per_slot = lambda xs, spec=".2f": "/".join(format(x, spec) for x in xs)  # noqa: E731
        for r in quality:
            print(f"{r['model']:<9}{r['k']:>2}{r['gen_ppl']:>9.2f}{r['gen_ppl_ratio']:>7.2f}"
                  f"{per_slot(r['gen_ppl_per_slot_ratio']):>24}{fmt(r['entropy_ratio'], '.2f'):>8}"
                  f"{fmt(r['repeat4_tokens'], '.3f'):>8}/{fmt(r['repeat4_words'], '.3f'):<6}  "
                  f"{per_slot(r['window_agreement'], '.0%')} | {per_slot(r['agreement'], '.0%')}")
        print(f"blind to the noise: {blind['independent_draw']:.1%} (an independent draw), "
              f"{blind['teacher_mode']:.1%} (the teacher's mode)")
        print("\nthe student's tokens per slot over many draws of its noise, against the teacher's "
              "distribution:\n   k  total variation (its floor)                   entropy ratio")
        for r in quality[1:]:
            tv = " ".join(map("{:.2f}({:.2f})".format, r["tv_per_slot"], r["tv_floor_per_slot"]))
            print(f"{r['k']:>4}  {tv:<46}{per_slot(r['draw_entropy_ratio_per_slot'])}")


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda" or args.roofline is not None   # a roofline is of the GPU grid
    default = lambda value, otherwise: otherwise if value is None else value  # noqa: E731
    batch_sizes = default(args.batch_sizes, [1, 8, 32, 64, 128, 256, 512] if gpu else [1, 8])
    seq_lens = default(args.seq_lens, [128, 1024] if gpu else [64])
    repeats = default(args.repeats, 3 if device.type == "cuda" else 5)
    quality = args.trained and default(args.quality, not args.profile and args.roofline is None)
    paper_shape = not args.trained or default(args.paper_shape, gpu)
    if min(batch_sizes + [repeats, args.quality_samples, args.readout_layers]) < 1:
        raise UserError("--batch_sizes, --repeats, --quality_samples, --readout_layers: at least 1")
    peaks = tuple(device_peak(device, t, args.roofline) for t in (PEAK_BANDWIDTH, PEAK_FLOPS))
    if args.roofline is not None and not (all(peaks) and args.dtype == "bfloat16"):
        raise UserError(f"--roofline {args.roofline!r}: bf16 ceilings (no --dtype) of a GPU with "
                        f"known peaks: {', '.join(n for n, v in PEAK_BANDWIDTH if v)}")
    torch.set_float32_matmul_precision("highest")   # float32 quality must not use TF32

    max_k, label = max([4] + (args.ks or [])), "paper_shape"   # the paper shape's student
    if args.trained:
        teacher_path, student_path = find_checkpoints(args.preset, args.teacher, args.student)
        teacher, student, ckpt = load_models(teacher_path, student_path, device)
        max_k, tok = student.config.max_k, get_tokenizer(ckpt["tokenizer"])
        label = "trained" if args.teacher else os.path.basename(os.path.dirname(teacher_path))[8:]
    ks = default(args.ks, [k for k in (2, 3, 4) if k <= max_k])
    if not ks or any(not 2 <= k <= max_k for k in ks):
        raise UserError(f"--ks: each k from 2 to the student's max_k ({max_k}); AR always runs")
    stem = os.path.join(args.out_dir, default(args.name, f"bench_{label}"))

    # the models to time: (label, AR teacher, student, seq_lens that fit), copies cast to --dtype
    models, cast = [], lambda m: copy.deepcopy(m).to(device, getattr(torch, args.dtype)).eval()
    if args.speed:
        if min(seq_lens) < PROMPT_LEN + max(ks):
            raise UserError(f"--seq_lens must hold the {PROMPT_LEN}-token prefix + the largest k")
        candidates = [(label, teacher, student)] if args.trained else []
        if paper_shape:   # random weights: a pass's speed does not depend on them
            torch.manual_seed(args.seed)
            ps = GPT(replace(PAPER_SHAPE, coupling=args.coupling))   # the student inherits it
            candidates.insert(0, ("paper_shape_random", ps, GPT.student_from(
                ps, max(ks), readout=args.readout, readout_layers=args.readout_layers)))
        for m, t, s in candidates:
            fit = [L for L in seq_lens if L <= t.config.block_size]
            fit = fit or ([t.config.block_size] if args.seq_lens is None else [])   # its block
            models += [(m, cast(t), cast(s), fit)] if fit else []
        if not models:
            raise UserError(f"--seq_lens: each of {seq_lens} exceeds every block size")
    if quality:   # checked now, not after the speed grid
        room = teacher.config.block_size - PROMPT_LEN - max_k + 1   # whole passes of every k
        T = default(args.quality_tokens, min(96, room))
        least = max(4, max_k)   # 4-grams, and a whole pass at every k
        if not least <= T <= room:
            raise UserError(f"--quality_tokens {T}: {least} (4-grams, a pass of every k) to {room} "
                            "(the block size allows)")
        val = load_split(default(args.data_dir, ckpt["train_config"]["data_dir"]), "val",
                         ckpt["tokenizer"])
    try:   # now, not after the speed grid
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)   # --name may hold a folder
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {args.out_dir} ({e.strerror})") from None

    commit = git_commit()
    print(f"bench on {device_name(device)}, commit {commit}: " + ", ".join(m for m, *_ in models))
    points = [(m, t, s, L, B) for m, t, s, fit in models for L in fit for B in batch_sizes]
    speed, profile, roof, skipped, rows, blind = [], [], [], [], [], None
    grid = stem + ("_profile" if args.profile else "_speed") + ".partial.jsonl"
    if args.roofline is not None:
        roof = [{"model": m, "seq_len": L, "batch_size": B, "k": k, **r} for m, t, s, L, B in points
                for k, r in roofline(by_k(t, s, ks), B, L, peaks).items()]
    elif args.speed:
        def point(m, t, s, L, B, gen):
            if args.profile:
                return profile_point(m, t, s, ks, B, L, device, gen, args.attention, args.compile)
            timed = time_point(t, s, ks, B, L, repeats, device, gen, args.attention, args.compile)
            return speed_rows(m, by_k(t, s, ks), B, L, timed, peaks)
        made_by = {"commit": commit, "machine": device_name(device), "torch": torch.__version__,
                   **{k: v for k, v in vars(args).items() if k != "resume"}}
        found, skipped = run_grid(points, point, grid, args.resume, args.seed, made_by)
        profile, speed = (found, []) if args.profile else ([], found)
        if speed and all(r["suspect"] for r in speed):   # not one result: earlier files stay
            print(f"every timed row is suspect (as {speed[0]['suspect']}): speed not written")
            speed = []
    if quality:
        rows, blind = run_quality(teacher, student, tok, T, val, args.quality_samples, args.seed,
                                  device)

    head = {"device": device_name(device), "torch": torch.__version__, "git": commit, "config": {
        **vars(args), "batch_sizes": batch_sizes, "seq_lens": seq_lens, "quality": quality,
        "repeats": repeats, "ks": ks, "paper_shape": paper_shape, "spread_limit": SPREAD_LIMIT,
        "peaks": dict(zip(("hbm_bytes_per_s", "dense_flops_per_s"), peaks)),
        "model_configs": {m: asdict(s.config) for m, _, s, _ in models}}}
    parts = {"speed": {"speed": speed, "skipped": skipped}, "quality": {"quality": rows,
             "agreement_without_noise": blind}, "profile": {"profile": profile, "skipped": skipped},
             f"roofline_{str(args.roofline).lower().replace(' ', '_')}": {"roofline": roof}}
    parts = {part: out for part, out in parts.items() if next(iter(out.values()))}   # measured
    if not parts:   # earlier results stay as they were
        raise UserError("measured nothing (no point ran, all skipped or suspect): nothing written")
    for part, out in parts.items():
        write_json(f"{stem}_{part}.json", {**head, **out})
    if speed:
        plot_speed(speed, device_name(device), stem + "_speed.png")
    if rows:
        plot_quality(rows, blind, stem + "_quality.png")
    if args.speed and args.roofline is None and os.path.exists(grid):   # the grid ran whole:
        os.remove(grid)   # nothing left to resume (a quality-only run keeps a stopped grid)
    print_tables(speed, skipped, rows, blind, profile, roof, device_name(device))
    plots = [f"{stem}_{part}.png" for part in ("speed", "quality") if part in parts]
    print(f"\nwrote {', '.join([f'{stem}_{part}.json' for part in parts] + plots)}")


if __name__ == "__main__":
    run_cli(main)
