"""
What teacher.py, distill.py, sample.py and bench.py share, so that each of them can read as its method:
flags built from a config dataclass, clear one-line errors, devices and DDP, batches, the learning-rate
schedule, checkpoints written atomically, and the resume / Ctrl-C / NaN handling of a training loop.
"""
import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

try:
    import fcntl
except ImportError:   # Windows: no run lock
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback, exit code 2."""


def print_error(msg):
    # one write, not print's two (text, then "\n"): DDP ranks failing together then never splice their lines
    sys.stderr.write(f"error: {msg}\n")


def run_cli(main):
    try:
        main()
        if dist.is_initialized():
            dist.barrier()   # let every rank finish before the group goes: gloo aborts a rank torn down early
    except UserError as e:
        print_error(e)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Flags: every field of a config dataclass is a flag (its metadata "help" is the flag's help); --preset
# picks a named set of defaults, and flags given on the command line override it.

# The flags that say where a run executes and writes and how often it reports, never what it computes: a resume may
# change them, and a run of a preset that changes only them still writes that preset's reference summary
BOOKKEEPING = ("out_dir", "results_dir", "device", "compile", "log_interval", "ckpt_interval",
               "curve_interval")


def field(default, help, choices=None, at_least=None, below=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "at_least": at_least,
                                                        "below": below})


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an unknown flag or a bad value is one line like every other UserError, not a usage block."""

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, but not an empty one (None, a switch's False): such a flag's own help says
    what leaving it out does."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_config(cls, presets, description, argv=None, extra=None):
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=next(iter(presets)), choices=list(presets),
                   help=f"named defaults (default: {next(iter(presets))}): " +
                        "; ".join(f"{k}: {v.get('_about', '')}" for k, v in presets.items()))
    for f in dataclasses.fields(cls):
        per_preset = {name: pre.get(f.name, f.default) for name, pre in presets.items()}
        shown = (f"default: {f.default}" if len(set(map(str, per_preset.values()))) == 1 else
                 "default: " + ", ".join(f"{v} ({name})" for name, v in per_preset.items()))
        low, high = f.metadata.get("at_least"), f.metadata.get("below")
        help = (f"{f.metadata.get('help', '')} ({shown}{'' if low is None else f'; at least {low}'}"
                f"{'' if high is None else f'; below {high}'})")
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=None, help=help, choices=f.metadata.get("choices"))
    if extra:
        extra(p)
    args = p.parse_args(argv)
    values = {k: v for k, v in presets[args.preset].items() if not k.startswith("_")}
    reference = cls(**values)   # the preset as it stands, before the command line
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                   if getattr(args, f.name) is not None})
    cfg = cls(**values)
    for f in dataclasses.fields(cls):
        low, high, value = f.metadata.get("at_least"), f.metadata.get("below"), getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):   # nan would pass every comparison below
            raise UserError(f"--{f.name} must be a finite number, not {value}")
        if low is not None and value < low:
            raise UserError(f"--{f.name} must be at least {low}, not {value}")
        if high is not None and value >= high:
            raise UserError(f"--{f.name} must be below {high}, not {value}")
    cfg.out_dir = cfg.out_dir.format(preset=args.preset)
    if getattr(cfg, "results_dir", None) == "auto":
        # results/ holds each preset's reference summary, which only the preset as it stands writes: a run with its own
        # --out_dir, or with a flag that changes what it computes, keeps its summary beside its checkpoints
        norm = lambda v: os.path.normpath(v.replace("{preset}", args.preset)) if isinstance(v, str) else v  # noqa
        experiment = [f.name for f in dataclasses.fields(cls) if (f.name == "out_dir" or f.name not in BOOKKEEPING)
                      and norm(getattr(cfg, f.name)) != norm(getattr(reference, f.name))]
        cfg.results_dir = cfg.out_dir if experiment else "results"
    return cfg, args


# ----------------------------------------------------------------------------------------------------
# Devices, precision and DDP. Under torchrun every rank draws the same global batch from the same seeded
# generator and keeps its own share, so a run's numbers do not depend on how many processes ran it.

def resolve_device(name):
    """--device: cuda, cpu (or cuda:N), or auto (CUDA where there is one). On CPU, keep freed memory."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):   # (the code paths here are CUDA's and the CPU's)
        raise UserError(f"--device {name!r} is not supported; use cuda, cuda:N, cpu or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "cpu":
        keep_freed_memory()
    return device


def setup_runtime(device="auto", dtype="auto", tf32=True):
    """tf32=False keeps float32 matmuls exact: distill.py's same-noise targets are that sensitive."""
    ddp = "RANK" in os.environ
    device = resolve_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    autocast = (torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext())
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, device=device,
                           dtype=ptdtype, autocast=autocast)


