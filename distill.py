"""
Progressive self-forcing distillation (METHOD.md §3): turn the AR teacher into a push-forward student that
maps k uniform noises to k joint tokens in one pass, growing k stage by stage (default 1 -> 2 -> 4).

    python distill.py --k 4                                  # teacher: out/teacher_<preset>/best.pt
    python distill.py --preset small --schedule 1,2,3,4
    torchrun --standalone --nproc_per_node 8 distill.py --preset small

Stage 1 targets: the AR teacher's inverse CDF on the real context with the student's own noise u_1.
Stage k' targets: the previous k-student's same-noise rollout: it decodes u_1..u_k on the real context, then
u_{k+1}.. on the real context followed by ITS OWN tokens (self-forcing), in as many blocks as k' needs.
Each student starts as a copy of the previous one; the loss is cross-entropy per slot against those tokens.
The learning curve (same-noise agreement on the teacher's context every --curve_interval steps) goes to log.jsonl,
the summary and distill_<preset>_curve.png beside it.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (EMA, JsonlLog, OldRun, RunLock, StopFlag, UserError, all_mean, check_batch_split, check_finite,
                    check_resume_config, check_run_dir, check_split_length, device_name, draw_noise_blind,
                    ensure_writable, field, fits_in_memory, git_commit, load_checkpoint, load_split, lr_at,
                    model_from_checkpoint, noise_blind, out_of_memory, parse_config, pyplot, rng_state, run_cli,
                    sample_windows, save_checkpoint, save_figure, set_rng_state, setup_runtime, shard, teacher_id,
                    write_json)
from model import GPT, agreement_without_noise, generate, inverse_cdf, same_noise_agreement, window_agreement


@dataclass
class DistillConfig:
    teacher: str = field("out/teacher_{preset}/best.pt", "the AR teacher checkpoint (from teacher.py)")
    data_dir: str = field("data/offline", "directory with train.bin / val.bin from prepare_data.py")
    out_dir: str = field("out/distill_{preset}", "where student_k<K>.pt, last.pt and log.jsonl go")
    results_dir: str = field("auto", "where the final distill_<preset>.json summary is written; auto: results/ "
                             "for a run of the preset as it stands (--device, --compile and how often it reports "
                             "aside), else out_dir: an experiment never replaces the reference")
    k: int = field(4, "the final number of tokens per pass", at_least=1)
    schedule: str = field("", "stages as a comma list starting at 1, e.g. 1,2,3,4; empty: doubling 1,2,4,.. up to k")
    steps_per_stage: int = field(1000, "optimizer steps in each stage", at_least=0)
    batch_size: int = field(32, "sequences per step, summed over all processes", at_least=1)
    block_size: int = field(256, "context tokens per sequence (at most the teacher's block size)", at_least=1)
    anchors: int = field(128, "anchor positions sampled per sequence; each anchors a window of k noise slots "
                              "(the paper uses every position; fewer is cheaper)", at_least=1)
    lr: float = field(3e-4, "learning rate (AdamW), constant after warmup", at_least=0)
    warmup_steps: int = field(50, "linear warmup steps at the start of each stage", at_least=0)
    weight_decay: float = field(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = field(1.0, "clip the global gradient norm to this (0: off)", at_least=0)
    ema: float = field(0.0, "decay of an exponential moving average of the student's weights, which is what each "
                       "stage evaluates, saves as student_k<K>.pt and hands to the next stage (0: off; the paper's "
                       "k = 4 stage used 0.999, which the paper preset applies to every stage)", at_least=0, below=1)
    noise_features: str = field("paper", "noise encoder features: paper (<= 1 cycle over [0,1]) or high (1-256 cycles)",
                                choices=("paper", "high"))
    eval_samples: int = field(256, "val prefixes for the same-noise agreement at the start and end of each stage",
                              at_least=1)
    eval_tokens: int = field(48, "tokens generated per prefix for that agreement", at_least=1)
    prompt_len: int = field(6, "prefix length for that agreement (6 as in the paper)", at_least=1)
    curve_interval: int = field(250, "also measure the agreement on the teacher's context every N steps of a stage, "
                                "for the learning curve (log.jsonl, the summary and its plot; 0: at each stage's "
                                "start and end only)", at_least=0)
    log_interval: int = field(10, "write per-slot loss and accuracy every N steps", at_least=1)
    ckpt_interval: int = field(250, "write a resumable checkpoint every N steps", at_least=1)
    seed: int = field(1337, "seeds the data order, the anchors and the noise", at_least=0, below=2 ** 63)
    device: str = field("auto", "cuda, cpu or auto")
    dtype: str = field("auto", "float32 or bfloat16 (autocast) for the student; targets are always fp32",
                       choices=("auto", "float32", "bfloat16"))
    compile: bool = field(True, "torch.compile the student (CUDA only)")


PRESETS = {
    "tiny": dict(_about="CPU demo and tests, ~1 min", steps_per_stage=150, batch_size=8, block_size=64,
                 anchors=16, lr=1e-3, warmup_steps=10, eval_samples=64, eval_tokens=24, curve_interval=50,
                 ckpt_interval=50),
    "small": dict(_about="one GPU, ~4 min on an H100 for the three stages, for the small teacher"),
    "paper": dict(_about="the paper's K=4 stage: lr 1e-4 constant, fp32, batch 512 over all anchors; 20k steps "
                           "per stage (the paper's: not known)",
                  steps_per_stage=20_000, batch_size=512, block_size=128, anchors=128, lr=1e-4, warmup_steps=0,
                  dtype="float32", ema=0.999, curve_interval=2000, ckpt_interval=1000),
}


def parse_schedule(cfg):
    if not cfg.schedule:
        sched = [1]
        while sched[-1] < cfg.k:
            sched.append(min(2 * sched[-1], cfg.k))
    else:
        try:
            sched = [int(s) for s in cfg.schedule.split(",")]
        except ValueError:
            raise UserError(f"--schedule {cfg.schedule!r} is not a comma list of integers, e.g. 1,2,4") from None
    if sched[0] != 1 or any(b <= a for a, b in zip(sched, sched[1:])) or sched[-1] != cfg.k:
        raise UserError(f"--schedule {','.join(map(str, sched))} must rise strictly from 1 to --k {cfg.k}")
    return sched


@torch.no_grad()
def rollout_targets(prev, x, anchors, u):
    """The previous model's same-noise tokens for each window, (B, A, k): the targets of this stage.
    prev is the AR teacher (one token per pass, by inverse CDF) or the previous student (k_prev tokens per
    pass, by argmax); each block after the first runs on the real context followed by prev's own tokens."""
    if prev.config.max_k == 0:
        assert u.size(2) == 1, "stage 1 distils one token from the AR teacher"
        return inverse_cdf(prev.next_token_logits(x, anchors).float(), u[:, :, 0]).unsqueeze(-1)
    kp, k = prev.config.max_k, u.size(2)
    out = None
    for s in range(0, k, kp):
        logits = prev.forward_staircase(x, anchors, u[:, :, s:s + kp], window=out)
        tokens = logits.argmax(-1)
        out = tokens if out is None else torch.cat([out, tokens], dim=2)
    return out


