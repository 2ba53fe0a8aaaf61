"""The method end to end on CPU, on synthetic character corpora small enough to learn in seconds:
the teacher learns context, and distillation teaches the student to turn noise into the teacher's
samples, stage by stage."""
import dataclasses
import json
import math
import os
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import distill
import teacher
from common import EMA, UserError, load_checkpoint, lr_at, model_from_checkpoint, sample_sequences
from model import GPT, GPTConfig, draw, generate, inverse_cdf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "abcdefgh"   # an 8-character vocabulary: the model is small and fast on CPU


def write_dataset(d, train, val, chars=CHARS):
    """A character dataset as prepare_data.py writes one: train.bin, val.bin and meta.json."""
    os.makedirs(d, exist_ok=True)
    for split, tokens in (("train", train), ("val", val)):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(d, f"{split}.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"tokenizer": "char", "vocab_size": len(chars), "chars": chars,
                   "train_tokens": len(train), "val_tokens": len(val)}, f)
    return d


def train_teacher(root, data, steps):
    out = os.path.join(root, "teacher")
    teacher.main(["--preset", "tiny", "--data_dir", data, "--out_dir", out, "--n_layer", "1",
                  "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
                  "--max_steps", str(steps), "--lr", "1e-2", "--warmup_steps", "5",
                  "--eval_interval", str(steps), "--eval_iters", "2", "--device", "cpu"])
    return os.path.join(out, "best.pt"), json.load(open(os.path.join(out, "teacher_tiny.json")))


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    """A Markov chain over 8 tokens: the next token is the current one + 1, 3 or 5 (mod 8) with
    probabilities 0.6 / 0.3 / 0.1: a model reading context reaches 0.90 nats, a unigram 2.08."""
    root = str(tmp_path_factory.mktemp("markov"))
    rng = np.random.default_rng(0)
    chain = lambda n: np.cumsum(rng.choice([1, 3, 5], n, p=[0.6, 0.3, 0.1])) % 8  # noqa: E731
    data = write_dataset(os.path.join(root, "data"), chain(20_000), chain(4_000))
    path, result = train_teacher(root, data, 60)
    return dict(root=root, data=data, teacher=path, result=result)


@pytest.fixture(scope="module")
def iid(tmp_path_factory):
    """Tokens drawn i.i.d. from a fixed 8-token distribution, then distilled k = 1 -> 2. Stage 1
    must learn the noise-to-token map F^-1(u): always the most likely token agrees 25%."""
    root = str(tmp_path_factory.mktemp("iid"))
    rng = np.random.default_rng(0)
    p = [0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04]
    data = write_dataset(os.path.join(root, "data"), rng.choice(8, 20_000, p=p),
                         rng.choice(8, 4_000, p=p))
    teacher_path, _ = train_teacher(root, data, 60)
    out = os.path.join(root, "students")
    distill.main(["--preset", "tiny", "--teacher", teacher_path, "--data_dir", data,
                  "--out_dir", out, "--recipe", "paper", "--no-freeze_trunk", "--k", "2",
                  "--steps_per_stage", "60",
                  "--block_size", "32", "--batch_size", "8", "--anchors", "8", "--lr", "3e-3",
                  "--eval_samples", "64", "--eval_tokens", "8", "--curve_interval", "20",
                  "--device", "cpu"])
    result = json.load(open(os.path.join(out, "distill_tiny.json")))
    return dict(root=root, data=data, teacher=teacher_path, out=out, result=result)


def test_teacher_learns_context(markov):
    result = markov["result"]
    # 2.08 nats is the best a model that ignores context can do; 0.90 is the chain's entropy
    assert result["unigram_loss"] == pytest.approx(np.log(8), abs=0.01)
    assert result["final_val_loss"] < result["unigram_loss"] - 0.4, result
    assert result["steps"] == 60 and result["tokens_seen"] == 60 * 8 * 32
    ckpt = load_checkpoint(markov["teacher"], kind="teacher")
    assert ckpt["step"] == 60 and ckpt["model_config"]["max_k"] == 0


