"""
Distillation: turn the AR teacher into a push-forward student that maps k uniform noises to k
tokens in one pass.
--recipe cdf_seq (the default) and cdf (without the slot MLP): the distribution readout, one stage
at --k. Token i's distribution learns the AR teacher's after the context and the student's own
tokens 1..i-1 (--kl): at its fixed point the student samples the teacher. onpolicy: the argmax
readout, by cross-entropy to those targets' draw.
--recipe paper: the paper's progressive self-forcing distillation (argmax readout): stages k = 1,
2, 4, .. up to --k, each a copy of the last learning its same-noise rollout, block after block on
the real context followed by its own tokens (stage 1: the teacher's inverse CDF), by cross-entropy.

    python distill.py --preset tiny      # teacher: out/teacher_<preset>/best.pt
    torchrun --standalone --nproc_per_node 8 distill.py --preset paper
"""
import dataclasses
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (EMA, JsonlLog, StopFlag, UserError, all_mean, device_name, field, git_commit,
                    load_checkpoint, load_split, lr_at, model_from_checkpoint, parse_config, pyplot,
                    run_cli, sample_sequences, save_checkpoint, save_figure, setup_runtime, shard,
                    start_run, stop_if_not_finite, teacher_id, write_json)
from fast import compile_per_shape
from model import (GPT, agreement_without_noise, draw, generate, inverse_cdf,
                   same_noise_agreement, window_agreement)


@dataclasses.dataclass
class DistillConfig:
    teacher: str = field("out/teacher_{preset}/best.pt", "the AR teacher (teacher.py)")
    data_dir: str = field("data/offline", "the teacher's dataset (prepare_data.py)")
    out_dir: str = field("out/distill_{preset}", "student_k<K>.pt, last.pt, log and summary")
    k: int = field(4, "tokens per pass of the last stage", at_least=1)
    recipe: str = field("cdf_seq", "see above", choices=("paper", "onpolicy", "cdf", "cdf_seq"))
    coupling: str = field("auto", "how u becomes a token: inverse_cdf (the paper's), or gumbel "
                          "(Gumbel-max: the same distributions, whose same-noise samples coincide "
                          "more often); auto: gumbel for the cdf readouts (the argmax ones learn "
                          "the map from u, which must be smooth)",
                          choices=("auto", "inverse_cdf", "gumbel"))
    steps_per_stage: int = field(1000, "optimizer steps per stage (0: the untrained student, "
                                 "evaluated and saved)", at_least=0)
    batch_size: int = field(32, "sequences per step, over all processes (out of memory: lower it "
                            "or --anchors)", at_least=1)
    block_size: int = field(256, "context tokens per sequence (<= the teacher's)", at_least=1)
    anchors: int = field(128, "anchors per sequence, each a window of k noise slots (the cdf "
                         "readouts: k - 1); at most --block_size (more are capped)", at_least=1)
    lr: float = field(3e-4, "AdamW learning rate, constant after warmup", at_least=0)
    warmup_steps: int = field(50, "linear warmup steps at each stage's start", at_least=0)
    grad_clip: float = field(1.0, "clip the gradient norm to this (0: off)", at_least=0)
    ema: float = field(0.0, "decay of the weight average that is evaluated, saved and handed on "
                       "(0: the weights themselves)", at_least=0, below=1)
    kl: str = field("both", "the cdf readouts' loss per slot: forward KL(teacher || student) "
                    "(mass-covering), reverse (mode-seeking) or both (their mean)",
                    choices=("forward", "reverse", "both"))
    readout_layers: int = field(1, "cdf_seq: residual MLPs in the slot readout", at_least=1)
    noise_features: str = field("paper", "the noise encoder's cycles over [0, 1]: paper <= 1, "
                                "high 1-256", choices=("paper", "high"))
    freeze_trunk: bool = field(False, "train only the noise encoder and the slot MLP (cdf readouts"
                               "): every weight the teacher had stays frozen, so the real tokens' "
                               "states and K/V and token 1's distribution stay the teacher's")
    eval_samples: int = field(256, "val prefixes of the same-noise agreement", at_least=1)
    eval_tokens: int = field(48, "tokens it generates per prefix (>= k)", at_least=1)
    prompt_len: int = field(6, "its prefix length (the paper's 6)", at_least=1)
    curve_interval: int = field(250, "the learning curve: its agreement on the teacher's context "
                                "every N steps (0: at each stage's start and end)", at_least=0)
    log_interval: int = field(10, "log per-slot loss and accuracy every N steps", at_least=1)
    ckpt_interval: int = field(250, "save a resumable checkpoint every N steps", at_least=1)
    seed: int = field(1337, "seeds batches, anchors, noise and the first stage's new weights (the "
                      "agreement's prefixes and noise are fixed)", at_least=0, below=2 ** 63)
    device: str = field("auto", "cuda, cpu or auto")
    dtype: str = field("auto", "float32, or bfloat16 autocast for the student (targets: fp32); "
                       "auto: bfloat16 on CUDA",
                       choices=("auto", "float32", "bfloat16"))
    compile: bool = field(True, "torch.compile the student and the targets' draw (CUDA only)")


