"""
Pass-key retrieval: does the model keep a number it read many windows ago?

    python eval.py                                   # out/ckpt.pt, with the state-off baseline
    python eval.py --baseline_dir=out-plain          # and a plain GPT (n_state=0) beside it
    python eval.py --trials=20 --max_windows=64      # quicker

Each prompt is the passkey test of Landmark Attention (arXiv:2305.16300) and Infini-attention
(arXiv:2404.07143) in the built-in corpus's own words, which add a '#' before each key: an
intro, filler ("The grass is green. The sky is blue. ..."), "The pass key is #K. Remember it.
#K is the pass key.", more filler, then "What is the pass key? The pass key is #". The model
continues greedily and a trial counts when the number it writes is K, exactly.

The distance is the filler between the key and the question, in windows of W tokens: 0, 1, 2,
4, ... up to --max_windows. The key's depth varies from trial to trial: the filler before it
runs from 0 to 4 windows, so the key falls at every offset inside a window. The columns:
  FoldGPT    the checkpoint in --out_dir, carrying its state
  state off  the same checkpoint with its state reset to the initial state at every window
  n_state=0  the checkpoint in --baseline_dir, if given: a plain GPT with a W-token context
Writes a table to stdout, eval.csv, and eval.png when matplotlib is installed. For a model
with a memory (n_mem > 0) it first says which tokens of the prompts the first layer lets into
its memory: what a key has to outlast there is the filler that enters after it.
"""

import csv
import random
import re
import sys
import time
from dataclasses import dataclass

import torch

from configurator import configure, fail
from prepare_data import FILLER, INTRO, KEY_QUESTION, get_tokenizer, key_statement
from checkpoints import load_checkpoint, pick_device


@dataclass
class EvalConfig:
    out_dir: str = "out"  # the FoldGPT checkpoint to test
    baseline_dir: str = ""  # a checkpoint trained with n_state=0 and the same recipe, or ''
    trials: int = 50  # prompts per distance and model, each with its own key and depth
    max_windows: int = 256  # the longest distance, in windows of filler
    seed: int = 1337  # the keys and depths; the same prompts for every model
    device: str = "auto"
    csv: str = "eval.csv"  # the table as CSV; '' writes none
    plot: str = "eval.png"  # the curves as a PNG when matplotlib is installed; '' writes none


def filler_tokens(enc, n, start=0):
    """Whole filler sentences, beginning with sentence `start`, until there are >= n tokens."""
    ids, i = [], start
    while len(ids) < n:
        ids.extend(enc.encode_ordinary(FILLER[i % len(FILLER)]))
        i += 1
    return ids


def make_prompt(enc, key, depth, gap):
    """Token ids of one test prompt: intro, filler of >= `depth` tokens, the key statement,
    filler of >= `gap` tokens (whole sentences, so at most one sentence more), the question."""
    return (enc.encode_ordinary(INTRO) + filler_tokens(enc, depth)
            + enc.encode_ordinary(key_statement(key)) + filler_tokens(enc, gap, start=2)
            + enc.encode_ordinary(KEY_QUESTION))


def make_batch(enc, trials, gap, window, rng):
    """(keys, ids (trials, P)) for one distance. Prompts of one batch must be equally long: the
    shorter ones begin with the end of an earlier filler document and <|endoftext|>, which is
    how documents follow each other in the training stream."""
    keys = [rng.randrange(10000, 100000) for _ in range(trials)]
    prompts = [make_prompt(enc, k, rng.randrange(4 * window + 1), gap) for k in keys]
    longest = max(len(p) for p in prompts)
    lead = filler_tokens(enc, longest)
    rows = [lead[len(lead) - (longest - len(p)):] + [enc.eot_token] + p for p in prompts]
    return keys, torch.tensor(rows, dtype=torch.long)