def test_the_dataset_sets_the_vocabulary_and_checkpoints_record_it(markov, iid):
    """The model's vocabulary is the dataset's (8 characters here, not GPT-2's 50257), the teacher
    records the dataset's tokenizer, and every student records its teacher's."""
    ckpt = load_checkpoint(markov["teacher"], kind="teacher")
    want = {"tokenizer": "char", "vocab_size": 8, "chars": CHARS}
    assert ckpt["model_config"]["vocab_size"] == 8 and ckpt["tokenizer"] == want
    for k in (1, 2):
        student = load_checkpoint(os.path.join(iid["out"], f"student_k{k}.pt"), kind="student")
        assert student["tokenizer"] == want and student["model_config"]["vocab_size"] == 8


def test_unigram_loss():
    """The unigram baseline is fitted to train and scored on val; a token train never saw costs a
    large but finite loss; a split longer than one slice is counted whole."""
    V = 5
    train, val = np.array([1, 2] * 2**19 + [3] * 2**20), np.array([1, 2, 3, 4])
    p = np.array([2**19, 2**19, 2**20, 0]) + 1 / V
    assert teacher.unigram_loss(train, val, V) == pytest.approx(-np.log(p / (2**21 + 1)).mean())


def test_every_preset_is_a_valid_config():
    """Each preset names only real fields, with values a run accepts, and each distill preset fits
    the teacher preset of its name (the paper preset is never trained here)."""
    assert list(teacher.PRESETS) == list(distill.PRESETS)
    for preset in teacher.PRESETS:
        argv = ["--preset", preset]
        t, _ = common.parse_config(teacher.TeacherConfig, teacher.PRESETS, "", argv)
        d, _ = common.parse_config(distill.DistillConfig, distill.PRESETS, "", argv)
        for cfg, values in ((t, teacher.PRESETS[preset]), (d, distill.PRESETS[preset])):
            assert all(getattr(cfg, k) == v for k, v in values.items() if k != "_about"), preset
        assert (t.out_dir, d.out_dir) == (f"out/teacher_{preset}", f"out/distill_{preset}")
        assert d.teacher == f"out/teacher_{preset}/best.pt" and d.data_dir == t.data_dir
        assert t.n_embd % (2 * t.n_head) == 0 and t.eval_interval <= t.max_steps
        assert distill.stage_schedule(d)[-1] == d.k and d.anchors <= d.block_size <= t.block_size
        assert d.eval_tokens >= d.k and d.prompt_len + d.eval_tokens <= t.block_size
        assert "cdf" in d.recipe or not (d.freeze_trunk or d.coupling == "gumbel")   # as main's


@pytest.mark.parametrize("script,cls", [(teacher, teacher.TeacherConfig),
                                        (distill, distill.DistillConfig)])
