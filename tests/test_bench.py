"""Tests for bench.py and the decode path it times: the outputs of a tiny end-to-end run, the static-buffer
decode step (CUDA graphs' plumbing, run eagerly on CPU) against generate's plain path, and one-line errors.
About a minute on CPU. On a GPU the same tests check the captured graphs and the compiled pass on CUDA, and one
more checks the compiled FlexAttention kernel and the compiled step against SDPA on whole generations.
Run: python -m pytest tests/test_bench.py -q"""

import copy
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import UserError, save_checkpoint  # noqa: E402
import bench as bench_py  # noqa: E402   (bench() below runs the script)
from bench import bytes_moved, gen_ppl, generation_phases, quality_row, roofline, sized_to  # noqa: E402
from model import GPT, GPTConfig, CUDAGraphStep, KVCache, compile_per_shape, decode_step, generate  # noqa: E402

K = 4


@pytest.fixture
def no_tf32():
    """TF32 off (exact float32 matmuls on CUDA), restored afterwards. Not monkeypatch: torch.backends.cuda.matmul
    serves allow_tf32 through __getattr__, so pytest 9.2's undo deletes the attribute instead of restoring it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def tiny_models():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    student = GPT.student_from(teacher, K).eval()
    with torch.no_grad():   # a noise encoder whose output matters, so that tokens depend on u
        for p in student.noise_encoder.parameters():
            p.normal_(0, 0.5)
    return teacher, student


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    teacher, student = tiny_models()
    for kind, m in (("teacher", teacher), ("student", student)):
        save_checkpoint(str(tmp / f"{kind}.pt"), {"kind": kind, "model_config": dataclasses.asdict(m.config),
                                                  "model": m.state_dict()})
    (tmp / "data").mkdir()   # a val split of random GPT-2 ids: CI has no prepared corpus
    np.random.default_rng(0).integers(0, 50257, 4000, dtype=np.uint16).tofile(tmp / "data" / "val.bin")
    return tmp


def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", "--device", "cpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def bench(tmp, *args):
    """bench.py on the tiny checkpoints and val split of the `files` fixture."""
    return run_bench("--teacher", str(tmp / "teacher.pt"), "--student", str(tmp / "student.pt"),
                     "--data_dir", str(tmp / "data"), "--out_dir", str(tmp / "out"), *args)


def test_end_to_end_outputs(files):
    r = bench(files, "--batch_sizes", "1,2", "--seq_lens", "32", "--quality_samples", "8",
              "--quality_tokens", "12", "--no-paper_shape", "--name", "t", "--repeats", "3")
    assert r.returncode == 0, r.stderr
    out = files / "out"
    res = json.loads((out / "t.json").read_text())
    assert {"device", "torch", "git", "config", "speed", "quality"} <= set(res)
    assert res["device"].startswith("cpu") and res["config"]["quality_dtype"] == "float32"
    assert res["config"]["model_configs"]["trained_student"]["max_k"] == K

    speed = res["speed"]
    assert {(r["batch_size"], r["k"]) for r in speed} == {(b, k) for b in (1, 2) for k in (1, 2, 3, 4)}
    for row in speed:
        assert {"model", "seq_len", "batch_size", "k", "tokens_per_s", "speedup", "mbu"} <= set(row)
        assert row["model"] == "trained" and row["seq_len"] == 32
        assert row["tokens_per_s"] > 0 and row["speedup"] > 0
        assert row["mbu"] is row["roofline_tokens_per_s"] is row["roofline_speedup"] is None   # no peaks on a CPU
        assert row["new_tokens"] == (32 - 6) // row["k"] * row["k"]
        if row["k"] == 1:
            assert row["speedup"] == 1.0
    for row in speed:   # medians over the repeats; the speedup's of ratios within a repeat (AR and k back to back)
        ar_row = next(r for r in speed if r["batch_size"] == row["batch_size"] and r["k"] == 1)
        per_s = [row["batch_size"] * row["new_tokens"] / t for t in row["times_s"]]
        ar_per_s = [ar_row["batch_size"] * ar_row["new_tokens"] / t for t in ar_row["times_s"]]
        assert len(per_s) == 3 and row["tokens_per_s"] == pytest.approx(statistics.median(per_s))
        assert row["tokens_per_s_per_sequence"] == pytest.approx(row["tokens_per_s"] / row["batch_size"])
        assert row["speedup"] == pytest.approx(statistics.median(a / b for a, b in zip(per_s, ar_per_s)))

    quality = res["quality"]
    assert [(r["model"], r["k"]) for r in quality] == [("ar", 1)] + [("student", k) for k in range(1, K + 1)]
    for row in quality:
        assert {"k", "gen_ppl", "gen_ppl_ratio", "entropy", "entropy_ratio", "agreement", "window_agreement",
                "repeat4"} <= set(row)
        assert len(row["agreement"]) == len(row["window_agreement"]) == row["k"]
        # random tiny weights: the teacher's distribution is nearly uniform, so a student rarely matches it
        assert all(0 <= a <= 1 for a in row["agreement"] + row["window_agreement"])
        assert row["gen_ppl"] > 1 and 0 < row["entropy"] <= np.log(12) + 1e-9 and 0 <= row["repeat4"] <= 1
        blind = row["agreement_without_noise"]   # the teacher's, the same for every row; sum p^2 <= max p
        assert blind == quality[0]["agreement_without_noise"]
        assert 0 < blind["independent_draw"] <= blind["teacher_mode"] <= 1
    ar = quality[0]
    assert ar["agreement"] == ar["window_agreement"] == [1.0]
    for row in quality:
        assert row["gen_ppl_ratio"] == pytest.approx(row["gen_ppl"] / ar["gen_ppl"])
        assert row["entropy_ratio"] == pytest.approx(row["entropy"] / ar["entropy"])

    with open(out / "t_speed.csv") as f:
        assert len(list(csv.DictReader(f))) == len(speed)
    with open(out / "t_quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(quality)
    for row, q in zip(rows, quality):   # the CSV's columns are the JSON's numbers, slot by slot
        assert float(row["gen_ppl"]) == pytest.approx(q["gen_ppl"])
        assert float(row["agreement_without_noise_teacher_mode"]) == pytest.approx(
            q["agreement_without_noise"]["teacher_mode"])
        for i in range(q["k"]):
            assert float(row[f"agreement_slot{i + 1}"]) == pytest.approx(q["agreement"][i])
            assert float(row[f"window_agreement_slot{i + 1}"]) == pytest.approx(q["window_agreement"][i])
    for png in ("t_speedup_vs_batch.png", "t_quality_vs_k.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "tokens/s" in r.stdout and "agreement" in r.stdout


def test_quality_row_agreement_entropy_and_repetition():
    """A quality row's free-running agreement is per slot against the AR samples, entropy is that of each sample's
    own tokens, and repeat4 counts repeated 4-grams: checked on samples built to give known values."""
    teacher, _ = tiny_models()
    prompts = torch.randint(50257, (2, 6))
    ar = torch.randint(50257, (2, 8))
    samples = ar.clone()
    samples[:, 1::2] = (ar[:, 1::2] + 1) % 50257   # slot 2 of every window of k = 2 differs, slot 1 agrees
    row = quality_row("student", 2, samples, prompts, teacher, ar, [0.5, 0.25])
    assert row["agreement"] == [1.0, 0.0] and row["window_agreement"] == [0.5, 0.25]
    looped = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [7, 7, 7, 9, 7, 7, 7, 9]])   # 5 4-grams each, 1 repeated
    row = quality_row("ar", 1, looped, prompts, teacher, looped, [1.0])
    assert row["repeat4"] == pytest.approx(1 / 5)
    assert row["entropy"] == pytest.approx((math.log(4) - (0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2)


def test_gen_ppl_scores_each_continuation_token_given_its_prefix():
    """gen-PPL = exp(mean NLL per continuation token), each token scored by the judge's logits at the position
    before it: a judge sure that token j + 1 follows token j scores counting sequences at 1, a uniform judge at V."""
    V = 11
    prompts, samples = torch.tensor([[0, 1, 2], [4, 5, 6]]), torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    counting = lambda x: (50 * torch.nn.functional.one_hot((x + 1) % V, V).float(), None)  # noqa: E731
    uniform = lambda x: (torch.zeros(*x.shape, V), None)  # noqa: E731
    for batch in (1, 32):   # scored in batches: every batch counts
        assert gen_ppl(counting, prompts, samples, batch=batch) == pytest.approx(1.0)
        assert gen_ppl(uniform, prompts, samples, batch=batch) == pytest.approx(V)
    samples[1, -1] = 0   # one token the counting judge gives ~e^-50: the mean NLL takes it from the second batch
    assert math.log(gen_ppl(counting, prompts, samples, batch=1)) == pytest.approx(50 / 8, rel=1e-3)


def test_quality_decodes_every_model_from_the_ar_samples_noise(monkeypatch):
    """Same-noise quality: the student at every k decodes the noise the AR teacher decoded (a prefix of one shared
    tensor), and its windowed agreement is scored against the AR teacher's samples, not its own."""
    teacher, student = tiny_models()
    calls, windows = [], []

    def recording_generate(model, prompts, noise, k, *args, **kwargs):
        out = generate(model, prompts, noise, k, *args, **kwargs)
        calls.append((model, noise, out))
        return out

    def recording_window_agreement(model, prompts, ar_tokens, noise, k):
        windows.append((ar_tokens, noise))
        return [0.0] * k
    monkeypatch.setattr(bench_py, "generate", recording_generate)
    monkeypatch.setattr(bench_py, "window_agreement", recording_window_agreement)
    val = np.random.default_rng(0).integers(0, 50257, 500).astype(np.uint16)
    rows = bench_py.run_quality(teacher, student, teacher, 10, val, SimpleNamespace(seed=0, quality_samples=3), "cpu")
    (ar_model, ar_noise, ar_out), students = calls[0], calls[1:]
    assert ar_model is teacher and [m for m, _, _ in students] == [student] * K and len(rows) == K + 1
    for _, noise, _ in students:
        n = min(noise.size(1), ar_noise.size(1))
        assert torch.equal(noise[:, :n], ar_noise[:, :n])
    for ar_tokens, noise in windows:
        assert torch.equal(ar_tokens, ar_out) and torch.equal(noise, ar_noise)


