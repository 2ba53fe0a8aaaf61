"""Reliability of teacher.py and distill.py: runs killed with SIGKILL or stopped with Ctrl-C
resume exactly, checkpoints are never half-written, DDP under torchrun matches one process, and a
bad input is one line, a non-zero exit and no traceback. CPU only, tiny models on a small
character corpus built here (data/offline is not needed)."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bench
import common
import distill
import model
import sample
import teacher
from common import UserError, load_checkpoint, lr_at, run_cli, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = """The river ran past the old mill and under the stone bridge.
Children played in the fields until the evening bell rang.
A merchant came to town with silk, spices and news from the coast.
Rain fell for three days, and the road to the north was closed."""
TEACHER = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
           "--batch_size", "4", "--dropout", "0", "--lr", "3e-3", "--min_lr", "3e-4",
           "--warmup_steps", "4", "--eval_iters", "1", "--seed", "7", "--ema", "0.9",
           "--device", "cpu"]   # with an average: a resume must restore it too
TEACHER_REF = TEACHER + ["--max_steps", "16", "--eval_interval", "4"]
DISTILL = ["--block_size", "32", "--batch_size", "4", "--anchors", "4", "--eval_samples", "4",
           "--eval_tokens", "8", "--prompt_len", "4", "--lr", "1e-3", "--warmup_steps", "2",
           "--log_interval", "1", "--ckpt_interval", "2", "--curve_interval", "3",
           "--recipe", "paper", "--no-freeze_trunk", "--k", "2", "--seed", "7", "--ema", "0.9",
           "--device", "cpu"]
DISTILL_REF = DISTILL + ["--steps_per_stage", "8"]
EXACT = 0        # resumed vs uninterrupted on CPU fp32: the same arithmetic in the same order
DDP_TOL = 1e-4   # 2 processes vs 1: only the order of the gradient all-reduce differs
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_log(path):
    rows = []
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line being written right now
                pass
    return rows


def assert_same_log(got, want, tol):
    got, want = ([{k: v for k, v in r.items() if k != "tok_s"} for r in rows]
                 for rows in (got, want))
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for key in w:
            a, b = (np.atleast_1d(np.asarray(r[key], dtype=float)) for r in (g, w))
            assert np.allclose(a, b, rtol=0, atol=tol), (key, g, w)


def assert_same_weights(got, want):
    got, want = (torch.load(p, weights_only=False)["model"] for p in (got, want))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=EXACT)


def start(script, argv, tmp_path, name, env=ENV):
    return subprocess.Popen([sys.executable, script, *argv], cwd=REPO, env=env, text=True,
                            stdout=open(tmp_path / f"{name}.out", "w"),
                            stderr=open(tmp_path / f"{name}.err", "w"))


def wait_for(proc, log, pred, timeout=120):
    deadline = time.time() + timeout
    while not any(pred(r) for r in read_log(log)):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) too early"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def run(script, argv, env=ENV):
    return subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=env)


def error_line(stderr):
    """The one message a bad input may print: no traceback, nothing else but progress bars."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not re.search(r"\d+%\|", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def cli(mod, argv, capsys, code=2):
    """Run a script's main as its __main__ does (through run_cli); return its one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: mod.main(argv))
    assert e.value.code == code
    return error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    chars = "".join(sorted(set(TEXT)))
    ids = np.array([chars.index(c) for c in TEXT], dtype=np.uint16)
    d = tmp_path_factory.mktemp("data")
    for split, n in (("train", 20), ("val", 4)):
        np.tile(ids, n).tofile(d / f"{split}.bin")
    json.dump({"tokenizer": "char", "vocab_size": len(chars), "chars": chars,
               "train_tokens": 20 * len(ids), "val_tokens": 4 * len(ids)},
              open(d / "meta.json", "w"))
    return str(d)


@pytest.fixture(scope="module")
def teacher_ref(tmp_path_factory, data_dir):
    out = str(tmp_path_factory.mktemp("teacher_ref") / "out")
    teacher.main(TEACHER_REF + ["--data_dir", data_dir, "--out_dir", out])
    return {"out": out, "log": read_log(os.path.join(out, "log.jsonl")),
            "best": os.path.join(out, "best.pt")}


@pytest.fixture(scope="module")
def distill_ref(tmp_path_factory, data_dir, teacher_ref):
    out = str(tmp_path_factory.mktemp("distill_ref") / "out")
    distill.main(DISTILL_REF + ["--teacher", teacher_ref["best"], "--data_dir", data_dir,
                                "--out_dir", out])
    return {"out": out, "log": read_log(os.path.join(out, "log.jsonl")),
            "student": os.path.join(out, "student_k2.pt")}


def T(data_dir, out, *extra):
    return TEACHER_REF + ["--data_dir", data_dir, "--out_dir", str(out), *extra]


def D(data_dir, teacher_ckpt, out, *extra):
    return DISTILL_REF + ["--teacher", teacher_ckpt, "--data_dir", data_dir,
                          "--out_dir", str(out), *extra]


def stages(out):   # a distill summary's stages without their timings
    timings = ("steps_per_s", "tokens_per_s", "slots_per_s", "train_s")
    untimed = lambda d: {k: v for k, v in d.items() if k not in timings}  # noqa: E731
    return [{**untimed(s), "curve": [untimed(p) for p in s["curve"]]}
            for s in json.load(open(os.path.join(out, "distill_tiny.json")))["stages"]]


# ------------------------------------------------------------------------------------------------
# Resume: SIGKILL at an arbitrary moment, then --resume, reproduces the uninterrupted run exactly.

def test_teacher_sigkill_resume_matches_uninterrupted(tmp_path, data_dir, teacher_ref, capsys):
    out = tmp_path / "out"
    p = start("teacher.py", T(data_dir, out), tmp_path, "killed")
    wait_for(p, out / "log.jsonl", lambda r: r.get("step", 0) >= 10)   # last.pt of step 8 exists
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(str(out / "last.pt"), kind="teacher")["step"]
    assert 8 <= killed_at < 16
    with open(out / "log.jsonl", "a") as f:   # rows past the checkpoint, one torn by the kill
        f.write(json.dumps({"step": killed_at + 1, "loss": 1.0}) + '\n{"step": 15, "loss": 7.')
    teacher.main(T(data_dir, out, "--resume"))
    assert f"resuming at step {killed_at}" in capsys.readouterr().out
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)
    assert_same_weights(out / "best.pt", teacher_ref["best"])   # the average, across the kill


def test_distill_sigkill_mid_stage_resume_matches_uninterrupted(tmp_path, data_dir, teacher_ref,
                                                                distill_ref):
    out = tmp_path / "out"
    argv = D(data_dir, teacher_ref["best"], out)
    p = start("distill.py", argv, tmp_path, "killed")
    # stage 2 is global steps 9..16 with checkpoints at 10, 12, 14: stop after the one at 10
    wait_for(p, out / "log.jsonl",
             lambda r: r.get("stage") == 1 and r["step"] >= 11 and "loss" in r)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    ck = load_checkpoint(str(out / "last.pt"), kind="student")
    assert ck["stage"] == 1 and ck["optimizer"] is not None and 2 <= ck["step"] < 8
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)
    assert_same_weights(out / "student_k2.pt", distill_ref["student"])
    assert stages(out) == stages(distill_ref["out"])   # learning curves included


@pytest.mark.parametrize("log_deleted", [False, True])
def test_distill_resume_between_stages(tmp_path, data_dir, teacher_ref, distill_ref, capsys,
                                       log_deleted):
    """A kill right after stage 1's final checkpoint (last.pt = student_k1.pt): the resume starts
    stage 2 afresh and ends as the uninterrupted run; a deleted log.jsonl only loses its rows."""
    out = tmp_path / "out"
    shutil.copytree(distill_ref["out"], out)
    shutil.copy(out / "student_k1.pt", out / "last.pt")
    os.remove(out / "student_k2.pt")
    if log_deleted:
        os.remove(out / "log.jsonl")
    capsys.readouterr()
    distill.main(D(data_dir, teacher_ref["best"], out, "--resume"))
    stdout = capsys.readouterr().out
    assert "stage 2/2" in stdout and "stage 1/2" not in stdout
    lost = 0   # the uninterrupted log's rows that the new log lacks: those up to the checkpoint
    if log_deleted:
        lost = load_checkpoint(str(out / "student_k1.pt"))["log_rows"]
        assert 0 < lost < len(distill_ref["log"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"][lost:], EXACT)
    assert_same_weights(out / "student_k2.pt", distill_ref["student"])


def test_each_stage_warms_up_then_holds_its_learning_rate(distill_ref):
    for stage in (0, 1):
        lrs = [r["lr"] for r in distill_ref["log"] if r.get("stage") == stage and "loss" in r]
        assert lrs == pytest.approx([5e-4] + [1e-3] * 7)


# ------------------------------------------------------------------------------------------------
# Ctrl-C: once saves a checkpoint and exits with one line, and --resume continues exactly; twice
# stops at once, with one line too.

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])   # SIGTERM: what a scheduler sends
def test_teacher_ctrl_c_saves_and_resumes(tmp_path, data_dir, teacher_ref, sig):
    out = tmp_path / "out"
    p = start("teacher.py", T(data_dir, out), tmp_path, "stopped")
    wait_for(p, out / "log.jsonl", lambda r: r.get("step", 0) >= 5)
    os.kill(p.pid, sig)
    assert p.wait(timeout=60) == 2
    msg = error_line((tmp_path / "stopped.err").read_text())
    step = int(re.search(r"interrupted at step (\d+)", msg).group(1))
    assert "--resume" in msg and 5 <= step < 16
    assert load_checkpoint(str(out / "last.pt"), kind="teacher")["step"] == step
    teacher.main(T(data_dir, out, "--resume"))
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)


def test_distill_ctrl_c_during_evaluation_stops_after_the_stage(tmp_path, data_dir, teacher_ref,
                                                                distill_ref, monkeypatch):
    """A Ctrl-C in an end-of-stage evaluation stops the run once that stage is saved; --resume
    then starts the next stage afresh and ends as the uninterrupted run."""
    window_agreement, out = distill.window_agreement, tmp_path / "out"

    def interrupted(*a, **kw):
        rows = read_log(out / "log.jsonl")
        if rows and rows[-1]["step"] == 8 and "loss" in rows[-1]:   # stage 1's last evaluation
            os.kill(os.getpid(), signal.SIGINT)
        return window_agreement(*a, **kw)
    monkeypatch.setattr(distill, "window_agreement", interrupted)
    argv = D(data_dir, teacher_ref["best"], out)
    with pytest.raises(UserError, match=r"interrupted after stage k=1; .*--resume"):
        distill.main(argv)
    assert load_checkpoint(str(out / "last.pt"), kind="student")["stage"] == 1
    monkeypatch.undo()
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)


def test_default_recipe_ctrl_c_resume_matches_uninterrupted(tmp_path, data_dir, teacher_ref,
                                                           monkeypatch):
    """The tiny preset's recipe (cdf_seq: the slot MLP, the teacher after the student's own
    tokens; a frozen trunk) stopped mid-stage with Ctrl-C continues with --resume exactly as if
    uninterrupted; stopped off --ckpt_interval (2), last.pt holds the step the message names."""
    argv = lambda out: D(data_dir, teacher_ref["best"], out, "--recipe", "cdf_seq",  # noqa: E731
                         "--freeze_trunk")
    distill.main(argv(tmp_path / "ref"))
    teacher_after, out = distill.teacher_after, tmp_path / "out"

    def interrupted(*a):
        rows = read_log(out / "log.jsonl")
        if rows and rows[-1]["step"] == 4 and "loss" in rows[-1]:
            os.kill(os.getpid(), signal.SIGINT)
        return teacher_after(*a)
    monkeypatch.setattr(distill, "teacher_after", interrupted)
    with pytest.raises(UserError, match=r"interrupted in stage k=2 at step 5; saved"):
        distill.main(argv(out))
    assert load_checkpoint(str(out / "last.pt"), kind="student")["step"] == 5
    monkeypatch.undo()
    distill.main(argv(out) + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), read_log(tmp_path / "ref" / "log.jsonl"), EXACT)
    assert_same_weights(out / "student_k2.pt", tmp_path / "ref" / "student_k2.pt")


def test_ctrl_c_twice_stops_at_once_with_one_line(tmp_path, data_dir, monkeypatch, capsys):
    def evaluate(*a):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return 1.0
    monkeypatch.setattr(teacher, "evaluate", evaluate)
    msg = cli(teacher, T(data_dir, tmp_path / "out"), capsys, code=130)
    assert "interrupted" in msg


def test_distill_disk_full_while_saving_is_one_line_and_resumes(tmp_path, data_dir, teacher_ref,
                                                                 distill_ref, monkeypatch, capsys):
    """The disk fills while student_k1.pt is written (after stage 1's evaluations were logged):
    one line naming the file; --resume evaluates again, and the log holds each row once."""
    out, dump = tmp_path / "out", torch.save

    class FullDisk:   # the disk fills 4 kB into the file
        def __init__(self, f):
            self.f, self.left = f, 4096

        def write(self, b):
            self.left -= len(b)
            if self.left < 0:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def disk_fills(obj, f):   # as torch.save meets it: its zip writer wraps the OSError
        stage1 = obj.get("stage") == 1 and obj.get("optimizer", 0) is None   # stage 1's student
        dump(obj, FullDisk(f) if stage1 else f)
    monkeypatch.setattr(torch, "save", disk_fills)
    argv = D(data_dir, teacher_ref["best"], out)
    assert re.search(r"cannot write .*student_k1\.pt \(No space left", cli(distill, argv, capsys))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    monkeypatch.undo()
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)


# ------------------------------------------------------------------------------------------------
# Checkpoint files are never half-written; a NaN loss stops and keeps the last good one.

def test_checkpoint_write_killed_midway_leaves_old_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")
    code = f"""
import sys, time, torch
sys.path.insert(0, {REPO!r})
from common import save_checkpoint
class Slow:   # pickled after the zip header is out: the write is in progress while it sleeps
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(60)
save_checkpoint({str(path)!r}, {{"model": torch.zeros(1000), "slow": Slow()}})
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "writing"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")], "no temporary file"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert path.read_bytes() == b"the previous checkpoint"


@pytest.mark.parametrize("bad", ["nan", "inf"])   # an overflow gives inf, not NaN
def test_teacher_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, teacher_ref,
                                                               monkeypatch, bad):
    forward, calls = model.GPT.forward, [0]

    def bad_from_step_7(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and loss is not None:
            calls[0] += 1
            loss = loss * float(bad) if calls[0] >= 7 else loss
        return logits, loss
    monkeypatch.setattr(model.GPT, "forward", bad_from_step_7)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"loss became {bad} at step 7;.*last good checkpoint"):
        teacher.main(T(data_dir, out))
    assert load_checkpoint(str(out / "last.pt"), kind="teacher")["step"] == 4
    assert read_log(out / "log.jsonl")[-1]["step"] == 6   # the bad step is not logged
    assert not os.path.exists(out / "teacher_tiny.json")   # no summary of a failed run
    monkeypatch.undo()
    teacher.main(T(data_dir, out, "--resume"))   # the kept step-4 state goes on exactly
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)