def keep_freed_memory():
    """On CPU, glibc hands the 100 MB logit buffers back to the OS after every step and page-faults them in
    again on the next: more system time than arithmetic on a small machine. A 1 GB top pad keeps them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-2, 1 << 30)   # M_TOP_PAD
        except (OSError, AttributeError):
            pass


def all_mean(x, rt):
    """Mean of a scalar tensor over ranks (identity in one process)."""
    if rt.ddp:
        x = x.clone()
        dist.all_reduce(x)
        x /= rt.world
    return x


def shard(t, rt):
    """This rank's share of a global batch (rows rank, rank + world, ...)."""
    return t[rt.rank::rt.world]


def check_batch_split(batch_size, rt):
    if batch_size % rt.world:
        raise UserError(f"--batch_size {batch_size} must be divisible by the number of processes ({rt.world})")


def out_of_memory(e):
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


@contextmanager
def fits_in_memory(hint):
    """Running out of memory inside the block ends in one line: `hint`, what did not fit and what to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if out_of_memory(e):
            raise UserError(hint) from None
        raise


# ----------------------------------------------------------------------------------------------------
# Data

def load_split(data_dir, split):
    from prepare_data import DataError, load_tokens
    try:
        return load_tokens(data_dir, split)
    except DataError as e:
        raise UserError(str(e)) from None


def check_split_length(data, T, flag="--block_size"):
    if len(data) < T + 1:
        raise UserError(f"the {len(data)}-token split is shorter than one window of {T + 1} tokens; lower {flag}")


def sample_windows(data, n, T, gen, flag="--block_size"):
    """n random windows of T + 1 tokens: (inputs, next-token targets), both (n, T) int64. flag: what sets T."""
    check_split_length(data, T, flag)
    ix = torch.randint(len(data) - T, (n,), generator=gen).numpy()   # starts 0 .. len - T - 1: every window
    w = torch.from_numpy(data[ix[:, None] + np.arange(T + 1)].astype(np.int64))
    return w[:, :-1], w[:, 1:]


def lr_at(step, lr, min_lr, warmup, total):
    """Linear warmup, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)


class EMA:
    """An exponential moving average of a model's weights, evaluated and saved in place of the raw weights (the
    paper's checkpoints: 0.9999 for the AR teacher, 0.999 for the k = 4 stage). The decay ramps up as
    min(decay, (1 + n) / (10 + n)) after n updates, so that a short run's average does not keep most of its initial
    weights (0.999^1000 = 0.37 of them after 1000 steps without the ramp). The average is kept in float32 whatever
    the autocast, on the model's device; one copy per process, identical across DDP ranks (same gradients)."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)   # a tied embedding stays tied

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # parameters are the whole state: GPT has no buffers (RoPE and the noise features are computed on the fly)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


# ----------------------------------------------------------------------------------------------------
# Files: nothing is ever half-written (temporary file in the same directory, fsync, rename), and an
# output directory is checked before any work is done.

def ensure_writable(d, flag="--out_dir"):
    try:
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {d!r} ({e.strerror}); pick another with {flag}") from None


def atomic_write(path, write_fn, binary=True):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes files private (0600); results are meant to be shared
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# What teacher.py and distill.py write in their out_dir (the summary too, for a run whose results_dir is its out_dir),
# and the file that tells each kind of run apart (a run stopped before its first evaluation has only last.pt, whose
# "kind" tells)
RUN_FILES = {"teacher": ("last.pt", "best.pt", "log.jsonl", "teacher_*.json"),
             "student": ("last.pt", "student_k*.pt", "log.jsonl", "distill_*.json", "distill_*_curve.png")}
RUN_MARK = {"teacher": "best.pt", "student": "student_k*.pt"}


def checkpoint_kind(path):
    """The "kind" a checkpoint of teacher.py or distill.py records, None if it has none or cannot be read. Memory-
    mapped: nothing of its weights is read."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("kind")
    except Exception:
        return None