def test_help_shows_every_flag_with_each_presets_value(capsys, script, cls):
    """--help names every field, with its default, or with each preset's where they differ."""
    with pytest.raises(SystemExit):
        common.parse_config(cls, script.PRESETS, "", ["--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps the lines
    for f in dataclasses.fields(cls):
        values = {name: repr(p.get(f.name, f.default)) for name, p in script.PRESETS.items()}
        shown = (next(iter(values.values())) if len(set(values.values())) == 1
                 else ", ".join(f"{name} {v}" for name, v in values.items()))
        assert f"--{f.name}" in text and f"({shown})" in text, f.name
    if script is distill:   # as a user reads them
        assert "(tiny 0.005, small 0.002, paper 0.0001)" in text and "(4)" in text   # --lr, --k


def test_distillation_raises_same_noise_agreement(iid):
    stage1, stage2 = iid["result"]["stages"]
    assert [stage1["k"], stage2["k"]] == [1, 2] and iid["result"]["schedule"] == [1, 2]
    assert iid["result"]["config"]["coupling"] == "inverse_cdf"   # --coupling auto, argmax readout
    # slot 1 agrees with the AR teacher's same-noise sample on >= 60% of tokens, from <= 35%
    assert stage1["agreement_init"][0] <= 0.35, stage1
    assert stage1["agreement"][0] >= 0.6, stage1
    assert len(stage2["agreement"]) == 2 and len(stage2["final_loss_per_slot"]) == 2
    # progressive: stage 2 starts from the stage-1 student (its slot 1 agrees from the start)
    assert stage2["agreement_init"][0] >= stage1["agreement"][0] - 0.1, (stage1, stage2)
    for stage in (stage1, stage2):   # per-slot means (a sum over anchors would be > log V)
        assert all(0 < loss < math.log(8) for loss in stage["final_loss_per_slot"])
        assert stage["final_window_acc"] <= min(stage["final_acc_per_slot"]) + 1e-9
    assert len(stage2["window_agreement"]) == 2
    # the learning curve: slot 1 on the teacher's context rises from chance during stage 1; every
    # point is logged, and the last one is the stage's result
    log = [json.loads(line) for line in open(os.path.join(iid["out"], "log.jsonl"))]
    for si, stage in enumerate((stage1, stage2)):
        assert [p["step"] for p in stage["curve"]] == [0, 20, 40, 60]
        assert stage["curve"][-1]["window_agreement"] == stage["window_agreement"]
        logged = [r["window_agreement"] for r in log
                  if r["stage"] == si and "window_agreement" in r]
        assert logged == [p["window_agreement"] for p in stage["curve"]]
        lr = [r["lr"] for r in log if r["stage"] == si and "lr" in r]   # every 10 steps
        assert lr[0] < 3e-3 and lr[1:] == pytest.approx([3e-3] * 5)   # warmup, then constant
    first, *_, last = (p["window_agreement"][0] for p in stage1["curve"])
    assert first <= 0.35 and last >= 0.6, stage1["curve"]
    assert os.path.getsize(os.path.join(iid["out"], "distill_tiny_curve.png")) > 0
    # ... and that agreement is the noise's doing: a student blind to it would agree far less
    blind = iid["result"]["agreement_without_noise"]
    assert blind["independent_draw"] <= blind["teacher_mode"] < stage1["window_agreement"][0] - 0.2
    for k in (1, 2):
        ckpt = load_checkpoint(os.path.join(iid["out"], f"student_k{k}.pt"), kind="student")
        assert ckpt["model_config"]["max_k"] == k


def test_summaries_record_commit_device_and_torch(markov, iid):
    """Every summary names the commit its code was at ("+dirty" if a .py file differed from it),
    the device and torch's version."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "*.py"], cwd=REPO).returncode
    want = head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else None
    for summary in (markov["result"], iid["result"]):
        assert summary["git"] == want, summary["git"]
        assert summary["device"].startswith("cpu") and summary["torch"] == torch.__version__


def test_ema_update_ramps_then_keeps_its_decay():
    """After the n-th update, average = d * average + (1 - d) * weights with
    d = min(decay, (1 + n) / (10 + n)), every tensor once (a tied embedding stays tied)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    ema = EMA(model, 0.6)
    assert ema.model.lm_head.weight is ema.model.wte.weight and not ema.model.training
    want = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 15):   # the ramp binds up to n = 12, the decay from n = 13
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, n)
        d = min(0.6, (1 + n) / (10 + n))
        want = [d * w + (1 - d) * p for w, p in zip(want, model.parameters())]
    for w, e in zip(want, ema.model.parameters()):
        torch.testing.assert_close(e, w)