PRESETS = {
    "tiny": dict(_about="CPU demo, for the tiny teacher", data_dir="data/shakespeare_char",
                 steps_per_stage=750, batch_size=16, block_size=64, anchors=32, lr=5e-3,
                 ema=0.99, freeze_trunk=True, readout_layers=3, warmup_steps=20, eval_samples=128,
                 curve_interval=50, ckpt_interval=50),
    "small": dict(_about="one GPU: the tiny preset's recipe, its lr scaled to the width, 32 "
                         "anchors (128 would hold ~90 GB eager; not yet run on a GPU)",
                  freeze_trunk=True, lr=2e-3, ema=0.99, readout_layers=3, anchors=32),
    "paper": dict(_about="the paper's k = 4 stage: lr 1e-4 constant, fp32, batch 512, every anchor;"
                         " 20k steps per stage (the paper's: not known)",
                  steps_per_stage=20_000, batch_size=512, block_size=128, anchors=128, lr=1e-4,
                  warmup_steps=0, dtype="float32", ema=0.999, curve_interval=2000, recipe="paper",
                  ckpt_interval=1000),
}


def stage_schedule(cfg):
    """The stages' k: the paper's 1, 2, 4, .. up to --k; the other recipes' one stage at --k."""
    ks = [1 if cfg.recipe == "paper" else cfg.k]
    while ks[-1] < cfg.k:
        ks.append(min(2 * ks[-1], cfg.k))
    return ks


@torch.no_grad()
def rollout_targets(prev, x, anchors, u):
    """The previous model's same-noise tokens per window (B, A, k): the AR teacher's inverse CDF,
    or the previous student's k_prev tokens a pass, each block on the real context followed by its
    own tokens (self-forcing)."""
    if prev.config.max_k == 0:
        assert u.size(2) == 1, "stage 1 distils one token from the AR teacher"
        return inverse_cdf(prev.next_token_logits(x, anchors).float(), u[:, :, 0]).unsqueeze(-1)
    kp, out = prev.config.max_k, None
    for s in range(0, u.size(2), kp):
        tokens = prev.forward_staircase(x, anchors, u[:, :, s:s + kp], window=out).argmax(-1)
        out = tokens if out is None else torch.cat([out, tokens], dim=2)
    return out


@torch.no_grad()
def teacher_after(teacher, x, anchors, own):
    """Token i's target distribution: the AR teacher's after the context and the student's OWN
    tokens 1..i-1 (own: (B, A, k)), in one teacher pass, float32 (B, A, k, vocab). At a fixed
    point the student's k tokens are the teacher's chain after its own tokens: a teacher sample."""
    return teacher.forward_window(x, anchors, own[:, :, :-1]).float()


