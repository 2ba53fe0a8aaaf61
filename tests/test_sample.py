"""sample.py: the teacher and the student decode one noise, the student's tokens that differ are
marked, both agreements are printed beside the noise-blind baselines, and mistakes are one line.
Run: python -m pytest tests/test_sample.py -q"""
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sample  # noqa: E402
from common import UserError, save_checkpoint  # noqa: E402
from model import (GPT, GPTConfig, agreement_without_noise, generate,  # noqa: E402
                   teacher_context_windows, window_agreement)

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
K = 4


def tiny_pair(vocab_size=len(CHARS), k=K, **choices):
    """A 2 x 32 teacher and its k-slot student (choices: student_from's), with a noise encoder
    whose output matters."""
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2,
                            n_embd=32)).eval()
    student = GPT.student_from(teacher, k, **choices).eval()
    with torch.no_grad():
        for p in student.noise_encoder.parameters():
            p.normal_(0, 0.5)
    return teacher, student


def write_pair(tmp, teacher_extra=None, student_extra=None, **choices):
    """The pair's checkpoints with the fields sample.py and bench.py read (character vocabulary;
    without the extras no step, best_val or teacher_id, so loading them warns that the student
    may be another teacher's), and a val split of the data they name. Returns (teacher path,
    student path, data dir)."""
    spec = {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS}
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    ids = np.array([CHARS.index(c) for c in TEXT * 30], dtype=np.uint16)
    ids.tofile(data / "val.bin")
    np.full_like(ids, CHARS.index("z")).tofile(data / "train.bin")   # prefixes come from val
    (data / "meta.json").write_text(json.dumps({**spec, "val_tokens": len(ids),
                                                "train_tokens": len(ids)}))
    paths = []
    for kind, m, extra in zip(("teacher", "student"), tiny_pair(**choices),
                              (teacher_extra, student_extra)):
        paths.append(str(tmp / f"{kind}.pt"))
        save_checkpoint(paths[-1], {"kind": kind, "model_config": asdict(m.config),
                                    "model": m.state_dict(), "tokenizer": spec,
                                    "train_config": {"data_dir": str(data)}, **(extra or {})})
    return (*paths, str(data))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"))


def run(pair, *args):
    return sample.main(["--teacher", pair[0], "--student", pair[1], "--device", "cpu", *args])


def test_show_marks_exactly_the_tokens_that_differ():
    """Each token is padded to the wider of the pair, so '^' stands under exactly the student's
    tokens that differ, for characters and for multi-character (BPE-like) tokens alike; '|' parts
    the passes and a newline is drawn as one column."""
    chars = SimpleNamespace(decode=lambda ids: "".join("abcdefgh\nXY"[i] for i in ids))
    teacher, student = [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 9, 3, 4, 5, 10, 8]
    t, s, marks = sample.show(chars, teacher, student, 4).split("\n")
    assert t == "  teacher abcd|efgh" and s == "  student abXd|efY⏎"
    assert [i for i, c in enumerate(marks) if c == "^"] == [s.index(c) for c in "XY⏎"]
    words = SimpleNamespace(decode=lambda ids: ["the", " a", " cat", "!"][ids[0]])
    t, s, marks = sample.show(words, [0, 2, 3], [1, 2, 2], 1).split("\n")
    assert (t, s) == ("  teacher the cat!", "  student  a  cat cat")
    assert marks == " " * 10 + "^^^" + " " * 4 + "^^^^"   # under " a " and the last " cat"
    lines = sample.show(chars, teacher * 10, teacher * 10, 2, width=20).split("\n")
    assert len(lines) % 3 == 0 and len(lines) > 3 and all(len(x) <= 20 + 10 for x in lines)
    assert sample.show(chars, teacher, teacher, 4, width=9).count("\n") == 2   # "abcd|efgh" fits
    assert sample.show(chars, teacher, teacher, 4, width=8).count("\n") == 5
    same = SimpleNamespace(decode=lambda ids: "aab"[ids[0]])   # ids 0 and 1 both read "a"
    assert sample.show(same, [0, 2], [1, 2], 1).split("\n")[2] == " " * 10 + "^"   # ids differ