def test_distill_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, teacher_ref,
                                                               monkeypatch):
    staircase, calls = model.GPT.forward_staircase, [0]

    def nan_from_step_3(self, *a, **kw):
        logits = staircase(self, *a, **kw)
        if self.training:   # the student's training pass, not the evaluations
            calls[0] += 1
            logits = logits * float("nan") if calls[0] >= 3 else logits
        return logits
    monkeypatch.setattr(model.GPT, "forward_staircase", nan_from_step_3)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"loss became nan at step 3;.*last good checkpoint"):
        distill.main(D(data_dir, teacher_ref["best"], out))
    ck = load_checkpoint(str(out / "last.pt"), kind="student")
    assert (ck["stage"], ck["step"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_nan_loss_before_the_first_checkpoint_names_none(tmp_path, data_dir, monkeypatch):
    forward = model.GPT.forward

    def nan_loss(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        return logits, loss * float("nan") if self.training and loss is not None else loss
    monkeypatch.setattr(model.GPT, "forward", nan_loss)
    with pytest.raises(UserError, match=r"loss became nan at step 1; stopped, before the first "
                       r"checkpoint \(lower --lr"):
        teacher.main(T(data_dir, tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "last.pt")


def test_grad_accum_splits_the_same_batch(tmp_path, data_dir, monkeypatch):
    """Batch 4 x 2 micro-batches is batch 8: the same loss, gradient norm (what --grad_clip
    clips) and tokens seen."""
    clip, norms = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda *a, **kw: norms.append(clip(*a, **kw).item()))
    logs, tokens = [], []
    for batch, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"accum{accum}"
        teacher.main(TEACHER + ["--batch_size", str(batch), "--grad_accum", str(accum),
                                "--max_steps", "4", "--eval_interval", "4", "--data_dir",
                                data_dir, "--out_dir", str(out)])
        logs.append([r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r])
        tokens.append(json.load(open(out / "teacher_tiny.json"))["tokens_seen"])
    assert len(logs[0]) == 4 and np.allclose(logs[1], logs[0], rtol=0, atol=DDP_TOL), logs
    assert len(norms) == 8 and np.allclose(norms[4:], norms[:4], rtol=1e-4), norms
    assert tokens == [4 * 8 * 32] * 2


def test_the_seed_sets_the_teachers_init_and_batch_order(tmp_path, data_dir, monkeypatch):
    """--seed seeds the teacher's initial weights and its train batches; the val batches stay
    the same for every seed (evaluations compare like with like)."""
    def run(seed):
        batches = []
        def sample_sequences(*a):   # called for: val (step 0), train (step 1), val
            batches.append(common.sample_sequences(*a))
            return batches[-1]
        monkeypatch.setattr(teacher, "sample_sequences", sample_sequences)
        out = tmp_path / str(seed)
        teacher.main(T(data_dir, out, "--max_steps", "1", "--seed", str(seed)))
        return [x for x, _ in batches], read_log(out / "log.jsonl")[0]["val_loss"]
    (val, train, _), first_val = run(7)
    (val2, train2, _), first_val2 = run(8)
    assert torch.equal(val, val2) and not torch.equal(train, train2)
    assert first_val != first_val2   # the same val batch through other initial weights


def test_the_seed_sets_the_distillations_batches_noise_and_new_weights(tmp_path, data_dir,
                                                                       teacher_ref, monkeypatch):
    """--seed seeds distill.py's context batches, anchors, noise and the noise encoder's initial
    weights (the rest of the first student is its teacher's)."""
    first, loss = {}, distill.distill_loss

    def recording(recipe, kl, model, teacher, prev, x, anchors, u, *a):
        first.setdefault(seed, (x, anchors, u, model.noise_encoder.inp.weight.detach().clone()))
        return loss(recipe, kl, model, teacher, prev, x, anchors, u, *a)
    monkeypatch.setattr(distill, "distill_loss", recording)
    for seed in (7, 8):
        distill.main(D(data_dir, teacher_ref["best"], tmp_path / str(seed), "--seed", str(seed),
                       "--steps_per_stage", "1"))
    for name, a, b in zip(("context", "anchors", "noise", "noise encoder"), first[7], first[8]):
        assert a.shape == b.shape and not torch.equal(a, b), name


def test_the_teacher_follows_its_schedule_and_decays_only_matrices(teacher_ref):
    """Each step's learning rate is lr_at's (warmup to 3e-3 in 4 steps, cosine to 3e-4 at step
    16), in both of the optimizer's groups; weight decay applies to the matrices, never to the
    norms' gains."""
    lrs = [r["lr"] for r in teacher_ref["log"] if "loss" in r]
    assert lrs == pytest.approx([lr_at(s, 3e-3, 3e-4, 4, 16) for s in range(16)])
    ck = torch.load(os.path.join(teacher_ref["out"], "last.pt"), weights_only=False)
    matrices, gains = ck["optimizer"]["param_groups"]
    assert matrices["lr"] == gains["lr"] == lrs[-1]   # what the last step used, not only logged
    assert (matrices["weight_decay"], gains["weight_decay"]) == (0.1, 0.0)
    assert len(gains["params"]) == sum(w.dim() == 1 for w in ck["model"].values()) > 0


def test_the_last_step_is_evaluated_and_saved_off_the_interval(tmp_path, data_dir):
    """--max_steps 6 with --eval_interval 4: step 6 is evaluated, summarised and in last.pt."""
    out = tmp_path / "out"
    teacher.main(T(data_dir, out, "--max_steps", "6"))
    evals = [r for r in read_log(out / "log.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 6]
    assert json.load(open(out / "teacher_tiny.json"))["final_val_loss"] == evals[-1]["val_loss"]
    assert load_checkpoint(str(out / "last.pt"), kind="teacher")["step"] == 6


def test_without_an_average_the_teacher_saves_its_weights(tmp_path, data_dir):
    """--ema 0: the average, which is evaluated and saved as best.pt, is the weights after the
    step, not one step behind."""
    out = tmp_path / "out"
    teacher.main(T(data_dir, out, "--ema", "0", "--max_steps", "4"))
    ck = torch.load(out / "last.pt", weights_only=False)
    assert all(torch.equal(ck["ema"][name], w) for name, w in ck["model"].items())


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
@pytest.mark.parametrize("recipe,targets_from", [("paper", "rollout_targets"),
                                                 ("cdf_seq", "teacher_after")])
def test_targets_are_fp32_and_from_models_in_eval_mode(tmp_path, monkeypatch, data_dir,
                                                       teacher_ref, recipe, targets_from):
    """Targets come from the previous model (paper) or the teacher (cdf_seq) in eval mode and
    outside autocast, while the student trains under bf16 autocast; every update's gradient is
    clipped to --grad_clip, and every update uses the learning rate the log shows."""
    targets, student, clips, lrs = [], [], [], []
    mode = lambda m: (m.training, torch.is_autocast_enabled("cpu"))   # noqa: E731
    make, forward = getattr(distill, targets_from), model.GPT.forward
    clip, step = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step
    monkeypatch.setattr(distill, targets_from,
                        lambda m, *a: targets.append(mode(m)) or make(m, *a))
    monkeypatch.setattr(model.GPT, "forward", lambda m, *a, **kw: (
        m.training and student.append(mode(m))) or forward(m, *a, **kw))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda p, m, *a, **kw: clips.append(m) or clip(p, m, *a, **kw))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda o, *a, **kw: lrs.append(
        [g["lr"] for g in o.param_groups]) or step(o, *a, **kw))
    out = tmp_path / "run"
    distill.main(D(data_dir, teacher_ref["best"], out, "--steps_per_stage", "2", "--dtype",
                   "bfloat16", "--grad_clip", "0.5", "--recipe", recipe))
    # (training, autocast) of every call
    assert targets and set(targets) == {(False, False)} and set(student) == {(True, True)}
    logged = [[r["lr"]] for r in read_log(out / "log.jsonl") if "loss" in r]
    stages = 2 if recipe == "paper" else 1   # k = 1, 2 or one stage at k = 2; 2 steps each
    assert lrs == logged == [[5e-4], [1e-3]] * stages and clips == [0.5] * 2 * stages


def test_error_line_is_one_write(monkeypatch):
    """Ranks failing together share stderr: a line written in two pieces splices with another."""
    writes = []
    monkeypatch.setattr(sys, "stderr", type("Pipe", (), {"write": lambda _, s: writes.append(s)})())
    with pytest.raises(SystemExit):
        run_cli(lambda: (_ for _ in ()).throw(UserError("in use")))
    assert writes == ["error: in use\n"]


def test_the_commit_a_summary_records(tmp_path, capfd):
    """From a copy without git (a downloaded archive), git_commit is None and git's complaint
    ("error: Could not access 'HEAD'", like one of ours) does not reach the user's terminal. In a
    checkout it is HEAD, with "+dirty" once a .py file differs from it, and only then."""
    shutil.copy(os.path.join(REPO, "common.py"), tmp_path)
    spec = importlib.util.spec_from_file_location("common_copy", tmp_path / "common.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.git_commit() is None and capfd.readouterr().err == ""
    (tmp_path / "notes.txt").write_text("notes")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout
    head = head.strip()
    assert copy.git_commit() == head
    (tmp_path / "notes.txt").write_text("other notes")   # not code
    assert copy.git_commit() == head
    with open(tmp_path / "common.py", "a") as f:
        f.write("# changed\n")
    assert copy.git_commit() == head + "+dirty"


# ------------------------------------------------------------------------------------------------
# DDP: 2 processes (gloo on CPU) give the losses of 1 process with the same global batch.

def torchrun(script, argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", script, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env=ENV)


def test_ddp_two_processes_match_one(tmp_path, data_dir, teacher_ref):
    t1 = TEACHER + ["--max_steps", "5", "--eval_interval", "5", "--grad_accum", "2",
                    "--data_dir", data_dir]   # grad_accum 2: the no_sync micro-batches too
    teacher.main(t1 + ["--out_dir", str(tmp_path / "t1")])
    r = torchrun("teacher.py", t1 + ["--out_dir", str(tmp_path / "t2")])
    assert r.returncode == 0 and "x 2," in r.stdout, r.stderr[-3000:]   # really 2 processes
    one, two = read_log(tmp_path / "t1" / "log.jsonl"), read_log(tmp_path / "t2" / "log.jsonl")
    assert len(one) == 7 and all(math.isfinite(r.get("loss", 0)) for r in one)
    assert_same_log(two, one, DDP_TOL)
    d1 = DISTILL + ["--steps_per_stage", "3", "--teacher", teacher_ref["best"], "--data_dir",
                    data_dir]
    distill.main(d1 + ["--out_dir", str(tmp_path / "d1")])
    r = torchrun("distill.py", d1 + ["--out_dir", str(tmp_path / "d2")])
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_log(tmp_path / "d1" / "log.jsonl"), read_log(tmp_path / "d2" / "log.jsonl")
    assert sum("loss" in r for r in one) == 6
    assert_same_log(two, one, DDP_TOL)
    assert json.load(open(tmp_path / "d2" / "distill_tiny.json"))["world_size"] == 2


MASK_PROBE = """
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import common, teacher
masks, dropout = [], torch.nn.functional.dropout

def spy(x, p=0.5, training=True, inplace=False):   # what nn.Dropout calls
    y = dropout(x, p, training, inplace)
    if training and p > 0:
        masks.append((y == 0).flatten()[:256].tolist())
    return y
torch.nn.functional.dropout = spy
common.run_cli(lambda: teacher.main(sys.argv[3:]))
json.dump(masks, open(os.path.join(sys.argv[2], "masks%s.json" % os.environ["RANK"]), "w"))
"""


def test_ddp_ranks_draw_their_own_dropout_masks(tmp_path, data_dir):
    """With dropout, rank 1 masks its rows with masks of its own: one seeded stream on every rank
    would give it rank 0's."""
    (tmp_path / "probe.py").write_text(MASK_PROBE)
    r = torchrun(str(tmp_path / "probe.py"), [REPO, str(tmp_path)] + T(
        data_dir, tmp_path / "out", "--max_steps", "2", "--dropout", "0.1"))
    assert r.returncode == 0, r.stderr[-3000:]
    masks = [json.load(open(tmp_path / f"masks{rank}.json")) for rank in (0, 1)]
    assert len(masks[0]) == len(masks[1]) > 0 and masks[0] != masks[1]
    assert all(m0 != m1 for m0, m1 in zip(*masks))   # every dropout call of every step


STOP_PROBE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import common, teacher
lr_at = teacher.lr_at

def lr_at_with_ctrl_c(step, *a):   # called once a step
    if step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGINT)   # a Ctrl-C that reaches one process only
    return lr_at(step, *a)
teacher.lr_at = lr_at_with_ctrl_c
common.run_cli(lambda: teacher.main(sys.argv[2:]))
"""


def test_ddp_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, data_dir):
    """The ranks agree to stop (an all-reduce of the flag): a rank stopping alone would leave the
    others waiting for it in the next step's gradient all-reduce."""
    (tmp_path / "probe.py").write_text(STOP_PROBE)
    r = torchrun(str(tmp_path / "probe.py"), [REPO] + T(data_dir, tmp_path / "out"))
    assert r.returncode != 0 and r.stderr.count("error: interrupted at step 3;") == 2, \
        r.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "out" / "last.pt"), kind="teacher")["step"] == 3


def test_ddp_with_dropout_stopped_and_resumed_matches_uninterrupted(tmp_path, data_dir):
    """Under DDP each rank draws its dropout masks from a seed of (seed, step, rank): a run stopped
    by Ctrl-C and resumed draws on every rank the masks the uninterrupted run drew (last.pt holds
    only rank 0's generator)."""
    short = ("--max_steps", "6", "--eval_interval", "3", "--dropout", "0.1")
    r = torchrun("teacher.py", T(data_dir, tmp_path / "ref", *short))
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "probe.py").write_text(STOP_PROBE)
    r = torchrun(str(tmp_path / "probe.py"), [REPO] + T(data_dir, tmp_path / "out", *short))
    assert "error: interrupted at step 3;" in r.stderr, r.stderr[-3000:]
    r = torchrun("teacher.py", T(data_dir, tmp_path / "out", *short, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_log(read_log(tmp_path / "out" / "log.jsonl"),
                    read_log(tmp_path / "ref" / "log.jsonl"), EXACT)


def test_a_stray_rank_variable_is_not_a_multi_process_run(tmp_path, data_dir):
    r = run("teacher.py", T(data_dir, tmp_path / "out", "--max_steps", "2"),
            env={**ENV, "RANK": "1"})
    assert r.returncode == 0 and "x 1," in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# What a resume keeps: the training before a failed evaluation, the dropout masks, the best so far.

def test_an_error_in_the_final_evaluation_loses_no_training(tmp_path, data_dir, teacher_ref,
                                                            monkeypatch):
    """last.pt is saved before its step is evaluated: a resume evaluates that step again."""
    evaluate, calls = teacher.evaluate, []

    def fails_at_the_end(*a):
        calls.append(1)
        if len(calls) == 5:   # steps 0, 4, 8, 12, then 16: the end of training
            raise RuntimeError("the evaluation failed")
        return evaluate(*a)
    monkeypatch.setattr(teacher, "evaluate", fails_at_the_end)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        teacher.main(T(data_dir, out))
    assert load_checkpoint(str(out / "last.pt"), kind="teacher")["step"] == 16
    monkeypatch.undo()
    teacher.main(T(data_dir, out, "--resume"))
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)
    assert_same_weights(out / "best.pt", teacher_ref["best"])


def test_dropout_masks_repeat_on_resume(tmp_path, data_dir, teacher_ref, monkeypatch):
    """last.pt keeps the generator that draws the dropout masks: a run with dropout stopped by
    Ctrl-C and resumed trains as the uninterrupted one."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    teacher.main(T(data_dir, ref, "--dropout", "0.3"))
    assert read_log(ref / "log.jsonl")[1]["loss"] != teacher_ref["log"][1]["loss"]   # it drops
    evaluate, calls = teacher.evaluate, []

    def ctrl_c_at_step_4(*a):
        calls.append(1)
        if len(calls) == 2:   # steps 0, then 4: the run stops after step 5
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*a)
    monkeypatch.setattr(teacher, "evaluate", ctrl_c_at_step_4)
    with pytest.raises(UserError, match="interrupted at step 5"):
        teacher.main(T(data_dir, out, "--dropout", "0.3"))
    monkeypatch.undo()
    teacher.main(T(data_dir, out, "--dropout", "0.3", "--resume"))
    assert_same_log(read_log(out / "log.jsonl"), read_log(ref / "log.jsonl"), EXACT)
    assert_same_weights(out / "best.pt", ref / "best.pt")


def test_resume_keeps_the_best_so_far(tmp_path, data_dir, monkeypatch):
    """best.pt and the best val loss are the best of the whole run, across a resume too, after
    step 0: the initial weights are never the teacher, even where their loss is the lowest."""
    losses = iter([1.0, 3.0, 4.0, 6.0, 7.0])   # steps 0, 4, 8, then resumed: 12, 16

    def scripted(*a):
        loss = next(losses)
        if loss == 4.0:   # Ctrl-C during step 8's evaluation: the run stops after step 9
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    monkeypatch.setattr(teacher, "evaluate", scripted)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="interrupted at step 9"):
        teacher.main(T(data_dir, out))
    teacher.main(T(data_dir, out, "--resume"))
    summary = json.load(open(out / "teacher_tiny.json"))
    assert (summary["best_val_loss"], summary["final_val_loss"]) == (3.0, 7.0)
    assert load_checkpoint(str(out / "best.pt"), kind="teacher")["step"] == 4


# ------------------------------------------------------------------------------------------------
# Existing runs: a directory holding a run needs --resume or --overwrite; --overwrite replaces it.

@pytest.mark.parametrize("script", ["teacher", "distill"])
def test_overwrite_replaces_the_old_run(tmp_path, data_dir, teacher_ref, distill_ref, monkeypatch,
                                        script):
    """--overwrite deletes the old run's files before the new run writes any: a stage the new
    schedule does not reach leaves no student behind to be taken for this run's."""
    out, at_start = tmp_path / "out", []
    module, ref = (teacher, teacher_ref) if script == "teacher" else (distill, distill_ref)
    shutil.copytree(ref["out"], out)

    def start_run(*args):   # what the directory holds once the run has started
        ckpt = common.start_run(*args)
        at_start.append(sorted(os.listdir(out)))
        return ckpt
    monkeypatch.setattr(module, "start_run", start_run)
    if script == "teacher":
        teacher.main(T(data_dir, out, "--overwrite", "--max_steps", "4"))
        assert max(r["step"] for r in read_log(out / "log.jsonl")) == 4
    else:
        distill.main(D(data_dir, teacher_ref["best"], out, "--overwrite", "--k", "1"))
        assert sorted(os.listdir(out)) == ["distill_tiny.json", "distill_tiny_curve.png",
                                           "last.pt", "log.jsonl", "student_k1.pt"]
        assert max(r["stage"] for r in read_log(out / "log.jsonl")) == 0
    assert at_start == [[]]   # every file of the old run gone before the new run writes one


def test_overwrite_deletes_only_the_old_runs_files(tmp_path, data_dir, teacher_ref):
    """Only a run's own files go: not another kind's, not a folder's results without a run in it,
    not a folder whose name a glob pattern would match (r1 for r[1])."""
    results, r1, rr = tmp_path / "results", tmp_path / "r1", tmp_path / "r[1]"
    results.mkdir()
    for name in ("distill_tiny.json", "teacher_small.json", "notes.txt"):
        (results / name).write_text("kept")
    shutil.copytree(teacher_ref["out"], r1)
    shutil.copytree(teacher_ref["out"], rr)
    (rr / "distill_tiny.json").write_text("kept")
    before = {name: (r1 / name).read_bytes() for name in os.listdir(r1)}
    for out in (results, rr):
        teacher.main(T(data_dir, out, "--overwrite", "--max_steps", "4"))
    assert all((results / name).read_text() == "kept"
               for name in ("distill_tiny.json", "teacher_small.json", "notes.txt"))
    assert (rr / "distill_tiny.json").read_text() == "kept"
    assert {name: (r1 / name).read_bytes() for name in os.listdir(r1)} == before


# ------------------------------------------------------------------------------------------------
# Bad input: one line saying what is wrong and what to do, exit code 2, no traceback.

@pytest.fixture(scope="module")
def bad(tmp_path_factory, data_dir, teacher_ref, distill_ref):
    d = tmp_path_factory.mktemp("bad")
    p = {"data": data_dir, "teacher": teacher_ref["best"], "student": distill_ref["student"],
         "missing": str(d / "nope"), "teacher_run": teacher_ref["out"],
         "distill_run": distill_ref["out"],
         "out": str(d / "out"), "file": str(d / "file.txt")}
    (d / "file.txt").write_text("a regular file")
    (d / "odd").mkdir()
    for name in ("val.bin", "meta.json"):
        shutil.copy(os.path.join(data_dir, name), d / "odd" / name)
    (d / "odd" / "train.bin").write_bytes(b"\x01\x00\x02")
    p["odd"] = str(d / "odd")
    (d / "reordered").mkdir()   # the same ids, another character set: another vocabulary
    for name in ("train.bin", "val.bin"):
        shutil.copy(os.path.join(data_dir, name), d / "reordered" / name)
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    json.dump({**meta, "chars": meta["chars"][::-1]}, open(d / "reordered" / "meta.json", "w"))
    p["reordered"] = str(d / "reordered")
    (d / "garbage.pt").write_bytes(os.urandom(5000))
    p["garbage"] = str(d / "garbage.pt")
    raw = open(teacher_ref["best"], "rb").read()
    (d / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    p["truncated"] = str(d / "truncated.pt")
    ck = torch.load(teacher_ref["best"], weights_only=False)
    del ck["model"][next(iter(ck["model"]))]
    save_checkpoint(str(d / "short.pt"), ck)
    p["short"] = str(d / "short.pt")
    return p


BAD = {
    "data dir missing": (teacher, lambda p: T(p["missing"], p["out"]), r"not found"),
    "data corrupt": (teacher, lambda p: T(p["odd"], p["out"]), r"\.bin"),
    "distill data missing": (distill, lambda p: D(p["missing"], p["teacher"], p["out"]),
                             r"not found"),
    "no teacher": (distill, lambda p: D(p["data"], p["missing"], p["out"]),
                   r"checkpoint .* not found; run teacher.py first"),
    "teacher garbage": (distill, lambda p: D(p["data"], p["garbage"], p["out"]), r"corrupt"),
    "teacher truncated": (distill, lambda p: D(p["data"], p["truncated"], p["out"]), r"corrupt"),
    "teacher short of a weight": (distill, lambda p: D(p["data"], p["short"], p["out"]),
                                  r"corrupt"),
    "student as teacher": (distill, lambda p: D(p["data"], p["student"], p["out"]),
                           r"student checkpoint where a teacher is expected"),
    "teacher dir to distill": (distill, lambda p: D(p["data"], p["teacher"], p["teacher_run"],
                                                    "--overwrite"), r"holds a teacher run"),
    "distill dir to teacher": (teacher, lambda p: T(p["data"], p["distill_run"], "--overwrite"),
                               r"holds a student run"),
    "existing distill run": (distill, lambda p: D(p["data"], p["teacher"], p["distill_run"]),
                             r"already holds a run; pass --resume"),   # it has no best.pt
    "existing run": (teacher, lambda p: T(p["data"], p["teacher_run"]),
                     r"already holds a run; pass --resume .* or --overwrite"),
    "resume and overwrite": (teacher, lambda p: T(p["data"], p["teacher_run"], "--resume",
                                                  "--overwrite"), r"not allowed with .*--resume"),
    "resume without a run": (teacher, lambda p: T(p["data"], p["out"], "--resume"),
                             r"no checkpoint at"),
    "resume with other flags": (teacher, lambda p: T(p["data"], p["teacher_run"], "--resume",
                                                     "--lr", "1e-2"),
                                r"resumed used --lr 0.003; resume with the same flags"),
    "k zero": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--k", "0"),
               r"--k must be at least 1, not 0"),
    "k out of range": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--k", "40"),
                       r"--k 40 is out of range"),
    "empty flag": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--data_dir", ""),
                   r"--data_dir must not be empty"),
    "empty out_dir": (teacher, lambda p: T(p["data"], ""), r"--out_dir must not be empty"),
    "another vocabulary": (distill, lambda p: D(p["reordered"], p["teacher"], p["out"]),
                           r"trained on another vocabulary than .*reordered's"),
    "context past the teacher's": (distill, lambda p: D(p["data"], p["teacher"], p["out"],
                                                        "--block_size", "64"),
                                   r"--block_size 64 exceeds the teacher's block size"),
    "eval tokens past the block": (distill, lambda p: D(p["data"], p["teacher"], p["out"],
                                                        "--eval_tokens", "100000"),
                                   r"--eval_tokens 100000 exceed the teacher's block size"),
    "zero flag": (teacher, lambda p: T(p["data"], p["out"], "--eval_interval", "0"),
                  r"--eval_interval must be at least 1, not 0"),
    "zero k of anchors": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--anchors", "0"),
                          r"--anchors must be at least 1, not 0"),
    "frozen trunk, argmax readout": (distill, lambda p: D(p["data"], p["teacher"], p["out"],
                                                          "--freeze_trunk"),
                                     r"--freeze_trunk \(on in the tiny .*\) needs --recipe cdf"),
    "gumbel, argmax readout": (distill, lambda p: D(p["data"], p["teacher"], p["out"],
                                                    "--coupling", "gumbel"),
                               r"--coupling gumbel needs --recipe cdf or cdf_seq"),
    "learning rate NaN": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--lr", "nan"),
                          r"--lr must be at least 0, not nan"),
    "ema of 1": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--ema", "1"),
                 r"--ema must be below 1"),
    "unknown flag": (teacher, lambda p: T(p["data"], p["out"], "--learning_rate", "1"),
                     r"unrecognized arguments: --learning_rate"),
    "unknown preset": (distill, lambda p: D(p["data"], p["teacher"], p["out"], "--preset", "huge"),
                       r"invalid choice: 'huge'"),
    "heads of an odd width": (teacher, lambda p: T(p["data"], p["out"], "--n_head", "32"),
                              r"multiple of 2 x --n_head \(32\)"),   # 32 / 32 = 1: RoPE needs 2
    "block longer than the data": (teacher, lambda p: T(p["data"], p["out"], "--block_size",
                                                        "100000"), r"shorter than one sequence"),
    "device not supported": (teacher, lambda p: T(p["data"], p["out"], "--device", "mps"),
                             r"--device 'mps' is not supported"),
    "one CUDA device past the last": (teacher, lambda p: T(p["data"], p["out"], "--device",
                                                           f"cuda:{torch.cuda.device_count()}"),
                                      r"is not supported \(\d+ CUDA devices\)"),
    "teacher batch too big": (teacher, lambda p: T(p["data"], p["out"], "--batch_size",
                                                   str(10 ** 12)),
                              r"out of memory; lower the sizes"),
    "distill batch too big": (distill, lambda p: D(p["data"], p["teacher"], p["out"],
                                                   "--batch_size", str(10 ** 12)),
                              r"out of memory; lower the sizes"),
    "out_dir unwritable": (teacher, lambda p: T(p["data"], p["file"] + "/out"), r"cannot write"),
    "student as sample's teacher": (sample, lambda p: ["--teacher", p["student"]],
                                    r"student checkpoint where a teacher is expected"),
    "sample's empty prompt": (sample, lambda p: ["--teacher", p["teacher"], "--student",
                                                 p["student"], "--prompt", ""],
                              r"--prompt must not be empty"),
    "sample out of memory": (sample, lambda p: ["--teacher", p["teacher"], "--student",
                                                p["student"], "--num_samples", str(10 ** 12)],
                             r"out of memory; lower the sizes this run was given"),
    "bench on another vocabulary": (bench, lambda p: ["--teacher", p["teacher"], "--student",
                                                      p["student"], "--no-speed", "--data_dir",
                                                      p["reordered"], "--out_dir", p["out"]],
                                    r"trained on another vocabulary than .*reordered's"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, bad, capsys):
    mod, argv, pattern = BAD[case]
    msg = cli(mod, argv(bad), capsys)
    assert re.search(pattern, msg), msg