def kl_per_slot(log_a, log_b):
    """KL(a || b) per slot, a mean over windows; a, b: log-probabilities (B, A, k, vocab)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1).mean((0, 1))


def distill_loss(recipe, kl, model, teacher, prev, x, anchors, u, autocast, draw_fn=draw):
    """One step's loss per slot (a mean over windows), the loss to minimise, the student's tokens
    and their targets: cross-entropy to the rollout (paper) or to the teacher's inverse CDF after
    the student's own tokens (onpolicy), or --kl to that distribution (cdf, cdf_seq). draw_fn:
    model.draw, or the same compiled."""
    if recipe == "paper":   # targets first, in fp32, outside autocast
        targets = rollout_targets(prev, x, anchors, u)
    with autocast:   # the student's staircase pass, all windows at once: logits (B, A, k, V) and,
        logits, own = model(x, anchors=anchors, noise=u)   # the cdf readout, the tokens it drew
    own = logits.argmax(-1) if own is None else own   # the argmax readout's tokens
    if recipe != "paper":   # (the cdf readouts' targets only score accuracy: they learn by KL)
        target_logits = teacher_after(teacher, x, anchors, own)
        targets = draw_fn(target_logits, u, teacher.config.coupling)   # main set it: --coupling
    if recipe in ("paper", "onpolicy"):
        per_slot = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(),
                                   reduction="none").view_as(targets).mean((0, 1))
        return per_slot, per_slot.mean(), own, targets
    log_p, log_q = F.log_softmax(target_logits, dim=-1), F.log_softmax(logits.float(), dim=-1)
    forward = kl_per_slot(log_p, log_q) if kl != "reverse" else 0   # where p has mass, q needs it
    reverse = kl_per_slot(log_q, log_p) if kl != "forward" else 0   # where p has none, q may not
    per_slot = (forward + reverse) / (2 if kl == "both" else 1)
    # summed: on the student's own prefixes the reverse terms add up to the joint's reverse KL in
    # expectation (the chain rule), though the gradient takes the drawn prefixes as fixed; the
    # forward terms stand in for the joint's forward KL, whose prefixes are p's
    return per_slot, per_slot.sum(), own, targets


@torch.no_grad()
def eval_agreement(student, k, bench, windows=False):
    """Same-noise agreement per slot with the AR teacher's samples on val prefixes: free-running
    (both decode their own tokens), or with windows=True each window on the teacher's context."""
    student.eval()
    n = bench.noise.size(1) // k * k   # whole passes
    out = (window_agreement(student, bench.prompts, bench.ar_tokens, bench.noise, k) if windows
           else same_noise_agreement(bench.ar_tokens[:, :n],
                                     generate(student, bench.prompts, bench.noise[:, :n], k), k))
    student.train()
    return out


def checkpoint(run, model, gen, log, stage, **mid_stage):
    """last.pt mid-stage (the raw weights, optimizer, average and the stage's progress), or a
    stage's student (student_k<K>.pt, and last.pt: a resume from it starts the next stage)."""
    return {**run, "model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
            "rng": gen.get_state(), "log_rows": log.rows, "stage": stage, "optimizer": None,
            **mid_stage}


