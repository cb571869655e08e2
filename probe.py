"""
Two probes: the fast signal of whether a design can learn to use its carried state at all.

--task=copy: each sequence is 32 random letters, then the same 32 letters again, with the loss
on the copy only. With a window of 32 the copy sits wholly in the second window, so it can only
come from what the first window left in the state. Chance is ln 26 = 3.26. A copy at a fixed
distance: attention can find it by position alone.

--task=recall: 96 bytes of the pass-key test's filler ("The grass is green. ..."), three
windows of 32, with three pairs "#d" (a marker, one of 10 signs, then a digit) planted in the
first window; each marker comes again somewhere in windows 2-3, and the loss is on the digit
after it, which only the first window saw (S=64 carried rows reach two windows back). Chance
is ln 10 = 2.30. The distance differs every time, so the model must find the marker by what it
is: "what followed this token before" (an induction step), which is what a pass key needs.

--task=haystack: the recall probe's three marker-key pairs in a first window, asked for in the
last of --gap + 2 windows, with numbers sown everywhere (a space and 1-4 digits, then 2 to 5
bytes of filler: about ten digits a window). The carried rows are one window of recent rows and
S - W memory rows, so the keys can only come from the memory, and a memory that lets rows in
by their byte (every digit: the keys need theirs) is flushed by the numbers within a few
windows. Only a memory that lets in "a digit after a marker", a matter of context, can keep
them; --numbers=False is the same task without the numbers, where letting in by byte works.

We count the optimizer steps until the loss falls below --target.

    python probe.py                       # the copy probe and its baselines, about 2 minutes
    python probe.py --task=recall         # the recall probe and the design choices it picked
    python probe.py --task=recall --digits=5   # keys of 5 digits, as a pass key
    python probe.py --n_state=32 --max_steps=2000
    python probe.py --task=haystack       # keys among numbers: the memory must choose by context

Rows: full attention over the whole sequence in one window (the bar to match), FoldGPT as
configured, and for recall also: trained on the loss of every byte (as a language model is,
the filler too) instead of the digits only; without token shift, or with keys reading one row
back only; with tied embeddings; with its carried rows evolved fully every window instead of
by a gate that starts at 0. Last, the same FoldGPT with its state reset at every window
(which must stay at chance: if it learns, the probe leaks).
"""

import random
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from configurator import configure, fail
from foldgpt import FoldGPT, FoldGPTConfig
from prepare_data import filler


@dataclass
class ProbeConfig:
    task: str = "copy"  # 'copy' (a fixed distance), 'recall' (found by content) or 'haystack'
    digits: int = 1  # recall, haystack: digits per key (a pass key has 5)
    gap: int = 5  # haystack: windows between the keys' window and the question's
    numbers: bool = True  # haystack: numbers sown among the filler (False: the filler alone)
    mem_cost: float = 0.01  # with memory rows: train.py's cost on keeping them (see train.py)
    window: int = 32  # W; the copy is 32 letters, so with W = 32 it crosses one boundary
    n_state: int = 64  # S of the FoldGPT row
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 16
    learning_rate: float = 1e-3
    max_steps: int = 600  # give up after this many steps
    target: float = 0.3  # the task counts as learned below this loss
    seed: int = 0
    rows: str = ""  # which rows of the table to run, by number from 0, comma-separated; "": all


def copy_batch(cfg, gen):
    """(x, y) (B, 64): 32 letters then the same again; y is -1 but on the copy."""
    first = torch.randint(1, 27, (cfg.batch_size, 32), generator=gen)
    x = torch.cat([torch.zeros_like(first[:, :1]), first, first[:, :-1]], dim=1)  # (B, 64)
    y = torch.cat([torch.full_like(first, -1), first], dim=1)  # loss on the copy only
    return x, y


FILLER = torch.tensor(list(filler(random.Random(0), 4096).encode()))
MARKERS = torch.tensor(list(b"#$%&*+=@^~"))