def test_sample_shows_both_on_one_noise_and_both_agreements(tmp_path, capsys):
    """Free-running and on the teacher's context, per sample; the agreements printed are
    model.window_agreement's (on the teacher's context) and the free-running one, beside
    model.agreement_without_noise's two baselines, all on the very noise the samples used. A cdf
    student, whose two views differ (in sample 2) and agree with the teacher in part."""
    run(write_pair(tmp_path, readout="cdf"), "--prompt", "First", "--num_samples", "2",
        "--max_new_tokens", "22", "--k", "4")
    out = capsys.readouterr().out
    teacher, student = tiny_pair(readout="cdf")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.tensor([[CHARS.index(c) for c in "First"]] * 2)
    noise = torch.rand(2, 24, generator=gen, dtype=torch.float64)   # 22 rounded up to 6 passes
    ar, kf = generate(teacher, prompts, noise, 1), generate(student, prompts, noise, 4)
    windowed = teacher_context_windows(student, prompts, ar, noise, 4)
    text = lambda ids: "|".join("".join(CHARS[i] for i in ids[s:s + 4]).replace("\n", "⏎")  # noqa
                                for s in range(0, 24, 4))
    assert out.count("free-running:") == out.count("on the teacher's context:") == 2
    assert "per slot, 2 x 24 tokens:" in out   # the tokens measured, not --max_new_tokens
    assert out.count("  teacher " + text(ar[0])) == 2
    assert not torch.equal(kf[1], windowed[1])   # (so that the two views are told apart)
    free_view, context_view = out.split("--- sample 2")[1].split("on the teacher's context:")
    assert "  student " + text(kf[1]) in free_view
    assert "  student " + text(windowed[1]) in context_view
    slots = lambda name: [float(x) / 100 for x in  # noqa: E731
                          re.findall(r"slot \d +([\d.]+)%", out.split(name)[-1].split("\n")[0])]
    want = window_agreement(student, prompts, ar, noise, 4)
    free = (ar == kf).float().view(2, 6, 4).mean((0, 1)).tolist()
    assert want[0] == 1.0 and want != free   # values that a mix-up of the two would change
    assert slots("on the teacher's context  ") == pytest.approx(want, abs=1e-3)
    assert slots("free-running    ") == pytest.approx(free, abs=1e-3)
    blind = agreement_without_noise(teacher, prompts, ar)
    assert (f"blind to the noise: {blind['independent_draw']:.1%} (an independent draw), "
            f"{blind['teacher_mode']:.1%} (the teacher's mode)") in out


def test_val_prefixes_come_from_the_teachers_data(pair, capsys):
    run(pair, "--num_samples", "1", "--max_new_tokens", "4", "--k", "2")
    prompt = re.search(r"--- sample 1: '(.*)', k = 2", capsys.readouterr().out).group(1)
    assert len(prompt.encode().decode("unicode_escape")) == 6 and prompt in repr(TEXT)


def test_k_is_the_students_own_unless_given(pair, capsys):
    run(pair, "--prompt", "First", "--num_samples", "1", "--max_new_tokens", "8")
    assert "'First', k = 4" in capsys.readouterr().out


def test_a_prompt_may_fill_the_block_but_for_the_new_tokens(pair, capsys):
    """Block size 64, 12 new tokens: a prompt of 52 fits, one of 53 is refused."""
    run(pair, "--prompt", "a" * 52, "--num_samples", "1", "--max_new_tokens", "12")
    with pytest.raises(UserError, match="a prompt of 53 tokens: 1 to 52 fit"):
        run(pair, "--prompt", "a" * 53, "--num_samples", "1", "--max_new_tokens", "12")


