"""Reliability of teacher.py / distill.py / sample.py (issue 5): runs killed with SIGKILL or stopped with
Ctrl-C resume exactly, checkpoints are never half-written, DDP under torchrun matches one process, and every
bad input is one line, a non-zero exit, no traceback and nothing overwritten.

CPU only, tiny models on a small corpus built here (data/offline is not needed), about a minute on 2 cores.
Run: python -m pytest tests/test_reliability.py -q"""

import dataclasses
import fcntl
import hashlib
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import distill  # noqa: E402
import model  # noqa: E402
import sample  # noqa: E402
import teacher  # noqa: E402
from common import OldRun, UserError, load_checkpoint, run_cli, save_checkpoint  # noqa: E402
from prepare_data import get_encoding  # noqa: E402

TEXT = """The river ran past the old mill and under the stone bridge.
Children played in the fields until the evening bell rang.
A merchant came to town with silk, spices and news from the coast.
The council met on Tuesday to argue about the price of bread.
Rain fell for three days, and the road to the north was closed.
She wrote a letter to her brother, who had gone to sea in the spring.
In the library the clocks ticked and the pages turned slowly.
The baker rose before dawn, as his father had done before him.
Soldiers marched through the square, and nobody cheered.
By winter the harvest was stored and the granary doors were locked."""

# Tiny shapes: the GPT-2 vocabulary (50257) is fixed and its LM head dominates CPU time.
TEACHER = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
           "--dropout", "0", "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "4", "--eval_iters", "1",
           "--seed", "7", "--ema", "0.9", "--device", "cpu"]   # with an average: a resume must restore it too
TEACHER_REF = TEACHER + ["--max_steps", "16", "--eval_interval", "4"]
DISTILL = ["--block_size", "32", "--batch_size", "4", "--anchors", "4", "--eval_samples", "4",
           "--eval_tokens", "8", "--prompt_len", "4", "--lr", "1e-3", "--warmup_steps", "2", "--log_interval", "1",
           "--ckpt_interval", "2", "--curve_interval", "3", "--schedule", "1,2", "--k", "2", "--seed", "7", "--ema",
           "0.9", "--device", "cpu"]   # learning-curve points at steps 0, 3, 6 and 8 of each stage, across the resumes
DISTILL_REF = DISTILL + ["--steps_per_stage", "8"]
EXACT = 1e-6   # resumed vs uninterrupted losses on CPU fp32: the same arithmetic in the same order
DDP_TOL = 1e-4  # 2 processes vs 1: only the order of float reductions (gradient all-reduce) differs
# One thread everywhere (this process and the runs it starts): the same float arithmetic in all of them,
# and no thread oversubscription on a small, shared machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------
# helpers

def read_log(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:   # a line being written right now
                    pass
    return rows


def numbers(rows):
    """The logged numbers that must reproduce (not the timing: tok_s)."""
    return [{k: v for k, v in r.items() if k != "tok_s"} for r in rows]


def assert_same_log(got, want, tol):
    got, want = numbers(got), numbers(want)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for key in w:
            a, b = np.atleast_1d(np.asarray(g[key], dtype=float)), np.atleast_1d(np.asarray(w[key], dtype=float))
            assert np.allclose(a, b, rtol=0, atol=tol), (key, g, w)


STAGE_TIMING = ("steps_per_s", "tokens_per_s", "slots_per_s")   # a distill summary's timings of a stage


def stages_but_timing(res_dir):
    """The stages of a distill summary, without their timings (which no two runs share)."""
    stages = json.load(open(os.path.join(res_dir, "distill_tiny.json")))["stages"]
    return [{key: v for key, v in s.items() if key not in STAGE_TIMING} for s in stages]


def assert_same_weights(got, want):
    got, want = torch.load(got, weights_only=False)["model"], torch.load(want, weights_only=False)["model"]
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=EXACT)


def start(script, argv, tmp_path, name):
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen([sys.executable, script, *argv], cwd=REPO, stdout=out, stderr=err, text=True, env=ENV)


def wait_for(proc, log, pred, timeout=120):
    """Poll log.jsonl until a row satisfies pred; the run must still be going."""
    deadline = time.time() + timeout
    while not any(pred(r) for r in read_log(log)):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the point to stop it at"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def run(script, argv, timeout=180):
    return subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def error_line(stderr):
    """The one message a bad input may print: no traceback, and nothing else on stderr but progress bars."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not re.search(r"\d+%\|", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def cli(mod, argv, capsys):
    """Run a script's main exactly as its __main__ does (through run_cli) and return its one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: mod.main(argv))
    assert e.value.code == 2
    return error_line(capsys.readouterr().err)