def recall_batch(cfg, gen, pairs=3):
    """(x, y) (B, 96) bytes: filler with `pairs` marker-key pairs planted twice, each key
    cfg.digits digits; y is -1 but on the key's digits after a marker's second coming."""
    starts = torch.randint(0, len(FILLER) - 97, (cfg.batch_size,), generator=gen)
    seq = torch.stack([FILLER[s:s + 97] for s in starts.tolist()])  # (B, 97)
    y = torch.full((cfg.batch_size, 96), -1)
    pick = lambda n, k: torch.randperm(n, generator=gen)[:k]
    d = cfg.digits
    step = d + 1  # a marker and its key
    for b in range(cfg.batch_size):
        markers = MARKERS[pick(len(MARKERS), pairs)]
        keys = ord("0") + torch.randint(0, 10, (pairs, d), generator=gen)
        for first, again, m, key in zip(step * pick((29 - d) // step + 1, pairs),
                                        32 + step * pick((63 - d) // step + 1, pairs),
                                        markers, keys):
            seq[b, first], seq[b, first + 1:first + step] = m, key  # in slots 0-29
            seq[b, again], seq[b, again + 1:again + step] = m, key  # later: slots 32-95
            y[b, again:again + d] = key
    return seq[:, :-1], y


def haystack_batch(cfg, gen, pairs=3):
    """(x, y) (B, (gap + 2) * W) bytes: filler with numbers sown in (cfg.numbers), `pairs`
    marker-key pairs in the first window and again in the last; y is -1 but on the keys' digits
    in the last window."""
    W, d, step = cfg.window, cfg.digits, cfg.digits + 1
    n = (cfg.gap + 2) * W
    starts = torch.randint(0, len(FILLER) - n - 1, (cfg.batch_size,), generator=gen)
    seq = torch.stack([FILLER[s:s + n + 1] for s in starts.tolist()])  # (B, n+1)
    y = torch.full((cfg.batch_size, n), -1)
    pick = lambda n, k: torch.randperm(n, generator=gen)[:k]
    rand = lambda a, b: int(torch.randint(a, b, (), generator=gen))
    for b in range(cfg.batch_size):
        at = rand(0, 6)
        while cfg.numbers and at < n:  # a space, then 1-4 digits
            size = min(rand(1, 5), n - at - 1)
            seq[b, at] = ord(" ")
            seq[b, at + 1:at + 1 + size] = ord("0") + torch.randint(0, 10, (size,), generator=gen)
            at += 1 + size + rand(2, 6)
        markers = MARKERS[pick(len(MARKERS), pairs)]
        keys = ord("0") + torch.randint(0, 10, (pairs, d), generator=gen)
        last = (cfg.gap + 1) * W
        for first, again, m, key in zip(step * pick((W - 2 - d) // step + 1, pairs),
                                        last + step * pick((W - 1 - d) // step + 1, pairs),
                                        markers, keys):
            seq[b, first], seq[b, first + 1:first + step] = m, key
            seq[b, again], seq[b, again + 1:again + step] = m, key
            y[b, again:again + d] = key
    return seq[:, :-1], y


def steps_to_learn(cfg, window, n_state, reset_state=False, every_byte=False, **design):
    """Optimizer steps until the task's loss < cfg.target (None: not within cfg.max_steps), and
    the task's loss at the last step taken.
    every_byte: train on the language-model loss of every byte (the filler and the first
    statements too), still counting the steps by the loss on the task's targets alone.
    design: FoldGPTConfig fields to change (token_shift, tie_embeddings, evolve_gate, n_mem,
    keep_context). The carried rows are recent rows only unless design gives n_mem (copy and
    recall ask whether a look-back through the state is learnable at all, over distances the
    recent rows reach); with memory rows, cfg.mem_cost is added as train.py adds it."""
    torch.manual_seed(cfg.seed)
    model = FoldGPT(FoldGPTConfig(vocab_size=27 if cfg.task == "copy" else 256, window=window,
                                  n_state=n_state, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                  n_embd=cfg.n_embd, **{"n_mem": 0, **design}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.max_steps):
        x, y = dict(copy=copy_batch, recall=recall_batch, haystack=haystack_batch)[cfg.task](
            cfg, gen)
        if reset_state:  # each window alone, from the learned initial state
            start = model.initial_state(cfg.batch_size).rows
            loss = sum(model.run_window(x[:, t:t + window], start, None,
                                        y[:, t:t + window])[0].sum()  # (B,) summed
                       for t in range(0, x.size(1), window)) / (y != -1).sum()
        elif every_byte:
            logits, _, after = model(x)
            every = torch.cat([x[:, 1:], y[:, -1:]], dim=1)  # the next byte, everywhere
            every[:, -1] = -1  # (the byte after the last is not in x)
            every = torch.where(y != -1, y, every)
            train_loss = F.cross_entropy(logits.flatten(0, 1), every.flatten(), ignore_index=-1)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
        else:
            _, loss, after = model(x, None, y)
        train_loss = loss if not every_byte else train_loss
        if cfg.mem_cost and model.config.n_mem and not reset_state:  # as train.py's mem_cost
            rows = after.rows.detach(), None if after.kv is None else after.kv.detach()
            train_loss = train_loss + cfg.mem_cost * sum(
                torch.sigmoid(score).mean() for score in model.keep_scores(*rows))
        optimizer.zero_grad(set_to_none=True)
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if loss.item() < cfg.target:
            return step + 1, loss.item()
        if (step + 1) % 50 == 0:  # progress, on stderr: the table stays as printed
            print(f"\r  step {step + 1}: loss {loss.item():.3f}", end="", file=sys.stderr,
                  flush=True)
    return None, loss.item()


def main(cfg):
    if cfg.task not in ("copy", "recall", "haystack"):
        fail(f"unknown task {cfg.task!r}: use copy, recall or haystack")
    if not 1 <= cfg.digits <= 9:
        fail(f"--digits must be between 1 and 9, got {cfg.digits}")
    if cfg.task == "haystack" and (cfg.gap < 1 or cfg.window < 3 * cfg.digits + 4
                                   or cfg.n_state <= cfg.window):
        fail(f"haystack needs --gap >= 1, --window >= {3 * cfg.digits + 4} (three keys of "
             f"{cfg.digits} digits) and --n_state > --window (memory rows beside one window of "
             f"recent ones), got {cfg.gap}, {cfg.window} and {cfg.n_state}")
    n, chance = dict(copy=(64, 3.26), recall=(96, 2.30),
                     haystack=((cfg.gap + 2) * cfg.window, 2.30))[cfg.task]
    fold = f"FoldGPT W={cfg.window} S={cfg.n_state}"
    rows = [(f"full attention, one window of {n}", n, 0, False, {}),
            (fold, cfg.window, cfg.n_state, False, {})]
    if cfg.task == "haystack":  # one window of recent rows, the rest memory
        M = cfg.n_state - cfg.window
        fold = f"FoldGPT W={cfg.window} S={cfg.n_state} M={M}"
        rows = [rows[0], (f"{fold}, kept by the row (its byte)", cfg.window, cfg.n_state, False,
                          dict(n_mem=M)),
                (f"{fold}, kept by the row one layer up", cfg.window, cfg.n_state, False,
                 dict(n_mem=M, keep_context=True))]
    if cfg.task == "recall":
        rows += [(f"{fold}, loss on every byte, not the digits only", cfg.window, cfg.n_state,
                  False, dict(every_byte=True)),
                 (f"{fold}, no token shift", cfg.window, cfg.n_state, False,
                  dict(token_shift=0)),
                 (f"{fold}, token shift of 1 row, keys only", cfg.window, cfg.n_state, False,
                  dict(token_shift=1)),
                 (f"{fold}, tied embeddings", cfg.window, cfg.n_state, False,
                  dict(tie_embeddings=True)),
                 (f"{fold}, carried rows fully evolved", cfg.window, cfg.n_state, False,
                  dict(evolve_gate=False))]
    rows.append((f"{fold}, state reset every window", cfg.window, cfg.n_state, True,
                 dict(n_mem=cfg.n_state - cfg.window) if cfg.task == "haystack" else {}))
    print(f"{cfg.task} probe: steps until the loss < {cfg.target} (chance {chance}), "
          f"at most {cfg.max_steps}; L={cfg.n_layer} C={cfg.n_embd} B={cfg.batch_size}")
    for i, (name, window, n_state, reset, design) in enumerate(rows):
        if cfg.rows and str(i) not in cfg.rows.split(","):
            continue
        t = time.time()
        steps, last = steps_to_learn(cfg, window, n_state, reset, **design)
        found = f"{steps} steps" if steps else f"not within {cfg.max_steps} (loss {last:.2f})"
        print("\r" + " " * 30 + "\r", end="", file=sys.stderr)
        print(f"  {name:55} {found:>18}  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(configure(ProbeConfig(), sys.argv[1:]))