def test_a_student_of_another_shape_is_an_error(tmp_path):
    teacher, _, _ = write_pair(tmp_path)
    other = GPT(GPTConfig(block_size=64, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=32,
                          max_k=K))
    save_checkpoint(str(tmp_path / "other.pt"), {"kind": "student", "model_config":
                                                 asdict(other.config), "model": other.state_dict()})
    with pytest.raises(UserError, match="n_layer 1 vs 2"):
        sample.main(["--teacher", teacher, "--student", str(tmp_path / "other.pt")])


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt must not be empty"),
    (["--prompt", "é"], "--prompt"),
    (["--k", "0"], "--k 0: must be 1 to"),
    (["--k", "5"], "max_k (4)"),
    (["--prompt", "a" * 60], "block size 64"),
    (["--max_new_tokens", "0"], "at least 1"),
    (["--max_new_tokens", "64"], "none fits (lower --max_new_tokens) before 64 new tokens"),
    (["--student", ""], "--student must not be empty"),   # an empty flag is given, not left out
])
def test_bad_input_is_one_line(pair, args, message):
    with pytest.raises(UserError) as e:
        run(pair, *args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_given_teacher_finds_the_student_of_its_preset(tmp_path, monkeypatch):
    """No flag: the newest teacher in out/. --teacher alone: the student is the highest k in
    out/distill_<the teacher's preset>/ (by number: k = 16 after k = 8; a copy named otherwise is
    no student); a teacher elsewhere needs --student, but a student given as the teacher, or no
    file, is said as such first."""
    monkeypatch.chdir(tmp_path)
    for path in ("out/teacher_y/best.pt", "out/teacher_x/best.pt", "out/distill_x/student_k8.pt",
                 "out/distill_x/student_k16.pt", "out/distill_x/student_k32_old.pt"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    os.makedirs("elsewhere")
    write_pair(tmp_path / "elsewhere")
    os.utime("out/teacher_y/best.pt", (0, 0))   # no flag: the newest, not the last by name
    assert sample.find_checkpoints(None, "out/teacher_x/best.pt", None) == (
        "out/teacher_x/best.pt", "out/distill_x/student_k16.pt")
    assert sample.find_checkpoints(None, None, None) == (
        "out/teacher_x/best.pt", "out/distill_x/student_k16.pt")
    with pytest.raises(UserError, match=r"not in an out/teacher_<preset>/ folder: pass --student"):
        sample.find_checkpoints(None, "elsewhere/teacher.pt", None)
    for given, said in (("elsewhere/student.pt", "a student checkpoint where a teacher"),
                        ("elsewhere/missing.pt", "not found; run teacher.py first")):
        with pytest.raises(UserError, match=said):
            sample.find_checkpoints(None, given, None)


def test_a_student_of_another_teacher_is_warned_about(tmp_path, capsys):
    """A teacher trained again after its student was distilled: sample.py (and bench.py) warn."""
    t, s, _ = write_pair(tmp_path, teacher_extra={"step": 20, "best_val": 1.5},
                         student_extra={"teacher_id": {"step": 20, "best_val": 1.5}})
    sample.load_models(t, s, torch.device("cpu"))
    assert capsys.readouterr().err == ""
    (tmp_path / "again").mkdir()
    t2, _, _ = write_pair(tmp_path / "again", teacher_extra={"step": 20, "best_val": 1.4})
    sample.load_models(t2, s, torch.device("cpu"))
    assert "distilled from another teacher" in capsys.readouterr().err


def test_the_command_line_prints_one_error_line(pair):
    r = subprocess.run([sys.executable, "sample.py", "--teacher", pair[0], "--student", pair[0]],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr


def test_a_distribution_readout_student_starts_at_its_teachers_first_token(tmp_path, capsys):
    """sample.py takes a cdf_seq student (its config adds a readout and a coupling to the
    teacher's): fresh from its teacher, its first token of every window on the teacher's context
    is the teacher's, the teacher drawing with the student's coupling."""
    run(write_pair(tmp_path, readout="cdf_seq", readout_layers=3, coupling="gumbel"),
        "--prompt", "First", "--num_samples", "2", "--max_new_tokens", "12", "--k", "4")
    assert re.search(r"on the teacher's context\s+slot 1\s+100\.0%", capsys.readouterr().out)


def test_on_the_teachers_context_every_window_starts_from_the_teachers_text(tmp_path, capsys):
    """A cdf student fresh from its teacher: free-running, its slot 1 drifts from the teacher's
    once its earlier passes differed; each window started from the teacher's text, never."""
    run(write_pair(tmp_path, readout="cdf"), "--prompt", "First", "--num_samples", "4",
        "--max_new_tokens", "24", "--k", "4")
    out = capsys.readouterr().out
    assert re.search(r"on the teacher's context\s+slot 1\s+100\.0%", out)
    assert not re.search(r"free-running\s+slot 1\s+100\.0%", out)
