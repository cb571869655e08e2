"""
Make the token files train.py reads: data/<name>/train.bin and val.bin (uint16 token ids, as
nanoGPT writes them) and meta.json (tokenizer, vocab size, counts, how the data was made).

    python prepare_data.py                        # built-in corpus: data/passkeys (~4.4 MB)
    python prepare_data.py --input=my_text.txt    # any text: a .txt file or a folder of them
    python prepare_data.py --input=books/ --tokenizer=gpt2 --workers=8   # any size, streamed
    python prepare_data.py --dataset=shakespeare  # downloads tinyshakespeare (needs network)

The built-in corpus, `passkeys`, is made so that the carried state matters: plain filler text
in which a pass key is stated once and asked for later, at distances from inside one window
to many windows. It is a function of --size, --max_gap and --seed alone, made with no files.

Text from --input is read in pieces of --piece_mb, cut at line ends, and tokenized by
--workers processes side by side; the token files are written as the pieces come, so a corpus
of any size passes through a few pieces' worth of memory. The val tokens are the last
--val_fraction of them.
"""

import json
import math
import multiprocessing
import os
import random
import re
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
    max_gap: int = 1024  # passkeys: longest distance, in characters, from a key to its question
    near_gap: int = 0  # passkeys, > 0: also train_near.bin, the same kind of corpus with its keys
    #                    asked for within this many characters, which train.py reads first
    #                    (its near_iters): the copy is learned close by, then keeping, far
    seed: int = 1337  # passkeys: the seed of the random keys, gaps and haystacks
    prose: float = 0.0  # passkeys: share of documents hiding their keys in real prose with numbers
    unmarked: float = 0.0  # passkeys: share of documents in the passkey test's words (no '#')
    bait: float = 0.0  # passkeys: share of the questions in prose that come right after a fact
    #                    with a number in it (hard cases for the copy: it must pass over them)
    lure: float = 0.0  # passkeys: share of the questions in prose that come right after a fact
    #                    whose number repeats a digit or two of the key and then goes on otherwise
    #                    (a copy from the window there writes the wrong next digit)
    adjacent: float = 0.0  # passkeys: share of the questions right after their key's statement,
    #                        nothing between (else at least 4 characters of haystack)
    near_adjacent: float = -1.0  # passkeys with --near_gap: --adjacent for train_near.bin alone
    #                              (below 0: as --adjacent), where the copy is learned
    ask: float = 0.0  # passkeys: share of the facts sown in prose that a question asks for again
    #                   within 64 characters ("What is the door code? The door code is 4170."):
    #                   the copy learns to follow its question's words, not any "is <number>"
    val_fraction: float = 0.1  # --input and shakespeare: share of the tokens, from the end, for val
    workers: int = 1  # processes that tokenize pieces side by side (the output is the same)
    piece_mb: float = 4.0  # --input: size of the pieces read and tokenized one at a time


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


# Real prose, carried in corpus/ (public domain; see corpus/README.md). Its first part is the
# haystack of the training documents; the rest, cut at a blank line, is held out: the haystack
# of the val documents and of eval.py --haystack=prose, which no model here trains on.
PROSE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                          "tinyshakespeare.txt")


def prose(part):
    """The 'train' or 'held-out' part of the carried prose."""
    with open(PROSE_FILE, encoding="utf-8") as f:
        text = f.read()
    cut = text.index("\n\n", int(0.9 * len(text)))  # 90% of it, then the end of a speech
    return text[:cut + 1] if part == "train" else text[cut + 2:]


