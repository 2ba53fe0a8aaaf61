"""What teacher.py, distill.py, sample.py and bench.py share: flags, one-line errors, DDP, batches,
the learning rate, the weight average, atomic files, the start of a run and Ctrl-C."""
import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from prepare_data import DataError, load_meta, load_tokens, tokenizer_spec


class UserError(Exception):
    """A mistake the user can fix, or a stop the user asked for: one line "error: ...", no
    traceback, exit code 2."""


def run_cli(main):
    try:
        main()
        if dist.is_initialized():
            dist.barrier()   # gloo aborts a rank whose group is torn down before the others finish
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")   # one write: DDP ranks failing together never splice
        sys.exit(2)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        sys.stderr.write("error: out of memory; lower the sizes this run was given (see --help)\n")
        sys.exit(2)
    except KeyboardInterrupt:   # Ctrl-C twice in a training loop (StopFlag), once elsewhere
        sys.stderr.write("error: interrupted; what was saved is kept (a training run or a speed "
                         "grid continues with --resume)\n")
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Flags: every field of a config dataclass is a flag; --preset picks named defaults.

def field(default, help, choices=None, at_least=None, below=None):
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices,
                                                            at_least=at_least, below=below))


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, description):   # a script's docstring as written: usage lines stay lines
        super().__init__(description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):   # one line like every other mistake, not a usage block
        raise UserError(f"{message}; see {self.prog} --help")

    def parse_args(self, argv=None):   # "" is given, and no flag means it (a path: the cwd, or /)
        args = super().parse_args(argv)
        for name, value in vars(args).items():
            if value == "":
                self.error(f"--{name} must not be empty")
        return args


def parse_config(cls, presets, description, argv=None):
    p = ArgumentParser(description)
    p.add_argument("--preset", default=next(iter(presets)), choices=list(presets),
                   help=f"default {next(iter(presets))}; "
                   + "; ".join(f"{k}: {v['_about']}" for k, v in presets.items()))
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the run in --out_dir at the start, then train afresh")
    for f in dataclasses.fields(cls):
        shown = {name: repr(pre.get(f.name, f.default)) for name, pre in presets.items()}
        shown = (shown.popitem()[1] if len(set(shown.values())) == 1
                 else ", ".join(f"{name} {value}" for name, value in shown.items()))
        how = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
               {"type": f.type, "choices": f.metadata["choices"]})
        p.add_argument(f"--{f.name}", help=f"{f.metadata['help']} ({shown})", **how)
    args = p.parse_args(argv)
    cfg = cls(**{k: v for k, v in presets[args.preset].items() if not k.startswith("_")})
    for f in dataclasses.fields(cls):
        value, low, high = getattr(args, f.name), f.metadata["at_least"], f.metadata["below"]
        value = getattr(cfg, f.name) if value is None else value   # 0 is given: checked
        if low is not None and not value >= low:   # (so that NaN is refused too)
            raise UserError(f"--{f.name} must be at least {low}, not {value}")
        if high is not None and not value < high:
            raise UserError(f"--{f.name} must be below {high}, not {value}")
        setattr(cfg, f.name, value.replace("{preset}", args.preset) if f.type is str else value)
    return cfg, args


# ------------------------------------------------------------------------------------------------
# Devices and DDP. Every rank draws the same global batch from the same seeded generator and keeps
# its share, so the batches do not depend on how many processes ran (nor, without dropout, the
# numbers: with it, each rank draws masks of its own, teacher.py).

def resolve_device(name):
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    n = torch.cuda.device_count()
    if name != "cpu" and not (re.fullmatch(r"cuda(:\d+)?", name) and int(name[5:] or 0) < n):
        raise UserError(f"--device {name!r} is not supported ({n} CUDA devices); use cpu or cuda:N")
    return torch.device(name)


def setup_runtime(device="auto", dtype="auto", tf32=True):   # tf32=False: exact fp32 matmuls
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ   # torchrun's; a stray RANK is not
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = resolve_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', rank)}")
            torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    bf16 = dtype == "bfloat16" or dtype == "auto" and device.type == "cuda"   # auto: bf16 on CUDA
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, device=device,
                           autocast=autocast)