def check_run_dir(out_dir, kind, resume, overwrite):
    """Nothing is overwritten by accident: a directory that holds a run needs --resume or --overwrite, and one that
    holds the other script's run (a teacher where students would go, or students where a teacher would) is refused
    whatever the flags."""
    other = "student" if kind == "teacher" else "teacher"
    last_path = os.path.join(out_dir, "last.pt")
    theirs = sorted(glob.glob(os.path.join(out_dir, RUN_MARK[other])))
    if not theirs and os.path.exists(last_path) and checkpoint_kind(last_path) == other:
        theirs = [last_path]
    if theirs:
        raise UserError(f"{out_dir} holds a {'distillation' if other == 'student' else 'teacher'} run "
                        f"({os.path.basename(theirs[0])}); pick another --out_dir")
    if resume and overwrite:
        raise UserError(f"--resume continues the run in {out_dir} and --overwrite replaces it: pass one of them")
    if resume and not os.path.exists(last_path):
        raise UserError(f"--resume: no checkpoint at {last_path}; run without --resume to start")
    if not resume and not overwrite and os.path.exists(last_path):
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    replaced = sorted(glob.glob(os.path.join(out_dir, "*.replaced")))
    if replaced and not overwrite:   # the next run's first checkpoint would delete them
        raise UserError(f"{out_dir} holds a run set aside by an --overwrite that was killed ("
                        f"{', '.join(os.path.basename(p) for p in replaced)}): rename them back (without .replaced) to "
                        "keep that run, or pass --overwrite to let this run replace it")


class RunLock:
    """One run at a time in an out_dir: two runs in one directory (the same command started twice, or an --overwrite
    while the first run still trains) would interleave their logs and checkpoints, or set aside the files of a run
    still writing them. An exclusive flock on <out_dir>/.lock, taken by the master process once the inputs are checked
    and before anything in out_dir is touched, and released when the run has written its last file; the kernel drops
    it when the process dies. A lock this process still holds from a run that raised is handed on to its next run
    (tests, notebooks). Under DDP every rank stops together. No lock where fcntl is missing (Windows) or the
    filesystem has no locks."""
    held = {}   # this process's locks: path -> fd

    def __init__(self, out_dir, rt):
        self.path, failed = os.path.realpath(os.path.join(out_dir, ".lock")), False
        if rt.master and fcntl is not None:
            stale = RunLock.held.pop(self.path, None)
            if stale is not None:
                os.close(stale)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                RunLock.held[self.path] = fd
            except OSError as e:
                os.close(fd)
                failed = isinstance(e, BlockingIOError)   # else a filesystem without locks: run unlocked
        if rt.ddp:
            failed = all_mean(torch.tensor(float(failed), device=rt.device), rt).item() > 0
        if failed:
            raise UserError(f"{out_dir} is in use by another run that is still going; wait for it to end or stop it, "
                            "or pick another --out_dir")

    def release(self):
        fd = RunLock.held.pop(self.path, None)
        if fd is not None:
            os.close(fd)


class OldRun:
    """--overwrite starts afresh, and none of the old run's files may outlive it to be taken for the new run's (an
    old best.pt, or the student_k4.pt of a longer schedule, which sample.py and bench.py would pick). They are set
    aside (renamed <name>.replaced) when the new run starts, deleted when it saves its first checkpoint, and put back
    if it stops before that: a mistake that shows only once training runs (a batch that does not fit in memory)
    costs the old run nothing. Made once the new run has passed every check of its inputs."""

    def __init__(self, out_dir, kind, args, rt):
        self.out_dir, self.kind, self.moved, self.pending = out_dir, kind, [], rt.master
        if args.overwrite and not args.resume and rt.master:
            for pattern in RUN_FILES[kind]:
                for path in glob.glob(os.path.join(out_dir, pattern)):
                    os.replace(path, path + ".replaced")
                    self.moved.append(path)

    def discard(self):
        """At the new run's first checkpoint: the old run goes for good, and so do the files that an overwrite killed
        before its first checkpoint (SIGKILL: nothing could put them back) left set aside."""
        if self.pending:
            for pattern in RUN_FILES[self.kind]:
                for path in glob.glob(os.path.join(self.out_dir, pattern + ".replaced")):
                    os.remove(path)
            self.moved, self.pending = [], False

    def restore(self):   # the new run stops without a checkpoint: the old one comes back as it was
        for path in self.moved:
            os.replace(path + ".replaced", path)
        self.moved = []


def check_resume_config(saved, cfg):
    """A resume continues the same run: every flag but the BOOKKEEPING ones must be what the run started with (a
    flag added since the run started counts as its default, which is how that run behaved)."""
    saved = {f.name: saved.get(f.name, f.default) for f in dataclasses.fields(cfg)}
    diff = [f.name for f in dataclasses.fields(cfg)
            if f.name not in BOOKKEEPING and saved[f.name] != getattr(cfg, f.name)]
    if diff:
        was = ", ".join(f"--{k} {saved[k] if saved[k] != '' else repr('')}" for k in diff)
        raise UserError(f"the run being resumed used {was}; resume with the same flags or start a new --out_dir")


def noise_blind(blind):
    """model.agreement_without_noise's two baselines, in words (distill.py, sample.py and bench.py print them)."""
    return (f"a student blind to the noise would agree {blind['independent_draw']:.1%} as an independent draw from the "
            f"teacher, {blind['teacher_mode']:.1%} always answering the teacher's most likely token")