@torch.no_grad()
def eval_agreement(student, k, prompts, noise, ar_tokens, windows=False):
    """Same-noise agreement per slot with the AR teacher's samples on val prefixes: free-running (both decode
    their own tokens), or with windows=True each window of k slots on the teacher's own context."""
    student.eval()
    if windows:
        out = window_agreement(student, prompts, ar_tokens, noise, k)
    else:
        n = noise.size(1) - noise.size(1) % k
        out = same_noise_agreement(ar_tokens[:, :n], generate(student, prompts, noise[:, :n], k), k)
    student.train()
    return out


def is_reference_teacher(ckpt, preset):
    """Whether a teacher is its preset's reference run: the finished run whose summary results/teacher_<preset>.json
    holds. A teacher of an experiment, or one interrupted or still training at the preset's path, has written none."""
    try:
        with open(os.path.join("results", f"teacher_{preset}.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return (ckpt.get("train_config", {}).get("results_dir") == "results"
            and summary.get("best_val_loss") == ckpt.get("best_val"))


def main(argv=None):
    cfg, args = parse_config(DistillConfig, PRESETS, __doc__, argv, extra=lambda p: (
        p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt"),
        p.add_argument("--overwrite", action="store_true", help="start afresh even if <out_dir> has a run")))
    schedule = parse_schedule(cfg)
    cfg.teacher = cfg.teacher.format(preset=args.preset)
    rt = setup_runtime(cfg.device, cfg.dtype, tf32=False)   # fp32 targets: no TF32 rounding
    check_batch_split(cfg.batch_size, rt)
    if not os.path.isfile(cfg.teacher) and cfg.teacher == DistillConfig.teacher.format(preset=args.preset):
        raise UserError(f"no teacher at {cfg.teacher}; train it with `python teacher.py --preset {args.preset}` "
                        "or pass --teacher")
    teacher_ckpt = load_checkpoint(cfg.teacher, kind="teacher")
    teacher = model_from_checkpoint(teacher_ckpt, rt.device).eval()
    # which training of the teacher (a retrained teacher at the same path must not feed a resumed run's targets)
    teacher_run = teacher_id(teacher_ckpt)
    if args.results_dir in (None, "auto") and not is_reference_teacher(teacher_ckpt, args.preset):
        cfg.results_dir = cfg.out_dir   # distilled from an experiment's teacher: an experiment too, whatever its flags
    del teacher_ckpt
    if cfg.block_size > teacher.config.block_size:
        raise UserError(f"--block_size {cfg.block_size} exceeds the teacher's block size {teacher.config.block_size}")
    if cfg.eval_tokens < cfg.k:
        raise UserError(f"--eval_tokens {cfg.eval_tokens} must be at least --k ({cfg.k}): the agreement decodes whole "
                        "windows of k tokens")
    if cfg.prompt_len + cfg.eval_tokens > teacher.config.block_size:
        block = teacher.config.block_size
        raise UserError(f"--prompt_len {cfg.prompt_len} + --eval_tokens {cfg.eval_tokens} exceed the teacher's block "
                        f"size {block} (so --k is at most {block - cfg.prompt_len})")
    if cfg.anchors > cfg.block_size:
        raise UserError(f"--anchors {cfg.anchors} exceeds --block_size ({cfg.block_size})")
    train, val = load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "val")
    check_split_length(train, cfg.block_size)
    ensure_writable(cfg.out_dir)
    ensure_writable(cfg.results_dir, "--results_dir")
    last_path = os.path.join(cfg.out_dir, "last.pt")
    stage_path = lambda k: os.path.join(cfg.out_dir, f"student_k{k}.pt")
    check_run_dir(cfg.out_dir, "student", args.resume, args.overwrite)

    # The agreement benchmark: fixed val prefixes and noise, and the AR teacher's samples on them, drawn once.
    g = torch.Generator().manual_seed(0)
    with fits_in_memory(f"the agreement's {cfg.eval_samples} samples do not fit in memory on {rt.device}; "
                        "lower --eval_samples"):
        prompts = sample_windows(val, cfg.eval_samples, cfg.prompt_len, g, "--prompt_len")[0].to(rt.device)
        eval_noise = torch.rand(cfg.eval_samples, cfg.eval_tokens, generator=g, dtype=torch.float64).to(rt.device)
        ar_tokens = generate(teacher, prompts, eval_noise, k=1)
        blind = agreement_without_noise(teacher, prompts, ar_tokens)   # what a student blind to the noise would reach

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)   # the first stage's new noise encoder; torch's own default seed varies per process
    state = load_checkpoint(last_path, kind="student") if args.resume else None
    if state is not None:
        if state["schedule"] != schedule:
            raise UserError(f"{last_path} was made with --k {state['schedule'][-1]} --schedule "
                            f"{','.join(map(str, state['schedule']))}; resume with the same --k and --schedule")
        check_resume_config(state["train_config"], cfg)
        if state.get("teacher_id") != teacher_run:
            raise UserError(f"{cfg.teacher} is not the teacher this run started from (it was trained again since); "
                            "start a new --out_dir, or --overwrite this one")
        set_rng_state(state["rng"], gen, rt.device)
    lock = RunLock(cfg.out_dir, rt)
    old_run = OldRun(cfg.out_dir, "student", args, rt)
    log = JsonlLog(os.path.join(cfg.out_dir, "log.jsonl"), state, rt.master)
    results = state["results"] if state else []
    global_step = state["global_step"] if state else 0
    prev = teacher
    stop, bar = StopFlag(), None
    try:
        for si, k in enumerate(schedule):
            if state is not None and si < state["stage"]:   # finished before the resume
                prev = model_from_checkpoint(load_checkpoint(stage_path(k), kind="student"), rt.device).eval()
                continue
            student = GPT.student_from(prev, k, noise_features=cfg.noise_features)
            optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                          weight_decay=cfg.weight_decay, fused=rt.device.type == "cuda")
            step = 0
            # the stage's last losses and its timing so far, kept in last.pt so that a resumed stage reports them too
            stats = {"loss": None, "acc": None, "window_acc": None, "train_s": 0.0, "steps_timed": 0, "curve": []}
            ema = EMA(student, cfg.ema) if cfg.ema else None
            # A stage's final checkpoint (no optimizer) points at the next stage, which then starts afresh.
            if state is not None and si == state["stage"] and state["optimizer"] is not None:
                student.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if ema:
                    ema.load_state_dict(state["ema"])
                step, agree_init = state["step"], state["agreement_init"]
                stats = {**stats, **state.get("stage_stats", {})}   # fields absent from checkpoints of older versions
            else:
                agree_init = eval_agreement(student, k, prompts, eval_noise, ar_tokens)
            model = student
            if cfg.compile and rt.device.type == "cuda":
                # static shapes: every stage has its own layout (N + A*k), and torch's automatic dynamic shapes
                # would compile the next stage's student symbolically, which crashed inductor in torch 2.11 on
                # an H100 (a reduction workspace sized for the previous stage)
                model = torch.compile(model, dynamic=False)
            if rt.ddp:
                model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

            def curve_point(evaluated):
                # the learning curve: agreement on the teacher's context of the model this stage would hand on
                window = eval_agreement(evaluated, k, prompts, eval_noise, ar_tokens, windows=True)
                stats["curve"].append({"step": step, "window_agreement": window})
                log.write(step=global_step, stage=si, k=k, window_agreement=window)
                return window

            if step == 0 and not stats["curve"]:   # a stage starting afresh (a resumed one has its curve so far)
                curve_point(student)

            def checkpoint(path, final=False):
                # mid-stage: the raw weights to continue from, and the average; final: the stage's student
                old_run.discard()
                if rt.master:
                    save_checkpoint(path, {
                        "kind": "student", "model_config": dataclasses.asdict(student.config),
                        "model": (ema.model if final and ema else student).state_dict(),
                        "ema": ema.state_dict() if ema and not final else None,
                        "train_config": dataclasses.asdict(cfg),
                        "schedule": schedule, "stage": si + final, "step": step, "global_step": global_step,
                        "optimizer": None if final else optimizer.state_dict(), "rng": rng_state(gen, rt.device),
                        "agreement_init": agree_init, "stage_stats": stats, "results": results,
                        "teacher_id": teacher_run, "log_rows": log.rows})

            if rt.master:
                print(f"stage {si + 1}/{len(schedule)}: k = {k}, targets from "
                      f"{'the AR teacher' if prev is teacher else f'the k = {prev.config.max_k} student'}; "
                      f"same-noise agreement at start {fmt(agree_init)}")
            slots_per_step = cfg.batch_size * cfg.anchors * k
            first_step = step   # of this process: the first steps it runs compile and warm up, so go untimed
            bar = tqdm(total=cfg.steps_per_stage, initial=step, desc=f"stage k={k}", disable=not rt.master,
                       dynamic_ncols=True)
            while step < cfg.steps_per_stage:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.lr, cfg.lr, cfg.warmup_steps, cfg.steps_per_stage)   # warmup, then constant
                for gr in optimizer.param_groups:
                    gr["lr"] = lr
                x, _ = sample_windows(train, cfg.batch_size, cfg.block_size, gen)
                anchors = torch.rand(cfg.batch_size, cfg.block_size, generator=gen).argsort(-1)[:, :cfg.anchors]
                u = torch.rand(cfg.batch_size, cfg.anchors, k, generator=gen, dtype=torch.float64)
                x, anchors, u = (shard(t, rt).to(rt.device) for t in (x, anchors, u))
                targets = rollout_targets(prev, x, anchors, u)            # fp32 teacher, no autocast
                with rt.autocast:
                    logits, _ = model(x, anchors=anchors, noise=u)         # (B, A, k, V)
                per_slot = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(),
                                           reduction="none").view_as(targets).mean((0, 1))
                loss = per_slot.mean()
                loss.backward()
                hit = logits.argmax(-1) == targets
                out = all_mean(torch.cat([per_slot.detach(), hit.float().mean((0, 1)),
                                          hit.all(-1).float().mean().view(1)]), rt).tolist()
                stats.update(loss=out[:k], acc=out[k:2 * k], window_acc=out[-1])
                check_finite(sum(out[:k]), global_step + 1, last_path)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update(student)
                step, global_step = step + 1, global_step + 1
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                if step > first_step + 3:
                    stats["train_s"] += time.perf_counter() - t0
                    stats["steps_timed"] += 1
                if step % cfg.log_interval == 0 or step == cfg.steps_per_stage:
                    log.write(step=global_step, stage=si, k=k, loss=stats["loss"], acc=stats["acc"],
                              window_acc=stats["window_acc"], lr=lr)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(stats['loss']) / k:.3f}", acc1=f"{stats['acc'][0]:.2f}",
                                win=f"{stats['window_acc']:.2f}")
                if cfg.curve_interval and step % cfg.curve_interval == 0 and step < cfg.steps_per_stage:
                    curve_point(ema.model if ema else student)   # before a checkpoint at the same step, into it
                if step % cfg.ckpt_interval == 0 and step < cfg.steps_per_stage:
                    checkpoint(last_path)
                if stop.should_stop(rt):
                    checkpoint(last_path)
                    raise UserError(f"interrupted in stage k={k} at step {step}; saved {last_path}; "
                                    "continue with --resume")
            bar.close()
            checkpoint(last_path)   # the whole stage trained: an error in the evaluations below loses none of it
            finished = ema.model if ema else student   # the stage's student: evaluated, saved, the next one's teacher
            agree = eval_agreement(finished, k, prompts, eval_noise, ar_tokens)
            window = curve_point(finished)
            speed = stats["steps_timed"] / stats["train_s"] if stats["train_s"] else None
            results.append({"k": k, "steps": step, "steps_per_s": speed,
                            "tokens_per_s": speed and speed * cfg.batch_size * cfg.block_size,
                            "slots_per_s": speed and speed * slots_per_step,
                            "final_loss_per_slot": stats["loss"], "final_acc_per_slot": stats["acc"],
                            "final_window_acc": stats["window_acc"], "agreement_init": agree_init, "agreement": agree,
                            "window_agreement": window, "curve": stats["curve"]})
            log.write(step=global_step, stage=si, k=k, agreement=agree)
            if rt.master:
                print(f"stage k={k} done: same-noise agreement with the AR teacher per slot {fmt(agree)} "
                      f"(start {fmt(agree_init)}); on the teacher's own context {fmt(window)}")
            checkpoint(stage_path(k), final=True)
            checkpoint(last_path, final=True)    # a resume after this point starts the next stage
            prev = finished.eval()
            if si + 1 < len(schedule) and stop.should_stop(rt):   # asked during the evaluation: stop here
                raise UserError(f"interrupted after stage k={k}; saved {last_path}; continue with --resume")
    except (RuntimeError, MemoryError) as e:
        if out_of_memory(e):
            raise UserError(f"a batch of {cfg.batch_size // rt.world} sequences x {cfg.anchors} anchors does not "
                            f"fit in memory on {rt.device}; lower --batch_size or --anchors") from None
        raise
    finally:
        if bar is not None:
            bar.close()   # so that an error starts on a line of its own
        stop.restore()
        old_run.restore()   # (nothing to put back once this run has saved a checkpoint)

    if rt.master:
        summary = os.path.join(cfg.results_dir, f"distill_{args.preset}.json")
        write_json(summary, {
            "device": device_name(rt.device), "world_size": rt.world, "torch": torch.__version__, "git": git_commit(),
            "config": dataclasses.asdict(cfg), "teacher_config": dataclasses.asdict(teacher.config),
            "schedule": schedule, "stages": results,
            "agreement_without_noise": blind})
        for key, what in (("agreement", "free-running, both decode their own tokens"),
                          ("window_agreement", "each window on the teacher's own context")):
            print(f"\nsame-noise agreement with the AR teacher, {what} (val prefixes of "
                  f"{cfg.prompt_len} tokens, {cfg.eval_samples} samples):")
            print("  k  " + "".join(f"  slot {i + 1}" for i in range(schedule[-1])))
            for r in results:
                print(f"  {r['k']}  " + "".join(f"  {a:6.1%}" for a in r[key]))
        print(f"({noise_blind(blind)})")
        curve = os.path.join(cfg.results_dir, f"distill_{args.preset}_curve.png")
        plot_curve(results, blind, curve)
        print(f"\nstudents {stage_path('*')}, summary {summary}, learning curve {curve}")
    lock.release()


def fmt(agree):
    return "/".join(f"{a:.0%}" for a in agree)


def plot_curve(results, blind, path):
    """Agreement on the teacher's context per slot against the training step, stage after stage, above what a
    student blind to the noise would agree."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = 0
    for r in results:
        ax.axvline(start, color="gray", lw=0.8, ls=":")
        ax.annotate(f"k = {r['k']}", (start, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
        curve = r.get("curve", [])   # absent from the stages of a run resumed from an older version
        for i in range(r["k"]):
            ax.plot([start + p["step"] for p in curve], [p["window_agreement"][i] for p in curve], marker=".",
                    color=f"C{i}", label=f"slot {i + 1}" if r is results[-1] else None)
        start += r["steps"]
    draw_noise_blind(ax, blind, ls="--", lw=0.8)
    ax.set(xlabel="distillation step (all stages)", ylabel="same-noise agreement with the AR teacher",
           title="same-noise agreement per slot, each window on the teacher's context")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
