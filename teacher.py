"""
Train the autoregressive (AR) teacher: a plain GPT with next-token cross-entropy. K-Forcing starts from it:
distill.py turns it into a push-forward student, and its own samples are what the student is judged against.

    python teacher.py --preset tiny                          # CPU, ~1 minute
    python teacher.py --preset small                         # one GPU, ~1.5 minutes on an H100: the README's numbers
    torchrun --standalone --nproc_per_node 8 teacher.py --preset paper
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (EMA, JsonlLog, OldRun, RunLock, StopFlag, UserError, all_mean, check_batch_split, check_finite,
                    check_resume_config, check_run_dir, check_split_length, device_name, ensure_writable, field,
                    git_commit, load_checkpoint, load_split, lr_at, out_of_memory, parse_config, rng_state, run_cli,
                    sample_windows, save_checkpoint, set_rng_state, setup_runtime, shard, write_json)
from model import GPT, GPTConfig, flops_per_token, peak_flops


@dataclass
class TeacherConfig:
    data_dir: str = field("data/offline", "directory with train.bin / val.bin from prepare_data.py")
    out_dir: str = field("out/teacher_{preset}", "where checkpoints (last.pt, best.pt) and log.jsonl go")
    results_dir: str = field("auto", "where the final teacher_<preset>.json summary is written; auto: results/ "
                             "for a run of the preset as it stands (--device, --compile and how often it reports "
                             "aside), else out_dir: an experiment never replaces the reference")
    # model
    n_layer: int = field(6, "transformer blocks", at_least=1)
    n_head: int = field(6, "attention heads", at_least=1)
    n_embd: int = field(384, "model width", at_least=2)
    block_size: int = field(256, "training sequence length (and the longest context at inference)", at_least=1)
    dropout: float = field(0.1, "dropout; our corpus is small enough that ~10 epochs overfit without it", at_least=0,
                           below=1)
    tie_embeddings: bool = field(True, "share the input embedding and the output head")
    # optimisation
    batch_size: int = field(64, "sequences per micro-batch, summed over all processes", at_least=1)
    grad_accum: int = field(1, "micro-batches per optimizer step (global batch = batch_size x grad_accum)", at_least=1)
    max_steps: int = field(3000, "optimizer steps", at_least=1)
    lr: float = field(1e-3, "peak learning rate (AdamW)", at_least=0)
    min_lr: float = field(1e-4, "learning rate at the end of the cosine decay", at_least=0)
    warmup_steps: int = field(200, "linear warmup steps", at_least=0)
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms and biases)", at_least=0)
    beta1: float = field(0.9, "AdamW beta1", at_least=0.0, below=1.0)
    beta2: float = field(0.95, "AdamW beta2", at_least=0.0, below=1.0)
    grad_clip: float = field(1.0, "clip the global gradient norm to this (0: off)", at_least=0)
    ema: float = field(0.0, "decay of an exponential moving average of the weights, which is what is evaluated and "
                       "saved as best.pt (0: off; the paper's teacher: 0.9999)", at_least=0, below=1)
    # bookkeeping
    eval_interval: int = field(250, "evaluate val loss and write a checkpoint every N steps", at_least=1)
    eval_iters: int = field(20, "val batches per evaluation (always the same batches)", at_least=1)
    seed: int = field(1337, "seeds the model init and the data order", at_least=0, below=2 ** 63)
    device: str = field("auto", "cuda, cpu or auto")
    dtype: str = field("auto", "float32 or bfloat16 (autocast); auto: bfloat16 on CUDA, float32 on CPU",
                       choices=("auto", "float32", "bfloat16"))
    compile: bool = field(True, "torch.compile the model (CUDA only)")


PRESETS = {
    "tiny": dict(_about="CPU demo and tests, ~1 min on 2 cores", n_layer=2, n_head=2, n_embd=64,
                 block_size=64, dropout=0.0, batch_size=8, max_steps=400, lr=3e-3, min_lr=3e-4,
                 warmup_steps=20, eval_interval=100, eval_iters=8),
    "small": dict(_about="one GPU, ~1.5 min on an H100 (6 x 384, block 256)"),
    "paper": dict(_about="the paper's shape: 12 x 768, 12 heads, untied, block 128 as on LM1B; 100k steps "
                           "(the paper's: 1M), cosine decay to 3e-5 (the paper's: not known)",
                  n_layer=12, n_head=12, n_embd=768, block_size=128, tie_embeddings=False,
                  batch_size=512, max_steps=100_000, lr=3e-4, min_lr=3e-5, warmup_steps=2500, ema=0.9999,
                  eval_interval=1000),
}


def model_config(cfg):
    return GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                     dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings)


def unigram_baselines(train, val, max_train_tokens=2**26):
    """Two context-free references for the val loss, in nats/token:
    "unigram_loss": val cross-entropy of a unigram model fitted to the train split, the baseline a model must
    beat to have learned anything from context. Its counts get a pseudo-count of one token spread over the
    vocabulary (a token never seen in train costs a finite loss) and cover all of train, or for a larger split
    64 evenly spaced slices of max_train_tokens in all: a multi-billion-token split is never read into memory whole.
    "unigram_entropy": the entropy of val's own unigram distribution: the best any context-free model could do,
    and only by fitting val itself (a small val set's plug-in entropy is biased low; its documents are not train's)."""
    V = GPTConfig.vocab_size
    counts = np.full(V, 1.0 / V)
    n, chunk = len(train), max_train_tokens // 64
    starts = range(0, n, chunk) if n <= max_train_tokens else np.linspace(0, n - chunk, 64).astype(np.int64)
    for start in starts:
        counts += np.bincount(np.asarray(train[start:start + chunk]), minlength=V)
    val = np.asarray(val)
    p_val = np.bincount(val, minlength=V).astype(np.float64)
    p_val = p_val[p_val > 0] / p_val.sum()
    return {"unigram_loss": float(-np.log(counts / counts.sum())[val].mean()),
            "unigram_entropy": float(-(p_val * np.log(p_val)).sum())}


@torch.no_grad()
def evaluate(model, val, cfg, rt):
    """Mean loss over the same eval_iters val batches every time (a fixed generator), so evaluations compare. Under
    DDP each rank evaluates its share of each batch, as in training."""
    training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = sample_windows(val, cfg.batch_size, cfg.block_size, gen)
        with rt.autocast:
            loss = model(shard(x, rt).to(rt.device), shard(y, rt).to(rt.device))[1]
        losses.append(all_mean(loss, rt).item())
    model.train(training)
    return float(np.mean(losses))


def main(argv=None):
    cfg, args = parse_config(TeacherConfig, PRESETS, __doc__, argv, extra=lambda p: (
        p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt"),
        p.add_argument("--overwrite", action="store_true", help="start afresh even if <out_dir> has a checkpoint")))
    if cfg.n_embd % (2 * cfg.n_head):
        raise UserError(f"--n_embd {cfg.n_embd} must be a multiple of 2 x --n_head ({cfg.n_head}): equal heads of "
                        "an even width (RoPE rotates pairs of features)")
    rt = setup_runtime(cfg.device, cfg.dtype)
    check_batch_split(cfg.batch_size, rt)
    train, val = load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "val")
    for split in (train, val):
        check_split_length(split, cfg.block_size)
    ensure_writable(cfg.out_dir)
    ensure_writable(cfg.results_dir, "--results_dir")
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")
    check_run_dir(cfg.out_dir, "teacher", args.resume, args.overwrite)

    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg)).to(rt.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=rt.device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)   # the data order; identical on every rank
    ema = EMA(model, cfg.ema) if cfg.ema else None
    step, best_val, tok_s, mfu = 0, math.inf, None, None   # tok_s: None until a step is timed
    ckpt = None   # the checkpoint a resume continues from
    if args.resume:
        ckpt = load_checkpoint(last_path, kind="teacher")
        if ckpt["model_config"] != dataclasses.asdict(model_config(cfg)):
            raise UserError(f"{last_path} was trained with another model shape; resume with the same flags")
        check_resume_config(ckpt["train_config"], cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema:
            ema.load_state_dict(ckpt["ema"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        tok_s, mfu = ckpt.get("tokens_per_s"), ckpt.get("mfu")   # until this run's own steps measure them
        set_rng_state(ckpt["rng"], gen, rt.device)
    raw = model
    evaluated = ema.model if ema else raw   # what val loss measures and best.pt keeps
    if cfg.compile and rt.device.type == "cuda":
        model = torch.compile(model, dynamic=False)   # one training shape; no symbolic recompiles
    if rt.ddp:
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    def checkpoint(path, with_optimizer=True):
        # last.pt (with the optimizer): the raw weights to continue from, and the average; best.pt: what was evaluated
        old_run.discard()
        if rt.master:
            save_checkpoint(path, {"kind": "teacher", "model_config": dataclasses.asdict(raw.config),
                                   "model": (raw if with_optimizer else evaluated).state_dict(),
                                   "ema": ema.state_dict() if ema and with_optimizer else None,
                                   "train_config": dataclasses.asdict(cfg),
                                   "optimizer": optimizer.state_dict() if with_optimizer else None,
                                   "step": step, "best_val": best_val, "rng": rng_state(gen, rt.device),
                                   "tokens_per_s": tok_s, "mfu": mfu, "log_rows": log.rows})

    lock = RunLock(cfg.out_dir, rt)
    old_run = OldRun(cfg.out_dir, "teacher", args, rt)
    log = JsonlLog(os.path.join(cfg.out_dir, "log.jsonl"), ckpt, rt.master)
    if rt.master:
        print(f"teacher: {raw.num_params() / 1e6:.1f}M parameters on {device_name(rt.device)} x {rt.world}, "
              f"{len(train) / 1e6:.1f}M train tokens" + (f", resuming at step {step}" if ckpt else ""))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    flops, peak = flops_per_token(raw.config, cfg.block_size), peak_flops(rt.device)
    train_time, train_tokens, val_loss, first_step = 0.0, 0, math.nan, step   # first_step: of this process
    stop = StopFlag()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="teacher", disable=not rt.master, dynamic_ncols=True)
    try:
        if ckpt is None:
            val_loss = evaluate(evaluated, val, cfg, rt)
            log.write(step=0, val_loss=val_loss)
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = sample_windows(train, cfg.batch_size * cfg.grad_accum, cfg.block_size, gen)
            x, y = shard(x, rt).to(rt.device), shard(y, rt).to(rt.device)
            mb = cfg.batch_size // rt.world
            loss_sum = torch.zeros((), device=rt.device)
            for i in range(cfg.grad_accum):
                sync = i == cfg.grad_accum - 1 or not rt.ddp
                with (model.no_sync() if not sync else torch.enable_grad()), rt.autocast:
                    _, loss = model(x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb])
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            loss = all_mean(loss_sum, rt).item()
            check_finite(loss, step + 1, last_path)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                ema.update(raw)
            step += 1
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if step > first_step + 3:   # the first steps compile and warm up
                train_time, train_tokens = train_time + dt, train_tokens + tokens_per_step
                tok_s = train_tokens / train_time
                mfu = flops * tok_s / (peak * rt.world) if peak else None
            log.write(step=step, loss=loss, lr=lr, tok_s=tok_s)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val_loss = evaluate(evaluated, val, cfg, rt)
                log.write(step=step, val_loss=val_loss)
                if val_loss < best_val:
                    best_val = val_loss
                    checkpoint(best_path, with_optimizer=False)
                checkpoint(last_path)
            bar.update(1)   # (after the evaluation, so that the bar shows this step's val loss)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tok_s:,.0f}" if tok_s else "-",
                            **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            if stop.should_stop(rt):
                checkpoint(last_path)
                raise UserError(f"interrupted at step {step}; saved {last_path}; continue with --resume")
    except (RuntimeError, MemoryError) as e:
        if out_of_memory(e):
            raise UserError(f"a batch of {cfg.batch_size // rt.world} x {cfg.block_size} tokens does not fit in "
                            f"memory on {rt.device}; lower --batch_size and raise --grad_accum") from None
        raise
    finally:
        bar.close()
        stop.restore()
        old_run.restore()   # (nothing to put back once this run has saved a checkpoint)

    if math.isnan(val_loss):   # resumed a finished run: nothing trained, but report where it stands
        val_loss = evaluate(evaluated, val, cfg, rt)
    if rt.master:
        baselines = unigram_baselines(train, val)
        result = {"device": device_name(rt.device), "world_size": rt.world, "torch": torch.__version__,
                  "git": git_commit(), "config": dataclasses.asdict(cfg), "params": raw.num_params(), "steps": step,
                  "tokens_seen": step * tokens_per_step, "final_val_loss": val_loss, "best_val_loss": best_val,
                  **baselines, "tokens_per_s": tok_s, "mfu": mfu}
        summary = os.path.join(cfg.results_dir, f"teacher_{args.preset}.json")
        write_json(summary, result)
        speed = (f"{tok_s:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else "") if tok_s else
                 "speed not timed (its first 3 steps only warm up)")
        print(f"val loss {val_loss:.3f} (best {best_val:.3f}; a unigram model fitted to train: "
              f"{baselines['unigram_loss']:.3f}, val's own unigram entropy: {baselines['unigram_entropy']:.3f} nats), "
              f"{speed}; checkpoint {best_path}, summary {summary}")
    lock.release()


if __name__ == "__main__":
    run_cli(main)