def snapshot(*dirs):
    """Content and mtime of every file under dirs: to prove that nothing was rewritten."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                out[p] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


# ----------------------------------------------------------------------------------------------------
# fixtures: a small corpus, a reference teacher run and a reference distill run (uninterrupted, in-process)

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    enc = get_encoding()
    sents = [enc.encode_ordinary(s + "\n") for s in TEXT.splitlines()]
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("data")
    for split, n in (("train", 20_000), ("val", 4_000)):
        toks = []
        while len(toks) < n:
            toks += sents[rng.integers(len(sents))]
        np.array(toks, dtype=np.uint16).tofile(d / f"{split}.bin")
    return str(d)


@pytest.fixture(scope="module")
def teacher_ref(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("teacher_ref")
    out = str(tmp / "out")
    teacher.main(TEACHER_REF + ["--data_dir", data_dir, "--out_dir", out, "--results_dir", str(tmp / "res")])
    return {"out": out, "res": str(tmp / "res"), "log": read_log(os.path.join(out, "log.jsonl")),
            "best": os.path.join(out, "best.pt")}


@pytest.fixture(scope="module")
def distill_ref(tmp_path_factory, data_dir, teacher_ref):
    tmp = tmp_path_factory.mktemp("distill_ref")
    out = str(tmp / "out")
    distill.main(DISTILL_REF + ["--teacher", teacher_ref["best"], "--data_dir", data_dir, "--out_dir", out,
                                "--results_dir", str(tmp / "res")])
    return {"out": out, "res": str(tmp / "res"), "log": read_log(os.path.join(out, "log.jsonl")),
            "student": os.path.join(out, "student_k2.pt"), "student1": os.path.join(out, "student_k1.pt")}


def teacher_args(data_dir, out, tmp_path):
    return TEACHER_REF + ["--data_dir", data_dir, "--out_dir", str(out), "--results_dir", str(tmp_path / "res")]


def distill_args(data_dir, teacher_ckpt, out, tmp_path):
    return DISTILL_REF + ["--teacher", teacher_ckpt, "--data_dir", data_dir, "--out_dir", str(out),
                          "--results_dir", str(tmp_path / "res")]


# ----------------------------------------------------------------------------------------------------
# Resume: SIGKILL at an arbitrary moment, then --resume, reproduces the uninterrupted run's log exactly.

def test_teacher_sigkill_resume_matches_uninterrupted(tmp_path, data_dir, teacher_ref, capsys):
    out = tmp_path / "out"
    argv = teacher_args(data_dir, out, tmp_path)
    p = start("teacher.py", argv, tmp_path, "killed")
    wait_for(p, out / "log.jsonl", lambda r: r.get("step", 0) >= 10)   # last.pt of step 8 is complete
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(str(out / "last.pt"), kind="teacher")["step"]
    assert 8 <= killed_at < 16
    # rows past the checkpoint, to be dropped: the run's own (how many depends on when the kill landed), one more
    # whatever the timing, and one torn by the kill in the middle of a write
    with open(out / "log.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": killed_at + 1, "loss": 1.0}) + '\n{"step": 15, "loss": 7.')
    teacher.main(argv + ["--resume"])   # in this process: the resume, not a process start, is under test
    assert f"resuming at step {killed_at}" in capsys.readouterr().out
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)
    assert_same_weights(out / "best.pt", teacher_ref["best"])   # the average, carried across the kill


def test_distill_sigkill_mid_stage_resume_matches_uninterrupted(tmp_path, data_dir, teacher_ref, distill_ref):
    out = tmp_path / "out"
    argv = distill_args(data_dir, teacher_ref["best"], out, tmp_path)
    p = start("distill.py", argv, tmp_path, "killed")
    # stage 2 (k = 2) is global steps 9..16 with checkpoints at 10, 12, 14: stop after the one at 10
    wait_for(p, out / "log.jsonl", lambda r: r.get("stage") == 1 and r["step"] >= 11 and "loss" in r)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    ck = load_checkpoint(str(out / "last.pt"), kind="student")
    assert ck["stage"] == 1 and ck["optimizer"] is not None and 10 <= ck["global_step"] < 16
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)
    assert_same_weights(out / "student_k2.pt", distill_ref["student"])   # the stage's average, across the kill
    assert stages_but_timing(tmp_path / "res") == stages_but_timing(distill_ref["res"])   # learning curves included


def test_overwrite_leaves_no_checkpoint_of_the_old_run(tmp_path, data_dir, teacher_ref, distill_ref):
    """--overwrite deletes the old run's files by the new run's first checkpoint (and whatever an overwrite killed
    earlier left set aside): a stage that the new schedule does not reach leaves no student behind for sample.py and
    bench.py to take for this run's."""
    out = tmp_path / "out"
    shutil.copytree(distill_ref["out"], out)   # a finished k = 1 -> 2 run
    shutil.copy(out / "student_k2.pt", out / "student_k4.pt.replaced")   # set aside by an overwrite killed early
    (out / "distill_tiny_curve.png").write_bytes(b"the old run's learning curve, where its summary went")
    distill.main(distill_args(data_dir, teacher_ref["best"], out, tmp_path) + ["--overwrite", "--k", "1",
                                                                               "--schedule", "1"])
    assert sorted(os.listdir(out)) == [".lock", "last.pt", "log.jsonl", "student_k1.pt"]
    assert max(r["stage"] for r in read_log(out / "log.jsonl")) == 0


def test_each_stage_warms_up_then_holds_its_learning_rate(distill_ref):
    """distill.py's schedule, as the paper's k = 4 stage ran (constant lr), after a warmup that each stage repeats:
    the learning rate each step of the reference run used, from its log (--warmup_steps 2, --lr 1e-3)."""
    for stage in (0, 1):
        lrs = [r["lr"] for r in distill_ref["log"] if r.get("stage") == stage and "loss" in r]
        assert lrs == pytest.approx([5e-4] + [1e-3] * 7)


def test_distill_resume_between_stages(tmp_path, data_dir, teacher_ref, distill_ref, capsys):
    """A kill right after stage 1's final checkpoint: last.pt then equals student_k1.pt (it is written the
    same way) and student_k2.pt does not exist yet. The resume must start stage 2 afresh."""
    out = tmp_path / "out"
    shutil.copytree(distill_ref["out"], out)
    shutil.copy(out / "student_k1.pt", out / "last.pt")
    os.remove(out / "student_k2.pt")
    capsys.readouterr()
    distill.main(distill_args(data_dir, teacher_ref["best"], out, tmp_path) + ["--resume"])
    stdout = capsys.readouterr().out
    assert "stage 2/2" in stdout and "stage 1/2" not in stdout
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)
    assert os.path.exists(out / "student_k2.pt")


# ----------------------------------------------------------------------------------------------------
# Ctrl-C: saves a checkpoint, exits non-zero with one line, and --resume continues exactly.

def test_teacher_ctrl_c_saves_and_resumes(tmp_path, data_dir, teacher_ref):
    out = tmp_path / "out"
    argv = teacher_args(data_dir, out, tmp_path)
    p = start("teacher.py", argv, tmp_path, "sigint")
    wait_for(p, out / "log.jsonl", lambda r: r.get("step", 0) >= 5)
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(timeout=60) == 2
    msg = error_line((tmp_path / "sigint.err").read_text())
    step = int(re.search(r"interrupted at step (\d+)", msg).group(1))
    assert "--resume" in msg and 5 <= step < 16
    assert load_checkpoint(str(out / "last.pt"), kind="teacher")["step"] == step   # saved on the way out
    teacher.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)