def draw_noise_blind(ax, blind, **style):
    """noise_blind's two baselines as horizontal lines on a plot of agreement (bench.py's and distill.py's)."""
    ax.axhline(blind["teacher_mode"], color="tab:red", label="blind to the noise: teacher's mode", **style)
    ax.axhline(blind["independent_draw"], color="tab:purple", label="blind to the noise: independent draw", **style)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)


def pyplot():
    """matplotlib's pyplot on its file-only backend (no display on a server), imported only to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    pyplot().close(fig)


def save_checkpoint(path, ckpt):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kind=None, vocab_size=50257, map_location="cpu"):
    """Load and validate a checkpoint. kind: "teacher" (an AR model) or "student" (K-Forcing), or None."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        cfg = GPTConfig(**ckpt["model_config"])
        ckpt["model"]
    except Exception as e:
        raise UserError(f"checkpoint {path!r} is corrupt or not from this project ({type(e).__name__})") from None
    got = "student" if cfg.max_k > 0 else "teacher"
    if kind is not None and got != kind:
        hint = {"teacher": "pass an AR checkpoint written by teacher.py",
                "student": "pass a student_k*.pt written by distill.py"}[kind]
        raise UserError(f"{path!r} is a {got} checkpoint where a {kind} is expected; {hint}")
    if vocab_size is not None and cfg.vocab_size != vocab_size:
        raise UserError(f"{path!r} has a vocabulary of {cfg.vocab_size} tokens, not the GPT-2 BPE's {vocab_size}")
    with torch.device("meta"):   # the network its config describes, without allocating it
        want = {name: t.shape for name, t in GPT(cfg).state_dict().items()}
    got = {name: getattr(t, "shape", None) for name, t in ckpt["model"].items()}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or sorted(n for n in want if got[n] != want[n])
        raise UserError(f"checkpoint {path!r} is corrupt or not from this version: its weights do not match its "
                        f"model_config ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return ckpt


def teacher_id(ckpt):
    """Which training of a teacher a checkpoint holds: a student records its teacher's, so that a teacher trained
    again at the same path is told apart (distill.py's resume, sample.py and bench.py)."""
    return {key: ckpt.get(key) for key in ("step", "best_val")}


def model_from_checkpoint(ckpt, device):
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


# The generator on the training device only (dropout): every rank seeds its own GPU alike and draws the same number
# of numbers per step, so rank 0's state is every rank's, and it restores onto whichever GPU a resumed rank uses.
def rng_state(gen, device):
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, gen, device):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------------
# The training loop's safety net.

class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, save and exit; a second
    Ctrl-C stops at once. Under DDP (should_stop's rt: setup_runtime's) the ranks agree on the flag each step so
    that all stop together."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, rt=None):
        flag = torch.tensor(float(self.requested))
        if rt is not None and rt.ddp:
            if rt.device.type == "cuda":
                flag = flag.to(rt.device)
            dist.all_reduce(flag)
        return flag.item() > 0

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def check_finite(loss, step, last_ckpt):
    if not math.isfinite(loss):
        kept = f"the last good checkpoint {last_ckpt!r} is kept" if last_ckpt and os.path.exists(last_ckpt) \
            else "no checkpoint had been written yet"
        raise UserError(f"loss became {loss} at step {step}; stopped before the update, {kept} "
                        "(lower --lr or raise --warmup_steps)")


class JsonlLog:
    """Append-only training log. Every checkpoint records how many rows the log held when it was saved (`rows`, saved
    as "log_rows"), and a run resumed from it (`resumed_from`; None for a fresh log) keeps exactly those: the rows a
    killed run wrote after its checkpoint go, whatever their step."""

    def __init__(self, path, resumed_from, master):
        self.path, self.master, self.rows = path, master, 0
        if not master:
            return
        kept = []
        if resumed_from is not None and os.path.exists(path):
            # (a checkpoint of an older version did not record its log's rows: keep the whole log)
            resume_rows = resumed_from.get("log_rows", math.inf)
            with open(path) as f:
                for line in f:
                    if len(kept) >= resume_rows:
                        break
                    try:
                        kept.append(json.loads(line))
                    except json.JSONDecodeError:   # blank, or torn by a crash in the middle of a write
                        continue
        self.rows = len(kept)
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), binary=False)

    def write(self, **row):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.rows += 1


def git_commit():
    """The commit the code is at, with "+dirty" if a .py file differs from it (results files may): the provenance of a
    summary. None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=30)
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"], cwd=here,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode or diff.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if diff.stdout.strip() else "")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
