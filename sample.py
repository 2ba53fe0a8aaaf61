"""
Sample from the AR teacher and a K-Forcing student on the SAME noise, and show where they differ.

    python sample.py                                   # val prefixes; the small preset's models if trained, else tiny's
    python sample.py --prompt "The king said" --k 4 --num_samples 3
    python sample.py --teacher_only --prompt "Once upon a time"

One noise sequence u_1..u_n ~ U(0,1) is drawn per sample. The teacher turns it into tokens one pass at a
time (x_j = F^-1(u_j | x_<j)); the student turns the same u into k tokens per pass. Tokens where the two
differ are marked [like this] in the student's line. The per-slot agreement is printed at the end twice:
free-running (as shown: the two part at the first different token) and with every window of k slots started on
the teacher's own sample (model.window_agreement, the measure the README compares with the paper).
Both decode through bench.py's path (model.generate with a static KV cache, each decode step replayed from a CUDA
graph on CUDA), in float32, as bench's quality runs (its speed runs use bf16): same-noise agreement is sensitive
to rounding.
"""
import glob
import os
import re
from dataclasses import asdict

import torch

from common import (ArgumentParser, DefaultsHelpFormatter, UserError, fits_in_memory, load_checkpoint, load_split,
                    model_from_checkpoint, noise_blind, resolve_device, run_cli, sample_windows, teacher_id)
from model import CUDAGraphStep, KVCache, agreement_without_noise, generate, same_noise_agreement, window_agreement
from prepare_data import get_encoding
from teacher import PRESETS   # the presets' names, as teacher.py and distill.py take them


def find_checkpoints(preset=None, teacher=None, student=None, need_student=True, alternative=""):
    """(label, teacher path, student path): the ones given, else the preset's teacher and its student of highest k
    (preset None: small if trained, else tiny). A missing one ends with the command that makes it (or `alternative`).
    label: the preset, or "trained" for checkpoints given by path."""
    if preset is None:
        preset = "small" if os.path.exists("out/teacher_small/best.pt") else "tiny"
    preset_teacher = f"out/teacher_{preset}/best.pt"
    if teacher is None and not os.path.exists(preset_teacher):
        raise UserError(f"no trained teacher at {preset_teacher}; run `python teacher.py --preset {preset}` or pass "
                        "--teacher")
    label = preset if teacher is None and student is None else "trained"
    if student is None and need_student:
        students = glob.glob(f"out/distill_{preset}/student_k*.pt")
        if not students:
            raise UserError(f"no student in out/distill_{preset}/; run `python distill.py --preset {preset}` or pass "
                            f"--student{alternative}")
        student = max(students, key=lambda p: int(re.findall(r"k(\d+)", p)[-1]))
    return label, teacher or preset_teacher, student


def load_models(teacher_path, student_path, device):
    """The teacher and student (None without a path), refusing a student not distilled from this teacher: another
    shape, or another training of it (a retrained teacher), whose same-noise agreement would measure nothing."""
    teacher_ckpt = load_checkpoint(teacher_path, kind="teacher")
    teacher = model_from_checkpoint(teacher_ckpt, device).eval()
    student = None
    if student_path:
        student_ckpt = load_checkpoint(student_path, kind="student")
        student = model_from_checkpoint(student_ckpt, device).eval()
        # a student is its teacher's network plus a noise encoder: everything else in the config is the teacher's
        shape = lambda m: {k: v for k, v in asdict(m.config).items()  # noqa: E731
                           if k not in ("max_k", "noise_features", "dropout")}
        diff = [f"{k} {v} vs {shape(teacher)[k]}" for k, v in shape(student).items() if v != shape(teacher)[k]]
        trained = teacher_id(teacher_ckpt)
        if not diff and student_ckpt.get("teacher_id", trained) != trained:
            diff = [f"its teacher's training ended at step {student_ckpt['teacher_id']['step']}, val loss "
                    f"{student_ckpt['teacher_id']['best_val']:.4f}; this one's at step {trained['step']}, "
                    f"{trained['best_val']:.4f} (trained again since?)"]
        if diff:
            raise UserError(f"{student_path} was not distilled from {teacher_path}: {', '.join(diff)}")
    return teacher, student


def check_k(k, student):
    if k is None:
        return student.config.max_k
    if k < 1 or k > student.config.max_k:
        raise UserError(f"--k must be between 1 and the student's max_k ({student.config.max_k}), not {k}")
    return k


def marked(enc, tokens, reference):
    return "".join(enc.decode([t]) if t == r else f"[{enc.decode([t])}]" for t, r in zip(tokens, reference))