def all_mean(x, rt):
    if rt.ddp:
        x = x.clone()
        dist.all_reduce(x)
        x /= rt.world
    return x


def shard(t, rt):   # this rank's rows of a global batch
    return t[rt.rank::rt.world]


def out_of_memory(e):   # CUDA's error, or on CPU a MemoryError or a RuntimeError saying so
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError))
            or any(s in str(e) for s in ("out of memory", "can't allocate memory")))


# ------------------------------------------------------------------------------------------------
# Batches, the learning rate, the weight average

def load_split(data_dir, split, tokenizer=None):   # tokenizer: a checkpoint's, that must match
    try:   # (load_tokens checks the split against meta.json; read it again only to compare)
        data = load_tokens(data_dir, split)
        other = tokenizer is not None and tokenizer != tokenizer_spec(load_meta(data_dir))
    except DataError as e:
        raise UserError(str(e)) from None
    if other:
        raise UserError(f"the teacher was trained on another vocabulary than {data_dir}'s; pass "
                        "the --data_dir it was trained on")
    return data


def sample_sequences(data, n, T, gen):
    """n random sequences of T + 1 tokens: (inputs, next-token targets), both (n, T) int64."""
    if len(data) < T + 1:
        raise UserError(f"the {len(data)}-token split is shorter than one sequence of {T + 1} "
                        "tokens; lower --block_size")
    ix = torch.randint(len(data) - T, (n,), generator=gen).numpy()   # every start 0 .. len - T - 1
    w = torch.from_numpy(data[ix[:, None] + np.arange(T + 1)].astype(np.int64))
    return w[:, :-1], w[:, 1:]


def lr_at(step, lr, min_lr, warmup, total):
    if step < warmup:   # 1) linear warmup
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))   # 2) cosine decay to min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)