def ctrl_c_in_evaluation(monkeypatch, module, n, losses=None):
    """module.evaluate, patched: Ctrl-C during its n-th call; it returns losses[i] at call i if given."""
    calls, real = [], module.evaluate

    def evaluate(*args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return losses[len(calls) - 1] if losses else real(*args)
    monkeypatch.setattr(module, "evaluate", evaluate)


def test_teacher_resume_keeps_the_best_so_far(tmp_path, data_dir, monkeypatch):
    """best.pt and the summary's best val loss count the evaluations made before a resume too."""
    out = tmp_path / "out"
    argv = TEACHER + ["--max_steps", "12", "--eval_interval", "4", "--data_dir", data_dir, "--out_dir", str(out),
                      "--results_dir", str(out)]
    ctrl_c_in_evaluation(monkeypatch, teacher, 3, [3.0, 2.0, 1.0])   # steps 0, 4 and 8, each better
    with pytest.raises(UserError, match="interrupted at step 8"):
        teacher.main(argv)
    monkeypatch.setattr(teacher, "evaluate", lambda *args: 5.0)   # worse after the resume
    teacher.main(argv + ["--resume"])
    assert load_checkpoint(str(out / "best.pt"), kind="teacher")["step"] == 8
    assert json.loads((out / "teacher_tiny.json").read_text())["best_val_loss"] == 1.0


def test_teacher_resume_with_dropout_repeats_its_masks(tmp_path, data_dir, monkeypatch):
    """With dropout, a resumed run draws the dropout masks an uninterrupted one draws (the global RNG is restored):
    the same losses."""
    def argv(out):
        return TEACHER + ["--dropout", "0.2", "--max_steps", "8", "--eval_interval", "4", "--data_dir", data_dir,
                          "--out_dir", str(out), "--results_dir", str(out)]
    teacher.main(argv(tmp_path / "ref"))
    ctrl_c_in_evaluation(monkeypatch, teacher, 2)   # at step 4
    with pytest.raises(UserError, match="interrupted at step 4"):
        teacher.main(argv(tmp_path / "out"))
    monkeypatch.undo()
    teacher.main(argv(tmp_path / "out") + ["--resume"])
    assert_same_log(read_log(tmp_path / "out" / "log.jsonl"), read_log(tmp_path / "ref" / "log.jsonl"), EXACT)


def test_grad_accum_splits_the_same_batch(tmp_path, data_dir):
    """--grad_accum 2 of half the batch takes the steps that one whole batch takes (the loss averaged, not summed):
    the same training losses (the val loss is not compared: its batches have --batch_size sequences)."""
    logs = []
    for batch, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"accum{accum}"
        teacher.main(TEACHER + ["--batch_size", str(batch), "--grad_accum", str(accum), "--max_steps", "4",
                                "--eval_interval", "4", "--data_dir", data_dir, "--out_dir", str(out),
                                "--results_dir", str(out)])
        logs.append([r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r])
    assert len(logs[0]) == 4 and np.allclose(logs[1], logs[0], rtol=0, atol=DDP_TOL), logs


def test_distill_ctrl_c_saves_and_resumes(tmp_path, data_dir, teacher_ref, distill_ref):
    out = tmp_path / "out"
    argv = distill_args(data_dir, teacher_ref["best"], out, tmp_path)
    p = start("distill.py", argv, tmp_path, "sigint")
    wait_for(p, out / "log.jsonl", lambda r: r.get("step", 0) >= 3 and "loss" in r)
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(timeout=60) == 2
    msg = error_line((tmp_path / "sigint.err").read_text())
    m = re.search(r"interrupted in stage k=(\d) at step (\d+)", msg)
    assert m and "--resume" in msg
    ck = load_checkpoint(str(out / "last.pt"), kind="student")
    assert ck["model_config"]["max_k"] == int(m.group(1)) and ck["step"] == int(m.group(2))
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)


def at_stage_end(out, last_step):
    """Whether the run in out has logged the training step that ends a stage and no evaluation after it: an
    evaluation now is the stage's last (the learning curve's earlier points come after other steps)."""
    rows = read_log(out / "log.jsonl")
    return bool(rows) and rows[-1]["step"] == last_step and "loss" in rows[-1]


def test_distill_ctrl_c_during_evaluation_stops_after_the_stage(tmp_path, data_dir, teacher_ref, distill_ref,
                                                                monkeypatch):
    """A Ctrl-C that lands in an end-of-stage evaluation stops the run right after that stage is saved, instead
    of starting the next stage; --resume then starts the next stage afresh."""
    window_agreement = distill.window_agreement
    out = tmp_path / "out"

    def interrupted(*a, **kw):
        if at_stage_end(out, 8):
            os.kill(os.getpid(), signal.SIGINT)   # Python runs the StopFlag handler in this thread, at once
        return window_agreement(*a, **kw)
    monkeypatch.setattr(distill, "window_agreement", interrupted)
    argv = distill_args(data_dir, teacher_ref["best"], out, tmp_path)
    with pytest.raises(UserError, match=r"interrupted after stage k=1; .*--resume"):
        distill.main(argv)
    assert load_checkpoint(str(out / "last.pt"), kind="student")["stage"] == 1
    assert os.path.exists(out / "student_k1.pt") and not os.path.exists(out / "student_k2.pt")
    monkeypatch.undo()
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)


def test_distill_error_in_end_of_stage_evaluation_loses_no_training(tmp_path, data_dir, teacher_ref, distill_ref,
                                                                   monkeypatch):
    """The stage's training is saved before its evaluations run: after an error there (out of memory, say) a resume
    trains nothing again and reports the stage's last losses and its speed as the uninterrupted run did."""
    window_agreement = distill.window_agreement
    out = tmp_path / "out"

    def fails_in_stage_2(*a, **kw):
        if at_stage_end(out, 16):
            raise RuntimeError("an error in the evaluation")
        return window_agreement(*a, **kw)
    monkeypatch.setattr(distill, "window_agreement", fails_in_stage_2)
    argv = distill_args(data_dir, teacher_ref["best"], out, tmp_path)
    with pytest.raises(RuntimeError, match="an error in the evaluation"):
        distill.main(argv)
    ck = load_checkpoint(str(out / "last.pt"), kind="student")
    assert ck["stage"] == 1 and ck["step"] == 8 and ck["optimizer"] is not None
    monkeypatch.undo()
    trained = []
    monkeypatch.setattr(distill, "rollout_targets", lambda *a: trained.append(1))
    distill.main(argv + ["--resume"])
    assert not trained
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)
    assert stages_but_timing(tmp_path / "res") == stages_but_timing(distill_ref["res"])
    got = json.load(open(tmp_path / "res" / "distill_tiny.json"))["stages"]
    assert all(s[key] is not None for s in got for key in STAGE_TIMING)


def test_distill_failure_after_the_end_of_stage_evaluations_logs_them_once(tmp_path, data_dir, teacher_ref,
                                                                          distill_ref, monkeypatch):
    """A stage's evaluations log their rows at the step of its last checkpoint with an optimizer: a run that stops
    after them but before the stage's final checkpoint (here the disk fails writing student_k1.pt) resumes from that
    checkpoint, evaluates again, and its log holds each row once."""
    save = distill.save_checkpoint

    def disk_fails(path, ckpt):
        if path.endswith("student_k1.pt"):
            raise OSError("no space left on device")
        save(path, ckpt)
    monkeypatch.setattr(distill, "save_checkpoint", disk_fails)
    out = tmp_path / "out"
    argv = distill_args(data_dir, teacher_ref["best"], out, tmp_path)
    with pytest.raises(OSError):
        distill.main(argv)
    assert [r for r in read_log(out / "log.jsonl") if "agreement" in r]   # stage 1's rows were written
    monkeypatch.undo()
    distill.main(argv + ["--resume"])
    assert_same_log(read_log(out / "log.jsonl"), distill_ref["log"], EXACT)
    assert stages_but_timing(tmp_path / "res") == stages_but_timing(distill_ref["res"])