# Shakespeare has almost no digits (27 in 1.1 MB), so facts with numbers, names and dates are
# sown through it: some in the pass key's own shape ("The door code is 4170."), so that neither
# a byte class nor the words "is <number>" mark what matters; only "pass key" does.
NAMES = ["Ward", "Percy", "Ann Hale", "Kate", "Old Capulet", "Hugh Oatcake", "Mistress Ford",
         "Tybalt", "Cobweb", "Lucio"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
THINGS = ["door code", "room number", "price", "year", "count", "ship's number", "tally"]


def distractor(rng):
    """A fact with numbers in it, in one of several shapes, ending in a space."""
    digits = rng.randint(1, 5)
    n = rng.randrange(10 ** (digits - 1), 10 ** digits)
    name, year = rng.choice(NAMES), rng.randrange(1066, 2000)
    date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {year}"
    return rng.choice([
        f"The {rng.choice(THINGS)} is {n}. ", f"{name}'s number is {n}. ",
        f"{name} paid {n:,} crowns on {date}. ", f"It was {year}. ", f"In {year}, {n} came. ",
        f"Room {n}. ", f"{name} was born on {date}. ", f"{n} of them at {rng.randint(1, 12)}. ",
    ])


def lure_fact(rng, key):
    """A fact whose number holds one or two of the key's digits in a row and then a digit that
    differs from the key's next one: the question right after it tempts a copy from the window
    ("The room number is 9167." before the question for the key 42918)."""
    a = rng.randrange(len(key) - 1)  # where the shared digits begin in the key
    b = min(a + rng.randint(1, 2), len(key) - 1)  # and end: key[b] is the digit to differ from
    other = rng.choice([d for d in "0123456789" if d != key[b]])
    head = "".join(rng.choice("123456789") for _ in range(rng.randint(0, 1)))
    tail = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 2)))
    n = head + key[a:b] + other + tail
    if n[0] == "0":  # no number begins with 0: a digit before it, so the key's digits stay
        n = rng.choice("123456789") + n
    return rng.choice([f"The {rng.choice(THINGS)} is {n}. ",
                       f"{rng.choice(NAMES)}'s number is {n}. ",
                       f"{n} of them at {rng.randint(1, 12)}. ", f"Room {n}. "])


def fact_question(fact):
    """The question that asks for a fact's number again, in the pass key's words, with its
    answer: "The door code is 4170. " -> "What is the door code? The door code is 4170.\n";
    "Kate's number is 88. " -> "What is Kate's number? Kate's number is 88.\n". None for a
    fact of another shape."""
    m = re.fullmatch(r"The (.+) is (\d+)\. ", fact)
    if m:
        return f"What is the {m[1]}? The {m[1]} is {m[2]}.\n"
    m = re.fullmatch(r"(\w+)'s number is (\d+)\. ", fact)
    if m:
        return f"What is {m[1]}'s number? {m[1]}'s number is {m[2]}.\n"
    return None


class Haystack:
    """Where a document's text between its keys comes from. 'filler': the five sentences above.
    Else real prose, read on from a random place, with a distractor sown in every 60 to 180
    characters (numbers=False: the prose as it is). ask: the share of those facts, of the two
    shapes fact_question knows, that a question asks for again 0 to 64 characters later."""

    def __init__(self, rng, text=None, numbers=True, ask=0.0):
        self.rng, self.text, self.numbers, self.ask = rng, text, numbers, ask
        self.pending, self.ask_in = None, 0  # a question still to ask, and in how many characters
        if text is not None:
            self.at = rng.randrange(len(text))
            self.next_fact = rng.randint(60, 180)

    def take(self, length):
        """At least `length` characters (0: none), ending after a space or a line end."""
        if self.text is None:
            return filler(self.rng, length)
        out, n = [], 0
        while n < length or (out and not out[-1][-1].isspace()):
            if self.at >= len(self.text):
                self.at = 0  # the text goes round
            if self.pending and self.ask_in <= 0 and out and out[-1][-1].isspace():
                out.append(self.pending)  # the question, its answer the fact's number
                self.pending = None
            elif self.numbers and self.next_fact <= 0 and out and out[-1][-1].isspace():
                out.append(distractor(self.rng))
                self.next_fact = self.rng.randint(60, 180)
                # (a share of 0 draws nothing: the haystack is what it was before --ask)
                if self.ask and not self.pending and self.rng.random() < self.ask:
                    self.pending, self.ask_in = fact_question(out[-1]), self.rng.randint(0, 64)
            else:
                out.append(self.text[self.at])
                self.at += 1
                self.next_fact -= 1
                self.ask_in -= 1
            n += len(out[-1])
        return "".join(out)


# The key's two wordings. 'landmark': the passkey test's words exactly. 'marked': the same
# with '#' before each key, as the built-in corpus said it first: "The pass key is #74937." The
# marker makes a key easy to find again (a copy of what follows the one earlier '#').
def key_statement(key, between="", marked=True):
    """The key stated, then said again after `between` (the passkey test's words have none)."""
    m = "#" if marked else ""
    return f"The pass key is {m}{key}. Remember it. {between}{m}{key} is the pass key. "