def test_bad_input_through_the_real_command_line(bad):
    for script, argv, pattern in (("teacher.py", T(bad["missing"], bad["out"]), r"not found"),
                                  ("distill.py", D(bad["data"], bad["teacher"], bad["out"],
                                                   "--bogus"), r"unrecognized arguments")):
        r = run(script, argv)
        assert r.returncode == 2 and re.search(pattern, error_line(r.stderr)), (script, r.stderr)


def test_a_second_ctrl_c_lets_a_checkpoint_finish(tmp_path):
    """Ctrl-C pressed again while a checkpoint is written: torch.save would turn the interrupt
    into a RuntimeError (a traceback) and lose the save; the press is ignored, the file whole."""
    with common.StopFlag() as stop:
        stop.requested = True   # the first press

        def write(f):
            os.kill(os.getpid(), signal.SIGINT)   # the second, mid-write
            torch.save({"w": torch.ones(3)}, f)
        try:
            common.atomic_write(str(tmp_path / "last.pt"), write)
        except KeyboardInterrupt:
            pytest.fail("the second press interrupted the save")
        with pytest.raises(KeyboardInterrupt):   # outside a save it stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Python's, once more
    assert torch.equal(torch.load(tmp_path / "last.pt")["w"], torch.ones(3))


def test_a_log_that_cannot_be_written_is_one_line(tmp_path):
    log = common.JsonlLog(str(tmp_path / "log.jsonl"), 0, True)
    os.remove(log.path)
    os.mkdir(log.path)   # (as a full disk would, open or write fails)
    with pytest.raises(UserError, match="cannot write .*log.jsonl") as e:
        log.write(step=1)
    assert "\n" not in str(e.value)


