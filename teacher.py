"""Train the autoregressive (AR) teacher: a plain GPT with next-token cross-entropy. distill.py
turns it into a push-forward student, judged against the teacher's own samples.

    python teacher.py --preset tiny    # CPU, minutes; --preset small: one GPU, ~1.5 min on an H100
    torchrun --standalone --nproc_per_node 8 teacher.py --preset paper"""
import dataclasses
import math
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (EMA, JsonlLog, StopFlag, UserError, all_mean, device_name, field, git_commit,
                    load_split, lr_at, parse_config, run_cli, sample_sequences, save_checkpoint,
                    setup_runtime, shard, start_run, stop_if_not_finite, write_json)
from fast import flops_per_token, peak_flops
from model import GPT, GPTConfig
from prepare_data import load_meta, tokenizer_spec


@dataclasses.dataclass
class TeacherConfig:
    data_dir: str = field("data/offline", "a dataset from prepare_data.py (it sets the vocabulary)")
    out_dir: str = field("out/teacher_{preset}", "checkpoints, log.jsonl and the summary")
    # model
    n_layer: int = field(6, "transformer blocks", at_least=1)
    n_head: int = field(6, "attention heads", at_least=1)
    n_embd: int = field(384, "model width", at_least=2)
    block_size: int = field(256, "training sequence length; the longest context", at_least=1)
    dropout: float = field(0.1, "dropout (~10 epochs overfit our corpus)", at_least=0, below=1)
    tie_embeddings: bool = field(True, "share the input embedding and the output head")
    # optimisation
    batch_size: int = field(64, "sequences per micro-batch, over all processes (out of memory: "
                            "lower it, raise --grad_accum)", at_least=1)
    grad_accum: int = field(1, "micro-batches per optimizer step", at_least=1)
    max_steps: int = field(3000, "optimizer steps", at_least=1)
    lr: float = field(1e-3, "peak learning rate (AdamW)", at_least=0)
    min_lr: float = field(1e-4, "learning rate at the end of the cosine decay", at_least=0)
    warmup_steps: int = field(200, "linear warmup steps", at_least=0)
    weight_decay: float = field(0.1, "AdamW weight decay of matrices", at_least=0)
    grad_clip: float = field(1.0, "clip the gradient norm to this (0: off)", at_least=0)
    ema: float = field(0.0, "decay of best.pt's weight average (0: none)", at_least=0, below=1)
    # bookkeeping
    eval_interval: int = field(250, "evaluate and save a checkpoint every N steps", at_least=1)
    eval_iters: int = field(20, "val batches per evaluation (the same ones each time)", at_least=1)
    seed: int = field(1337, "seeds the init and the data order", at_least=0, below=2 ** 63)
    device: str = field("auto", "cuda, cpu or auto")
    dtype: str = field("auto", "float32 (TF32 matmuls on CUDA), bfloat16 autocast, or auto: "
                       "bfloat16 on CUDA",
                       choices=("auto", "float32", "bfloat16"))
    compile: bool = field(True, "torch.compile the model (CUDA only)")


PRESETS = {
    "tiny": dict(_about="CPU demo: character-level Shakespeare, 4 x 128", dropout=0.0,
                 data_dir="data/shakespeare_char", n_layer=4, n_head=4, n_embd=128,
                 block_size=128, batch_size=16, max_steps=2000, lr=3e-3, min_lr=3e-4,
                 warmup_steps=100, eval_interval=250, eval_iters=10),
    "small": dict(_about="one GPU, ~1.5 min on an H100 (6 x 384, block 256)"),
    "paper": dict(_about="the paper's shape (its LM1B run): 12 x 768, untied, block 128, on "
                         "--data_dir; 100k of 1M steps",
                  n_layer=12, n_head=12, n_embd=768, block_size=128, tie_embeddings=False,
                  batch_size=512, max_steps=100_000, lr=3e-4, min_lr=3e-5, warmup_steps=2500,
                  ema=0.9999, eval_interval=1000),
}


def unigram_loss(train, val, vocab_size):
    """The val loss of a unigram model of train: the best a model blind to the context does."""
    counts = np.full(vocab_size, 1.0 / vocab_size)   # one pseudo-count spread over the vocabulary
    for start in range(0, len(train), 2**20):   # in slices: bincount copies them as int64
        counts += np.bincount(train[start:start + 2**20], minlength=vocab_size)
    return float(-np.log(counts / counts.sum())[np.asarray(val)].mean())


@torch.no_grad()
def evaluate(model, val, cfg, rt):   # model: the average, always in eval mode
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(cfg.eval_iters):
        x, y = sample_sequences(val, cfg.batch_size, cfg.block_size, gen)
        with rt.autocast:
            loss = model(shard(x, rt).to(rt.device), shard(y, rt).to(rt.device))[1]
        losses.append(all_mean(loss, rt).item())
    return float(np.mean(losses))


def save(path, model, cfg, meta, **state):   # state, for last.pt: everything a resume needs
    save_checkpoint(path, {"kind": "teacher", "model_config": dataclasses.asdict(model.config),
                           "model": model.state_dict(), "tokenizer": tokenizer_spec(meta),
                           "train_config": dataclasses.asdict(cfg), **state})