KEY_QUESTION = "What is the pass key? The pass key is #"  # marked
LANDMARK_QUESTION = "What is the pass key? The pass key is"  # the model goes on " 12345."


def question(marked=True):
    return KEY_QUESTION if marked else LANDMARK_QUESTION


def passkey_document(rng, max_gap, rounds, haystack, marked=True, bait=0.0, adjacent=0.0,
                     lure=0.0):
    """(text, recall spans). Rounds of: haystack, a key stated and said again after haystack of
    0 to 47 characters (so the repeat is a look-back by content, not at a fixed distance),
    haystack of a log-uniform length, the question. The gaps run from inside one window to far
    beyond it; half of them are under 64 characters; an `adjacent` share of them are 0. In prose
    with numbers, a `bait` share of the other questions come right after a fact (distractor).
    The recall spans are the (start, end) of each key's digits said again (the repeat and the
    answer), which only a model that remembers the key can predict."""
    parts, spans, n = [INTRO], [], len(INTRO)

    def add(text, recall=None):  # recall: where in text the key said again starts
        nonlocal n
        if recall is not None:
            spans.append((n + recall, n + recall + len(key)))
        parts.append(text)
        n += len(text)

    for _ in range(rounds):
        key = str(rng.randrange(10000, 100000))
        add(haystack.take(rng.randrange(30)))
        statement = key_statement(key, haystack.take(rng.randrange(48)), marked)
        add(statement, recall=statement.rindex(key))  # the repeat: the last number in it
        if not adjacent or rng.random() >= adjacent:  # (a share of 0 draws nothing)
            add(haystack.take(int(math.exp(rng.uniform(math.log(4), math.log(max_gap))))))
            if bait and haystack.text is not None and haystack.numbers and rng.random() < bait:
                add(distractor(rng))  # a number just before the question, to pass over
            elif lure and haystack.text is not None and haystack.numbers and rng.random() < lure:
                add(lure_fact(rng, key))  # the key's digits, then others, just before it
        asked = question(marked) + ("" if marked else " ")
        add(f"{asked}{key}.\n", recall=len(asked))
    return "".join(parts), spans


# Where a document says what its key is: "key is 12345" (or "#12345"), stated or answered. A
# memory taught by these marks (train.py --keep_supervise) learns to keep them by their words.
KEY_SAID = re.compile(r"key is #?\d+")


def encode_with_targets(enc, doc, spans, sizes=None):
    """Token ids of doc and a same-length list of marks: 1 on the tokens that hold a character
    of a recall target (with GPT-2's BPE, " 12345" is " 123" "45": the space is marked too), 2
    on the other tokens of each "key is 12345" (KEY_SAID), 0 elsewhere.
    sizes: each token id's length in bytes, if at hand."""
    ids = np.array(enc.encode_ordinary(doc), dtype=np.int64)
    if sizes is None:
        sizes = token_sizes(enc)
    ends = np.cumsum(sizes[ids])
    starts, marks = ends - sizes[ids], np.zeros(len(ids), dtype=np.uint8)
    said = [(m.start(), m.end(), 2) for m in KEY_SAID.finditer(doc)]
    for a, b, mark in said + [(a, b, 1) for a, b in spans]:  # the recall targets win
        a, b = len(doc[:a].encode()), len(doc[:b].encode())  # character -> byte spans
        marks[(starts < b) & (ends > a)] = mark
    return ids.tolist(), marks.tolist()