def test_load_checkpoint_refuses_the_wrong_kind(teacher_ref, distill_ref):
    with pytest.raises(UserError, match="teacher checkpoint where a student is expected"):
        common.load_checkpoint(teacher_ref["best"], kind="student")


def test_a_weight_of_another_shape_is_a_corrupt_checkpoint(teacher_ref, tmp_path):
    """Every weight named as its model_config's, one of another shape: refused in one line, not a
    load_state_dict traceback later."""
    ck = torch.load(teacher_ref["best"], weights_only=False)
    name = next(n for n, t in ck["model"].items() if t.dim() == 2)
    ck["model"][name] = ck["model"][name][:, :-1].clone()
    save_checkpoint(str(tmp_path / "odd.pt"), ck)
    with pytest.raises(UserError, match="corrupt or not from this version of this project"):
        load_checkpoint(str(tmp_path / "odd.pt"), kind="teacher")


def test_a_last_pt_of_an_older_version_is_refused_in_one_line(teacher_ref, tmp_path):
    """last.pt's weight average, as versions before the update number was passed in saved it
    ({"model": ..., "updates": n}; None without one), is refused, not a traceback at the resume."""
    ck = torch.load(os.path.join(teacher_ref["out"], "last.pt"), weights_only=False)
    assert load_checkpoint(os.path.join(teacher_ref["out"], "last.pt"), kind="teacher")
    for old in ({"model": ck["ema"], "updates": 16}, None):
        save_checkpoint(str(tmp_path / "old.pt"), {**ck, "ema": old})
        with pytest.raises(UserError, match="corrupt or not from this version"):
            load_checkpoint(str(tmp_path / "old.pt"), kind="teacher")


