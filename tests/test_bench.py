"""bench.py: the outputs of a run on a tiny pair, the measures against known answers, the timing
discipline, the roofline's arithmetic, the resumable grid, and the rule that keeps impossible speed
figures out of the results. (The fast path's equivalence with model.generate: tests/test_fast.py.)
Run: python -m pytest tests/test_bench.py -q"""
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import bytes_moved, generation_phases, nll_per_position, roofline  # noqa: E402
from common import UserError  # noqa: E402
from model import GPT, draw, generate  # noqa: E402
from test_sample import CHARS, K, tiny_pair, write_pair  # noqa: E402

TOK = SimpleNamespace(decode=lambda ids: "".join(CHARS[i] for i in ids))   # the pair's characters
FAST = ["--device", "cpu", "--repeats", "1", "--seq_lens", "16", "--batch_sizes", "1"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"))


def run(pair, out, *args):
    """bench.main on the tiny pair, writing under `out`; returns the named part's JSON reader."""
    bench.main(["--teacher", pair[0], "--student", pair[1], "--out_dir", str(out), *args])
    return lambda part, name="bench_trained": json.loads((out / f"{name}_{part}.json").read_text())


@pytest.fixture
def steady(monkeypatch):
    """Timings on a busy CI machine may disagree: here no row is set aside as suspect (the tests of
    that rule patch the timings instead)."""
    monkeypatch.setattr(bench, "SPREAD_LIMIT", math.inf)


def test_end_to_end_outputs(pair, tmp_path, capsys, steady):
    read = run(pair, tmp_path, "--device", "cpu", "--batch_sizes", "1,2", "--seq_lens", "32",
               "--repeats", "3", "--quality_samples", "8", "--quality_tokens", "12")
    speed = read("speed")
    assert speed["device"].startswith("cpu") and speed["config"]["ks"] == [2, 3, 4]
    rows = speed["speed"]
    assert [(r["batch_size"], r["k"]) for r in rows] == [(b, k) for b in (1, 2)
                                                         for k in (1, 2, 3, 4)]
    for r in rows:   # medians over the repeats; the speedup the median of ratios within a repeat
        ar = next(a for a in rows if a["batch_size"] == r["batch_size"] and a["k"] == 1)
        assert r["new_tokens"] == (32 - 6) // r["k"] * r["k"] and len(r["times_s"]) == 3
        per_s = [r["batch_size"] * r["new_tokens"] / t for t in r["times_s"]]
        ar_per_s = [ar["batch_size"] * ar["new_tokens"] / t for t in ar["times_s"]]
        assert r["tokens_per_s"] == pytest.approx(statistics.median(per_s))
        ratios = [a / b for a, b in zip(per_s, ar_per_s)]
        assert r["speedup"] == pytest.approx(statistics.median(ratios))
        assert r["mbu"] is r["roofline_tokens_per_s"] is None   # no peaks on a CPU
        assert "suspect" in r
    quality = read("quality")
    q, blind = quality["quality"], quality["agreement_without_noise"]
    assert [(r["model"], r["k"]) for r in q] == [("ar", 1)] + [("student", k) for k in range(1, 5)]
    assert 0 < blind["independent_draw"] <= blind["teacher_mode"] <= 1
    for r in q:
        lists = ("agreement", "window_agreement", "gen_ppl_per_slot", "gen_ppl_per_slot_ratio")
        assert [len(r[key]) for key in lists] == [r["k"]] * 4
        assert r["gen_ppl"] > 1 and r["entropy_ratio"] == pytest.approx(r["entropy"]
                                                                        / q[0]["entropy"])
        assert 0 <= r["repeat4_tokens"] <= 1
        assert r["repeat4_words"] is None or 0 <= r["repeat4_words"] <= 1
    assert q[0]["agreement"] == q[0]["window_agreement"] == [1.0] and q[0]["gen_ppl_ratio"] == 1.0
    for png in ("speed", "quality"):
        assert (tmp_path / f"bench_trained_{png}.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "tokens/s" in out and "blind to the noise" in out
    assert not list(tmp_path.glob("*.partial.jsonl"))   # the grid is whole: no progress left


def test_gen_ppl_is_exact_on_judges_with_known_answers_whatever_the_batching():
    """The NLL of each continuation token given everything before it: a judge sure that token j + 1
    follows token j scores counting sequences at 1, a uniform judge at V, in any batching; per slot,
    one surprising token raises only its slot's gen-PPL. A row's ratios divide by the teacher's
    samples' gen-PPL, overall and per slot."""
    V = 11
    prompts = torch.tensor([[0, 1, 2], [4, 5, 6]])
    samples = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    counting = lambda x: (50 * torch.nn.functional.one_hot((x + 1) % V, V).float(), None)  # noqa
    uniform = lambda x: (torch.zeros(*x.shape, V), None)  # noqa: E731
    ppl = lambda judge, batch, k=1: bench.gen_ppl(  # noqa: E731
        nll_per_position(judge, prompts, samples, batch), k)
    for batch in (1, 32):
        assert ppl(counting, batch)[0] == pytest.approx(1)
        assert ppl(uniform, batch)[0] == pytest.approx(V)
    samples[1, -1] = 0   # the counting judge gives it ~e^-50: it is the 4th token, slot 2 of k = 2
    for batch in (1, 32):
        overall, per_slot = ppl(counting, batch, 2)
        assert math.log(overall) == pytest.approx(50 / 8)
        assert per_slot[0] == pytest.approx(1)
        assert math.log(per_slot[1]) == pytest.approx(50 / 4)
    nll, ar_nll = torch.tensor([1.0, 3.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 2.0, 2.0])
    row = bench.quality_row("student", 2, samples, nll, ar_nll, samples, [1.0, 1.0], TOK)
    assert row["gen_ppl_ratio"] == pytest.approx(math.exp(2 - 1.5))
    assert row["gen_ppl_per_slot_ratio"] == pytest.approx([math.exp(-0.5), math.exp(1.5)])


def test_repetition_counts_token_and_word_4grams():
    """Repeated 4-grams over the tokens, and over the words of the decoded text (what means
    something for characters): 'to be or not to be or not' repeats one of its five word 4-grams."""
    seqs = [[1, 2, 3, 4, 1, 2, 3, 4], [7, 7, 7, 7, 7]]   # 5 + 2 4-grams, 1 + 1 seen before
    assert bench.repeated_4grams(seqs) == pytest.approx(2 / 7)
    assert bench.repeated_4grams([[1, 2, 3]]) is None
    assert bench.repeated_4grams([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.0   # each sample on its own
    text = torch.tensor([[CHARS.index(c) for c in "to be or not to be or not"]])
    row = bench.quality_row("ar", 1, text, torch.ones(text.size(1)), torch.ones(text.size(1)), text,
                            [1.0], TOK)
    assert row["repeat4_words"] == pytest.approx(1 / 5)
    assert row["repeat4_tokens"] == bench.repeated_4grams(text.tolist())


def test_entropy_is_within_each_sample_then_averaged():
    """Two samples with no token in common are two narrow samples, not one broad one."""
    samples, nll = torch.tensor([[0, 1, 0, 1], [2, 2, 2, 2]]), torch.ones(4)
    row = bench.quality_row("ar", 1, samples, nll, nll, samples, [1.0], TOK)
    assert row["entropy"] == pytest.approx(math.log(2) / 2)


def test_every_sample_is_judged_by_the_teacher(monkeypatch):
    """gen-PPL: the AR teacher scores its own samples and the student's at every k, each the
    samples that model made, never the student its own (whose AR logits here are not the
    teacher's)."""
    teacher, student = tiny_pair()
    with torch.no_grad():
        student.lm_head.weight.add_(torch.randn_like(student.lm_head.weight))
    judged, made, nll, gen = [], [], bench.nll_per_position, bench.generate
    monkeypatch.setattr(bench, "nll_per_position", lambda judge, prompts, samples: judged.append(
        (judge, samples)) or nll(judge, prompts, samples))
    monkeypatch.setattr(bench, "generate", lambda *a: made.append(gen(*a)) or made[-1])
    monkeypatch.setattr(bench, "distribution_per_slot", lambda *a: {})
    val = np.random.default_rng(0).integers(0, len(CHARS), 500).astype(np.uint16)
    bench.run_quality(teacher, student, TOK, 8, val, 3, 0, torch.device("cpu"))
    assert len(judged) == len(made) == 1 + K and all(judge is teacher for judge, _ in judged)
    assert all(torch.equal(samples, m[:, :8]) for (_, samples), m in zip(judged, made))
    assert not any(torch.equal(made[0], m[:, :8]) for m in made[1:])   # (told apart)


def test_quality_decodes_every_k_from_the_ar_samples_noise(monkeypatch):
    """The student at every k decodes the noise the AR teacher decoded (and more, to fill its last
    pass), and its agreement on the teacher's context is scored against the teacher's samples, at
    every k."""
    teacher, student = tiny_pair()
    calls, windows = [], []

    def recording_generate(model, prompts, noise, k, *args, **kw):
        calls.append((model, noise, generate(model, prompts, noise, k, *args, **kw)))
        return calls[-1][2]

    def recording_window_agreement(model, prompts, ar_tokens, noise, k):
        windows.append((ar_tokens, noise))
        return [0.0] * k
    monkeypatch.setattr(bench, "generate", recording_generate)
    monkeypatch.setattr(bench, "window_agreement", recording_window_agreement)
    val = np.random.default_rng(0).integers(0, len(CHARS), 500).astype(np.uint16)
    rows, _ = bench.run_quality(teacher, student, TOK, 10, val, 3, 0, torch.device("cpu"))
    (ar_model, ar_noise, ar_out), students = calls[0], calls[1:]
    assert ar_model is teacher and [m for m, _, _ in students] == [student] * K
    assert len(rows) == K + 1
    for _, noise, _ in students:
        n = min(noise.size(1), ar_noise.size(1))
        assert torch.equal(noise[:, :n], ar_noise[:, :n])
    assert len(windows) == K
    for ar_tokens, noise in windows:
        assert torch.equal(ar_tokens, ar_out) and torch.equal(noise, ar_noise)


def test_time_point_warms_up_first_and_fences_each_timed_run(monkeypatch):
    """Warm-up (prefill + one pass) runs before any timed generation, and every generation is
    bracketed by synchronise-then-read-the-clock: no queued kernel is left out of a timing. The
    times returned are the timed rounds', the warm-up's apart."""
    events, gen, reads = [], bench.generate, iter(range(100))
    monkeypatch.setattr(bench, "sync", lambda device: events.append("sync"))
    monkeypatch.setattr(bench, "generate", lambda m, p, u, k, **kw:
                        events.append(f"generate {u.size(1)}") or gen(m, p, u, k, **kw))
    # the clock's i-th reading is i^2, so that the j-th timed span lasts 4j + 1
    monkeypatch.setattr(bench, "time", SimpleNamespace(
        perf_counter=lambda: events.append("clock") or next(reads) ** 2))
    teacher, student = tiny_pair()
    timed = bench.time_point(teacher, student, [2], 1, 12, 2, torch.device("cpu"),
                             torch.Generator().manual_seed(0), "sdpa", False)
    # warm-up of AR (2 new tokens) and k = 2 (4), then 2 repeats of (AR, k = 2), 6 new tokens each
    assert events == [e for n in (2, 4, 6, 6, 6, 6)
                      for e in ("sync", "clock", f"generate {n}", "sync", "clock")]
    assert timed == {1: (6, [9, 17], 1), 2: (6, [13, 21], 5)}   # spans 0-5 in that order


def fake_timed(ar_times, k_times, k=4, n=24):
    return {1: (n, ar_times, 0.0), k: (n, k_times, 0.0)}


def test_an_impossible_speed_is_suspect_and_never_plotted(monkeypatch, capsys):
    """The speed rule, on every device: a speedup above k (k tokens a pass cannot go more than k
    times faster) or repeats that disagree (slowest / fastest above 1.5) mark the row `suspect`;
    the table says so and the plot leaves it out."""
    teacher, student = tiny_pair()
    runs = {1: teacher, 4: student}
    honest = bench.speed_rows("m", runs, 1, 30, fake_timed([1.0, 1.1], [0.4, 0.41]), (None, None))
    assert [r["suspect"] for r in honest] == [None, None] and honest[1]["speedup"] == pytest.approx(
        statistics.median([1.0 / 0.4, 1.1 / 0.41]))
    too_fast = bench.speed_rows("m", runs, 2, 30, fake_timed([1.0, 1.0], [0.2, 0.2]), (None, None))
    assert too_fast[0]["suspect"] is None and "k-fold bound" in too_fast[1]["suspect"]
    noisy = bench.speed_rows("m", runs, 4, 30, fake_timed([1.0, 1.6], [0.5, 0.5]), (None, None))
    assert all("repeats disagree" in r["suspect"] for r in noisy)
    bench.print_tables(honest + too_fast + noisy, [], [], None, [], [], "cpu")
    table = capsys.readouterr().out
    assert "suspect: speedup 5.00x above the k-fold bound 4x" in table
    assert table.count("suspect: repeats disagree (slowest / fastest 1.6)") == 2
    figures = []
    monkeypatch.setattr(bench, "save_figure", lambda fig, path: figures.append(fig))
    bench.plot_speed(honest + too_fast + noisy, "cpu", "unused.png")
    drawn = [line.get_xydata().tolist() for line in figures[0].axes[0].lines
             if line.get_marker() == "o"]
    assert drawn == [[[1.0, honest[1]["speedup"]]]]   # batch 1 only: 2 and 4 are suspect


def test_bytes_moved_per_pass():
    """MBU's numerator: every pass reads the trunk's weights and the LM head (once, tied to the
    embedding or not; an untied input embedding is only gathered) and the cache so far and writes
    the K/V it commits; a student's also reads its noise encoder."""
    teacher, student = tiny_pair()
    weights = sum(p.numel() * 4 for p in teacher.parameters())
    encoder = sum(p.numel() * 4 for p in student.noise_encoder.parameters())
    kv = 2 * 2 * 32 * 2   # K and V, 2 layers, width 32, 2-byte cache entries
    B, P = 3, 6
    # k = 4, 8 new tokens: the prefill commits the prompt (cache 6 long), the next pass 4 tokens
    assert bytes_moved(student, B, P, 8, 4, 2) == (2 * (weights + encoder)
                                                   + B * kv * ((6 + 6) + (10 + 4)))
    assert bytes_moved(teacher, B, P, 2, 1, 2) == 2 * weights + B * kv * ((6 + 6) + (7 + 1))
    untied = GPT(dataclasses.replace(teacher.config, tie_embeddings=False))   # the paper shape's
    weights = sum(p.numel() * 4 for name, p in untied.named_parameters() if name != "wte.weight")
    assert bytes_moved(untied, B, P, 2, 1, 2) == 2 * weights + B * kv * ((6 + 6) + (7 + 1))


def test_roofline_phases_and_ceiling():
    """Per pass the trunk computes 2 FLOPs per weight for each row, noise slots included, the LM
    head for the rows read out (AR: the last; a student: its k slots), attention 4 per query, key
    and channel. In sequence each phase takes the longer of bytes / bandwidth and FLOPs / peak;
    overlapped, the whole generation takes the longer of all bytes and all FLOPs."""
    teacher, student = (copy.deepcopy(m).to(torch.bfloat16) for m in tiny_pair())
    d, L, V = 32, 2, teacher.config.padded_vocab
    trunk = L * 12 * d * d
    encoder_flops = 2 * sum(m.weight.numel() for m in student.noise_encoder.modules()
                            if isinstance(m, torch.nn.Linear))
    B, P = 3, 6
    phases = generation_phases(student, B, P, 8, 4, 2)
    # k = 4, 8 new tokens: the prefill (6 tokens + 4 slots; cache 6 long), then 4 + 4 (10 long)
    assert [f for _, f in phases] == [
        B * 4 * encoder_flops, 2 * B * 10 * trunk, 2 * B * 4 * d * V, 4 * B * L * d * 10 * (6 + 4),
        B * 4 * encoder_flops, 2 * B * 8 * trunk, 2 * B * 4 * d * V, 4 * B * L * d * 8 * (10 + 4)]
    assert phases[2][0] == phases[6][0] == d * V * 2   # the LM head's bf16 weights, once a pass
    cdf = tiny_pair(readout="cdf_seq")[1].to(torch.bfloat16)   # k - 1 noise slots a pass
    slot_flops = 2 * sum(m.weight.numel() for name, m in cdf.named_modules()
                         if name.startswith(("noise_encoder", "slot_readout"))
                         and isinstance(m, torch.nn.Linear))
    assert [f for _, f in generation_phases(cdf, B, P, 8, 4, 2)][:2] == [
        B * 3 * slot_flops, 2 * B * 9 * trunk]
    assert [f for _, f in generation_phases(teacher, B, P, 2, 1, 2)] == [
        2 * B * 6 * trunk, 2 * B * d * V, 4 * B * L * d * 6 * 6, 2 * B * trunk, 2 * B * d * V,
        4 * B * L * d * 7]
    bw, fl = 1e12, 16e12   # 16 FLOPs a byte: the trunk binds on compute, the rest on bytes
    roof = roofline({1: teacher, 4: student}, B, 14, (bw, fl))   # 14 = 6 + 8 new tokens
    sequence = (phases[1][1] + phases[5][1]) / fl + sum(phases[i][0]
                                                        for i in (0, 2, 3, 4, 6, 7)) / bw
    assert roof[4]["roofline_tokens_per_s"] == pytest.approx(B * 8 / sequence)
    overlapped = max(sum(b for b, _ in phases) / bw, sum(f for _, f in phases) / fl)
    ar = generation_phases(teacher, B, P, 8, 1, 2)
    ar_overlapped = max(sum(b for b, _ in ar) / bw, sum(f for _, f in ar) / fl)
    assert roof[4]["roofline_overlapped_speedup"] == pytest.approx(ar_overlapped / overlapped)
    # AR's passes: each phase bound by the slower of its bytes and its FLOPs
    ar_sequence = sum(max(b / bw, f / fl) for b, f in ar)
    assert roof[1]["roofline_tokens_per_s"] == pytest.approx(B * 8 / ar_sequence)
    assert roof[4]["roofline_speedup"] == pytest.approx(
        roof[4]["roofline_tokens_per_s"] / roof[1]["roofline_tokens_per_s"])
    none = dict.fromkeys(bench.ROOFLINE_FIELDS)
    assert roofline({1: teacher, 4: student}, B, 14, (None, fl)) == {1: none, 4: none}
    assert roofline(dict(zip((1, 4), tiny_pair())), B, 14, (bw, fl)) == {1: none, 4: none}   # fp32


def test_roofline_of_a_gpu_on_any_machine(pair, tmp_path):
    """--roofline GPU: the grid's ceilings there, computed: at batch 1 a pass reads the weights,
    so k tokens a pass approach k times AR's ceiling; a wider batch raises every ceiling."""
    read = run(pair, tmp_path, "--device", "cpu", "--roofline", "H200", "--batch_sizes", "1,64",
               "--seq_lens", "32", "--no-paper_shape")
    res = read("roofline_h200")
    assert res["config"]["peaks"] == {"hbm_bytes_per_s": 4.8e12, "dense_flops_per_s": 989e12}
    rows = {(r["batch_size"], r["k"]): r for r in res["roofline"]}
    assert sorted(rows) == [(b, k) for b in (1, 64) for k in (1, 2, 3, 4)]
    for (b, k), r in rows.items():
        # (this toy's noise encoder, read every pass, weighs almost as much as its trunk)
        assert 0.7 * k < rows[(1, k)]["roofline_speedup"] <= k
        assert rows[(64, k)]["roofline_tokens_per_s"] > rows[(1, k)]["roofline_tokens_per_s"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_trained_roofline_h200.json"]


def test_timed_rows_carry_each_sides_ceiling(pair, tmp_path, monkeypatch, steady):
    """On a GPU with known peaks (patched in), each timed row carries the ceiling of the model that
    made it, in bf16 as timed, and MBU is the bytes a generation needs over its median time."""
    peaks = {"bw": 3.35e12, "fl": 989e12}
    monkeypatch.setattr(bench, "device_peak", lambda device, table, name=None:
                        peaks["bw"] if table is bench.PEAK_BANDWIDTH else peaks["fl"])
    rows = run(pair, tmp_path, *FAST, "--seq_lens", "32", "--batch_sizes", "2", "--no-quality",
               "--repeats", "3")(
        "speed")["speed"]
    teacher, student = (copy.deepcopy(m).to(torch.bfloat16) for m in tiny_pair())
    want = roofline({1: teacher, 2: student, 3: student, 4: student}, 2, 32,
                    (peaks["bw"], peaks["fl"]))
    assert [{f: r[f] for f in want[1]} for r in rows] == [want[r["k"]] for r in rows]
    for r in rows:
        model = teacher if r["k"] == 1 else student
        assert r["mbu"] == pytest.approx(bytes_moved(model, 2, 6, r["new_tokens"], r["k"], 2)
                                         / statistics.median(r["times_s"]) / peaks["bw"])


def test_an_interrupted_grid_resumes_at_the_point_it_stopped(pair, tmp_path, monkeypatch):
    """Ctrl-C stops the grid at once, with one line per point done in <name>_speed.partial.jsonl and
    no results; --resume times only the points not done, the interrupted one again (each from a
    generator of its own: what an uninterrupted run gives it) and refuses rows of another commit,
    machine or flags."""
    timed, time_point, ctrl_c = [], bench.time_point, {"at": 2}

    def recorded(teacher, student, ks, B, seq_len, repeats, device, gen, *rest):
        timed.append((B, gen.initial_seed()))
        if len(timed) == ctrl_c["at"]:
            # the point done is on disk already (a kill now would keep it), not in a buffer
            assert len((tmp_path / "bench_trained_speed.partial.jsonl").read_text()
                       .splitlines()) == 1
            raise KeyboardInterrupt   # Ctrl-C while this point is timed
        return time_point(teacher, student, ks, B, seq_len, repeats, device, gen, *rest)
    monkeypatch.setattr(bench, "time_point", recorded)
    args = [*FAST, "--no-quality", "--ks", "4", "--batch_sizes", "1,2,3"]
    with pytest.raises(KeyboardInterrupt):
        run(pair, tmp_path, *args)
    partial = tmp_path / "bench_trained_speed.partial.jsonl"
    lines = [json.loads(x) for x in partial.read_text().splitlines()]
    assert [x["point"] for x in lines] == [["trained", 16, 1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]   # no results yet
    for name, made_with in (("git_commit", "commit"), ("device_name", "machine")):
        with monkeypatch.context() as m:
            m.setattr(bench, name, lambda *a: "another")
            with pytest.raises(UserError, match=f"rows made with {made_with}"):
                run(pair, tmp_path, *args, "--resume")
    for other, made_with in ((["--dtype", "float32"], "dtype 'bfloat16'"),
                             (["--repeats", "2"], "repeats 1"), (["--seed", "1"], "seed 0"),
                             (["--attention", "flex"], "attention 'sdpa'"),
                             (["--compile"], "compile False")):   # each makes other rows
        with pytest.raises(UserError, match=f"rows made with .*{made_with}"):
            run(pair, tmp_path, *args, "--resume", *other)
    rows = run(pair, tmp_path, *args, "--resume")("speed")["speed"]
    assert [B for B, _ in timed] == [1, 2, 2, 3]   # the interrupted point again, then the third
    assert timed[1] == timed[2]   # redone from the same generator
    assert rows[:2] == [r for x in lines for r in x["rows"]]
    assert [r["batch_size"] for r in rows[2:]] == [2, 2, 3, 3]
    assert not partial.exists()
    seeds, ctrl_c["at"] = dict(timed), None
    timed.clear()
    run(pair, tmp_path, *args)   # uninterrupted: the same inputs at every point
    assert dict(timed) == seeds and len(set(seeds.values())) == 3


def test_a_point_out_of_memory_is_skipped_and_the_grid_goes_on(tmp_path):
    def point(label, teacher, student, seq_len, B, gen):
        if B == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if B == 3:   # what the CPU allocator raises
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        return [{"batch_size": B}]
    rows, skipped = bench.run_grid([("m", None, None, 12, B) for B in (1, 2, 3, 4)], point,
                                   str(tmp_path / "p.partial.jsonl"), False, 0, {})
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert skipped == [{"model": "m", "seq_len": 12, "batch_size": B, "reason": "out of memory"}
                       for B in (2, 3)]

    def bug(*a):   # any other error is no reason to skip a point: it stops the grid
        raise RuntimeError("a bug, not memory")
    with pytest.raises(RuntimeError, match="a bug"):
        bench.run_grid([("m", None, None, 12, 1)], bug, str(tmp_path / "q.partial.jsonl"), False,
                       0, {})


@pytest.mark.parametrize("left", ["whole, torn", "torn", "nothing"])   # what the kill left
def test_a_resumed_grid_cuts_a_line_torn_by_a_kill(tmp_path, left):
    """A kill while a point's line is written leaves it without its newline: --resume redoes that
    point, keeps the whole lines (if any), and the file it leaves reads back whole."""
    path = tmp_path / "p.partial.jsonl"
    whole = {"point": ["m", 12, 1], "made_by": {"commit": "c"}, "rows": [{"batch_size": 1}],
             "skipped": None}
    torn = json.dumps({**whole, "point": ["m", 12, 2]})[:30]
    path.write_text({"whole, torn": json.dumps(whole) + "\n" + torn, "torn": torn,
                     "nothing": ""}[left])
    done = []
    rows, _ = bench.run_grid([("m", None, None, 12, B) for B in (1, 2)],
                             lambda *a: done.append(a[4]) or [{"batch_size": a[4]}], str(path),
                             True, 0, {"commit": "c"})
    assert done == ([2] if left == "whole, torn" else [1, 2])
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert [json.loads(x)["point"] for x in path.read_text().splitlines()] == [["m", 12, 1],
                                                                               ["m", 12, 2]]


@pytest.mark.parametrize("stop", ["out of memory", "Ctrl-C", "suspect"])
def test_a_run_that_measures_nothing_writes_nothing(pair, tmp_path, monkeypatch, stop):
    """Every point out of memory, Ctrl-C before the grid is whole (after its first point), or every
    timed row suspect: earlier results stay."""
    earlier = {name: "earlier" for name in ("bench_trained_speed.json", "bench_trained_speed.png",
                                             "bench_trained_quality.json")}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    timed, points, ctrl_c = bench.time_point, [], stop == "Ctrl-C"

    def stopped(*args):
        points.append(args)
        if stop == "suspect" or ctrl_c and len(points) == 1:
            return timed(*args)
        raise KeyboardInterrupt if ctrl_c else torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(bench, "time_point", stopped)
    if stop == "suspect":   # every repeat's spread is above the limit
        monkeypatch.setattr(bench, "SPREAD_LIMIT", 0.0)
    with pytest.raises(KeyboardInterrupt if ctrl_c else UserError,
                       match=None if ctrl_c else "measured nothing"):
        run(pair, tmp_path, *FAST, "--batch_sizes", "1,2", *([] if ctrl_c else ["--no-quality"]))
    assert len(points) == 2
    assert {name: (tmp_path / name).read_text() for name in earlier} == earlier


def test_some_suspect_rows_are_written_with_the_others(pair, tmp_path, monkeypatch):
    """One suspect row (here k = 4 timed 100 times too fast) leaves a result to write: the speed
    file keeps every row, the suspect one marked."""
    timed = bench.time_point

    def too_fast_at_4(*args):   # every k at AR's measured pace (a busy CPU's own timings may pass
        out = timed(*args)      # the k-fold bound at k = 2), but k = 4 100 times faster
        n_ar, ts_ar, _ = out[1]
        return {k: (n, [t * n / n_ar / (100 if k == 4 else 1) for t in ts_ar], warm)
                for k, (n, _, warm) in out.items()}
    monkeypatch.setattr(bench, "time_point", too_fast_at_4)
    rows = run(pair, tmp_path, *FAST, "--no-quality")("speed")["speed"]
    assert [r["k"] for r in rows if r["suspect"]] == [4] and len(rows) == 4


def test_a_name_may_hold_a_folder(pair, tmp_path):
    assert run(pair, tmp_path, *FAST, "--no-quality", "--ks", "4", "--name", "runs/first")(
        "speed", "runs/first")["speed"]


def test_a_partial_run_keeps_the_other_parts_files(pair, tmp_path):
    """--no-quality writes the speed files and leaves the quality files of an earlier run;
    --no-speed writes the quality files and leaves a stopped speed grid to resume."""
    (tmp_path / "bench_trained_quality.json").write_text("from the whole run")
    run(pair, tmp_path, *FAST, "--no-quality", "--ks", "4")
    assert (tmp_path / "bench_trained_quality.json").read_text() == "from the whole run"
    assert (tmp_path / "bench_trained_speed.json").exists()
    grid = tmp_path / "bench_trained_speed.partial.jsonl"
    grid.write_text('{"point": ["trained", 16, 1]}\n')
    run(pair, tmp_path, "--device", "cpu", "--no-speed", "--quality_samples", "4",
        "--quality_tokens", "8")
    assert (tmp_path / "bench_trained_quality.json").read_text() != "from the whole run"
    assert grid.read_text() == '{"point": ["trained", 16, 1]}\n'


def test_profile_of_one_decode_step(pair, tmp_path):
    """--profile: per point and k, one step's time and launches; a student's step is the same code
    at every k, and launches about what an AR step does (the trunk; argmax for the inverse CDF; the
    noise encoder's few kernels)."""
    rows = run(pair, tmp_path, "--device", "cpu", "--profile", "--batch_sizes", "2", "--seq_lens",
               "32")("profile")["profile"]
    rows = {r["k"]: r for r in rows}
    assert sorted(rows) == [1, 2, 3, 4]
    for r in rows.values():
        assert r["step_ms"] > 0 and 0 < len(r["top"]) <= 8 and r["launches"].startswith("CPU")
        assert r["tokens_per_s"] == pytest.approx(2 * r["k"] / r["step_ms"] * 1e3)
    launches = {k: r["launches_per_step"] for k, r in rows.items()}
    assert launches[2] == launches[3] == launches[4]
    assert abs(launches[4] - launches[1]) < 0.2 * launches[1]


def test_paper_shape_needs_no_checkpoint(tmp_path, monkeypatch):
    """--no-trained: the paper's shape with random weights; its student gets as many slots as the
    largest k asked for. (A narrow stand-in: the real one takes CPU seconds to build.)"""
    paper = bench.PAPER_SHAPE
    assert (paper.n_layer, paper.n_head, paper.n_embd, paper.tie_embeddings) == (12, 12, 768, False)
    monkeypatch.setattr(bench, "PAPER_SHAPE", dataclasses.replace(paper, n_layer=1, n_head=2,
                                                                  n_embd=32))
    bench.main(["--no-trained", *FAST, "--seq_lens", "12", "--ks", "2,5", "--out_dir",
                str(tmp_path)])
    res = json.loads((tmp_path / "bench_paper_shape_speed.json").read_text())
    assert [(r["model"], r["k"]) for r in res["speed"]] == [("paper_shape_random", k)
                                                           for k in (1, 2, 5)]
    assert res["config"]["model_configs"]["paper_shape_random"]["max_k"] == 5
    assert not list(tmp_path.glob("*quality*"))


@pytest.mark.parametrize("args, message", [
    (["--ks", "0"], "--ks"),
    (["--ks", "9"], "max_k (4)"),
    (["--ks", ""], "not a comma list"),
    (["--batch_sizes", "0"], "at least 1"),
    (["--repeats", "0"], "at least 1"),
    (["--seq_lens", "100"], "block size"),
    (["--quality_tokens", "80", "--no-speed"], "block size"),
    (["--student", "missing.pt"], "not found"),
    (["--roofline", "TPU"], "known peaks: H100"),
    (["--roofline", ""], "--roofline must not be empty"),
    (["--name", ""], "--name must not be empty"),
    (["--roofline", "H100", "--dtype", "float32"], "bf16"),
    (["--data_dir", "/nonexistent", "--no-speed"], "/nonexistent"),
    (["--resume"], "nothing to continue"),
])
def test_bad_input_is_one_line(pair, tmp_path, args, message):
    with pytest.raises(UserError) as e:
        run(pair, tmp_path, "--device", "cpu", "--batch_sizes", "1", *args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_quality_samples_hold_a_pass_of_every_k(tmp_path):
    """A k = 8 student scored on 5 tokens would have no window at k = 6..8 (NaN agreements)."""
    pair = write_pair(tmp_path, k=8)
    with pytest.raises(UserError, match="--quality_tokens 5: 8 "):
        run(pair, tmp_path, "--device", "cpu", "--no-speed", "--quality_tokens", "5")


@torch.no_grad()
def test_distribution_per_slot_tells_a_sampler_from_a_collapsed_student():
    """A cdf student fresh from its teacher, which samples the teacher exactly at slot 1
    (test_model.py), measures at the finite-sample floor (total variation within 1.5x of it,
    entropy kept); an argmax student blind to its noise writes one token whatever u (entropy 0,
    total variation far above the floor)."""
    teacher, _ = tiny_pair()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(4)   # less uniform (max p 0.09-0.19 over 61 characters)
    sampler = GPT.student_from(teacher, K, readout="cdf").eval()
    blind = GPT.student_from(teacher, K).eval()
    with torch.no_grad():
        for p in blind.noise_encoder.parameters():
            p.zero_()
    prompts = torch.randint(len(CHARS), (8, 6), generator=torch.Generator().manual_seed(0))
    good, bad = (bench.distribution_per_slot(teacher, m, 2, prompts,
                                             torch.Generator().manual_seed(1), draws=256, batch=b)
                 for m, b in ((sampler, 4), (blind, 3)))   # 3: batches of 3, 3 and 2
    assert good["tv_per_slot"][0] < 1.5 * good["tv_floor_per_slot"][0]
    assert 0.8 < good["draw_entropy_ratio_per_slot"][0] < 1.2
    assert bad["draw_entropy_ratio_per_slot"] == [0.0, 0.0]
    assert min(bad["tv_per_slot"]) > 3 * max(bad["tv_floor_per_slot"])
    # all its draws on one token t: the total variation is the teacher's mass elsewhere, 1 - p(t)
    anchors = torch.full((8, 1), 5)
    t = blind.window_tokens(prompts, anchors, torch.rand(8, 1, 2))[:, 0, 0]
    p = teacher.next_token_logits(prompts, anchors)[:, 0].float().softmax(-1)
    assert bad["tv_per_slot"][0] == pytest.approx(1 - p[range(8), t].mean().item(), abs=1e-6)


class TeacherChain:
    """In each window the teacher's own chain, drawn with its noise: exact at every slot."""

    def __init__(self, teacher):
        self.teacher = teacher

    def window_tokens(self, idx, anchors, noise):
        own = anchors.new_zeros(*anchors.shape, 0)
        for i in range(noise.size(2)):
            logits = self.teacher.forward_window(idx, anchors, own)[:, :, -1].float()
            own = torch.cat([own, draw(logits, noise[:, :, i], "inverse_cdf")[..., None]], dim=2)
        return own


@torch.no_grad()
def test_distribution_per_slot_puts_the_teachers_own_chain_at_the_floor():
    """Slot i is judged against the teacher after the tokens the same draws wrote before it: the
    teacher's own chain is at the finite-sample floor at every slot, the entropy kept."""
    teacher, _ = tiny_pair()
    teacher.lm_head.weight.mul_(4)   # peaked, and dependent on the order of the tokens before
    out = bench.distribution_per_slot(teacher, TeacherChain(teacher), 3, torch.randint(
        len(CHARS), (8, 6), generator=torch.Generator().manual_seed(0)),
        torch.Generator().manual_seed(1), draws=256)
    for tv, floor, ratio in zip(*out.values()):
        assert tv < 1.5 * floor and 0.9 < ratio < 1.1, out


@torch.no_grad()
def test_the_entropy_ratio_compares_histograms_of_as_many_draws():
    """16 draws over a broad distribution show fewer tokens than it has: the ratio divides by the
    teacher's own histogram of 16 draws, so that the teacher's chain reads about 1 (against the
    distribution's entropy it would read about 0.65)."""
    teacher, _ = tiny_pair()   # untrained: nearly uniform over 62 characters
    out = bench.distribution_per_slot(teacher, TeacherChain(teacher), 2, torch.randint(
        len(CHARS), (16, 6), generator=torch.Generator().manual_seed(0)),
        torch.Generator().manual_seed(1), draws=16)
    assert all(0.93 < r < 1.07 for r in out["draw_entropy_ratio_per_slot"]), out