@pytest.mark.parametrize("args, message", [
    (["--ks", "0"], "--ks"),
    (["--ks", "9"], "max_k"),
    (["--seq_lens", "100"], "block size"),
    (["--quality_tokens", "80", "--no-speed"], "block size"),
    (["--student", "missing.pt"], "not found"),
    (["--no-trained"], "--no-trained"),   # with the --teacher and --student it cannot use
    (["--profile", "--quality"], "--profile"),
    (["--roofline", "H100", "--no-speed"], "--roofline"),
    (["--roofline", "H100", "--profile"], "pick one"),
    (["--roofline", "TPU"], "known: H100"),
    (["--roofline", ""], "known: H100"),
    (["--roofline", "H100", "--dtype", "float32"], "bf16"),
    (["--data_dir", "/nonexistent"], "not found"),   # before the speed grid, not after it
    (["--resume"], "no unfinished run"),
    (["--resume", "--no-speed"], "--resume continues a speed or profile grid"),
])
def test_bad_input_is_one_line(files, args, message):
    r = bench(files, "--batch_sizes", "1", *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_paper_shape_needs_no_checkpoint(tmp_path, monkeypatch):
    """--no-trained: the speed of the paper's shape alone, with random weights and no trained model; its student
    gets as many slots as the largest k asked for. Files of an earlier run under the same name that this run does
    not write are removed, so that a name's files all come from one run. (Run on a narrow stand-in for the paper's
    shape, which takes CPU seconds to build.)"""
    paper = bench_py.PAPER_SHAPE
    assert (paper.n_layer, paper.n_head, paper.n_embd, paper.tie_embeddings) == (12, 12, 768, False)
    monkeypatch.setattr(bench_py, "PAPER_SHAPE", dataclasses.replace(paper, n_layer=1, n_head=2, n_embd=32))
    (tmp_path / "bench_paper_shape_quality.csv").write_text("from an earlier run")
    bench_py.main(["--no-trained", "--device", "cpu", "--batch_sizes", "1", "--seq_lens", "12", "--ks", "2,5",
                   "--dtype", "float32", "--out_dir", str(tmp_path)])
    res = json.loads((tmp_path / "bench_paper_shape.json").read_text())
    assert res["quality"] == [] and res["config"]["model_configs"]["trained_teacher"] is None
    assert [(row["model"], row["k"]) for row in res["speed"]] == [("paper_shape_random", k) for k in (1, 2, 5)]
    student_config = dataclasses.replace(bench_py.PAPER_SHAPE, max_k=5)
    assert res["config"]["model_configs"]["paper_shape_random"] == dataclasses.asdict(student_config)
    assert sorted(os.listdir(tmp_path)) == ["bench_paper_shape.json", "bench_paper_shape_speed.csv",
                                            "bench_paper_shape_speedup_vs_batch.png"]


def test_a_partial_run_keeps_the_whole_runs_files(files, tmp_path):
    """--no-quality (or --no-speed) under the default name writes <name>_speed_only (_quality_only): it never replaces
    or deletes the files of a whole run under <name>, some of which end in _speed and _quality."""
    (tmp_path / "bench_trained.json").write_text("{}")
    (tmp_path / "bench_trained_quality.csv").write_text("from the whole run")
    r = run_bench("--teacher", str(files / "teacher.pt"), "--student", str(files / "student.pt"), "--no-quality",
                  "--batch_sizes", "1", "--seq_lens", "12", "--ks", "4", "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bench_trained.json").read_text() == "{}"
    assert (tmp_path / "bench_trained_quality.csv").read_text() == "from the whole run"
    assert json.loads((tmp_path / "bench_trained_speed_only.json").read_text())["speed"]
    # nor under a name of one's own that is the whole run's name + _speed: the whole run's speed CSV stays
    (tmp_path / "bench_trained_speed.csv").write_text("from the whole run")
    r = run_bench("--teacher", str(files / "teacher.pt"), "--student", str(files / "student.pt"), "--no-quality",
                  "--batch_sizes", "1", "--seq_lens", "12", "--ks", "4", "--out_dir", str(tmp_path),
                  "--name", "bench_trained_speed")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bench_trained_speed.csv").read_text() == "from the whole run"
    assert (tmp_path / "bench_trained_speed_speed.csv").exists()


def test_an_interrupted_grid_resumes_where_it_stopped(files, tmp_path, monkeypatch):
    """A speed grid saves its rows after every point. Ctrl-C stops it after the current point, leaving
    <name>.partial.json; a plain rerun refuses to replace that progress, and a resume with other flags to mix two
    runs; the same command with --resume times only the points not done, keeps the saved rows, and deletes the
    progress once the outputs are written. Each point draws its inputs from a generator of its own, so the resumed
    point gets what an uninterrupted run gives it."""
    timed, time_point, ctrl_c = [], bench_py.time_point, {"at point": 2}

    def recorded(teacher, student, ks, B, seq_len, repeats, device, gen, *rest):
        timed.append((B, gen.initial_seed()))
        if len(timed) == ctrl_c["at point"]:
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C while this point is timed
        return time_point(teacher, student, ks, B, seq_len, repeats, device, gen, *rest)
    monkeypatch.setattr(bench_py, "time_point", recorded)
    args = ["--device", "cpu", "--teacher", str(files / "teacher.pt"), "--student", str(files / "student.pt"),
            "--no-quality", "--seq_lens", "12", "--ks", "4", "--out_dir", str(tmp_path), "--batch_sizes"]
    with pytest.raises(UserError, match="interrupted after 2 of 3 points"):
        bench_py.main(args + ["1,2,3"])
    progress = tmp_path / "bench_trained_speed_only.partial.json"
    saved = json.loads(progress.read_text())
    assert saved["done"] == [["trained", 12, 1], ["trained", 12, 2]] and len(saved["rows"]) == 4
    assert not (tmp_path / "bench_trained_speed_only.json").exists()
    with pytest.raises(UserError, match="holds an unfinished run"):
        bench_py.main(args + ["1,2,3"])
    with pytest.raises(UserError, match="differs in batch_sizes"):
        bench_py.main(args + ["1,2,4", "--resume"])
    for name, other, field in (("source_digest", lambda: "edited", "code"),   # an edit of the decode path
                               ("device_name", lambda device: "another GPU", "machine")):
        with monkeypatch.context() as m:
            m.setattr(bench_py, name, other)
            with pytest.raises(UserError, match=f"differs in {field}"):
                bench_py.main(args + ["1,2,3", "--resume"])
    assert progress.read_text() == json.dumps(saved, indent=2)   # refusals leave it as it was

    bench_py.main(args + ["1,2,3", "--resume"])
    assert [B for B, _ in timed] == [1, 2, 3]   # the third point only
    speed = json.loads((tmp_path / "bench_trained_speed_only.json").read_text())["speed"]
    assert speed[:4] == saved["rows"] and [r["batch_size"] for r in speed[4:]] == [3, 3]
    assert not progress.exists()
    seeds = [seed for _, seed in timed]
    timed.clear()
    ctrl_c["at point"] = None
    bench_py.main(args + ["1,2,3"])   # uninterrupted
    assert [seed for _, seed in timed] == seeds and len(set(seeds)) == 3


def test_source_digest_covers_every_file_a_timing_runs(tmp_path, monkeypatch):
    for name in ("model.py", "common.py", "bench.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    monkeypatch.setattr(bench_py, "__file__", str(tmp_path / "bench.py"))
    digests = {bench_py.source_digest()}
    for name in ("model.py", "common.py", "bench.py"):
        with open(tmp_path / name, "a") as f:
            f.write("\n# edited\n")
        digests.add(bench_py.source_digest())
    assert len(digests) == 4


def test_a_point_out_of_memory_is_skipped_and_the_grid_goes_on(tmp_path):
    def point(label, teacher, student, seq_len, B, gen):
        if B == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [{"batch_size": B}]
    progress = bench_py.Progress(str(tmp_path / "p.partial.json"), {}, False)
    rows, skipped = bench_py.run_grid([("m", None, None, [12])], [1, 2, 3], torch.device("cpu"), "t", point,
                                      progress, 0)
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert skipped == [{"model": "m", "seq_len": 12, "batch_size": 2, "reason": "out of memory"}]


def test_time_point_warms_up_first_and_fences_each_timed_run(monkeypatch):
    """Warm-up (prefill + one decode step: compilation, graph capture) runs before any timed generation, and every
    generation is bracketed by synchronise-then-read-the-clock, so that no queued kernel is left out of a timing."""
    events, gen, clock = [], bench_py.generate, bench_py.time.perf_counter
    monkeypatch.setattr(bench_py, "sync", lambda device: events.append("sync"))
    monkeypatch.setattr(bench_py, "generate",
                        lambda m, p, u, k, **kw: events.append(f"generate {u.size(1)}") or gen(m, p, u, k, **kw))
    monkeypatch.setattr(bench_py, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or clock()))
    teacher, student = tiny_models()
    bench_py.time_point(teacher, student, [2], 1, 12, 2, torch.device("cpu"), torch.Generator().manual_seed(0),
                        "sdpa", False)
    # warm-up of AR (2 new tokens) and k = 2 (4), then 2 repeats x (AR, k = 2), each generating all 6 new tokens
    assert events == [e for n in (2, 4, 6, 6, 6, 6) for e in ("sync", "clock", f"generate {n}", "sync", "clock")]


def test_profile_of_one_decode_step(files):
    """--profile: per point and k, one step's time and what it launches. A student's step is the same code at every k
    (only shapes differ), and launches about what an AR step does: the same trunk, the slots' concatenation and an
    argmax instead of the inverse CDF (generate encodes the noise before its loop)."""
    r = bench(files, "--profile", "--batch_sizes", "2", "--seq_lens", "32", "--no-paper_shape", "--name", "p")
    assert r.returncode == 0, r.stderr
    res = json.loads((files / "out" / "p.json").read_text())
    assert res["speed"] == [] and res["quality"] == []
    rows = {row["k"]: row for row in res["profile"]}
    assert sorted(rows) == [1, 2, 3, 4]
    notes = " ".join(res["config"]["notes"])   # what the rows are, not what a speed grid's would be
    assert "profile: one decode step" in notes and "random weights" not in notes
    assert not any(grid_note in notes for grid_note in ("whole generation", "mbu:", "warmup_s:"))
    for row in rows.values():
        assert row["step_ms"] > 0 and row["busy_ms_per_step"] > 0 and row["launches"].startswith("CPU")
        assert 0 < len(row["top"]) <= 8 and row["top"][0]["ms_per_step"] >= row["top"][-1]["ms_per_step"]
        assert row["tokens_per_s"] == pytest.approx(2 * row["k"] / row["step_ms"] * 1e3)
    launches = {k: row["launches_per_step"] for k, row in rows.items()}
    assert launches[2] == launches[3] == launches[4] and abs(launches[4] - launches[1]) < 0.1 * launches[1], launches
    assert "a step" in r.stdout
    # a cache shorter than twice a pass: the profiled pass still fits in it
    r = bench(files, "--profile", "--batch_sizes", "1", "--seq_lens", "12", "--no-paper_shape", "--name", "p")
    assert r.returncode == 0, r.stderr


def test_static_step_matches_eager_generate():
    """CUDAGraphStep's plumbing (static input buffers, the static output fed back as the next input, one
    cache reused across generations, a step object reused across shapes) gives generate's exact tokens.
    On CPU it runs the steps eagerly; on a GPU the same test checks the captured graphs."""
    teacher, student = tiny_models()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, student = teacher.to(dev), student.to(dev)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(50257, (3, 6), generator=gen).to(dev)
    noise = torch.rand(3, 24, generator=gen, dtype=torch.float64).to(dev)
    cache = KVCache(student.config, 3, dev, torch.float32)
    step = CUDAGraphStep(capture=dev.type == "cuda")
    for model, k in ((teacher, 1), (student, 2), (student, 4), (teacher, 1)):
        eager = generate(model, prompt, noise, k)
        assert torch.equal(generate(model, prompt, noise, k, cache=cache, step_fn=step), eager), k
        # the same cache again, now holding a longer generation's stale entries, and new noise
        other = noise.flip(0)
        assert torch.equal(generate(model, prompt, other, k, cache=cache, step_fn=step),
                           generate(model, prompt, other, k)), k
    assert len(step.graphs) == 3   # one per (model, batch, k); prefill runs eagerly
    buffer = weakref.ref(next(iter(step.graphs.values()))["tokens"])
    del step   # no reference cycle: the graphs and their memory go with the step object
    assert buffer() is None
    fresh = KVCache(student.config, 3, dev, torch.float32)   # a new step object on a new cache
    assert torch.equal(generate(student, prompt, noise, 4, step_fn=CUDAGraphStep(capture=dev.type == "cuda"),
                                cache=fresh), generate(student, prompt, noise, 4))


needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on CPU needs a C++ compiler")


@needs_compiler
def test_compiled_step_matches_eager_generate():
    """bench.py --compile: CUDAGraphStep(compile=True) compiles the decode step and gives generate's tokens. The
    teacher's logits are sharpened so that rounding differences between fused and unfused kernels (~1e-7) cannot
    move its inverse CDF across a token boundary; the student's argmax readout is robust to them anyway."""
    teacher, student = tiny_models()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(50257, (3, 6), generator=gen)
    noise = torch.rand(3, 16, generator=gen, dtype=torch.float64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()   # (reset() keeps them: count this test's graphs only)
    step = CUDAGraphStep(capture=False, compile=True)
    for attention in ("sdpa", "flex"):
        for model, k in ((teacher, 1), (student, 2), (student, 4)):
            cache = KVCache(model.config, 3, "cpu", torch.float32, attention)
            assert torch.equal(generate(model, prompt, noise, k, step_fn=step, cache=cache),
                               generate(model, prompt, noise, k)), (attention, k)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 6   # really compiled, once per shape


@needs_compiler
@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compiled_pass_matches_eager_logits(attention, device, no_tf32):
    """The compiled cached pass gives eager's logits pass after pass, in a model of two layers. A compiled CPU flex
    kernel once ignored the storage offset of a layer's view into one (layers, ...) cache and read layer 0's keys
    for layer 1: logits off by ~1e-3, too little to move these random models' tokens, 10-100 times the tolerance.
    (On CPU, flex itself now runs its eager reference inside the compiled step, model._flex_reference.)"""
    student = tiny_models()[1].to(device)
    gen = torch.Generator().manual_seed(4)
    tokens, u = torch.randint(50257, (3, 6), generator=gen), torch.rand(3, K, generator=gen, dtype=torch.float64)
    tokens, slots = tokens.to(device), student.noise_encoder(u.to(device))
    caches = [KVCache(student.config, 3, device, torch.float32, attention) for _ in range(2)]
    torch._dynamo.reset()
    passes = (student.forward_step, compile_per_shape(student.forward_step))
    pos = torch.arange(6 + K, device=device)   # the prompt, then the slots
    for _ in range(3):
        eager, compiled = (f(tokens, pos, slots, c) for f, c in zip(passes, caches))
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 if device == "cpu" else 1e-4)
        tokens, pos = eager.argmax(-1), pos[-K] + torch.arange(2 * K, device=device)   # the tokens made, new slots


@needs_compiler
@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compiled_step_writes_the_cache_in_place(attention):
    """A compiled decode step writes its K/V into the cache in place and allocates nothing of a layer's cache size.
    With one (layers, ...) tensor for the whole cache, each layer wrote into a view of a graph input, which
    torch.compile turned into copies of the layer's whole cache (at batch 512 and 1024 tokens, about 1 GB per layer
    every step); this checks the generated code for such buffers."""
    from torch._inductor.utils import run_and_get_code
    cfg = GPTConfig(block_size=512, n_layer=2, n_head=2, n_embd=32, vocab_size=256, max_k=2)
    student = GPT(cfg).eval()
    cache = KVCache(cfg, 3, "cpu", torch.float32, attention)
    tokens, pos = torch.randint(256, (3, 2)), torch.arange(40, 44)   # 2 tokens to commit, then 2 slots
    slots = student.noise_encoder(torch.rand(3, 2, dtype=torch.float64))
    torch._dynamo.reset()
    _, code = run_and_get_code(compile_per_shape(decode_step), student, tokens, pos, slots, cache)
    shapes = re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", "\n".join(code))
    assert shapes, "no buffers found: the generated code's format changed"
    layer_cache = math.prod(cache.shape[1:])
    assert max(math.prod(int(d) for d in s.split(",") if d.strip()) for s in shapes) < layer_cache / 8
    written = torch.stack(cache.k).abs().sum((0, 1, 2, 4)).nonzero().flatten()   # cache positions written
    assert written.tolist() == [40, 41, 42, 43]   # the 2 tokens, then the 2 slots


def test_bytes_moved_per_pass():
    """MBU's numerator: every pass reads the trunk's weights (a tied embedding once) and the cache so far and writes
    the K/V it commits; the noise encoder runs once per generation, before the loop, so a student's passes read no
    more weights than the teacher's."""
    teacher, student = tiny_models()
    weights = sum(p.numel() * 4 for p in teacher.parameters())   # float32, tied embedding counted once
    encoder = sum(p.numel() * 4 for p in student.noise_encoder.parameters())
    kv = 2 * 2 * 32 * 2   # K and V, 2 layers, width 32, 2-byte cache entries
    B, P = 3, 6
    # k = 4, 8 new tokens: the prefill commits the prompt (cache 6 long after it), the next pass the first 4 tokens
    want = 2 * weights + encoder + B * kv * ((6 + 6) + (10 + 4))
    assert bytes_moved(student, B, P, 8, 4, 2) == want
    assert bytes_moved(teacher, B, P, 2, 1, 2) == 2 * weights + B * kv * ((6 + 6) + (7 + 1))
    for n, calls in ((8, 1), (256, 1), (260, 2)):   # generate encodes the noise in calls of NOISE_CHUNK = 256
        assert bytes_moved(student, B, P, n, 4, 2) - bytes_moved(teacher, B, P, n, 4, 2) == calls * encoder


def test_roofline_phases_and_ceiling():
    """The roofline: per pass, the trunk computes 2 FLOPs per weight for each row, the k noise slots included, the LM
    head only for the rows read out (AR: the last token; a student: its k slots), attention 4 per query, key and
    channel. In sequence, each phase takes the longer of bytes / bandwidth and FLOPs / peak; overlapped, the whole
    generation takes the longer of all bytes / bandwidth and all FLOPs / peak."""
    teacher, student = (copy.deepcopy(m).to(torch.bfloat16) for m in tiny_models())
    d, L, V = 32, 2, teacher.config.padded_vocab
    trunk = L * 12 * d * d                         # qkv, projection, MLP up and down
    encoder_flops = 2 * sum(m.weight.numel() for m in student.noise_encoder.modules()
                            if isinstance(m, torch.nn.Linear))
    B, P = 3, 6
    # k = 4, 8 new tokens: the prefill (6 tokens + 4 slots; cache 6 long), then 4 tokens + 4 slots (cache 10 long)
    phases = generation_phases(student, B, P, 8, 4, 2)
    assert [f for _, f in phases] == [B * 8 * encoder_flops,
                                      2 * B * 10 * trunk, 2 * B * 4 * d * V, 4 * B * L * d * 10 * (6 + 4),
                                      2 * B * 8 * trunk, 2 * B * 4 * d * V, 4 * B * L * d * 8 * (10 + 4)]
    assert phases[2][0] == phases[5][0] == d * V * 2   # the LM head's bf16 weights, read once a pass
    flops = [f for _, f in generation_phases(teacher, B, P, 2, 1, 2)]   # AR: no slots, one row read out
    assert flops == [2 * B * 6 * trunk, 2 * B * d * V, 4 * B * L * d * 6 * 6,
                     2 * B * trunk, 2 * B * d * V, 4 * B * L * d * 7]

    # peaks at 16 FLOPs a byte: the encoder and the trunk (24+ FLOPs a byte here) bind on compute, the LM head (12)
    # and attention (8 or less) on bandwidth
    bw, fl = 1e12, 16e12
    roof = roofline({1: teacher, 4: student}, B, 14, (bw, fl))   # 14 = 6 + 8: 8 new tokens for both
    sequence = (phases[0][1] + phases[1][1] + phases[4][1]) / fl + sum(phases[i][0] for i in (2, 3, 5, 6)) / bw
    assert roof[4]["roofline_tokens_per_s"] == pytest.approx(B * 8 / sequence)
    overlapped = max(sum(b for b, _ in phases) / bw, sum(f for _, f in phases) / fl)
    ar = generation_phases(teacher, B, P, 8, 1, 2)
    ar_overlapped = max(sum(b for b, _ in ar) / bw, sum(f for _, f in ar) / fl)
    assert roof[4]["roofline_overlapped_speedup"] == pytest.approx(ar_overlapped / overlapped)
    assert roof[1]["roofline_speedup"] == roof[1]["roofline_overlapped_speedup"] == 1.0
    tok_s = {k: r["roofline_tokens_per_s"] for k, r in roof.items()}
    assert roof[4]["roofline_speedup"] == pytest.approx(tok_s[4] / tok_s[1])
    none = dict.fromkeys(["roofline_tokens_per_s", "roofline_speedup", "roofline_overlapped_speedup"])
    assert roofline({1: teacher, 4: student}, B, 14, (None, fl)) == {1: none, 4: none}    # a peak unknown (CPU)
    assert roofline(dict(zip((1, 4), tiny_models())), B, 14, (bw, fl)) == {1: none, 4: none}   # float32: no peak


def test_roofline_of_a_gpu_on_any_machine(files):
    """--roofline GPU: the speed grid's ceilings on that GPU, computed, not timed. At batch 1 a pass reads the
    weights, so k tokens a pass approach k times AR's ceiling; a wider batch raises every ceiling."""
    r = bench(files, "--roofline", "H100", "--batch_sizes", "1,64", "--seq_lens", "32", "--no-paper_shape")
    assert r.returncode == 0, r.stderr
    res = json.loads((files / "out" / "bench_trained_roofline_h100.json").read_text())
    assert res["speed"] == [] and res["quality"] == []
    assert res["config"]["peaks"] == {"gpu": "H100", "hbm_bytes_per_s": 3.35e12, "dense_flops_per_s": 989e12}
    rows = {(row["batch_size"], row["k"]): row for row in res["roofline"]}
    assert sorted(rows) == [(b, k) for b in (1, 64) for k in (1, 2, 3, 4)]
    for (b, k), row in rows.items():
        assert row["roofline_speedup"] == pytest.approx(
            row["roofline_tokens_per_s"] / rows[(b, 1)]["roofline_tokens_per_s"])
        assert 0.9 * k < rows[(1, k)]["roofline_speedup"] <= k
        assert rows[(64, k)]["roofline_tokens_per_s"] > rows[(1, k)]["roofline_tokens_per_s"]
    with open(files / "out" / "bench_trained_roofline_h100.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "ceiling speedup" in r.stdout


def test_timed_rows_carry_each_sides_ceiling(files, tmp_path, monkeypatch):
    """On a GPU with known peaks (patched in here), each timed row carries the ceiling of the model that made it: AR's
    of the teacher, every k's of the student, in bf16 as timed."""
    peaks = (3.35e12, 989e12)
    monkeypatch.setattr(bench_py, "peaks_of", lambda device, gpu_name=None: peaks)
    bench_py.main(["--teacher", str(files / "teacher.pt"), "--student", str(files / "student.pt"), "--no-quality",
                   "--batch_sizes", "2", "--seq_lens", "32", "--device", "cpu", "--out_dir", str(tmp_path),
                   "--name", "g"])
    rows = json.loads((tmp_path / "g.json").read_text())["speed"]
    teacher, student = (copy.deepcopy(m).to(torch.bfloat16) for m in tiny_models())   # the checkpoints' models
    want = roofline({1: teacher, 2: student, 3: student, 4: student}, 2, 32, peaks)
    assert [{f: row[f] for f in want[1]} for row in rows] == [want[row["k"]] for row in rows] and len(rows) == 4
    for row in rows:   # MBU: the bytes a generation needs, over its (median) time, over the peak bandwidth
        model = teacher if row["k"] == 1 else student
        assert row["mbu"] == pytest.approx(bytes_moved(model, 2, 6, row["new_tokens"], row["k"], 2)
                                           / statistics.median(row["times_s"]) / peaks[0])


def test_speed_outputs_with_a_roofline(tmp_path, capsys):
    """On a GPU with known peaks every speed row has its ceiling: the table prints the speedup's ceiling and each
    side's tokens/s as a fraction of its own; the plot draws the largest k's ceiling."""
    rows = [{"model": "m", "seq_len": 64, "batch_size": b, "k": k, "tokens_per_s": 100.0 * k * b,
             "tokens_per_s_per_sequence": 100.0 * k, "speedup": float(k), "mbu": 0.5,
             "roofline_tokens_per_s": 400.0 * k * b, "roofline_speedup": k - 0.25}
            for b in (1, 8) for k in (1, 2, 4)]
    rows[0]["roofline_speedup"] = 1.0
    bench_py.print_tables(rows, [], [], [], [], "GPU")
    out = capsys.readouterr().out
    assert "roofline" in out and "of roof" in out
    assert re.search(r"m\s+64\s+8\s+4\s+3,200\s+400\s+4\.00x\s+50\.0%\s+3\.75x\s+25\.0%", out), out
    bench_py.plot_speed(rows, "GPU", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cache_sized_to_the_generation_gives_the_same_tokens():
    """bench.py times generations with a static cache of seq_len entries instead of block_size."""
    teacher, student = tiny_models()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(50257, (2, 6), generator=gen)
    noise = torch.rand(2, 20, generator=gen, dtype=torch.float64)
    for model, k in ((teacher, 1), (student, 4)):
        small = sized_to(model, 26)
        assert small.config.block_size == 26 and model.config.block_size == 64   # the original is untouched
        assert small.lm_head.weight is model.lm_head.weight                      # weights are shared
        assert torch.equal(generate(small, prompt, noise, k), generate(model, prompt, noise, k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernel needs a GPU")
@torch.no_grad()
def test_compiled_flex_matches_sdpa_on_gpu(no_tf32):
    """The fused flex kernel skips the KV blocks its block mask does not list; over a prefix that spans
    several blocks (and a prefill of several query blocks) it must still give SDPA's logits, with garbage
    in the unwritten cache."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=512, n_layer=2, n_head=2, n_embd=64, max_k=K)
    student = GPT(cfg).cuda().eval()
    x = torch.randint(50257, (3, 420), device="cuda")
    u = torch.rand(3, 60, K, dtype=torch.float64, device="cuda")
    logits = {}
    for attention in ("sdpa", "flex"):
        cache = KVCache(cfg, 3, "cuda", torch.float32, attention)
        for t in cache.k + cache.v:   # garbage in every entry
            t.normal_()
        slots = student.noise_encoder(u)   # (3, 60, K, C)
        out = [student.forward_step(x[:, :300], torch.arange(300 + K, device="cuda"), slots[:, 0], cache)]
        for i, s in enumerate(range(300, 420, K)):
            pos = torch.arange(s, s + 2 * K, device="cuda")   # K tokens to commit, then K slots
            out.append(student.forward_step(x[:, s:s + K], pos, slots[:, i + 1], cache))
        logits[attention] = torch.stack(out)
    torch.testing.assert_close(logits["flex"], logits["sdpa"], rtol=0, atol=2e-3)
    # whole generations at an evaluation's batch size, the AR teacher's 1-query steps included: distill.py's
    # end-of-stage agreement decodes exactly these shapes
    teacher = GPT(dataclasses.replace(cfg, max_k=0)).cuda().eval()
    prompt, noise = x[:, :6].repeat(86, 1), torch.rand(258, 48, dtype=torch.float64, device="cuda")
    for model, k in ((teacher, 1), (student, 1), (student, 2), (student, 4)):
        out = {a: generate(model, prompt, noise, k, cache=KVCache(cfg, 258, "cuda", torch.float32, a))
               for a in ("sdpa", "flex")}
        assert (out["flex"] == out["sdpa"]).float().mean() > 0.99, k
        if model is student and k != 4:
            continue
        # bench.py --compile: the whole step compiled, then captured in a CUDA graph, on both attention paths
        for a in ("sdpa", "flex"):
            compiled = generate(model, prompt, noise, k, cache=KVCache(cfg, 258, "cuda", torch.float32, a),
                                step_fn=CUDAGraphStep(compile=True))
            assert (compiled == out["sdpa"]).float().mean() > 0.99, (a, k)
