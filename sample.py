"""
Sample the AR teacher and a K-Forcing student on the SAME noise, and show where they differ.

    python sample.py                          # the newest teacher in out/ and its highest-k student
    python sample.py --prompt "ROMEO:" --k 4 --num_samples 2

One noise sequence u_1..u_n ~ U(0,1) per sample: the teacher turns it into tokens one pass at a
time (x_j = F^-1(u_j | x_<j)), the student into k tokens per pass. Shown free-running (each on its
own text: they part at the first difference) and on the teacher's context (each window of k slots
starts from the teacher's text so far: where the coupling shows), '|' between passes and '^' under
each token that differs; then the agreement per slot beside that of a student blind to the noise.
"""
import argparse
import glob
import os
import re
import sys

import torch

from common import (ArgumentParser, UserError, load_checkpoint, load_split, model_from_checkpoint,
                    resolve_device, run_cli, sample_windows)
from model import (agreement_without_noise, generate, same_noise_agreement,
                   teacher_context_windows)
from prepare_data import get_tokenizer


def find_checkpoints(preset, teacher, student):
    """The paths given, else out/teacher_<preset>/best.pt (default: the newest), its highest k."""
    name = "*" if preset is None else preset
    found = sorted(glob.glob(f"out/teacher_{name}/best.pt"), key=os.path.getmtime)
    if teacher is None and not found:
        raise UserError(f"no teacher in out/teacher_{name}/; run teacher.py or pass --teacher")
    if teacher is None:
        teacher, preset = found[-1], os.path.basename(os.path.dirname(found[-1]))[len("teacher_"):]
    found = glob.glob(f"out/distill_{preset}/student_k*.pt") if preset is not None else []
    if student is None and not found:
        raise UserError(f"no student in out/distill_{preset}/; run distill.py or pass --student")
    if student is None:   # the highest k
        student = max(found, key=lambda p: int(re.findall(r"(\d+)\.pt$", p)[0]))
    return teacher, student


def load_models(teacher_path, student_path, device):
    """(teacher, student, the teacher's checkpoint): a student must have its teacher's shape."""
    t_ckpt = load_checkpoint(teacher_path, "teacher")
    s_ckpt = load_checkpoint(student_path, "student")
    added = ("max_k", "noise_features", "readout", "dropout")   # what a student adds to its teacher
    diff = [f"{key} {s_ckpt['model_config'].get(key)} vs {v}"
            for key, v in t_ckpt["model_config"].items()
            if key not in added and s_ckpt["model_config"].get(key) != v]
    if diff:
        raise UserError(f"{student_path} does not have {teacher_path}'s shape: {', '.join(diff)}")
    recorded = s_ckpt.get("teacher_id") or {}   # (step, best_val) of the teacher it learned from
    if recorded != {key: t_ckpt.get(key) for key in recorded}:
        print(f"warning: {student_path} was distilled from another training of {teacher_path}",
              file=sys.stderr)
    return (model_from_checkpoint(t_ckpt, device).eval(),
            model_from_checkpoint(s_ckpt, device).eval(), t_ckpt)