def test_resume_from_a_checkpoint_of_an_older_version(tmp_path, data_dir, teacher_ref, distill_ref):
    """A mid-stage last.pt written before the learning curve and the log's row count existed still resumes, to the
    same student."""
    out = tmp_path / "out"
    argv = distill_args(data_dir, teacher_ref["best"], out, tmp_path)
    p = start("distill.py", argv, tmp_path, "old")
    wait_for(p, out / "log.jsonl", lambda r: r.get("stage") == 1 and r["step"] >= 11 and "loss" in r)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ck = torch.load(out / "last.pt", weights_only=False)
    del ck["log_rows"], ck["stage_stats"]["curve"]
    save_checkpoint(str(out / "last.pt"), ck)
    distill.main(argv + ["--resume"])
    assert_same_weights(out / "student_k2.pt", distill_ref["student"])
    assert json.load(open(tmp_path / "res" / "distill_tiny.json"))["stages"][1]["curve"]


# ----------------------------------------------------------------------------------------------------
# Checkpoint files are never half-written.

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
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-last.pt")], "no temporary file in progress"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert path.read_bytes() == b"the previous checkpoint"


def test_checkpoint_write_error_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), {"step": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(str(path), {"step": 2, "x": Boom()})
    assert torch.load(path)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


# ----------------------------------------------------------------------------------------------------
# NaN / inf loss: stop, keep the last good checkpoint, name the step.

def test_teacher_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, teacher_ref, monkeypatch):
    forward, calls = model.GPT.forward, [0]

    def nan_from_step_7(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] >= 7:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(model.GPT, "forward", nan_from_step_7)
    out = tmp_path / "out"
    argv = teacher_args(data_dir, out, tmp_path)
    with pytest.raises(UserError, match=r"loss became nan at step 7;.*last good checkpoint"):
        teacher.main(argv)
    assert load_checkpoint(str(out / "last.pt"), kind="teacher")["step"] == 4   # the eval at 4; 8 never came
    assert read_log(out / "log.jsonl")[-1]["step"] == 6                       # the NaN step is not logged
    assert not os.path.exists(tmp_path / "res" / "teacher_tiny.json")         # no result from a failed run
    monkeypatch.undo()
    teacher.main(argv + ["--resume"])   # the kept checkpoint is the good step-4 state: the run goes on exactly
    assert_same_log(read_log(out / "log.jsonl"), teacher_ref["log"], EXACT)


def test_distill_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, teacher_ref, monkeypatch):
    staircase, calls = model.GPT.forward_staircase, [0]

    def nan_from_step_3(self, *a, **kw):
        logits = staircase(self, *a, **kw)
        if self.training:   # the student's training pass, not the targets' rollout
            calls[0] += 1
            if calls[0] >= 3:
                logits = logits * float("nan")
        return logits
    monkeypatch.setattr(model.GPT, "forward_staircase", nan_from_step_3)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"loss became nan at step 3;.*last good checkpoint"):
        distill.main(distill_args(data_dir, teacher_ref["best"], out, tmp_path))
    ck = load_checkpoint(str(out / "last.pt"), kind="student")
    assert ck["global_step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


# ----------------------------------------------------------------------------------------------------
# DDP: 2 processes (gloo on CPU) give the losses of 1 process with the same global batch.

def test_error_line_is_one_write(monkeypatch):
    """Ranks that fail together share stderr: a line written in two pieces splices into the other rank's line."""
    def fail():
        raise UserError("in use")

    writes = []
    monkeypatch.setattr(sys, "stderr", type("Pipe", (), {"write": lambda self, s: writes.append(s)})())
    with pytest.raises(SystemExit):
        run_cli(fail)
    assert writes == ["error: in use\n"]


def torchrun(script, argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *argv], cwd=REPO, capture_output=True, text=True, timeout=240, env=ENV)