def token_sizes(enc):
    """(n_vocab,) each token's length in bytes (the special tokens: 0)."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return np.array([0 if t in special else len(enc.decode_single_token_bytes(t))
                     for t in range(enc.n_vocab)])


def passkey_corpus(size, max_gap, seed, part="train", prose_share=0.0, unmarked=0.0, bait=0.0,
                   adjacent=0.0, lure=0.0, ask=0.0):
    """(text, spans) documents of 1 to 8 rounds until `size` characters: a function of its
    arguments alone. A prose_share of them hide their keys in real prose with numbers sown in
    (the carried prose's `part`), the others in the filler sentences; `unmarked` of them say
    their keys in the passkey test's own words, the others with '#'; an `adjacent` share of
    the questions come right after their key's statement, and in prose a `bait` share of the
    others right after a fact with a number; an `ask` share of the prose's facts are asked for
    again close by (see Haystack)."""
    rng, docs, n = random.Random(seed), [], 0
    text = prose(part) if prose_share > 0 else None
    while n < size:
        # A share of 0 draws nothing, so the filler-only corpus is what it was before shares.
        real = prose_share > 0 and rng.random() < prose_share
        haystack = Haystack(rng, text if real else None, ask=ask)
        rounds = rng.randint(1, 8)
        docs.append(passkey_document(rng, max_gap, rounds, haystack,
                                     marked=unmarked == 0 or rng.random() >= unmarked,
                                     bait=bait, adjacent=adjacent, lure=lure))
        n += len(docs[-1][0])
    return docs


def text_files(path):
    """The .txt files under path, in sorted order: one file, or every .txt file of a folder."""
    if os.path.isdir(path):
        names = sorted(os.path.join(root, f) for root, _, files in os.walk(path)
                       for f in files if f.endswith(".txt"))
        if not names:
            fail(f"no .txt files in folder {path}")
        return names
    if os.path.isfile(path):
        return [path]
    fail(f"input {path} does not exist: give a .txt file or a folder of them")


def file_pieces(names, piece_bytes):
    """(bytes, ends_document) pieces of about piece_bytes from each file in turn, cut at line
    ends, so that only one piece of a corpus of any size is in memory at a time and no token
    spans two pieces (UTF-8 never has a newline byte inside a character)."""
    for name in names:
        with open(name, "rb") as f:
            piece = f.read(piece_bytes)
            while piece:
                piece += f.readline()  # finish the line
                after = f.read(piece_bytes)
                yield piece, not after
                piece = after


def download_shakespeare():
    url = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
           "tinyshakespeare/input.txt")
    try:
        with urllib.request.urlopen(url, timeout=20) as f:
            return f.read()
    except OSError as e:
        fail(f"cannot download tinyshakespeare ({e}); with the file at hand, run: "
             "python prepare_data.py --input=path/to/input.txt")


_enc = None  # each worker process builds its tokenizer once


def encode_piece(job):
    """Token ids (uint16) of one piece of text (str or bytes), and whether it was not UTF-8."""
    global _enc
    name, piece, ends_document = job
    if _enc is None or _enc.name != name:
        _enc = get_tokenizer(name)
    bad = False
    if isinstance(piece, bytes) and name == "byte":
        ids = list(piece)  # the byte tokenizer takes any bytes, valid UTF-8 or not
    else:
        if isinstance(piece, bytes):
            try:
                piece = piece.decode("utf-8")
            except UnicodeDecodeError:
                bad, piece = True, piece.decode("utf-8", errors="replace")
        ids = _enc.encode_ordinary(piece)
    if ends_document:
        ids.append(_enc.eot_token)
    return np.array(ids, dtype=np.uint16), bad


def write_tokens(pieces, tokenizer, path, workers=1):
    """Encode (text, ends_document) pieces, in order, with `workers` processes, appending the
    ids to path as they come. Returns the number of tokens written."""
    jobs = ((tokenizer, piece, ends) for piece, ends in pieces)
    total, noted = 0, False
    with open(path, "wb") as out:
        if workers > 1:
            pool = multiprocessing.Pool(workers)
            results = pool.imap(encode_piece, jobs)  # in order, `workers` pieces at a time
        else:
            pool, results = None, map(encode_piece, jobs)
        try:
            for ids, bad in results:
                ids.tofile(out)
                total += len(ids)
                if bad and not noted:
                    print("note: input is not valid UTF-8; its bad bytes became U+FFFD")
                    noted = True
        finally:
            if pool is not None:
                pool.terminate()
    return total


def write_marked(docs, enc, path):
    """Write passkey documents' ids to path and their marks (uint8, 1 on a recall target, 2 on
    the rest of where a key is said, see encode_with_targets) beside it, as <split>_recall.bin.
    Returns the number of tokens written."""
    total, sizes = 0, token_sizes(enc)
    with open(path, "wb") as out, open(path.replace(".bin", "_recall.bin"), "wb") as marked:
        for doc, spans in docs:
            ids, marks = encode_with_targets(enc, doc, spans, sizes)
            np.array(ids + [enc.eot_token], dtype=np.uint16).tofile(out)
            np.array(marks + [0], dtype=np.uint8).tofile(marked)
            total += len(ids) + 1
    return total


def split_off_val(train_path, val_path, val_fraction, chunk=1 << 24):
    """Move the last val_fraction of the tokens in train_path to val_path, a chunk at a time.
    Returns (train tokens, val tokens)."""
    total = os.path.getsize(train_path) // 2
    n_val = int(total * val_fraction)
    with open(train_path, "r+b") as src, open(val_path, "wb") as dst:
        src.seek((total - n_val) * 2)
        while block := src.read(chunk):
            dst.write(block)
        src.truncate((total - n_val) * 2)
    return total - n_val, n_val


TOKENIZER_VOCAB = {"byte": 257, "gpt2": 50257}  # get_tokenizer(name).n_vocab


def read_meta(data_dir):
    """meta.json of a data folder made by prepare, after checking that its files are there and
    belong together: each token file a whole number of tokens, as many as meta.json says, and
    every id below the vocabulary. Anything else is a one-line error naming the fix."""
    remake = "remake the data with python prepare_data.py (see its --help for your own text)"
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.isfile(os.path.join(data_dir, name)):
            fail(f"no {name} in {data_dir}: {remake}")
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        vocab, tokenizer = meta["vocab_size"], meta["tokenizer"]
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{data_dir}/meta.json is damaged ({type(e).__name__}): {remake}")
    if TOKENIZER_VOCAB.get(tokenizer) != vocab:
        fail(f"{data_dir}/meta.json says tokenizer {tokenizer!r} with vocab {vocab}, which do not "
             f"go together: {remake}")
    for split in ("train", "val") + (("near",) if meta.get("near_tokens") else ()):
        path = os.path.join(data_dir, "train_near.bin" if split == "near" else f"{split}.bin")
        if not os.path.isfile(path):  # meta.json says it made one
            fail(f"no train_near.bin in {data_dir}: {remake}")
        size = os.path.getsize(path)
        if size % 2:
            fail(f"{path} is {size:,} bytes, not a whole number of 2-byte tokens (a copy cut "
                 f"short?): {remake}")
        if size // 2 != meta.get(f"{split}_tokens"):
            fail(f"{path} holds {size // 2:,} tokens, but meta.json says "
                 f"{meta.get(f'{split}_tokens')}: the files are from different runs; {remake}")
        top = largest_id(path) if size else 0
        if top >= vocab:
            fail(f"{path} holds token id {top}, but {tokenizer!r} has {vocab} tokens: the folder "
                 f"mixes two tokenizers' data; {remake}")
    return meta


def largest_id(path, chunk=1 << 24):
    """The largest token id in a token file, read in chunks (a corpus may not fit in memory)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    return max(int(data[i:i + chunk].max()) for i in range(0, len(data), chunk))