def test_ema_is_what_is_evaluated_saved_and_handed_on(iid, tmp_path, monkeypatch):
    """With --ema, the average (not the raw weights) is what the teacher's val loss measures and
    best.pt keeps, and what each stage evaluates, saves as student_k<K>.pt and hands to the next
    stage as its teacher and its starting point."""
    made = []

    class Recorded(EMA):
        def __init__(self, model, decay):
            super().__init__(model, decay)
            self.numbers = []   # n of each update: its decay's ramp
            made.append(self)

        def update(self, model, n):
            self.numbers.append(n)
            super().update(model, n)
    for module in (teacher, distill):
        monkeypatch.setattr(module, "EMA", Recorded)
    out = str(tmp_path / "teacher")
    teacher_argv = ["--preset", "tiny", "--data_dir", iid["data"], "--out_dir", out,
                    "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
                    "--batch_size", "8", "--max_steps", "12", "--lr", "1e-2",
                    "--eval_interval", "12", "--eval_iters", "2", "--ema", "0.9"]
    teacher.main(teacher_argv)
    ema = made[0]
    assert ema.numbers == list(range(1, 13))
    best, last = (load_checkpoint(os.path.join(out, f), "teacher") for f in ("best.pt", "last.pt"))
    averaged = ema.model.state_dict()
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert all(torch.equal(last["ema"][k], averaged[k]) for k in averaged)
    assert any(not torch.equal(last["model"][k], averaged[k]) for k in averaged)   # raw weights
    logged = json.load(open(os.path.join(out, "teacher_tiny.json")))["final_val_loss"]
    cfg = SimpleNamespace(eval_iters=2, batch_size=8, block_size=32)
    rt = SimpleNamespace(device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                         rank=0, world=1, ddp=False)
    assert teacher.evaluate(ema.model, common.load_split(iid["data"], "val"), cfg, rt) == logged
    teacher.main(teacher_argv + ["--resume"])   # a finished run, resumed, reports the average again
    assert json.load(open(os.path.join(out, "teacher_tiny.json")))["final_val_loss"] == logged

    made.clear()
    seen_prev, rollout = [], distill.rollout_targets
    monkeypatch.setattr(distill, "rollout_targets",
                        lambda prev, *a: seen_prev.append(prev) or rollout(prev, *a))
    evaluated, eval_agreement = [], distill.eval_agreement   # the models each evaluation decodes
    monkeypatch.setattr(distill, "eval_agreement", lambda m, *a, windows=False: evaluated.append(
        (m, windows)) or eval_agreement(m, *a, windows=windows))
    seen_init, student_from = [], GPT.student_from
    monkeypatch.setattr(GPT, "student_from",
                        lambda prev, *a, **kw: seen_init.append(prev) or student_from(prev, *a,
                                                                                      **kw))
    students = str(tmp_path / "students")
    distill.main(["--preset", "tiny", "--teacher", os.path.join(out, "best.pt"),
                  "--data_dir", iid["data"], "--out_dir", students, "--recipe", "paper",
                  "--no-freeze_trunk", "--k", "2",
                  "--steps_per_stage", "6", "--block_size", "32", "--batch_size", "4",
                  "--anchors", "4", "--eval_samples", "8", "--eval_tokens", "8",
                  "--curve_interval", "4", "--ema", "0.9"])
    stage1, stage2 = made
    assert stage1.numbers == stage2.numbers == list(range(1, 7))   # each stage's own ramp
    for k, ema in ((1, stage1), (2, stage2)):
        saved = load_checkpoint(os.path.join(students, f"student_k{k}.pt"), kind="student")["model"]
        assert all(torch.equal(saved[name], p) for name, p in ema.model.state_dict().items())
    assert len(seen_prev) == 12 and all(p is stage1.model for p in seen_prev[6:])   # its targets
    assert len(seen_init) == 2 and seen_init[1] is stage1.model                     # its start
    # each stage's free-running agreement at its start is the fresh student's; the learning
    # curve (steps 0, 4 and 6: at step 0 the average is the fresh student) and the free-running
    # agreement at its end, the average's
    assert len(evaluated) == 10
    for stage, calls in ((stage1, evaluated[:5]), (stage2, evaluated[5:])):
        assert [(m is stage.model, windows) for m, windows in calls] == \
            [(False, False), (True, True), (True, True), (True, True), (True, False)]


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """Four steps of the default recipe (every weight training, an average of 0.9) from an
    untrained teacher, on a train split of tokens 0-3 and a val split of 4-7; records each batch,
    anchor, noise and update of the average."""
    root = str(tmp_path_factory.mktemp("split"))
    rng = np.random.default_rng(0)
    data = write_dataset(os.path.join(root, "data"), rng.integers(0, 4, 4000),
                         rng.integers(4, 8, 1000))
    torch.manual_seed(0)
    ar = GPT(GPTConfig(block_size=32, vocab_size=8, n_layer=1, n_head=2, n_embd=32))
    spec = {"tokenizer": "char", "vocab_size": 8, "chars": CHARS}
    common.save_checkpoint(os.path.join(root, "teacher.pt"), {
        "kind": "teacher", "model_config": dataclasses.asdict(ar.config),
        "model": ar.state_dict(), "tokenizer": spec, "step": 1, "best_val": 1.0})
    seen = SimpleNamespace(sequences=[], anchors=[], noise=[], updates=[], update_numbers=[],
                           teacher=ar.state_dict())
    sample, loss = distill.sample_sequences, distill.distill_loss

    def sample_sequences(*a):
        seen.sequences.append(sample(*a))
        return seen.sequences[-1]

    def distill_loss(recipe, kl, model, teacher, prev, x, anchors, u, *a):
        seen.anchors.append(anchors)
        seen.noise.append(u)
        return loss(recipe, kl, model, teacher, prev, x, anchors, u, *a)

    class Recorded(EMA):
        def update(self, model, n):
            seen.student = model
            seen.updates.append({name: p.detach().clone() for name, p in model.named_parameters()})
            seen.update_numbers.append(n)
            super().update(model, n)
    with pytest.MonkeyPatch.context() as mp:
        for name, spy in (("sample_sequences", sample_sequences), ("distill_loss", distill_loss),
                          ("EMA", Recorded)):
            mp.setattr(distill, name, spy)
        distill.main(["--preset", "tiny", "--teacher", os.path.join(root, "teacher.pt"),
                      "--data_dir", data, "--out_dir", os.path.join(root, "out"), "--k", "2",
                      "--no-freeze_trunk", "--steps_per_stage", "4", "--warmup_steps", "0",
                      "--block_size", "32", "--batch_size", "4", "--anchors", "8",
                      "--eval_samples", "4", "--eval_tokens", "4", "--prompt_len", "4",
                      "--curve_interval", "0", "--ema", "0.9", "--device", "cpu"])
    seen.saved = load_checkpoint(os.path.join(root, "out", "student_k2.pt"), "student")["model"]
    return seen


