"""Same-noise agreement per slot on the teacher's context, taken apart: (1) split by whether the
window's earlier slots agreed, how much of a later slot's shortfall it inherits from the slots
before it; (2) with the noise slots fed OTHER noise than the readout draws with, how much of it the
network's trunk carries from the noise; (3) for a distribution readout, how much the coupling
decides: the same student and teacher drawing by each coupling, and 1 - TV between their
distributions at each slot, the most that any coupling could agree; (4) for a distribution readout,
what its gen-PPL per slot is made of on the teacher's context: breadth and error.

    python scripts/slot_agreement.py out/distill_tiny out/lever_layers1 out/lever_layers3 \
        out/ablation_tiny/paper out/lever_lr5_ema out/lever_frozen_long out/lever_lr5_long \
        --out results/slot_agreement_tiny.json   # ablation_tiny.sh's runs; (2) is newer than
                                                 # its cdf_seq, long and paper_long rows
    python scripts/slot_agreement.py out/distill_tiny out/ablation_tiny/preset \
        --out results/slot_agreement_tiny.json   # (3), newer: make demo's and the preset's
    python scripts/slot_agreement.py out/distill_tiny out/lever_gumbel out/lever_kl_reverse \
        out/lever_kl_both_long --out results/slot_agreement_tiny.json   # (4), newer: the losses

(1) A distribution-readout student conditions slot i on its OWN tokens of slots < i, so once it has
drawn another token than the teacher, its later slots follow another text: slot 4's agreement is
P(slots 1-3 agreed) x (its agreement given that) + the rest x (its agreement after a miss).
(2) The argmax readout has only the trunk to read u through: other noise at its slots is another
sample. The distribution readout also draws x_i = F^-1(u_i | ..) itself and its slot MLP reads the
token drawn: if its agreement holds with other noise at the slots, the trunk ignores the noise and
a slot's state is a function of the context alone.
(3) The distributions do not depend on the coupling; how often two nearby ones draw the same token
from the same u does.
(4) The teacher's NLL of the student's draw at a slot, less that of its own draw, is in expectation
E_q[-log p] - E_p[-log p] = (H(q) - H(p)) + KL(q || p): the log of the gen-PPL ratio on the
teacher's context, split into the student's excess entropy (too broad: > 0) and its error.
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (load_checkpoint, load_split, model_from_checkpoint,  # noqa: E402
                    sample_sequences, write_json)
from model import generate, teacher_context, teacher_context_windows  # noqa: E402

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("runs", nargs="+", help="distill.py output folders, each with a student_k<K>.pt")
p.add_argument("--k", type=int, default=4, help="the student checkpoint student_k<K>.pt to read")
p.add_argument("--teacher", default="out/teacher_tiny/best.pt", help="the AR teacher")
p.add_argument("--prefixes", type=int, default=256, help="val prefixes (6 tokens each)")
p.add_argument("--tokens", type=int, default=48, help="tokens the teacher samples after each")
p.add_argument("--out", help="write the numbers to this JSON file (its other runs are kept)")
args = p.parse_args()

ckpt = load_checkpoint(args.teacher, "teacher")
teacher = model_from_checkpoint(ckpt, "cpu").eval()
g = torch.Generator().manual_seed(0)   # with --prefixes its eval_samples: distill.py's evaluation
val = load_split(ckpt["train_config"]["data_dir"], "val")
prompts = sample_sequences(val, args.prefixes, 6, g)[0]
noise = torch.rand(args.prefixes, args.tokens, generator=g, dtype=torch.float64)
n, k, out = args.tokens // args.k * args.k, args.k, {}
rate = lambda hits, of: [None if math.isnan(x) else x   # noqa: E731  (per slot, over all windows)
                         for x in (hits.sum((0, 1)) / of.sum((0, 1))).tolist()]
if args.out and os.path.exists(args.out):   # runs measured before, perhaps on another machine
    out = json.load(open(args.out))["runs"]


def on_teachers_context(student, coupling):
    """The teacher's samples and the student's windows on them, both drawing by `coupling`."""
    student.config.coupling = teacher.config.coupling = coupling
    ar = generate(teacher, prompts, noise, k=1)
    return ar, teacher_context_windows(student, prompts, ar, noise, k)


def agreement(ar, tokens):   # (prefixes, windows, k): 1 where the student's token is the teacher's
    return (tokens.view(args.prefixes, -1, k) == ar[:, :n].view(args.prefixes, -1, k)).float()


for run in args.runs:
    student = model_from_checkpoint(
        load_checkpoint(f"{run}/student_k{k}.pt", "student"), "cpu").eval()
    own, cdf = student.config.coupling, student.config.readout != "argmax"
    drawn_by = {c: on_teachers_context(student, c) for c in
                (("inverse_cdf", "gumbel") if cdf else (own,))}   # (3): both, where it can
    ar, tokens = drawn_by[own]
    student.config.coupling = teacher.config.coupling = own   # (1) and (2): the run's own
    tv = None
    if cdf:   # (3) each slot's two distributions in each window, as distill.py has them
        seq, anchors, slots = teacher_context(prompts, ar, noise, k)
        with torch.no_grad():
            logits, drawn = student.forward_cdf(seq, anchors, slots)
            log_p = teacher.forward_window(seq, anchors, drawn[:, :, :-1]).log_softmax(-1)
        log_q = logits.log_softmax(-1)
        tv = 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)
        entropy = [-(t.exp() * t).sum(-1).mean((0, 1)) for t in (log_q, log_p)]   # (4)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean((0, 1))
    encode = student.noise_encoder.forward   # (2): the noise slots get fresh uniforms
    torch.manual_seed(1)   # the same for every run
    student.noise_encoder.forward = lambda u: encode(torch.rand(u.shape, dtype=u.dtype))
    other = teacher_context_windows(student, prompts, ar, noise, k)
    hit = agreement(ar, tokens)
    before = torch.cumprod(torch.cat([torch.ones_like(hit[..., :1]), hit[..., :-1]], -1), -1)
    missed = 1 - before
    out[run] = {   # per slot, over all windows (slot 1 has no earlier slot to miss)
        "agreement": hit.mean((0, 1)).tolist(),
        "earlier_slots_agreed": before.mean((0, 1)).tolist(),
        "agreement_given_earlier_agreed": rate(hit * before, before),   # None: never all agreed
        "agreement_after_a_miss": rate(hit * missed, missed),   # None: never missed
        "agreement_other_noise_at_the_slots": (other == ar[:, :n]).view(
            args.prefixes, -1, k).float().mean((0, 1)).tolist(),
        "coupling": own, **({} if tv is None else {
            "agreement_by_coupling": {c: agreement(*drawn).mean((0, 1)).tolist()
                                      for c, drawn in drawn_by.items()},
            "one_minus_tv_given_earlier_agreed": (((1 - tv) * before).sum((0, 1))
                                                  / before.sum((0, 1))).tolist(),
            "excess_entropy_nats": (entropy[0] - entropy[1]).tolist(), "kl_q_p_nats": kl.tolist(),
            "gen_ppl_ratio_on_teachers_context": (entropy[0] - entropy[1] + kl).exp().tolist()})}
    shown = {**out[run], **{f"agreement_{c}": a for c, a in
                            out[run].get("agreement_by_coupling", {}).items()}}
    parts = ("excess_entropy_nats", "kl_q_p_nats", "gen_ppl_ratio_on_teachers_context")   # (4)
    print(run, own, "; ".join(f"{key} " + "/".join("-" if x is None else f"{x:.0%}" for x in v)
                              for key, v in shown.items()
                              if isinstance(v, list) and key not in parts))
    print("  " + "; ".join(f"{key} " + "/".join(f"{x:.3f}" for x in shown[key])
                           for key in parts if key in shown))
if args.out:
    write_json(args.out, {"teacher": args.teacher, "prefixes": args.prefixes, "runs": out})