def prepare(cfg):
    """Write train.bin, val.bin and meta.json for cfg; returns the folder written."""
    enc = get_tokenizer(cfg.tokenizer)  # fails early, in one line, if it cannot load
    near_pieces = None  # the near keys' corpus (passkeys with --near_gap)
    if cfg.workers < 1 or cfg.piece_mb <= 0:
        fail("--workers must be >= 1 and --piece_mb > 0")
    if cfg.input:
        name = os.path.splitext(os.path.basename(os.path.normpath(cfg.input)))[0]
        source = f"text from {cfg.input}"
        names = text_files(cfg.input)
        if not any(os.path.getsize(n) for n in names):
            fail(f"input {cfg.input} is empty")
        train_pieces = file_pieces(names, int(cfg.piece_mb * 2 ** 20))
        val_pieces = None  # the val tokens are the last val_fraction of them
    elif cfg.dataset == "shakespeare":
        name, source = "shakespeare", "tinyshakespeare"
        train_pieces, val_pieces = [(download_shakespeare(), True)], None
    elif cfg.dataset == "passkeys":
        if cfg.size < 1 or cfg.max_gap < 4 or not (cfg.near_gap == 0 or
                                                   4 <= cfg.near_gap < cfg.max_gap):
            fail("--size must be >= 1, --max_gap >= 4, and --near_gap 0 (none) or from 4 to "
                 "below --max_gap")
        if not all(0 <= v <= 1 for v in (cfg.prose, cfg.unmarked, cfg.bait, cfg.adjacent,
                                         cfg.lure, cfg.ask)) or cfg.near_adjacent > 1:
            fail("--prose, --unmarked, --bait, --adjacent, --near_adjacent, --lure and --ask are "
                 "shares: give numbers from 0 to 1")
        if cfg.near_adjacent >= 0 and not cfg.near_gap:
            fail("--near_adjacent shapes train_near.bin, which only --near_gap writes: give "
                 "--near_gap=64 too, or --adjacent for train.bin")
        name = "passkeys"
        source = (f"built-in passkey corpus, size={cfg.size} max_gap={cfg.max_gap} "
                  f"seed={cfg.seed} prose={cfg.prose} unmarked={cfg.unmarked}"
                  + (f" bait={cfg.bait}" if cfg.bait else "")
                  + (f" adjacent={cfg.adjacent}" if cfg.adjacent else "")
                  + (f" lure={cfg.lure}" if cfg.lure else "")
                  + (f" ask={cfg.ask}" if cfg.ask else ""))
        mix = dict(prose_share=cfg.prose, unmarked=cfg.unmarked, bait=cfg.bait,
                   adjacent=cfg.adjacent, lure=cfg.lure, ask=cfg.ask)
        train_pieces = passkey_corpus(cfg.size, cfg.max_gap, cfg.seed, "train", **mix)
        val_pieces = passkey_corpus(cfg.size // 10, cfg.max_gap, cfg.seed + 1, "held-out", **mix)
        if cfg.near_gap:
            source += f" near_gap={cfg.near_gap}"
            if cfg.near_adjacent >= 0:
                source += f" near_adjacent={cfg.near_adjacent}"
                mix["adjacent"] = cfg.near_adjacent
            near_pieces = passkey_corpus(cfg.size, cfg.near_gap, cfg.seed, "train", **mix)
    else:
        fail(f"unknown dataset {cfg.dataset!r}: use passkeys or shakespeare, or --input=PATH")
    out_dir = cfg.out_dir or os.path.join("data", name)
    try:
        return write_data(cfg, enc, name, source, train_pieces, val_pieces, out_dir,
                          near_pieces)
    except OSError as e:  # a full disk, a folder that cannot be written
        print(f"error: cannot write the data to {out_dir} ({e.strerror or e}): free some disk "
              "space or pick another --out_dir, then run this again", file=sys.stderr)
        sys.exit(1)


def write_data(cfg, enc, name, source, train_pieces, val_pieces, out_dir, near_pieces=None):
    os.makedirs(out_dir, exist_ok=True)
    train_path, val_path = os.path.join(out_dir, "train.bin"), os.path.join(out_dir, "val.bin")
    marked = name == "passkeys" and not cfg.input  # the built-in corpus marks recall targets
    for stale in ("train_recall.bin", "val_recall.bin", "train_near.bin",
                  "train_near_recall.bin"):  # from an earlier run into out_dir
        if ((not marked or near_pieces is None and "near" in stale)
                and os.path.exists(os.path.join(out_dir, stale))):
            os.remove(os.path.join(out_dir, stale))
    n_near = 0
    if marked:
        n_train = write_marked(train_pieces, enc, train_path)
        n_val = write_marked(val_pieces, enc, val_path)
        if near_pieces is not None:
            n_near = write_marked(near_pieces, enc, os.path.join(out_dir, "train_near.bin"))
    else:
        n_train = write_tokens(train_pieces, cfg.tokenizer, train_path, cfg.workers)
        if val_pieces is None:
            n_train, n_val = split_off_val(train_path, val_path, cfg.val_fraction)
        else:
            n_val = write_tokens(val_pieces, cfg.tokenizer, val_path, cfg.workers)
    meta = dict(tokenizer=cfg.tokenizer, vocab_size=enc.n_vocab, eot_token=enc.eot_token,
                train_tokens=n_train, val_tokens=n_val, near_tokens=n_near,
                recall_marks=marked, source=source,
                command=" ".join(["python prepare_data.py"] + sys.argv[1:]))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{source}, tokenizer {cfg.tokenizer} (vocab {enc.n_vocab})")
    print(f"wrote {out_dir}/train.bin ({n_train:,} tokens), val.bin ({n_val:,} tokens), "
          + ("train_recall.bin, val_recall.bin (the recall targets), " if marked else "")
          + (f"train_near.bin ({n_near:,} tokens, keys asked for within {cfg.near_gap} "
             "characters) and its recall marks, " if n_near else "")
          + "meta.json")
    return out_dir


if __name__ == "__main__":
    prepare(configure(PrepareConfig(), sys.argv[1:]))
