"""Gather scripts/ablation_tiny.sh's runs (or the runs named, as scripts/bpe_cpu.sh does) into one
table, JSON and plot.

    python scripts/ablation.py out/ablation_tiny results/ablation_tiny
    python scripts/ablation.py out/bpe_cpu results/bpe_cpu paper forward both both_seed1 lr2e3 \
        lr2e3_anchors32   # (scripts/bpe_cpu.sh's runs)

For each recipe and the tiny preset (and each lever on top of cdf_seq, in out/lever_<name>):
distill.py's summary (the learning curve against training seconds, all stages) and bench.py's
quality at the final k (gen-PPL per slot, entropy, repetition, the distribution per slot). Writes
<prefix>.json and <prefix>.png and prints the table the README quotes. A row whose run folder is
gone (an earlier machine's) is kept from the previous <prefix>.json; each row records its commit
and distill.py's flags (rows kept from before the flags were recorded: the commit only).
Named runs are each <root>/<name> and replace <prefix>.json whole.
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import pyplot, save_figure, write_json  # noqa: E402

RECIPES = ("paper", "onpolicy", "cdf", "cdf_seq")
LEVERS = {"high": "cdf_seq, --noise_features high", "ema": "cdf_seq, --ema 0.99",   # out/lever_*
          "lr": "cdf_seq, --lr 2e-3", "paper_lr": "paper, --lr 2e-3",
          "lr_ema": "cdf_seq, --lr 2e-3 --ema 0.99",
          "anchors": "cdf_seq, --lr 2e-3 --anchors 64",
          "long": "cdf_seq, --lr 2e-3 --ema 0.99, twice the steps",
          "paper_long": "paper, twice the steps",
          "layers1": "the earlier tiny preset (1-layer slot MLP, 128-character windows)",
          "seed": "the earlier tiny preset, --seed 1",
          "lr5_ema": "cdf_seq, --lr 5e-3 --ema 0.99",
          "frozen": "cdf_seq, --freeze_trunk --lr 2e-3 --ema 0.99",
          "frozen_long": "the earlier tiny preset, twice the steps",
          "lr5_long": "cdf_seq, --lr 5e-3 --ema 0.99, twice the steps",
          "layers2": "the earlier tiny preset, --readout_layers 2",
          "layers3": "the earlier tiny preset, --readout_layers 3",
          "b64": "the earlier tiny preset, --block_size 64",
          "layers5": "the tiny preset, --readout_layers 5",
          "preset_long": "the tiny preset, twice the steps",
          "gumbel": "the tiny preset, --coupling gumbel --kl forward",
          "kl_reverse": "the tiny preset, --kl reverse",
          "kl_both": "the tiny preset as it stands: --kl both",
          "kl_both_long": "the tiny preset as it stands, twice the steps",
          "bf16": "the tiny preset as it stands, --dtype bfloat16",
          "anchors16": "the tiny preset as it stands, --anchors 16, 1000 steps"}
PRESET = ("the tiny preset (cdf_seq, --freeze_trunk --lr 5e-3 --ema 0.99 --readout_layers 3 "
          "--block_size 64, 750 steps), --coupling inverse_cdf")   # <root>/preset
# the tiny preset by coupling, loss and steps, on the plot's right
LOSSES = tuple(LEVERS[name] for name in ("gumbel", "kl_reverse", "kl_both", "kl_both_long"))


def gather(root, previous):
    out = {}
    runs = [(r, os.path.join(root, r), r) for r in RECIPES]
    runs += [(PRESET, os.path.join(root, "preset"), "preset")]
    runs += [(label, f"out/lever_{name}", name) for name, label in LEVERS.items()]
    for recipe, d, name in runs:
        if os.path.isdir(d):
            out[recipe] = summarise(d, name)
        elif recipe in previous:
            out[recipe] = previous[recipe]
    return out


def summarise(d, name):
    """The run in folder d: distill.py's summary and bench.py's <name>_quality.json."""
    distill = json.load(open(glob.glob(os.path.join(d, "distill_*.json"))[0]))   # one per run
    quality = json.load(open(os.path.join(d, f"{name}_quality.json")))
    curve, seconds = [], 0.0   # stage after stage, on one axis of training seconds
    for stage in distill["stages"]:
        curve += [{"train_s": seconds + p["train_s"], "k": stage["k"],
                   "window_agreement": p["window_agreement"]} for p in stage["curve"]]
        seconds += stage["curve"][-1]["train_s"]
    ar, last = quality["quality"][0], quality["quality"][-1]
    return {
        "git": distill["git"], "device": distill["device"], "config": distill["config"],
        "steps": sum(s["steps"] for s in distill["stages"]), "train_s": seconds,
        "curve": curve, "blind": distill["agreement_without_noise"],   # the curve's prompts
        "blind_quality": quality["agreement_without_noise"],   # the table's
        "ar_repeat4_tokens": ar["repeat4_tokens"],
        **{key: last[key] for key in (
            "k", "window_agreement", "gen_ppl_ratio", "gen_ppl_per_slot_ratio",
            "entropy_ratio", "repeat4_tokens", "tv_per_slot", "tv_floor_per_slot",
            "draw_entropy_ratio_per_slot")}}


def table(runs):
    pct = lambda a: " / ".join(f"{100 * x:.0f}" for x in a) + "%"  # noqa: E731
    two = lambda a: " / ".join(f"{x:.2f}" for x in a)  # noqa: E731
    lines = ["| recipe | steps | train s | agreement per slot | gen-PPL ratio (per slot) | "
             "entropy ratio | repeated 4-grams (teacher) | TV per slot (floor) |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe, r in runs.items():
        lines.append(
            f"| {recipe} | {r['steps']} | {r['train_s']:.0f} | {pct(r['window_agreement'])} | "
            f"{r['gen_ppl_ratio']:.2f} ({two(r['gen_ppl_per_slot_ratio'])}) | "
            f"{r['entropy_ratio']:.2f} | {r['repeat4_tokens']:.3f} ({r['ar_repeat4_tokens']:.3f}) "
            f"| {two(r['tv_per_slot'])} ({max(r['tv_floor_per_slot']):.2f}) |")
    return "\n".join(lines)


def plot(runs, path, shown):
    """Left: agreement on the teacher's context at slots 1 and 4 against training seconds, and
    middle: the final student's gen-PPL ratio to the teacher per slot, for the runs shown. Right
    (the tiny ablation): the same ratio for the preset by coupling, loss and steps, linear scale."""
    plt = pyplot()
    tiny = set(LOSSES) <= set(runs)
    fig, axes = plt.subplots(1, 3 if tiny else 2, figsize=(17 if tiny else 12, 4.5))
    curve, ppl = axes[:2]
    for i, (recipe, r) in enumerate((k, v) for k, v in runs.items() if k in shown):
        recipe = "the tiny preset" if recipe == PRESET else recipe
        for slot, ls in ((0, "-"), (3, "--")):
            pts = [(p["train_s"], p["window_agreement"][slot]) for p in r["curve"]
                   if p["k"] == r["k"]]
            curve.plot(*zip(*pts), ls=ls, marker=".", color=f"C{i}",
                       label=f"{recipe}, slot {slot + 1}")
        ppl.plot(range(1, r["k"] + 1), r["gen_ppl_per_slot_ratio"], marker="o", color=f"C{i}",
                 label=recipe)
    if tiny:
        for i, (recipe, label) in enumerate(zip((PRESET,) + LOSSES, (
                "inverse CDF, forward KL", "Gumbel-max, forward KL", "Gumbel-max, reverse KL",
                "Gumbel-max, their mean (the preset)", "the preset, twice the steps"))):
            axes[2].plot(range(1, 5), runs[recipe]["gen_ppl_per_slot_ratio"], marker="o",
                         color=f"C{4 + i}", label=label)
        axes[2].set(title="the tiny preset by coupling, loss and steps")
    blind = next(iter(runs.values()))["blind"]
    curve.axhline(blind["teacher_mode"], color="gray", ls=":", label="blind: teacher's mode")
    curve.set(xlabel="distillation seconds (all stages)", ylabel="same-noise agreement",
              title="k = 4 student on the teacher's context")
    curve.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ppl.set(yscale="log", title="free-running samples, k = 4")
    for ax in axes[1:]:
        ax.axhline(1.0, color="gray", ls=":")
        ax.set(xlabel="slot", ylabel="gen-PPL ratio to the AR teacher", xticks=range(1, 5))
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    root, prefix, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    path = prefix + ".json"
    if names:
        runs = {name: summarise(os.path.join(root, name), name) for name in names}
    else:
        runs = gather(root, json.load(open(path)) if os.path.exists(path) else {})
    write_json(path, runs)
    plot(runs, prefix + ".png", names or RECIPES + (PRESET,))
    print(table(runs))
    print(f"wrote {prefix}.json, {prefix}.png")