class EMA:
    """A moving average of the weights, evaluated and saved in their place (as in the paper). Its
    decay after the n-th update is min(decay, (1 + n) / (10 + n)): a short run forgets its start."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)   # ties stay tied

    @torch.no_grad()
    def update(self, model, n):   # the parameters are the whole state: GPT has no buffers
        decay = min(self.decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)


# ------------------------------------------------------------------------------------------------
# atomic_write's files are never half-written: a temporary file beside the target, fsync, rename.
# (Logs are appended instead: a resume keeps a log's rows up to its checkpoint, and bench.py's
# grid cuts a torn last line.)

def atomic_write(path, write_fn, mode="wb"):
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    StopFlag.saving = True   # a second Ctrl-C lets the write finish (torch.save would swallow it)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # a full disk, a read-only folder; torch.save's zip
        e = e if isinstance(e, OSError) else e.__context__   # writer wraps the OSError
        if not isinstance(e, OSError):
            raise
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        StopFlag.saving = False
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), "w")


def save_checkpoint(path, ckpt):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kind=None):   # kind: "teacher" (teacher.py's) or "student" (distill's)
    if not os.path.isfile(path):
        made_by = {"teacher": "; run teacher.py first", "student": "; run distill.py first"}
        raise UserError(f"checkpoint {path!r} not found{made_by.get(kind, '')}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        with torch.device("meta"):   # the network its config describes, not allocated
            want = GPT(GPTConfig(**ckpt["model_config"])).state_dict()
        want = {n: t.shape for n, t in want.items()}
        for weights in [ckpt["model"]] + ([ckpt["ema"]] if "ema" in ckpt else []):   # (last.pt's)
            if {n: t.shape for n, t in weights.items()} != want:
                raise ValueError("its weights (or their average) do not fit its model_config")
    except Exception as e:
        raise UserError(f"checkpoint {path!r} is corrupt or not from this version of this project "
                        f"({type(e).__name__})") from None
    is_a = "student" if ckpt["model_config"]["max_k"] > 0 else "teacher"
    if kind not in (None, is_a):
        raise UserError(f"{path!r} is a {is_a} checkpoint where a {kind} is expected")
    return ckpt


def stop_if_not_finite(loss, step, last_path):   # checked before the update: last.pt is good
    if not math.isfinite(loss):
        kept = (f"keeping the last good checkpoint {last_path}" if os.path.isfile(last_path)
                else "before the first checkpoint")
        raise UserError(f"loss became {loss} at step {step}; stopped, {kept} (lower --lr or raise "
                        "--warmup_steps)")


def teacher_id(ckpt):   # what tells one training of a teacher from another; a student records it
    return {key: ckpt.get(key) for key in ("step", "best_val")}


def model_from_checkpoint(ckpt, device):
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


RUN_FILES = {"teacher": ("last.pt", "log.jsonl", "best.pt", "teacher_*.json"),
             "student": ("last.pt", "log.jsonl", "student_k*.pt", "distill_*")}
RUN_FLAGS = ("out_dir", "device", "compile", "log_interval", "ckpt_interval", "curve_interval")


def start_run(out_dir, kind, args, cfg, rt):
    """The checkpoint a run continues from (--resume), else None. A directory holding a run needs
    --resume or --overwrite (which deletes that run's RUN_FILES, nothing else); a resume may change
    only RUN_FLAGS."""
    last = os.path.join(out_dir, "last.pt")
    try:   # every run with a checkpoint has a last.pt, and it says whose run it is
        found = torch.load(last, mmap=True, weights_only=False)["kind"]
    except Exception:
        found = kind   # none yet (a corrupt one: --resume says so)
    if found != kind:
        raise UserError(f"{out_dir} holds a {found} run; pick another --out_dir")
    if os.path.isfile(last) and not (args.resume or args.overwrite):
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or "
                        "--overwrite to replace it")
    if args.resume and not os.path.isfile(last):
        raise UserError(f"--resume: no checkpoint at {last}; run without --resume to start")
    if args.overwrite and rt.master and os.path.isfile(last):   # (escaped: out_dir is no pattern)
        for path in (p for pattern in RUN_FILES[kind]
                     for p in glob.glob(os.path.join(glob.escape(out_dir), pattern))):
            os.remove(path)
    if not args.resume:
        return None
    ckpt, now = load_checkpoint(last, kind), dataclasses.asdict(cfg)
    diff = [f"--{k} {v!r}" for k, v in ckpt["train_config"].items()
            if k not in RUN_FLAGS and now.get(k) != v]
    if diff:
        raise UserError(f"the run being resumed used {', '.join(diff)}; resume with the same flags")
    return ckpt


class JsonlLog:
    """log.jsonl, one JSON row a line (master only). A checkpoint records how many rows the log
    held (.rows); a resume keeps exactly those, so that no row appears twice."""

    def __init__(self, path, rows, master):   # rows: the resumed checkpoint's log_rows, else 0
        self.path, self.rows, self.master = path, rows, master
        if master:
            kept = open(path).readlines()[:rows] if rows and os.path.isfile(path) else []
            atomic_write(path, lambda f: f.writelines(kept), "w")

    def write(self, **row):
        if self.master:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:   # a full disk
                raise UserError(f"cannot write {self.path} ({e.strerror or e})") from None
        self.rows += 1


class StopFlag:
    """Ctrl-C (or SIGTERM) once asks to stop after this step and save; twice stops now, but a
    second press while a file is being saved is ignored, so that the file is finished."""
    requested = saving = False

    def __enter__(self):
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.requested and not StopFlag.saving:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, rt=None):   # under DDP the ranks agree, so that all stop together
        flag = torch.tensor(float(self.requested), device=rt.device if rt else None)
        if rt and rt.ddp:
            dist.all_reduce(flag)
        return flag.item() > 0


def git_commit():   # HEAD, "+dirty" if a tracked .py file differs from it; None outside a checkout
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "*.py"],
                               capture_output=True).returncode   # outside a checkout: silent
    except OSError:   # no git
        return None
    return None if head.returncode else head.stdout.strip() + ("+dirty" if dirty else "")


def device_name(device):
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores)")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: no display on a server
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    pyplot().close(fig)