def test_the_student_learns_on_train_and_is_measured_on_val(split_run):
    prompts, *batches = (x for x, _ in split_run.sequences)
    assert prompts.shape == (4, 4) and (prompts >= 4).all()
    assert len(batches) == 4 and all(b.shape == (4, 32) and (b < 4).all() for b in batches)


def test_anchors_are_distinct_positions_of_the_whole_context_and_the_noise_is_float64(split_run):
    anchors = torch.cat(split_run.anchors)
    assert anchors.shape == (16, 8) and 0 <= anchors.min() and anchors.max() < 32
    assert all(len(set(row.tolist())) == 8 for row in anchors)
    assert len(set(anchors.flatten().tolist())) > 24   # not only the first --anchors positions
    assert all(u.dtype == torch.float64 and u.shape == (4, 8, 2) for u in split_run.noise)


def test_the_average_takes_in_each_steps_weights_after_the_step(split_run):
    """The n-th update of a stage is told it is the n-th: its decay ramp counts from the stage's
    start (each stage a new average)."""
    final = dict(split_run.student.named_parameters())
    assert len(split_run.updates) == 4 and split_run.update_numbers == [1, 2, 3, 4]
    assert all(torch.equal(w, final[n]) for n, w in split_run.updates[-1].items())


def test_distillation_decays_no_weight(split_run):
    """A weight the loss never reaches (the embedding's padding rows, ids 8..63) stays exactly the
    teacher's while the rest trains: no weight decay pulls the student from its teacher."""
    emb, teacher_emb = split_run.saved["wte.weight"], split_run.teacher["wte.weight"]
    assert torch.equal(emb[8:], teacher_emb[8:]) and not torch.equal(emb[:8], teacher_emb[:8])