def draw(teacher, student, k, enc, gen, args, device):
    """The prompts, one noise sequence per sample, and the teacher's and the student's tokens from that noise."""
    if args.prompt is not None:
        ids = enc.encode_ordinary(args.prompt)
        if not ids:
            raise UserError("--prompt is empty; give some text, or leave it out to use val prefixes")
        prompts = torch.tensor([ids] * args.num_samples)
    else:
        prompts = sample_windows(load_split(args.data_dir, "val"), args.num_samples, args.prompt_len, gen,
                                 "--prompt_len")[0]
    n_new = -(-args.max_new_tokens // k) * k   # whole passes; extra tokens are cut by the caller
    block = teacher.config.block_size
    if prompts.size(1) + n_new > block:
        rounded = f" (rounded up to {n_new}, whole passes of k = {k})" if n_new != args.max_new_tokens else ""
        raise UserError(f"prompt ({prompts.size(1)} tokens) + --max_new_tokens {args.max_new_tokens}{rounded} exceed "
                        f"the block size {block}; shorten one of them")
    noise = torch.rand(args.num_samples, n_new, generator=gen, dtype=torch.float64)
    prompts, noise = prompts.to(device), noise.to(device)
    # one static cache for both models (the same shape; stale entries are masked) and one set of CUDA graphs
    cache, step = KVCache(teacher.config, args.num_samples, device, torch.float32, args.attention), CUDAGraphStep()
    ar_tokens = generate(teacher, prompts, noise, 1, step_fn=step, cache=cache)
    kf_tokens = generate(student, prompts, noise, k, step_fn=step, cache=cache) if student else None
    return prompts, noise, ar_tokens, kf_tokens


def main(argv=None):
    p = ArgumentParser(description=__doc__.strip().splitlines()[0],
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="use out/teacher_<preset>/best.pt and the highest "
                        "out/distill_<preset>/student_k*.pt (default: small if trained, else tiny)")
    p.add_argument("--teacher", default=None, help="AR teacher checkpoint (overrides --preset)")
    p.add_argument("--student", default=None, help="student checkpoint (overrides --preset)")
    p.add_argument("--teacher_only", action="store_true", help="sample from the teacher alone")
    p.add_argument("--k", type=int, default=None,
                   help="tokens per student pass (1..the student's max_k; default max_k)")
    p.add_argument("--prompt", default=None, help="prompt text; default: prefixes of the val split")
    p.add_argument("--data_dir", default="data/offline", help="where val.bin lives (for the default prefixes)")
    p.add_argument("--prompt_len", type=int, default=6, help="length of the val prefixes (6 as in the paper)")
    p.add_argument("--num_samples", type=int, default=4, help="samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=48, help="tokens to generate per sample")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise and the choice of val prefixes")
    p.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa",
                   help="attention of the cached decode passes (model.KVCache; flex compiles each shape on CUDA)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if min(args.num_samples, args.max_new_tokens, args.prompt_len) < 1:
        raise UserError("--num_samples, --max_new_tokens and --prompt_len must be at least 1")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, not {args.seed}")

    if args.teacher_only and (args.student or args.k):
        raise UserError("--teacher_only samples no student: drop --student and --k")
    _, teacher_path, student_path = find_checkpoints(args.preset, args.teacher, args.student, not args.teacher_only,
                                                     alternative=", or use --teacher_only")
    teacher, student = load_models(teacher_path, student_path, device)
    k = check_k(args.k, student) if student else 1
    enc = get_encoding()
    gen = torch.Generator().manual_seed(args.seed)
    with fits_in_memory(f"{args.num_samples} samples do not fit in memory on {device}; lower --num_samples"):
        prompts, noise, ar_tokens, kf_tokens = draw(teacher, student, k, enc, gen, args, device)
    ar = ar_tokens[:, :args.max_new_tokens].tolist()
    kf = kf_tokens[:, :args.max_new_tokens].tolist() if student else None

    for i in range(args.num_samples):
        print(f"--- sample {i + 1}: {enc.decode(prompts[i].tolist())!r}")
        print(f"AR teacher     | {enc.decode(ar[i])}")
        if kf:
            print(f"K-Forcing k={k}  | {marked(enc, kf[i], ar[i])}")
    n = args.max_new_tokens // k * k   # agreement over whole windows of the tokens shown: every slot counted alike
    if kf and n:
        free = same_noise_agreement(ar_tokens[:, :n], kf_tokens[:, :n], k)
        with fits_in_memory(f"the agreement over {args.num_samples} samples does not fit in memory on {device}; "
                            "lower --num_samples"):
            window = window_agreement(student, prompts, ar_tokens[:, :n], noise, k)
            blind = agreement_without_noise(teacher, prompts, ar_tokens[:, :n])
        per_slot = lambda agree: "   ".join(f"slot {j + 1}: {a:.1%}" for j, a in enumerate(agree))  # noqa: E731
        print(f"\nsame-noise agreement with the AR teacher over {args.num_samples} x {n} tokens:")
        print(f"  free-running ([marked] above):       {per_slot(free)}")
        print(f"  each window on the teacher's tokens: {per_slot(window)}")
        print(f"  ({noise_blind(blind)})")
    elif kf:
        print(f"\n(same-noise agreement per slot needs --max_new_tokens of at least k = {k})")


if __name__ == "__main__":
    run_cli(main)