def another(f, value):   # another valid value of the config field f
    if f.type is bool:
        return not value
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != value)
    return value + "x" if f.type is str else value + 1 if f.type is int else value + 0.01


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_a_resume_may_change_only_the_run_flags(kind, teacher_ref, distill_ref):
    """Each flag changed on its own: where the run lives and how often it logs and saves may
    change; every other flag is refused by name (--max_steps would move the learning-rate
    schedule, --seed the batches)."""
    out = (teacher_ref if kind == "teacher" else distill_ref)["out"]
    cls = teacher.TeacherConfig if kind == "teacher" else distill.DistillConfig
    base = cls(**load_checkpoint(os.path.join(out, "last.pt"), kind)["train_config"])
    allowed = {"out_dir", "device", "compile"} | (
        {"log_interval", "ckpt_interval", "curve_interval"} if kind == "student" else set())
    args, rt = SimpleNamespace(resume=True, overwrite=False), SimpleNamespace(master=True)
    for f in dataclasses.fields(cls):
        cfg = dataclasses.replace(base, **{f.name: another(f, getattr(base, f.name))})
        if f.name in allowed:
            assert common.start_run(out, kind, args, cfg, rt), f.name
        else:
            with pytest.raises(UserError, match=f"used --{f.name} "):
                common.start_run(out, kind, args, cfg, rt)