@pytest.mark.parametrize("freeze", [False, True])   # every weight trains; only the new ones
def test_the_distribution_readout_learns_the_teachers_chain(markov, freeze):
    """--recipe cdf_seq on the Markov chain (next = current + 1, 3 or 5): the student starts as its
    teacher at slot 1 (agreement 100% on the teacher's context; with a frozen trunk it stays so,
    every weight the teacher had unchanged), and slot 2, which must read the token slot 1 drew,
    learns to agree with the teacher's same-noise token far above what a student blind to the
    noise reaches, in 60 steps."""
    out = os.path.join(markov["root"], f"cdf_seq_{freeze}")
    distill.main(["--preset", "tiny", "--teacher", markov["teacher"], "--data_dir", markov["data"],
                  "--recipe", "cdf_seq", "--freeze_trunk" if freeze else "--no-freeze_trunk",
                  "--out_dir", out, "--k", "2", "--steps_per_stage", "60",
                  "--block_size", "32", "--batch_size", "8", "--anchors", "8", "--lr", "3e-3",
                  "--eval_samples", "64", "--eval_tokens", "8", "--curve_interval", "30",
                  "--device", "cpu"])
    result = json.load(open(os.path.join(out, "distill_tiny.json")))
    (stage,), blind = result["stages"], result["agreement_without_noise"]
    assert result["schedule"] == [2] and stage["curve"][0]["window_agreement"][0] == 1.0
    slot1, slot2 = stage["window_agreement"]
    assert slot1 == 1.0 if freeze else slot1 >= 0.8, stage
    assert slot2 >= blind["independent_draw"] + 0.1, (stage, blind)
    assert slot2 > blind["teacher_mode"], (stage, blind)   # not the mode's agreement either
    assert stage["curve"][0]["window_agreement"][1] < blind["independent_draw"]
    assert all(0 <= kl < 0.5 for kl in stage["final_loss_per_slot"])   # nats, per slot
    # the step's accuracy: the student's draws against the teacher's after its own tokens, by the
    # coupling --coupling auto gives a cdf readout (Gumbel-max); slot 1 is the frozen teacher's
    assert result["config"]["coupling"] == "gumbel"
    acc = [r["acc"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "acc" in r]
    assert not freeze or all(a[0] == 1.0 for a in acc)
    assert min(a[1] for a in acc) < 0.9, acc   # slot 2 learns: not a token compared with itself
    teacher = load_checkpoint(markov["teacher"])["model"]
    student = load_checkpoint(os.path.join(out, "student_k2.pt"))["model"]
    same = [torch.equal(student[name], w) for name, w in teacher.items()]
    assert all(same) if freeze else not any(same), same


@torch.no_grad()
def test_onpolicy_targets_are_the_teachers_chain_after_the_students_own_tokens():
    """--recipe onpolicy / cdf: slot i's target is the teacher's distribution after the context up
    to the anchor and the student's own tokens of slots < i (its last token is never read)."""
    torch.manual_seed(0)
    ar = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=40)).eval()
    x, anchors = torch.randint(40, (2, 12)), torch.tensor([[2, 7], [0, 11]])
    u, own = torch.rand(2, 2, 3, dtype=torch.float64), torch.randint(40, (2, 2, 3))
    logits = distill.teacher_after(ar, x, anchors, own)
    got = inverse_cdf(logits, u)
    for b in range(2):
        for a in range(2):
            t = anchors[b, a].item()
            for i in range(3):
                seq = torch.cat([x[b, :t + 1], own[b, a, :i]])[None]
                want = ar(seq)[0][0, -1:].float()
                torch.testing.assert_close(logits[b, a, i:i + 1], want, rtol=0, atol=1e-5)
                assert got[b, a, i] == inverse_cdf(want, u[b, a, i:i + 1]).item(), (b, a, i)
    other = own.clone()
    other[:, :, -1] = (own[:, :, -1] + 1) % 40
    assert torch.equal(inverse_cdf(distill.teacher_after(ar, x, anchors, other), u), got)


@torch.no_grad()
@pytest.mark.parametrize("recipe", ["paper", "onpolicy"])
def test_the_argmax_recipes_train_each_slot_on_its_own_target(recipe):
    """The argmax readout's loss: slot i's cross-entropy is to token i of the previous student's
    rollout (paper; here a k = 2 student's, for a k = 4 stage) or of the teacher's draws after the
    student's own argmax tokens of slots < i (onpolicy), a mean over windows per slot; the tokens
    returned (which the step's accuracy compares) are the student's argmax and those targets."""
    torch.manual_seed(0)
    ar = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=40)).eval()
    prev = GPT.student_from(ar, 2).eval()
    student = GPT.student_from(prev, 4)
    for p in [*prev.parameters(), *student.parameters()]:   # slots that differ, targets too
        p.add_(0.5 * torch.randn_like(p))
    x, anchors = torch.randint(40, (2, 12)), torch.tensor([[2, 7], [0, 11]])
    u = torch.rand(2, 2, 4, dtype=torch.float64)
    per_slot, loss, own, targets = distill.distill_loss(
        recipe, "both", student, ar, prev, x, anchors, u, torch.autocast("cpu", enabled=False))
    logits = student.forward_staircase(x, anchors, u)
    assert torch.equal(own, logits.argmax(-1))
    want = (distill.rollout_targets(prev, x, anchors, u) if recipe == "paper"
            else inverse_cdf(distill.teacher_after(ar, x, anchors, own), u))
    assert torch.equal(targets, want) and not torch.equal(want, want.flip(-1))
    ce = [torch.nn.functional.cross_entropy(logits[:, :, i].flatten(0, 1), want[:, :, i].flatten())
          for i in range(4)]
    torch.testing.assert_close(per_slot, torch.stack(ce))
    torch.testing.assert_close(loss, per_slot.mean())