def answer(text):
    """The number at the start of the model's continuation, or None."""
    found = re.match(r"\s*(\d+)", text)
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
    ids = list(dict.fromkeys(make_prompt(enc, 12345, 0, gap) + make_prompt(enc, 67890, 0, gap)))
    block, wte = model.transformer.h[0], model.transformer.wte.weight
    kept = [i for i, s in zip(ids, block.keep_score(wte[ids][None])[0].tolist()) if s > 0]
    return ([enc.decode([i]) for i in kept], len(ids),
            [enc.decode([i]) for i in kept if i in filler], len(filler))


def state_off(model):
    """The same model with its state reset at every window: each window starts from the
    learned initial state, so nothing passes from one window to the next."""
    model.fold = lambda window: model.initial_state(window.inputs[0].size(0)).rows
    return model


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


def save_plot(path, windows, table, names, W):
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
    ax.set_xlabel(f"filler between key and question, in windows of {W} tokens (0 at 0.5)")
    ax.set_ylabel("pass keys retrieved, %")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(cfg):
    if cfg.trials < 1 or cfg.max_windows < 0:
        fail("--trials must be >= 1 and --max_windows >= 0")
    device = pick_device(cfg.device)
    ckpt, model = load_checkpoint(cfg.out_dir, device)
    enc = get_tokenizer(ckpt["meta"]["tokenizer"])
    W = model.config.window
    models = {"FoldGPT": model.eval(), "state off": state_off(load_checkpoint(
        cfg.out_dir, device)[1].eval())}
    if cfg.baseline_dir:
        base_ckpt, base = load_checkpoint(cfg.baseline_dir, device)
        if base_ckpt["meta"]["tokenizer"] != ckpt["meta"]["tokenizer"]:
            fail(f"{cfg.baseline_dir} uses another tokenizer than {cfg.out_dir}: train the "
                 "baseline on the same data")
        if base.config.window != W:
            fail(f"{cfg.baseline_dir} has window {base.config.window}, {cfg.out_dir} has {W}: "
                 "train the baseline with the same window")
        models[f"n_state={base.config.n_state}"] = base.eval()
    windows = [0] + [2 ** i for i in range(cfg.max_windows.bit_length())]
    windows = [w for w in windows if w <= cfg.max_windows]
    c = model.config
    print(f"pass-key retrieval, {cfg.trials} trials per cell, greedy; the Landmark/Infini-"
          f"attention prompt in the built-in corpus's words (keys marked '#'); {cfg.out_dir}: "
          f"W={W} S={c.n_state} (memory {c.n_mem}) L={c.n_layer}")
    if c.n_mem:
        kept, n, kept_filler, n_filler = first_layer_keeps(model, enc)
        print(f"the first layer's memory lets in {len(kept)} of the prompts' {n} tokens: "
              f"{' '.join(repr(t) for t in kept) or 'none'}; of the filler's {n_filler}: "
              f"{' '.join(repr(t) for t in kept_filler) or 'none'}")
    rng, table, t0 = random.Random(cfg.seed), {}, time.time()
    for w in windows:
        keys, ids = make_batch(enc, cfg.trials, w * W, W, rng)
        table[w] = {}
        for name, m in models.items():
            table[w][name] = accuracy(m, enc, keys, ids, device)
            print(f"\r  {w:>4} windows ({ids.size(1):,} tokens): {name} "
                  f"{100 * table[w][name]:3.0f}%  [{time.time() - t0:.0f} s]" + " " * 10,
                  end="", file=sys.stderr, flush=True)
    print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
    names = list(models)
    print(f"{'windows':>8} {'tokens':>7}  " + "  ".join(f"{n:>10}" for n in names))
    for w in windows:
        print(f"{w:>8} {w * W:>7}  " + "  ".join(f"{100 * table[w][n]:>9.0f}%" for n in names))
    print(f"({time.time() - t0:.0f} s; tokens = filler between the key statement and the "
          "question)")
    if cfg.csv:
        with open(cfg.csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["windows", "tokens", *names])
            for w in windows:
                out.writerow([w, w * W, *(f"{table[w][n]:.3f}" for n in names)])
        print(f"wrote {cfg.csv}")
    if cfg.plot:
        save_plot(cfg.plot, windows, table, names, W)
    return table


if __name__ == "__main__":
    main(configure(EvalConfig(), sys.argv[1:]))
