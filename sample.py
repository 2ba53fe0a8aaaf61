"""Sample the AR teacher and a K-Forcing student on the SAME noise: free-running and on the
teacher's context (each window of k slots from the teacher's text so far), '^' under each mismatch.

    python sample.py --prompt "ROMEO:" --k 4  # the newest teacher in out/, its highest-k student"""
import glob
import os
import re
import sys

import torch

from common import (ArgumentParser, UserError, load_checkpoint, load_split, model_from_checkpoint,
                    resolve_device, run_cli, sample_sequences, teacher_id)
from model import (STUDENT_FIELDS, agreement_without_noise, generate, same_noise_agreement,
                   teacher_context_windows)
from prepare_data import get_tokenizer


def find_checkpoints(preset, teacher, student):
    """The paths given, else the newest out/teacher_<preset>/best.pt and its highest-k student."""
    teachers = sorted(glob.glob(f"out/teacher_{preset or '*'}/best.pt"), key=os.path.getmtime)
    if teacher is None and not teachers:
        raise UserError(f"no out/teacher_{preset or '*'}/best.pt; run teacher.py or pass --teacher")
    teacher = teacher or teachers[-1]
    if student is None:   # the highest k in out/distill_<preset>/ (no --preset: the teacher's)
        folder = os.path.basename(os.path.dirname(os.path.abspath(teacher)))
        if preset is None and not folder.startswith("teacher_"):
            load_checkpoint(teacher, "teacher")   # a missing file or a student says so first
            raise UserError(f"{teacher} is not in an out/teacher_<preset>/ folder: pass --student")
        preset = preset or folder.removeprefix("teacher_")
        found = {int(m[1]): p for p in glob.glob(f"out/distill_{preset}/student_k*.pt")
                 if (m := re.search(r"student_k(\d+)\.pt$", p))}   # not a student_k4_old.pt
        if not found:
            raise UserError(f"no student in out/distill_{preset}; run distill.py or pass --student")
        student = found[max(found)]
    return teacher, student


def load_models(t_path, s_path, device):
    """(teacher, student, the teacher's checkpoint): a student must have its teacher's shape."""
    t_ckpt, s_ckpt = load_checkpoint(t_path, "teacher"), load_checkpoint(s_path, "student")
    s_cfg = s_ckpt["model_config"]
    diff = [f"{key} {s_cfg.get(key)} vs {v}" for key, v in t_ckpt["model_config"].items()
            if key not in STUDENT_FIELDS and s_cfg.get(key) != v]
    if diff:
        raise UserError(f"{s_path} does not have {t_path}'s shape: {', '.join(diff)}")
    if s_ckpt.get("teacher_id", {}) != teacher_id(t_ckpt):
        print(f"warning: {s_path} was distilled from another teacher than {t_path} (trained "
              "again since?): its agreement with this one means little", file=sys.stderr)
    teacher, student = (model_from_checkpoint(ckpt, device).eval() for ckpt in (t_ckpt, s_ckpt))
    teacher.config.coupling = student.config.coupling   # the AR reference draws as the student does
    return teacher, student, t_ckpt


def show(tok, teacher, student, k, width=96):
    """The teacher's tokens over the student's, each padded to the wider of the two, wrapped."""
    rows, line = [], ["", "", ""]
    for i, (a, b) in enumerate(zip(teacher, student)):
        pair = [tok.decode([t]).replace("\n", "⏎") for t in (a, b)]   # (a newline breaks columns)
        w, bar = max(map(len, pair)), "|" if k > 1 and i % k == 0 and i else ""
        cell = [bar + pair[0].ljust(w), bar + pair[1].ljust(w), " " * len(bar) + " ^"[a != b] * w]
        if len(line[0]) + len(cell[0]) > width:
            rows, line = rows + [line], ["", "", ""]
        line = [text + c for text, c in zip(line, cell)]
    return "\n".join(f"  {who} {text}".rstrip() for line in rows + [line]
                     for who, text in zip(("teacher", "student", "       "), line))


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--preset", help="out/teacher_<preset>/best.pt, its highest k (default: newest)")
    p.add_argument("--teacher", help="AR teacher checkpoint (instead of the preset's)")
    p.add_argument("--student", help="K-Forcing student checkpoint (instead of the preset's)")
    p.add_argument("--k", type=int, help="tokens per student pass, 1..its max_k (default: max_k)")
    p.add_argument("--prompt", help="prompt text (default: 6-token prefixes of the val split)")
    p.add_argument("--num_samples", type=int, default=3, help="samples (default: 3)")
    p.add_argument("--max_new_tokens", type=int, default=48, help="in whole passes (default: 48)")
    p.add_argument("--seed", type=int, default=0, help="seeds noise and prefixes (default: 0)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    args = p.parse_args(argv)
    if min(args.num_samples, args.max_new_tokens) < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1")
    device = resolve_device(args.device)
    paths = find_checkpoints(args.preset, args.teacher, args.student)
    teacher, student, ckpt = load_models(*paths, device)
    k = student.config.max_k if args.k is None else args.k
    if not 1 <= k <= student.config.max_k:
        raise UserError(f"--k {k}: must be 1 to the student's max_k ({student.config.max_k})")
    tok, gen = get_tokenizer(ckpt["tokenizer"]), torch.Generator().manual_seed(args.seed)
    B, n = args.num_samples, -(-args.max_new_tokens // k) * k   # n: in whole passes
    if args.prompt is None:   # 6-token prefixes of the teacher's own val split
        val = load_split(ckpt["train_config"]["data_dir"], "val")
        prompts = sample_sequences(val, B, 6, gen)[0].to(device)
    else:
        try:
            prompts = torch.tensor([tok.encode(args.prompt)] * B, device=device)
        except ValueError as e:
            raise UserError(f"--prompt: {e}") from None
    P, T = prompts.size(1), teacher.config.block_size
    if not 0 < P <= T - n:
        fit = f"1 to {T - n} fit" if T > n else "none fits (lower --max_new_tokens)"
        raise UserError(f"a prompt of {P} tokens: {fit} before {n} new tokens in block size {T}")
    noise = torch.rand(B, n, generator=gen, dtype=torch.float64).to(device)
    ar, free = generate(teacher, prompts, noise, 1), generate(student, prompts, noise, k)
    windowed = teacher_context_windows(student, prompts, ar, noise, k)
    for i, (a, f, w) in enumerate(zip(ar.tolist(), free.tolist(), windowed.tolist())):
        print(f"--- sample {i + 1}: {tok.decode(prompts[i].tolist())!r}, k = {k}\nfree-running:\n"
              f"{show(tok, a, f, k)}\non the teacher's context:\n{show(tok, a, w, k)}")
    print(f"\nsame-noise agreement with the teacher per slot, {B} x {n} tokens:")
    for name, view in (("on the teacher's context", windowed), ("free-running", free)):
        slots = enumerate(same_noise_agreement(ar, view, k), 1)
        print(f"  {name:24}  " + "  ".join(f"slot {j} {x:6.1%}" for j, x in slots))
    print("  blind to the noise: {independent_draw:.1%} (an independent draw), {teacher_mode:.1%} "
          "(the teacher's mode)".format(**agreement_without_noise(teacher, prompts, ar)))


if __name__ == "__main__":
    run_cli(main)
