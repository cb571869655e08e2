"""
Make the token files train.py reads: data/<name>/train.bin and val.bin (uint16 token ids, as
nanoGPT writes them) and meta.json (tokenizer, vocab size, counts, how the data was made).

    python prepare_data.py                        # built-in corpus: data/passkeys (~4.4 MB)
    python prepare_data.py --input=my_text.txt    # any text: a .txt file or a folder of them
    python prepare_data.py --input=books/ --tokenizer=gpt2
    python prepare_data.py --dataset=shakespeare  # downloads tinyshakespeare (needs network)

The built-in corpus, `passkeys`, is made so that the carried state matters: plain filler text
in which a pass key is stated once and asked for later, at distances from inside one window
to many windows. It is a function of --size, --max_gap and --seed alone, made with no files.
"""

import json
import math
import os
import random
import sys
import urllib.request
from dataclasses import dataclass

import numpy as np
import tiktoken

from configurator import configure, fail


@dataclass
class PrepareConfig:
    dataset: str = "passkeys"  # 'passkeys' (built in) or 'shakespeare' (downloaded)
    input: str = ""  # a .txt file or a folder of them, used instead of --dataset
    tokenizer: str = "byte"  # 'byte' (256 bytes + <|endoftext|>) or 'gpt2' (r50k_base BPE)
    out_dir: str = ""  # where to write; default data/<dataset, or the input's name>
    size: int = 4_000_000  # passkeys: characters of training text (val gets a tenth of it)
    max_gap: int = 2048  # passkeys: longest distance, in characters, from a key to its question
    seed: int = 1337  # passkeys: the seed of the random keys and gaps
    val_fraction: float = 0.1  # --input and shakespeare: share of the tokens, from the end, for val


def get_tokenizer(name):
    """A tiktoken.Encoding: 'byte' is built here; 'gpt2' is r50k_base, GPT-2's own BPE, which
    tiktoken reads from TIKTOKEN_CACHE_DIR when that folder holds it, else downloads once."""
    if name == "byte":
        return tiktoken.Encoding(
            name="byte",
            pat_str=r"(?s).{1,256}",  # cut text in pieces; with no merges each byte is a token
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={"<|endoftext|>": 256},
        )
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:
            fail(f"cannot load the gpt2 tokenizer ({type(e).__name__}): set TIKTOKEN_CACHE_DIR "
                 "to a folder holding tiktoken's r50k_base cache file, or connect to the network")
    fail(f"unknown tokenizer {name!r}: use byte or gpt2")


# The passkey test's own words (Landmark Attention, arXiv:2305.16300; Infini-attention,
# arXiv:2404.07143), so that a model trained here meets the test in the words it learned.
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n")
FILLER = ["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. "]


def filler(rng, length):
    """At least `length` characters of filler sentences, in order from a random one."""
    start, out, n = rng.randrange(len(FILLER)), [], 0
    while n < length:
        out.append(FILLER[(start + len(out)) % len(FILLER)])
        n += len(out[-1])
    return "".join(out)


def passkey_document(rng, max_gap, rounds):
    """Rounds of: filler, a key stated once, filler of a log-uniform length, the question."""
    parts = [INTRO]
    for _ in range(rounds):
        key = rng.randrange(10000, 100000)
        gap = int(math.exp(rng.uniform(math.log(4), math.log(max_gap))))
        parts.append(filler(rng, rng.randrange(200)))
        parts.append(f"The pass key is {key}. Remember it. {key} is the pass key. ")
        parts.append(filler(rng, gap))
        parts.append(f"What is the pass key? The pass key is {key}.\n")
    return "".join(parts)


def passkey_corpus(size, max_gap, seed):
    """Documents of 1 to 8 rounds until `size` characters: a function of its arguments alone."""
    rng, docs, n = random.Random(seed), [], 0
    while n < size:
        docs.append(passkey_document(rng, max_gap, rounds=rng.randint(1, 8)))
        n += len(docs[-1])
    return docs