def main(argv=None):
    cfg, args = parse_config(TeacherConfig, PRESETS, __doc__, argv)
    if cfg.n_embd % (2 * cfg.n_head):
        raise UserError(f"--n_embd {cfg.n_embd} must be a multiple of 2 x --n_head ({cfg.n_head}):"
                        " equal heads of an even width (RoPE rotates pairs)")
    rt = setup_runtime(cfg.device, cfg.dtype)
    if cfg.batch_size % rt.world:
        raise UserError(f"--batch_size {cfg.batch_size} must split over {rt.world} processes")
    train, val = load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "val")
    meta = load_meta(cfg.data_dir)
    ckpt = start_run(cfg.out_dir, "teacher", args, cfg, rt)
    last_path, best_path = f"{cfg.out_dir}/last.pt", f"{cfg.out_dir}/best.pt"

    torch.manual_seed(cfg.seed)
    raw = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"],
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                        dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings)).to(rt.device)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in raw.parameters() if p.dim() >= 2]},
         {"params": [p for p in raw.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=rt.device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)   # the data order, the same on every rank
    ema = EMA(raw, cfg.ema)   # --ema 0: the average is the weights themselves
    step, best_val, tok_s, val_loss = 0, math.inf, None, math.nan
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.model.load_state_dict(ckpt["ema"])
        step, best_val, tok_s = ckpt["step"], ckpt["best_val"], ckpt["tok_s"]
        torch.set_rng_state(ckpt["rng"][0])   # the global generator draws the dropout masks
        gen.set_state(ckpt["rng"][1])
        if ckpt["rng"][2] is not None and rt.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][2], rt.device)
    # model: raw as it trains (compiled on CUDA, under DDP); raw is what is averaged and saved
    model = torch.compile(raw, dynamic=False) if cfg.compile and rt.device.type == "cuda" else raw
    if rt.ddp:
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    log = JsonlLog(f"{cfg.out_dir}/log.jsonl", ckpt["log_rows"] if ckpt else 0, rt.master)
    if rt.master:
        print(f"teacher: {raw.num_params() / 1e6:.1f}M parameters on {device_name(rt.device)} x "
              f"{rt.world}, {len(train) / 1e6:.1f}M train tokens"
              + (f", resuming at step {step}" if ckpt else ""))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    train_time, first_step = 0.0, step
    mb = cfg.batch_size // rt.world   # a micro-batch's rows on this rank
    bar = tqdm(total=cfg.max_steps, initial=step, desc="teacher", disable=not rt.master)
    with StopFlag() as stop, bar:
        while True:
            # evaluate a step that last.pt already holds (an error here loses no training); a
            # resume from it evaluates again. best.pt: the best evaluated weights after step 0
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val_loss = evaluate(ema.model, val, cfg, rt)
                log.write(step=step, val_loss=val_loss)
                if step > 0 and val_loss < best_val:
                    best_val = val_loss
                    if rt.master:
                        save(best_path, ema.model, cfg, meta, step=step, best_val=best_val)
            if step == cfg.max_steps:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = sample_sequences(train, cfg.batch_size * cfg.grad_accum, cfg.block_size, gen)
            x, y = shard(x, rt).to(rt.device), shard(y, rt).to(rt.device)
            # under DDP each rank draws dropout masks of its own (one seed would repeat rank 0's on
            # every rank), seeded by (seed, step, rank) so that a resume draws them again
            if rt.ddp:
                torch.manual_seed((cfg.seed * 1_000_003 + step * rt.world + rt.rank) % 2 ** 63)
            # forward backward, with gradient accumulation (DDP syncs on the last micro-batch only)
            loss_sum = torch.zeros((), device=rt.device)
            for i in range(cfg.grad_accum):
                with model.no_sync() if rt.ddp and i < cfg.grad_accum - 1 else torch.enable_grad():
                    with rt.autocast:
                        _, loss = model(x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb])
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            loss = all_mean(loss_sum, rt).item()
            stop_if_not_finite(loss, step + 1, last_path)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(raw, step + 1)
            step += 1
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            if step > first_step + 3:   # the first steps of a process compile and warm up
                train_time += time.perf_counter() - t0
                tok_s = (step - first_step - 3) * tokens_per_step / train_time
            log.write(step=step, loss=loss, lr=lr, tok_s=tok_s)
            stopping = stop.should_stop(rt)
            if (step % cfg.eval_interval == 0 or step == cfg.max_steps or stopping) and rt.master:
                rng = [torch.get_rng_state(), gen.get_state(),
                       torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None]
                save(last_path, raw, cfg, meta, optimizer=optimizer.state_dict(),
                     ema=ema.model.state_dict(), rng=rng, step=step, best_val=best_val, tok_s=tok_s,
                     log_rows=log.rows)
            bar.update(1)
            bar.set_postfix(loss=loss, val=val_loss)
            if stopping:
                raise UserError(f"interrupted at step {step}; saved {last_path}; "
                                "continue with --resume")

    if rt.master:
        unigram, peak = unigram_loss(train, val, meta["vocab_size"]), peak_flops(rt.device)
        mfu = (tok_s and peak and   # model FLOPs utilisation
               flops_per_token(raw.config, cfg.block_size) * tok_s / (peak * rt.world))
        summary = f"{cfg.out_dir}/teacher_{args.preset}.json"
        write_json(summary, {
            "device": device_name(rt.device), "world_size": rt.world, "torch": torch.__version__,
            "git": git_commit(), "config": dataclasses.asdict(cfg), "params": raw.num_params(),
            "steps": step, "tokens_seen": step * tokens_per_step, "final_val_loss": val_loss,
            "best_val_loss": best_val, "unigram_loss": unigram, "tokens_per_s": tok_s, "mfu": mfu})
        print(f"val loss {val_loss:.3f} (best {best_val:.3f}, a unigram model of train "
              f"{unigram:.3f}); checkpoint {best_path}, summary {summary}")


if __name__ == "__main__":
    run_cli(main)