def main(argv=None):
    cfg, args = parse_config(DistillConfig, PRESETS, __doc__, argv)
    schedule = stage_schedule(cfg)
    if cfg.coupling == "auto":   # the summary and checkpoints record the resolved one
        cfg.coupling = "gumbel" if "cdf" in cfg.recipe else "inverse_cdf"
    rt = setup_runtime(cfg.device, cfg.dtype, tf32=False)   # fp32 targets: no TF32 rounding
    if cfg.batch_size % rt.world:
        raise UserError(f"--batch_size {cfg.batch_size} must split over {rt.world} processes")
    teacher_ckpt = load_checkpoint(cfg.teacher, kind="teacher")
    teacher = model_from_checkpoint(teacher_ckpt, rt.device).eval()
    if cfg.prompt_len + cfg.eval_tokens > teacher.config.block_size:
        raise UserError(f"--prompt_len {cfg.prompt_len} + --eval_tokens {cfg.eval_tokens} exceed "
                        f"the teacher's block size {teacher.config.block_size}")
    if cfg.k > cfg.eval_tokens:
        raise UserError(f"--k {cfg.k} is out of range: at most --eval_tokens ({cfg.eval_tokens})")
    if "cdf" not in cfg.recipe and (cfg.freeze_trunk or cfg.coupling == "gumbel"):
        # the argmax readout reads token 1 from a slot, and learns the map from u: a smooth one
        flag = ("--freeze_trunk (on in the tiny and small presets: --no-freeze_trunk turns it off)"
                if cfg.freeze_trunk else "--coupling gumbel")
        raise UserError(f"{flag} needs --recipe cdf or cdf_seq (--recipe {cfg.recipe} reads tokens "
                        "by argmax)")
    # a longer context would run RoPE on past what the teacher learned (the windows at the last
    # anchors reach up to k positions further, as in the paper, where decoding never goes)
    if cfg.block_size > teacher.config.block_size:
        raise UserError(f"--block_size {cfg.block_size} exceeds the teacher's block size")
    tokenizer = teacher_ckpt["tokenizer"]
    train, val = (load_split(cfg.data_dir, split, tokenizer) for split in ("train", "val"))
    state = start_run(cfg.out_dir, "student", args, cfg, rt)   # the checkpoint a resume continues
    if state and state["teacher_id"] != teacher_id(teacher_ckpt) and rt.master:
        print(f"warning: {cfg.teacher} was trained again since this run started")

    # the agreement's benchmark: fixed val prefixes and noise, the AR teacher's samples on them
    g = torch.Generator().manual_seed(0)
    prompts = sample_sequences(val, cfg.eval_samples, cfg.prompt_len, g)[0].to(rt.device)
    noise = torch.rand(cfg.eval_samples, cfg.eval_tokens, generator=g, dtype=torch.float64)
    bench = SimpleNamespace(prompts=prompts, noise=noise.to(rt.device))
    teacher.config.coupling = cfg.coupling   # the AR reference draws as the student will
    bench.ar_tokens = generate(teacher, prompts, bench.noise, k=1)
    blind = agreement_without_noise(teacher, prompts, bench.ar_tokens)   # noise-blind baselines

    gen = torch.Generator().manual_seed(cfg.seed)   # batches, anchors, noise
    torch.manual_seed(cfg.seed)   # the first stage's new weights (noise encoder, slot readout)
    if state:
        gen.set_state(state["rng"])
    log = JsonlLog(f"{cfg.out_dir}/log.jsonl", state["log_rows"] if state else 0, rt.master)
    run = {"kind": "student", "train_config": dataclasses.asdict(cfg), "tokenizer": tokenizer,
           "teacher_id": teacher_id(teacher_ckpt), "results": state["results"] if state else []}
    prev, last_path = teacher, f"{cfg.out_dir}/last.pt"
    # eager, the targets' draw would sweep batch x anchors x k x vocab some 20 times a step
    draw_fn = compile_per_shape(draw) if cfg.compile and rt.device.type == "cuda" else draw
    teacher_names = {name for name, _ in teacher.named_parameters()}
    with StopFlag() as stop:
        for si, k in enumerate(schedule):
            if state and si < state["stage"]:   # finished before the resume
                prev = model_from_checkpoint(load_checkpoint(
                    f"{cfg.out_dir}/student_k{k}.pt", "student"), rt.device).eval()
                continue
            student = GPT.student_from(prev, k, noise_features=cfg.noise_features,
                                       readout=cfg.recipe if "cdf" in cfg.recipe else "argmax",
                                       readout_layers=cfg.readout_layers, coupling=cfg.coupling)
            for name, p in student.named_parameters():   # frozen: what the teacher already had
                p.requires_grad_(not (cfg.freeze_trunk and name in teacher_names))
            trained = [p for p in student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95),
                                          weight_decay=0.0, fused=rt.device.type == "cuda")
            # the average (--ema 0: the weights themselves) is what is evaluated, saved, handed on
            ema = EMA(student, cfg.ema)
            if state and si == state["stage"] and state["optimizer"]:   # resume mid-stage
                student.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                ema.model.load_state_dict(state["ema"])
                step, r = state["step"], state["progress"]
            else:   # r: the stage's result so far, in last.pt so that a resumed stage reports it
                step, r = 0, {"k": k, "agreement_init": eval_agreement(student, k, bench),
                              "train_s": 0.0, "curve": []}
            done, first_step = sum(s["steps"] for s in run["results"]), step   # steps before
            model = student
            if cfg.compile and rt.device.type == "cuda":   # static: every stage has its own shapes
                model = torch.compile(model, dynamic=False)
            if rt.ddp:
                model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                            else None)
            with tqdm(total=cfg.steps_per_stage, initial=step, desc=f"stage k={k}",
                      disable=not rt.master, dynamic_ncols=True) as bar:   # closed before an error
                while True:
                    if step in (0, cfg.steps_per_stage) or (   # the learning curve
                            cfg.curve_interval and step % cfg.curve_interval == 0):
                        window = eval_agreement(ema.model, k, bench, windows=True)
                        r["curve"].append({"step": step, "train_s": r["train_s"],
                                           "window_agreement": window})
                        log.write(step=done + step, stage=si, k=k, window_agreement=window)
                    if step == cfg.steps_per_stage:
                        break
                    t0 = time.perf_counter()
                    lr = lr_at(step, cfg.lr, cfg.lr, cfg.warmup_steps, cfg.steps_per_stage)
                    optimizer.param_groups[0]["lr"] = lr   # one group
                    # a batch: real context, random anchors, k uniforms per anchor (u_1..u_k)
                    x, _ = sample_sequences(train, cfg.batch_size, cfg.block_size, gen)
                    anchors = torch.rand(cfg.batch_size, cfg.block_size,
                                         generator=gen).argsort(-1)[:, :cfg.anchors]
                    u = torch.rand(*anchors.shape, k, generator=gen, dtype=torch.float64)
                    x, anchors, u = (shard(t, rt).to(rt.device) for t in (x, anchors, u))
                    per_slot, loss, own, targets = distill_loss(
                        cfg.recipe, cfg.kl, model, teacher, prev, x, anchors, u, rt.autocast,
                        draw_fn)
                    loss.backward()
                    hit = own == targets   # the loss and accuracy per slot, whole windows right
                    out = all_mean(torch.cat([per_slot.detach(), hit.float().mean((0, 1)),
                                              hit.all(-1).float().mean().view(1)]), rt).tolist()
                    stop_if_not_finite(sum(out[:k]), done + step + 1, last_path)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ema.update(student, step + 1)
                    step += 1
                    # not timed: a stage's (or a resume's) first 3 steps, which compile; later
                    # .tolist() has waited for the GPU, so the times add up
                    if step > first_step + 3:
                        r["train_s"] += time.perf_counter() - t0
                    r.update(final_loss_per_slot=out[:k], final_acc_per_slot=out[k:2 * k],
                             final_window_acc=out[-1])
                    if step % cfg.log_interval == 0 or step == cfg.steps_per_stage:
                        log.write(step=done + step, stage=si, k=k, loss=out[:k], acc=out[k:2 * k],
                                  window_acc=out[-1], lr=lr)
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(out[:k]) / k:.3f}", win=f"{out[-1]:.2f}")
                    stopping = stop.should_stop(rt)
                    if (step % cfg.ckpt_interval == 0 or step == cfg.steps_per_stage or stopping) \
                            and rt.master:   # the stage's end too: its evaluations lose no training
                        save_checkpoint(last_path, checkpoint(
                            run, student, gen, log, si, step=step, progress=r,
                            optimizer=optimizer.state_dict(), ema=ema.model.state_dict()))
                    if stopping:
                        raise UserError(f"interrupted in stage k={k} at step {step}; saved "
                                        f"{last_path}; continue with --resume")
            # the stage's student: evaluated, saved, and the next stage's teacher
            r.update(steps=step, agreement=eval_agreement(ema.model, k, bench),
                     window_agreement=window)
            run["results"].append(r)
            log.write(step=done + step, stage=si, k=k, agreement=r["agreement"])
            if rt.master:
                print(f"stage {si + 1}/{len(schedule)}: agreement per slot {fmt(r['agreement'])} "
                      f"(start {fmt(r['agreement_init'])}), on the teacher's context {fmt(window)}")
                final = checkpoint(run, ema.model, gen, log, si + 1)
                save_checkpoint(f"{cfg.out_dir}/student_k{k}.pt", final)
                save_checkpoint(last_path, final)   # a resume from here starts the next stage
            prev = ema.model.eval()
            if si + 1 < len(schedule) and stop.should_stop(rt):   # asked during the evaluations
                raise UserError(f"interrupted after stage k={k}; saved {last_path}; continue "
                                "with --resume")

    if rt.master:
        summary = f"{cfg.out_dir}/distill_{args.preset}.json"
        curve = f"{cfg.out_dir}/distill_{args.preset}_curve.png"
        write_json(summary, {
            "device": device_name(rt.device), "world_size": rt.world, "torch": torch.__version__,
            "git": git_commit(), "config": dataclasses.asdict(cfg),
            "teacher_config": dataclasses.asdict(teacher.config), "schedule": schedule,
            "stages": run["results"], "agreement_without_noise": blind})
        plot_curve(run["results"], blind, curve)
        print(f"blind to the noise: {blind['independent_draw']:.0%} (an independent draw), "
              f"{blind['teacher_mode']:.0%} (the teacher's mode); {summary}, {curve}")


def fmt(agree):
    return "/".join(f"{a:.0%}" for a in agree)


def plot_curve(results, blind, path):
    """Agreement per slot on the teacher's context against the step, stage after stage, above
    what a student blind to the noise would reach."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = 0
    for r in results:
        ax.axvline(start, color="gray", lw=0.8, ls=":")   # a stage starts
        for i in range(r["k"]):
            ax.plot([start + p["step"] for p in r["curve"]],
                    [p["window_agreement"][i] for p in r["curve"]], marker=".", color=f"C{i}",
                    label=f"slot {i + 1}" if r is results[-1] else None)
        start += r["steps"]
    for key, what, color in (("teacher_mode", "the teacher's mode", "tab:red"),
                             ("independent_draw", "an independent draw", "tab:purple")):
        ax.axhline(blind[key], color=color, ls="--", lw=0.8, label=f"blind to the noise: {what}")
    ax.set(xlabel="distillation step (all stages)", ylabel="same-noise agreement", ylim=(0, None),
           title="same-noise agreement with the AR teacher per slot, on the teacher's context")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