def test_ddp_two_processes_match_one(tmp_path, data_dir, teacher_ref):
    t1 = TEACHER + ["--max_steps", "5", "--eval_interval", "5", "--grad_accum", "2", "--data_dir", data_dir,
                    "--results_dir", str(tmp_path / "res")]   # grad_accum 2: the no_sync micro-batches too
    teacher.main(t1 + ["--out_dir", str(tmp_path / "t1")])
    r = torchrun("teacher.py", t1 + ["--out_dir", str(tmp_path / "t2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2," in r.stdout   # really 2 processes
    one, two = read_log(tmp_path / "t1" / "log.jsonl"), read_log(tmp_path / "t2" / "log.jsonl")
    assert len(one) == 7 and all(math.isfinite(r.get("loss", 0)) for r in one)
    assert_same_log(two, one, DDP_TOL)

    d1 = DISTILL + ["--steps_per_stage", "3", "--teacher", teacher_ref["best"], "--data_dir", data_dir,
                    "--results_dir", str(tmp_path / "res")]
    distill.main(d1 + ["--out_dir", str(tmp_path / "d1")])
    r = torchrun("distill.py", d1 + ["--out_dir", str(tmp_path / "d2")])
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_log(tmp_path / "d1" / "log.jsonl"), read_log(tmp_path / "d2" / "log.jsonl")
    assert sum("loss" in r for r in one) == 6
    assert_same_log(two, one, DDP_TOL)
    assert json.load(open(tmp_path / "res" / "distill_tiny.json"))["world_size"] == 2

    # a directory in use: every rank stops with the same one line (not rank 1 dying on a closed connection)
    fd = os.open(tmp_path / "d2" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as a run still going would
    try:
        r = torchrun("distill.py", d1 + ["--out_dir", str(tmp_path / "d2"), "--resume"])
    finally:
        os.close(fd)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]   # (torchrun then reports both exits)
    assert r.returncode != 0 and len(errors) == 2 and len(set(errors)) == 1, r.stderr[-3000:]
    assert "in use by another run" in errors[0] and "Connection closed" not in r.stderr, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------
# Bad input: one line saying what is wrong and what to do, exit code 2, no traceback, nothing overwritten.

@pytest.fixture(scope="module")
def bad(tmp_path_factory, data_dir, teacher_ref, distill_ref):
    """Broken files of every kind next to the good ones."""
    d = tmp_path_factory.mktemp("bad")
    paths = {"data": data_dir, "teacher": teacher_ref["best"], "student": distill_ref["student"],
             "missing": str(d / "nope"), "file": str(d / "file.txt")}
    (d / "file.txt").write_text("a regular file")
    for name, train in (("empty", b""), ("odd", b"\x01\x00\x02"),
                        ("big_ids", np.full(1000, 60000, dtype=np.uint16).tobytes())):
        (d / name).mkdir()
        (d / name / "train.bin").write_bytes(train)
        shutil.copy(os.path.join(data_dir, "val.bin"), d / name / "val.bin")
        paths[name] = str(d / name)
    (d / "garbage.pt").write_bytes(os.urandom(5000))
    paths["garbage"] = str(d / "garbage.pt")
    raw = open(teacher_ref["best"], "rb").read()
    (d / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    paths["truncated"] = str(d / "truncated.pt")
    ck = torch.load(teacher_ref["best"], weights_only=False)
    ck["model_config"]["vocab_size"] = 1000
    save_checkpoint(str(d / "vocab1000.pt"), ck)
    paths["vocab"] = str(d / "vocab1000.pt")
    ck["model_config"].update(vocab_size=50257, block_size=16)   # loads, but no student was distilled from it
    save_checkpoint(str(d / "block16.pt"), ck)
    paths["block16"] = str(d / "block16.pt")
    ck["model_config"]["block_size"] = 32
    ck["best_val"] += 0.01   # the same shape trained again (to the same step): its old students are not its students
    save_checkpoint(str(d / "retrained.pt"), ck)
    paths["retrained"] = str(d / "retrained.pt")
    del ck["model"][next(iter(ck["model"]))]   # a weight short of its config
    save_checkpoint(str(d / "missing_weight.pt"), ck)
    paths["missing_weight"] = str(d / "missing_weight.pt")
    (d / "data_parent").mkdir()   # a folder of datasets, not a dataset
    os.symlink(data_dir, d / "data_parent" / "offline")
    paths["data_parent"] = str(d / "data_parent")
    (d / "corrupt_run").mkdir()
    (d / "corrupt_run" / "last.pt").write_bytes(raw[:1000])
    paths["corrupt_run"] = str(d / "corrupt_run")
    paths["out"] = str(d / "out")
    paths["res"] = str(d / "res")
    return paths


def T(p, *extra):   # teacher flags with everything valid but what extra overrides
    return TEACHER_REF + ["--data_dir", p["data"], "--out_dir", p["out"], "--results_dir", p["res"]] + list(extra)


def D(p, *extra):
    return DISTILL_REF + ["--teacher", p["teacher"], "--data_dir", p["data"], "--out_dir", p["out"],
                          "--results_dir", p["res"]] + list(extra)


def S(p, *extra):
    return ["--teacher", p["teacher"], "--student", p["student"], "--prompt", "The river", "--max_new_tokens", "4",
            "--num_samples", "2", "--device", "cpu"] + list(extra)


BAD = {
    # data
    "data dir missing": (teacher, lambda p: T(p, "--data_dir", p["missing"]), r"not found.*prepare_data\.py"),
    "data empty .bin": (teacher, lambda p: T(p, "--data_dir", p["empty"]), r"train\.bin is empty; rebuild"),
    "data odd-sized .bin": (teacher, lambda p: T(p, "--data_dir", p["odd"]), r"corrupt.*rebuild"),
    "data ids past vocab": (teacher, lambda p: T(p, "--data_dir", p["big_ids"]), r"corrupt.*not GPT-2 tokens"),
    "data dir one level up": (teacher, lambda p: T(p, "--data_dir", p["data_parent"]),
                              r"holds no dataset itself but offline: pass --data_dir .*data_parent/offline"),
    "distill data missing": (distill, lambda p: D(p, "--data_dir", p["missing"]), r"not found"),
    # checkpoints
    "teacher ckpt missing": (distill, lambda p: D(p, "--teacher", p["missing"]), r"checkpoint .* not found"),
    "sample ckpt missing": (sample, lambda p: S(p, "--teacher", p["missing"]), r"checkpoint .* not found"),
    "teacher ckpt garbage": (distill, lambda p: D(p, "--teacher", p["garbage"]), r"is corrupt or not from"),
    "teacher ckpt truncated": (distill, lambda p: D(p, "--teacher", p["truncated"]), r"is corrupt or not from"),
    "resume from corrupt last.pt": (teacher, lambda p: T(p, "--out_dir", p["corrupt_run"], "--resume"),
                                    r"is corrupt or not from"),
    "resume without a run": (teacher, lambda p: T(p, "--resume"), r"no checkpoint at .*without --resume"),
    "student as distill teacher": (distill, lambda p: D(p, "--teacher", p["student"]),
                                   r"student checkpoint where a teacher is expected; pass an AR"),
    "student as sample teacher": (sample, lambda p: S(p, "--teacher", p["student"]),
                                  r"student checkpoint where a teacher is expected"),
    "teacher as sample student": (sample, lambda p: S(p, "--student", p["teacher"]),
                                  r"teacher checkpoint where a student is expected; pass a student_k"),
    "sample ckpt garbage": (sample, lambda p: S(p, "--student", p["garbage"]), r"is corrupt or not from"),
    "other vocabulary (distill)": (distill, lambda p: D(p, "--teacher", p["vocab"]), r"vocabulary of 1000 tokens"),
    "other vocabulary (sample)": (sample, lambda p: S(p, "--teacher", p["vocab"]), r"vocabulary of 1000 tokens"),
    "student of another teacher": (sample, lambda p: S(p, "--teacher", p["block16"]),
                                   r"was not distilled from .*block_size 32 vs 16"),
    "student of a retrained teacher": (sample, lambda p: S(p, "--teacher", p["retrained"]),
                                       r"was not distilled from .*trained again since"),
    "ckpt short of a weight": (sample, lambda p: S(p, "--teacher", p["missing_weight"]),
                               r"weights do not match its model_config"),
    "sample teacher_only with k": (sample, lambda p: S(p, "--teacher_only", "--k", "2"),
                                   r"--teacher_only samples no student"),
    # k
    "sample k above max_k": (sample, lambda p: S(p, "--k", "3"),
                             r"--k must be between 1 and the student's max_k \(2\)"),
    "sample k zero": (sample, lambda p: S(p, "--k", "0"), r"--k must be between 1 and"),
    "sample k negative": (sample, lambda p: S(p, "--k", "-2"), r"--k must be between 1 and"),
    "distill k zero": (distill, lambda p: D(p, "--k", "0", "--schedule", ""), r"--k must be at least 1, not 0"),
    "distill k negative": (distill, lambda p: D(p, "--k", "-3", "--schedule", ""), r"--k must be at least 1"),
    "distill schedule not reaching k": (distill, lambda p: D(p, "--k", "4"), r"must rise strictly from 1 to --k 4"),
    "distill eval tokens below k": (distill, lambda p: D(p, "--eval_tokens", "1"),
                                    r"--eval_tokens 1 must be at least --k \(2\): the agreement decodes whole"),
    # prompts
    "prompt empty": (sample, lambda p: S(p, "--prompt", ""), r"--prompt is empty"),
    "prompt longer than block": (sample, lambda p: S(p, "--prompt", "the river " * 40),
                                 r"exceed the block size 32; shorten"),
    # flags
    "unknown preset": (teacher, lambda p: T(p, "--preset", "huge"), r"invalid choice: 'huge'.*--help"),
    "unknown flag": (teacher, lambda p: T(p, "--learning_rate", "1"), r"unrecognized arguments: --learning_rate"),
    "bad flag value": (teacher, lambda p: T(p, "--max_steps", "ten"), r"invalid int value: 'ten'"),
    "flag below its minimum": (teacher, lambda p: T(p, "--eval_interval", "0"),
                               r"--eval_interval must be at least 1, not 0"),
    "negative learning rate": (distill, lambda p: D(p, "--lr", "-1"), r"--lr must be at least 0, not -1.0"),
    "infinite learning rate": (teacher, lambda p: T(p, "--lr", "inf"), r"--lr must be a finite number, not inf"),
    "ema nan": (teacher, lambda p: T(p, "--ema", "nan"), r"--ema must be a finite number, not nan"),
    "ema of 1": (distill, lambda p: D(p, "--ema", "1"), r"--ema must be below 1, not 1.0"),
    "adam beta above 1": (teacher, lambda p: T(p, "--beta1", "2"), r"--beta1 must be below 1.0, not 2.0"),
    "seed too large": (teacher, lambda p: T(p, "--seed", str(10 ** 20)), r"--seed must be below"),
    "sample seed negative": (sample, lambda p: S(p, "--seed", "-1"), r"--seed must be between 0 and"),
    "distill prompt_len zero": (distill, lambda p: D(p, "--prompt_len", "0"),
                                r"--prompt_len must be at least 1, not 0"),
    "sample prompt_len zero": (sample, lambda p: S(p, "--prompt_len", "0"), r"--prompt_len must be at least 1"),
    "dtype typo": (teacher, lambda p: T(p, "--dtype", "bf16"), r"--dtype: invalid choice: 'bf16'"),
    "noise features typo": (distill, lambda p: D(p, "--noise_features", "hi"), r"--noise_features: invalid choice"),
    "heads do not split the width": (teacher, lambda p: T(p, "--n_head", "3"),
                                     r"--n_embd 32 must be a multiple of 2 x --n_head \(3\)"),
    "distill unknown preset": (distill, lambda p: D(p, "--preset", "huge"), r"invalid choice: 'huge'"),
    "distill unknown flag": (distill, lambda p: D(p, "--n_layer", "2"), r"unrecognized arguments: --n_layer"),
    "sample unknown flag": (sample, lambda p: S(p, "--temperature", "1"), r"unrecognized arguments: --temperature"),
    "device not supported": (teacher, lambda p: T(p, "--device", "mps"), r"--device 'mps' is not supported"),
    "device not a device": (sample, lambda p: S(p, "--device", "gpu"), r"--device 'gpu' is not supported"),
    # memory: a batch that cannot be allocated fails at once (no tens of GB are touched)
    "teacher batch too big": (teacher, lambda p: T(p, "--batch_size", str(10 ** 12)),
                              r"does not fit in memory on cpu; lower --batch_size"),
    "distill batch too big": (distill, lambda p: D(p, "--batch_size", str(10 ** 12)),
                              r"does not fit in memory on cpu; lower --batch_size"),
    "sample too many samples": (sample, lambda p: S(p, "--num_samples", str(10 ** 12)),
                                r"do not fit in memory on cpu; lower --num_samples"),
    # unwritable output (tests run as root: a directory under a regular file cannot be created by anyone)
    "teacher out_dir unwritable": (teacher, lambda p: T(p, "--out_dir", p["file"] + "/out"),
                                   r"cannot write to output directory .*--out_dir"),
    "teacher results_dir unwritable": (teacher, lambda p: T(p, "--results_dir", p["file"] + "/res"),
                                       r"cannot write to output directory .*--results_dir"),
    "distill out_dir unwritable": (distill, lambda p: D(p, "--out_dir", p["file"] + "/out"),
                                   r"cannot write to output directory"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, bad, capsys):
    mod, argv, pattern = BAD[case]
    msg = cli(mod, argv(bad), capsys)
    assert re.search(pattern, msg), msg


def test_good_input_passes_the_same_checks(bad, capsys):
    """The bad cases above differ from a working call only in what they break."""
    sample.main(S(bad, "--k", "1"))
    assert "same-noise agreement" in capsys.readouterr().out


def test_bad_input_through_the_real_command_line(bad):
    for script, argv, pattern in (("teacher.py", T(bad, "--data_dir", bad["missing"]), r"not found"),
                                  ("distill.py", D(bad, "--bogus"), r"unrecognized arguments: --bogus"),
                                  ("sample.py", S(bad, "--k", "0"), r"--k must be between")):
        r = run(script, argv)
        assert r.returncode == 2 and re.search(pattern, error_line(r.stderr)), (script, r.stderr)


def test_bad_input_overwrites_nothing(tmp_path, data_dir, teacher_ref, distill_ref, capsys):
    before = snapshot(teacher_ref["out"], teacher_ref["res"], distill_ref["out"], distill_ref["res"])
    t = TEACHER_REF + ["--data_dir", data_dir, "--out_dir", teacher_ref["out"], "--results_dir", teacher_ref["res"]]
    d = DISTILL_REF + ["--teacher", teacher_ref["best"], "--data_dir", data_dir, "--out_dir", distill_ref["out"],
                       "--results_dir", distill_ref["res"]]
    missing, file, other_teacher = str(tmp_path / "nope"), tmp_path / "file.txt", str(tmp_path / "teacher2.pt")
    file.write_text("x")
    shutil.copy(teacher_ref["best"], other_teacher)   # the same weights under another name: still another --teacher
    for mod, argv, pattern in [
        (teacher, t, r"already holds a run; pass --resume .* or --overwrite"),
        (teacher, t + ["--overwrite", "--data_dir", missing], r"not found"),
        (teacher, t + ["--overwrite", "--preset", "huge"], r"invalid choice"),
        (teacher, t + ["--overwrite", "--bogus"], r"unrecognized arguments"),
        (teacher, t + ["--overwrite", "--results_dir", f"{file}/res"], r"cannot write"),
        (teacher, t + ["--resume", "--n_embd", "64"], r"another model shape; resume with the same flags"),
        (teacher, t + ["--resume", "--batch_size", "2", "--seed", "8"], r"resumed used --batch_size \d+, --seed"),
        (distill, d, r"already holds a run"),
        (distill, d + ["--overwrite", "--teacher", distill_ref["student"]], r"student checkpoint where a teacher"),
        (distill, d + ["--overwrite", "--k", "0", "--schedule", ""], r"--k must be at least 1"),
        (distill, d + ["--resume", "--k", "4", "--schedule", "1,2,4"],
         r"made with --k 2 --schedule 1,2; resume with the same --k and --schedule"),
        (teacher, t + ["--resume", "--overwrite"], r"pass one of them"),
        (distill, d + ["--resume", "--anchors", "3"], r"resumed used --anchors"),
        (distill, d + ["--resume", "--teacher", other_teacher], r"resumed used --teacher .*; resume with the same"),
        (teacher, t + ["--resume", "--max_steps", "32"], r"resumed used --max_steps 16"),
        (teacher, t + ["--resume", "--grad_clip", "0"], r"resumed used --grad_clip 1.0"),
        (distill, d + ["--resume", "--weight_decay", "0.5"], r"resumed used --weight_decay 0.0"),
        # --overwrite clears the old run only once the new one has passed every check of its inputs
        (teacher, t + ["--overwrite", "--block_size", "100000"], r"shorter than one window .*lower --block_size"),
        (distill, d + ["--overwrite", "--eval_samples", str(10 ** 12)], r"do not fit in memory.*--eval_samples"),
        # never into the other script's directory, whatever the flags
        (teacher, t + ["--overwrite", "--out_dir", distill_ref["out"]], r"holds a distillation run \(student_k1.pt\)"),
        (distill, d + ["--overwrite", "--out_dir", teacher_ref["out"]], r"holds a teacher run \(best.pt\)"),
    ]:
        assert re.search(pattern, cli(mod, argv, capsys))
    assert snapshot(teacher_ref["out"], teacher_ref["res"], distill_ref["out"], distill_ref["res"]) == before


def test_a_run_stopped_before_its_first_evaluation_is_still_the_other_scripts(tmp_path, data_dir, teacher_ref,
                                                                               distill_ref, capsys):
    """A run stopped before it evaluated anything has only last.pt (no best.pt, no student_k*.pt): its checkpoint's
    kind still keeps the other script out of its directory, whatever the flags."""
    runs = {kind: tmp_path / kind for kind in ("teacher", "distill")}
    for kind, ref in (("teacher", teacher_ref), ("distill", distill_ref)):
        runs[kind].mkdir()
        shutil.copy(os.path.join(ref["out"], "last.pt"), runs[kind])
    before = snapshot(*runs.values())
    for flag in ("--overwrite", "--resume"):
        assert re.search(r"holds a teacher run \(last.pt\); pick another --out_dir",
                         cli(distill, distill_args(data_dir, teacher_ref["best"], runs["teacher"], tmp_path) + [flag],
                             capsys))
        assert re.search(r"holds a distillation run \(last.pt\); pick another --out_dir",
                         cli(teacher, teacher_args(data_dir, runs["distill"], tmp_path) + [flag], capsys))
    assert snapshot(*runs.values()) == before


def test_overwrite_that_fails_before_its_first_checkpoint_keeps_the_old_run(tmp_path, data_dir, teacher_ref,
                                                                            distill_ref, monkeypatch, capsys):
    """--overwrite sets the old run aside and deletes it only when the new run saves its first checkpoint: a
    mistake that shows only once training runs (here a batch that does not fit in memory) leaves it as it was."""
    runs = {name: str(tmp_path / name) for name in ("teacher", "distill")}
    shutil.copytree(teacher_ref["out"], runs["teacher"])
    shutil.copytree(distill_ref["out"], runs["distill"])
    (tmp_path / "teacher" / "teacher_tiny.json").write_text("{}")   # an experiment's summary, beside its checkpoints
    before = snapshot(*runs.values())

    def out_of_memory(*a, **kw):
        raise MemoryError
    monkeypatch.setattr(teacher, "evaluate", out_of_memory)         # the teacher's first evaluation, at step 0
    monkeypatch.setattr(distill, "rollout_targets", out_of_memory)  # distillation's first step
    t = teacher_args(data_dir, runs["teacher"], tmp_path) + ["--overwrite"]
    d = distill_args(data_dir, teacher_ref["best"], runs["distill"], tmp_path) + ["--overwrite"]
    assert re.search(r"does not fit in memory", cli(teacher, t, capsys))
    assert re.search(r"does not fit in memory", cli(distill, d, capsys))
    assert snapshot(*runs.values()) == before   # every file back, the logs and the summary included


@pytest.mark.parametrize("script", ["teacher", "distill"])
def test_a_directory_in_use_by_a_run_is_refused_to_a_second(script, tmp_path, data_dir, teacher_ref):
    """Two runs never share an out_dir: while one trains there, a second, even with --overwrite (which would set the
    first one's files aside under it), stops with one line and touches nothing; once the first has died, the kernel has
    dropped its lock and the directory takes a new run."""
    out = tmp_path / "out"
    if script == "teacher":
        argv, forever = teacher_args(data_dir, out, tmp_path), ["--max_steps", "1000000"]
    else:
        argv, forever = distill_args(data_dir, teacher_ref["best"], out, tmp_path), ["--steps_per_stage", "1000000"]
    first = start(f"{script}.py", argv + forever, tmp_path, "first")
    try:
        wait_for(first, out / "log.jsonl", lambda r: r.get("step", 0) >= 5)   # training, past a checkpoint
        os.kill(first.pid, signal.SIGSTOP)   # holds its lock, writes nothing
        before = snapshot(out)
        for flags in (["--resume"], ["--overwrite"]):   # (a subprocess, which a timeout ends if it trains instead)
            r = run(f"{script}.py", argv + forever + flags, timeout=60)
            assert r.returncode == 2 and "in use by another run" in error_line(r.stderr)
        assert snapshot(out) == before
    finally:
        first.kill()
        first.wait()
    (teacher if script == "teacher" else distill).main(argv + ["--overwrite"])   # the short reference run
    assert os.path.exists(out / ("best.pt" if script == "teacher" else "student_k2.pt"))
    assert_lock_is_free(out)   # released once the run has written its files


def assert_lock_is_free(out):
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # raises BlockingIOError while a run holds it
    finally:
        os.close(fd)


def test_a_run_that_raised_hands_its_lock_on_to_the_next_in_the_process(tmp_path, data_dir, monkeypatch):
    """An error between taking the lock and the training loop leaves the lock with this process (a command-line run
    exits and the kernel drops it); the next run in the same process, as in a notebook or these tests, takes it."""
    def disk_fails(*a, **kw):
        raise OSError("no space left on device")
    monkeypatch.setattr(teacher, "JsonlLog", disk_fails)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        teacher.main(teacher_args(data_dir, out, tmp_path))
    monkeypatch.undo()
    teacher.main(teacher_args(data_dir, out, tmp_path))
    assert_lock_is_free(out)


def test_a_run_set_aside_by_a_killed_overwrite_is_not_deleted_by_the_next_run(tmp_path, data_dir, teacher_ref,
                                                                              capsys):
    """An --overwrite killed outright before its first checkpoint leaves the old run as *.replaced; a run there
    without --overwrite refuses to start (its first checkpoint would delete them) and touches nothing."""
    out = tmp_path / "out"
    shutil.copytree(teacher_ref["out"], out)
    for name in ("best.pt", "last.pt", "log.jsonl"):
        os.replace(out / name, out / (name + ".replaced"))
    before = snapshot(out)
    msg = cli(teacher, teacher_args(data_dir, out, tmp_path), capsys)
    assert "set aside by an --overwrite that was killed (best.pt.replaced, last.pt.replaced" in msg
    assert snapshot(out) == before


def test_a_weight_of_the_wrong_shape_is_one_line(tmp_path):
    m = model.GPT(model.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=8))
    weights = m.state_dict()
    weights["blocks.0.mlp.fc.weight"] = weights["blocks.0.mlp.fc.weight"][:-1]
    save_checkpoint(str(tmp_path / "c.pt"), {"model_config": dataclasses.asdict(m.config), "model": weights})
    with pytest.raises(UserError, match=r"weights do not match its model_config \(blocks.0.mlp.fc.weight\)"):
        load_checkpoint(str(tmp_path / "c.pt"), vocab_size=None)


def test_only_the_master_rank_touches_the_old_run(tmp_path):
    """Under DDP one process sets the old run aside and deletes it: two deleting the same files would fail."""
    (tmp_path / "best.pt").write_text("old")
    (tmp_path / "last.pt.replaced").write_text("older")
    args, worker = SimpleNamespace(overwrite=True, resume=False), SimpleNamespace(master=False)
    OldRun(str(tmp_path), "teacher", args, worker).discard()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt.replaced"]


def test_resume_refuses_a_retrained_teacher(tmp_path, distill_ref, capsys):
    """The teacher at the same path, trained again since the run started, would give the rest of the run other
    targets: a resume refuses it."""
    run_dir, teacher_path = tmp_path / "run", str(tmp_path / "teacher.pt")
    shutil.copytree(distill_ref["out"], run_dir)
    ck = torch.load(run_dir / "last.pt", weights_only=False)
    shutil.copy(ck["train_config"]["teacher"], teacher_path)
    ck["train_config"]["teacher"] = teacher_path   # as if the run had started from this copy
    save_checkpoint(str(run_dir / "last.pt"), ck)
    retrained = torch.load(teacher_path, weights_only=False)
    retrained["best_val"] += 0.01   # trained again with the same flags: the same step, another result
    save_checkpoint(teacher_path, retrained)
    argv = DISTILL_REF + ["--teacher", teacher_path, "--data_dir", ck["train_config"]["data_dir"],
                          "--out_dir", str(run_dir), "--results_dir", str(tmp_path / "res"), "--resume"]
    assert re.search(r"not the teacher this run started from", cli(distill, argv, capsys))


@pytest.mark.parametrize("teacher", ["reference", "experiment", "unfinished"])
def test_a_student_of_an_experiments_teacher_is_an_experiment(tmp_path, monkeypatch, data_dir, teacher_ref, teacher):
    """distill.py run as its preset stands writes the preset's reference summary to results/ only if its teacher is
    the teacher preset's reference run too: the finished run whose summary is results/teacher_<preset>.json. A
    teacher from an experiment, or one still training (or stopped) at the preset's path, makes its students
    experiments."""
    monkeypatch.chdir(tmp_path)   # the preset's default paths, relative to here
    os.makedirs("out/teacher_tiny")
    os.makedirs("data")
    os.makedirs("results")
    os.symlink(data_dir, "data/offline")
    ck = torch.load(teacher_ref["best"], weights_only=False)
    ck["train_config"]["results_dir"] = "out/teacher_tiny" if teacher == "experiment" else "results"
    save_checkpoint("out/teacher_tiny/best.pt", ck)
    # the summary of the finished reference run; an unfinished run has only an earlier run's summary, if any
    summary = json.load(open(os.path.join(teacher_ref["res"], "teacher_tiny.json")))
    if teacher == "unfinished":
        summary["best_val_loss"] += 0.1
    with open("results/teacher_tiny.json", "w") as f:
        json.dump(summary, f)
    teacher_is_reference = teacher == "reference"
    flags = dict(zip(DISTILL[::2], DISTILL[1::2]))   # the tiny run of these tests, as a preset standing alone
    preset = {f.name: f.type(flags[f"--{f.name}"]) if f.type in (int, float) else flags[f"--{f.name}"]
              for f in dataclasses.fields(distill.DistillConfig) if f"--{f.name}" in flags}
    monkeypatch.setitem(distill.PRESETS, "tiny", {**preset, "steps_per_stage": 2})
    distill.main(["--preset", "tiny"] + (["--results_dir", "auto"] if teacher == "unfinished" else []))
    reference = os.path.exists("results/distill_tiny.json")
    assert reference == teacher_is_reference
    assert os.path.exists("out/distill_tiny/distill_tiny.json") != teacher_is_reference


@pytest.mark.filterwarnings("ignore:Mismatch dtype")   # CPU autocast: the noise encoder's norm runs unfused
def test_targets_are_fp32_and_from_models_in_eval_mode(tmp_path, monkeypatch, data_dir, teacher_ref):
    """Stage targets come from the previous model in eval mode (no dropout) and outside autocast, even when the
    student trains under bf16 autocast (METHOD.md §6: the same-noise coupling is that sensitive); every update's
    gradient is clipped to --grad_clip."""
    seen, clips = [], []
    rollout, clip = distill.rollout_targets, torch.nn.utils.clip_grad_norm_

    def checked_rollout(prev, *args):
        seen.append((prev.training, torch.is_autocast_enabled("cpu")))
        return rollout(prev, *args)

    def counted_clip(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(distill, "rollout_targets", checked_rollout)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted_clip)
    distill.main(distill_args(data_dir, teacher_ref["best"], tmp_path / "run", tmp_path)
                 + ["--steps_per_stage", "2", "--dtype", "bfloat16", "--grad_clip", "0.5"])
    assert seen and all(not training and not autocast for training, autocast in seen), seen
    assert clips == [0.5] * 4   # 2 steps in each of 2 stages