def read_texts(path):
    """The documents under path, as bytes: one .txt file, or every .txt file of a folder."""
    if os.path.isdir(path):
        names = sorted(os.path.join(root, f) for root, _, files in os.walk(path)
                       for f in files if f.endswith(".txt"))
        if not names:
            fail(f"no .txt files in folder {path}")
    elif os.path.isfile(path):
        names = [path]
    else:
        fail(f"input {path} does not exist: give a .txt file or a folder of them")
    docs = [open(name, "rb").read() for name in names]
    if not any(docs):
        fail(f"input {path} is empty")
    return docs


def download_shakespeare():
    url = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
           "tinyshakespeare/input.txt")
    try:
        with urllib.request.urlopen(url, timeout=20) as f:
            return [f.read()]
    except OSError as e:
        fail(f"cannot download tinyshakespeare ({e}); with the file at hand, run: "
             "python prepare_data.py --input=path/to/input.txt")


def encode(enc, docs):
    """Token ids of the documents (str or bytes), each followed by <|endoftext|>."""
    ids = []
    for doc in docs:
        if isinstance(doc, bytes) and enc.name == "byte":
            ids.extend(doc)  # the byte tokenizer takes any bytes, valid UTF-8 or not
        elif isinstance(doc, bytes):
            try:
                ids.extend(enc.encode_ordinary(doc.decode("utf-8")))
            except UnicodeDecodeError:
                print("note: input is not valid UTF-8; its bad bytes became U+FFFD")
                ids.extend(enc.encode_ordinary(doc.decode("utf-8", errors="replace")))
        else:
            ids.extend(enc.encode_ordinary(doc))
        ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)


def split(ids, val_fraction):
    n_val = int(len(ids) * val_fraction)
    return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


def prepare(cfg):
    """Write train.bin, val.bin and meta.json for cfg; returns the folder written."""
    enc = get_tokenizer(cfg.tokenizer)
    if cfg.input:
        name = os.path.splitext(os.path.basename(os.path.normpath(cfg.input)))[0]
        source = f"text from {cfg.input}"
        train, val = split(encode(enc, read_texts(cfg.input)), cfg.val_fraction)
    elif cfg.dataset == "shakespeare":
        name, source = "shakespeare", "tinyshakespeare"
        train, val = split(encode(enc, download_shakespeare()), cfg.val_fraction)
    elif cfg.dataset == "passkeys":
        if cfg.size < 1 or cfg.max_gap < 4:
            fail("--size must be >= 1 and --max_gap >= 4")
        name = "passkeys"
        source = f"built-in passkey corpus, size={cfg.size} max_gap={cfg.max_gap} seed={cfg.seed}"
        train = encode(enc, passkey_corpus(cfg.size, cfg.max_gap, cfg.seed))
        val = encode(enc, passkey_corpus(cfg.size // 10, cfg.max_gap, cfg.seed + 1))
    else:
        fail(f"unknown dataset {cfg.dataset!r}: use passkeys or shakespeare, or --input=PATH")
    out_dir = cfg.out_dir or os.path.join("data", name)
    os.makedirs(out_dir, exist_ok=True)
    train.tofile(os.path.join(out_dir, "train.bin"))
    val.tofile(os.path.join(out_dir, "val.bin"))
    meta = dict(tokenizer=cfg.tokenizer, vocab_size=enc.n_vocab, eot_token=enc.eot_token,
                train_tokens=len(train), val_tokens=len(val), source=source,
                command=" ".join(["python prepare_data.py"] + sys.argv[1:]))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{source}, tokenizer {cfg.tokenizer} (vocab {enc.n_vocab})")
    print(f"wrote {out_dir}/train.bin ({len(train):,} tokens), val.bin ({len(val):,} tokens), "
          "meta.json")
    return out_dir


if __name__ == "__main__":
    prepare(configure(PrepareConfig(), sys.argv[1:]))