def show(tok, teacher, student, k, width=96):
    """The teacher's tokens over the student's, '|' between passes, '^' under each difference,
    wrapped at `width` columns (each token padded to the wider of the two: the columns align)."""
    rows, line = [], ["", "", ""]
    for i, (a, b) in enumerate(zip(teacher, student)):
        pair = [tok.decode([t]).replace("\n", "⏎") for t in (a, b)]   # (a newline breaks columns)
        w = max(map(len, pair))
        cell = [pair[0].ljust(w), pair[1].ljust(w), (" " if a == b else "^") * w]
        if k > 1 and i % k == 0 and i:
            cell = ["|" + cell[0], "|" + cell[1], " " + cell[2]]
        if len(line[0]) + len(cell[0]) > width:
            rows, line = rows + [line], ["", "", ""]
        line = [text + c for text, c in zip(line, cell)]
    return "\n".join(f"  {who} {text}".rstrip() for line in rows + [line]
                     for who, text in zip(("teacher", "student", "       "), line))


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="use out/teacher_<preset>/best.pt and the highest "
                   "out/distill_<preset>/student_k*.pt (default: the newest teacher in out/)")
    p.add_argument("--teacher", help="AR teacher checkpoint (instead of the preset's)")
    p.add_argument("--student", help="K-Forcing student checkpoint (instead of the preset's)")
    p.add_argument("--k", type=int, help="tokens per student pass, 1..its max_k (default: max_k)")
    p.add_argument("--prompt", help="prompt text (default: 6-token prefixes of the val split)")
    p.add_argument("--data_dir", help="where val.bin lives (default: the teacher's training data)")
    p.add_argument("--num_samples", type=int, default=3, help="samples (default: 3)")
    p.add_argument("--max_new_tokens", type=int, default=48,
                   help="tokens per sample, rounded up to whole passes (default: 48)")
    p.add_argument("--seed", type=int, default=0, help="seeds noise and prefixes (default: 0)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    args = p.parse_args(argv)
    if min(args.num_samples, args.max_new_tokens) < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1")
    device = resolve_device(args.device)
    teacher, student, ckpt = load_models(*find_checkpoints(args.preset, args.teacher, args.student),
                                         device)
    max_k = student.config.max_k
    k = max_k if args.k is None else args.k
    if not 1 <= k <= max_k:
        raise UserError(f"--k must be between 1 and the student's max_k ({max_k}), not {k}")
    tok, gen = get_tokenizer(ckpt["tokenizer"]), torch.Generator().manual_seed(args.seed)
    if args.prompt is None:
        data_dir = ckpt["train_config"]["data_dir"] if args.data_dir is None else args.data_dir
        prompts = sample_windows(load_split(data_dir, "val"), args.num_samples, 6, gen)[0]
    elif not args.prompt:
        raise UserError("--prompt is empty; give some text, or leave it out for val prefixes")
    else:
        try:
            prompts = torch.tensor([tok.encode(args.prompt)] * args.num_samples, dtype=torch.long)
        except ValueError as e:
            raise UserError(f"--prompt: {e}") from None
    B, P, n = args.num_samples, prompts.size(1), -(-args.max_new_tokens // k) * k   # whole passes
    if P + n > teacher.config.block_size:
        raise UserError(f"prompt ({P} tokens) + {n} new tokens exceed the block size "
                        f"{teacher.config.block_size}; shorten --prompt or --max_new_tokens")
    noise = torch.rand(B, n, generator=gen, dtype=torch.float64).to(device)
    prompts = prompts.to(device)
    ar, free = generate(teacher, prompts, noise, 1), generate(student, prompts, noise, k)
    windowed = teacher_context_windows(student, prompts, ar, noise, k)
    for i in range(B):
        print(f"--- sample {i + 1}: {tok.decode(prompts[i].tolist())!r}, k = {k}\nfree-running:\n"
              f"{show(tok, ar[i].tolist(), free[i].tolist(), k)}\non the teacher's context:\n"
              f"{show(tok, ar[i].tolist(), windowed[i].tolist(), k)}")
    per_slot = lambda a: "  ".join(f"slot {j + 1} {x:6.1%}" for j, x in enumerate(a))  # noqa: E731
    blind = agreement_without_noise(teacher, prompts, ar)
    print(f"\nsame-noise agreement with the teacher per slot, {B} x {n} tokens:\n"
          f"  on the teacher's context  {per_slot(same_noise_agreement(ar, windowed, k))}\n"
          f"  free-running              {per_slot(same_noise_agreement(ar, free, k))}\n"
          f"  blind to the noise: {blind['independent_draw']:.1%} (an independent draw from the "
          f"teacher), {blind['teacher_mode']:.1%} (always its most likely token)")


if __name__ == "__main__":
    run_cli(main)