@pytest.mark.parametrize("recipe,k", [("cdf_seq", 1), ("cdf_seq", 3), ("cdf", 1), ("onpolicy", 2),
                                      ("paper", 1)])
def test_the_loss_reaches_every_weight_the_student_trains(recipe, k):
    """distill.py builds DDP without find_unused_parameters, which stops at a trained weight that
    the loss never reaches: each recipe's loss reaches every weight of a fresh student, at any k
    (a cdf_seq student at k = 1 has no slot MLP, which it could not use)."""
    torch.manual_seed(0)
    ar = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=40)).eval()
    student = GPT.student_from(ar, k, readout=recipe if "cdf" in recipe else "argmax")
    x, anchors = torch.randint(40, (2, 12)), torch.tensor([[2, 7], [0, 11]])
    u = torch.rand(2, 2, k, dtype=torch.float64)
    distill.distill_loss(recipe, "both", student, ar, ar, x, anchors, u,
                         torch.autocast("cpu", enabled=False))[1].backward()
    assert [name for name, p in student.named_parameters() if p.grad is None] == []


def test_the_kl_choices_are_the_divergences_between_teacher_and_student_per_slot():
    """--kl: per slot, a mean over windows of KL(p || q) (forward), KL(q || p) (reverse) or their
    mean (both), p the teacher's distribution after the student's own tokens, q the student's; a
    fresh student's slot 1 is its teacher's, so its loss there is zero by each. The accuracy's
    targets: the teacher's draws from p with the same noise, by teacher.config.coupling (which
    distill.main sets to the student's)."""
    torch.manual_seed(0)
    ar = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, vocab_size=40)).eval()
    torch.nn.init.normal_(ar.wte.weight, std=0.3)   # the two KLs differ, so do the couplings
    student = GPT.student_from(ar, 3, readout="cdf_seq", readout_layers=1, coupling="gumbel")
    torch.nn.init.normal_(student.slot_readout.proj[0].weight, std=1.0)   # slots 2, 3 differ
    ar.config.coupling = "gumbel"   # as distill.py sets it
    x, anchors = torch.randint(40, (2, 12)), torch.tensor([[2, 7], [0, 11]])
    u = torch.rand(2, 2, 3, dtype=torch.float64)
    loss = {kl: distill.distill_loss("cdf_seq", kl, student, ar, None, x, anchors, u,
                                     torch.autocast("cpu", enabled=False))
            for kl in ("forward", "reverse", "both")}
    logits, own = student(x, anchors=anchors, noise=u)
    p = torch.distributions.Categorical(logits=distill.teacher_after(ar, x, anchors, own))
    q = torch.distributions.Categorical(logits=logits.float())
    want = {"forward": torch.distributions.kl_divergence(p, q).mean((0, 1)),
            "reverse": torch.distributions.kl_divergence(q, p).mean((0, 1))}
    want["both"] = (want["forward"] + want["reverse"]) / 2
    targets = draw(p.logits, u, "gumbel")
    assert not torch.equal(targets, draw(p.logits, u, "inverse_cdf"))
    params = list(student.parameters())

    def grad(y):   # dy / d(every weight), one vector
        gs = torch.autograd.grad(y, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(w) if g is None else g).flatten()
                          for g, w in zip(gs, params)])
    for kl, (per_slot, total, tokens, target) in loss.items():
        assert torch.allclose(per_slot, want[kl], atol=1e-6), kl
        assert torch.isclose(total, per_slot.sum()) and torch.equal(tokens, own)
        assert torch.equal(target, targets)
        assert per_slot[0] < 1e-6 < per_slot[1:].min(), (kl, per_slot)
        # its gradient is the divergence's too: the reverse KL's reaches q through its weights
        torch.testing.assert_close(grad(total), grad(want[kl].sum()), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(want["forward"][1:], want["reverse"][1:], rtol=0.05)


@torch.no_grad()
def test_rollout_targets_are_same_noise_samples():
    """Stage targets: the AR teacher's inverse CDF on the real context (stage 1), and the previous
    student's own same-noise decoding, block after block on its own tokens (self-forcing)."""
    torch.manual_seed(0)
    V = 64
    ar = GPT(GPTConfig(block_size=40, vocab_size=V, n_layer=1, n_head=2, n_embd=32)).eval()
    x = torch.randint(0, V, (2, 24))
    anchors = torch.tensor([[0, 7, 23], [5, 6, 12]])
    u = torch.rand(2, 3, 1, dtype=torch.float64)
    ref = inverse_cdf(ar(x)[0][torch.arange(2)[:, None], anchors], u[:, :, 0])
    assert torch.equal(distill.rollout_targets(ar, x, anchors, u)[:, :, 0], ref)

    prev = GPT.student_from(ar, 2).eval()
    for p in prev.parameters():   # large enough that the second block depends on the first's
        p.add_(0.5 * torch.randn_like(p))
    anchors = torch.tensor([[0, 2, 4, 7, 9, 12, 15, 18, 21], [1, 3, 5, 6, 8, 11, 14, 17, 20]])
    u = torch.rand(2, 9, 4, dtype=torch.float64)
    targets = distill.rollout_targets(prev, x, anchors, u)   # a k = 4 window from a k = 2 model
    for b in range(2):
        for a in range(9):
            t = anchors[b, a].item()
            own = generate(prev, x[b:b + 1, :t + 1], u[b:b + 1, a], k=2)
            assert torch.equal(targets[b, a], own[0])
    # self-forcing, not teacher forcing: the second block follows the model's own first block
    real = torch.stack([x[b, anchors[b] + 1 + torch.arange(2)[:, None]].T for b in range(2)])
    forced = prev.forward_staircase(x, anchors, u[:, :, 2:], window=real).argmax(-1)
    assert (forced != targets[:, :, 2:]).any()


@pytest.mark.parametrize("recipe,k,want", [
    ("paper", 4, [1, 2, 4]), ("paper", 3, [1, 2, 3]), ("paper", 1, [1]), ("paper", 6, [1, 2, 4, 6]),
    ("cdf_seq", 4, [4]), ("cdf", 4, [4]), ("onpolicy", 4, [4])])
def test_schedule(recipe, k, want):
    """The paper's stages double k from 1 up to --k; the other recipes train one stage at --k."""
    assert distill.stage_schedule(distill.DistillConfig(recipe=recipe, k=k)) == want


def test_learning_rate_schedules():
    """teacher.py: linear warmup to lr, then cosine decay to min_lr at the last step; distill.py:
    the same warmup, then constant (min_lr = lr)."""
    assert [lr_at(s, 1.0, 0.1, 4, 16) for s in (0, 3, 4, 10, 16)] == \
        pytest.approx([0.25, 1.0, 1.0, 0.55, 0.1])
    assert [lr_at(s, 1.0, 1.0, 2, 8) for s in (0, 1, 5, 8)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert lr_at(0, 1.0, 1.0, 0, 8) == 1.0   # no warmup


def test_sample_sequences_draws_every_start():
    """Sequences of T + 1 tokens start anywhere from 0 to len - T - 1: a split of exactly T + 1
    tokens holds one, one of T + 2 two, and both get drawn."""
    gen = torch.Generator().manual_seed(0)
    x, y = sample_sequences(np.arange(5), 1, 4, gen)
    assert x.tolist() == [[0, 1, 2, 3]] and y.tolist() == [[1, 2, 3, 4]]
    assert set(sample_sequences(np.arange(6), 64, 4, gen)[0][:, 0].tolist()) == {0, 1}
    with pytest.raises(UserError, match="shorter than one sequence"):
        sample_sequences(np.arange(4), 1, 4, gen)


def test_student_where_teacher_expected(iid):
    with pytest.raises(UserError, match="student checkpoint where a teacher is expected"):
        load_checkpoint(os.path.join(iid["out"], "student_k1.pt"), kind="teacher")
    with pytest.raises(UserError, match="teacher checkpoint where a student is expected"):
        load_checkpoint(iid["teacher"], kind="student")
    model = model_from_checkpoint(load_checkpoint(iid["teacher"], kind="teacher"), "cpu")
    assert model.config.max_k == 0
