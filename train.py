"""
Train FoldGPT window by window, carrying the state along each of B contiguous streams.

    python prepare_data.py && python train.py          # the CPU quick start, about 7 minutes
    python train.py --max_iters=200 --n_state=0        # the plain windowed GPT, same recipe
    python train.py config/my_run.py --device=cuda     # `key = value` lines, then flags

Every knob is in TrainConfig below; `python train.py --help` lists them with their defaults.
"""

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from configurator import configure, fail
from foldgpt import FoldGPT, FoldGPTConfig


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = "data/passkeys"  # made by prepare_data.py: train.bin, val.bin, meta.json
    out_dir: str = "out"  # ckpt.pt is written here
    init_from: str = "scratch"  # 'scratch', or 'resume' from out_dir/ckpt.pt
    # the model (FoldGPTConfig; vocab_size comes from the data's meta.json)
    window: int = 32  # W: new tokens per window
    n_state: int = 64  # S: carried rows per layer (0: a plain GPT with a W-token context)
    n_layer: int = 4  # L: blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # C: channels
    dropout: float = 0.0  # dropout in attention and residual branches
    bias: bool = False  # biases in Linear and LayerNorm
    # one optimizer step: batch_size streams x bptt windows, state carried through them
    batch_size: int = 16  # B: streams read side by side, each a contiguous part of the corpus
    bptt: int = 4  # windows per step through which gradients flow (truncated BPTT)
    grad_ckpt: bool = False  # recompute each window in backward: memory O(bptt) states
    # AdamW, with warmup then cosine decay to min_lr at max_iters
    max_iters: int = 1500  # optimizer steps
    learning_rate: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # learning rate at the end of the cosine
    warmup_iters: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # on matrices and embeddings only, decoupled (AdamW)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 turns clipping off
    # evaluation and logging
    eval_interval: int = 250  # steps between val loss estimates (and checkpoints)
    eval_iters: int = 20  # steps of val streams per estimate
    log_interval: int = 25  # steps between progress lines
    # system
    device: str = "auto"  # 'auto' picks cuda, then mps, then cpu
    compile: bool = False  # torch.compile each block (slow to start, faster on GPUs)
    seed: int = 1337


class StreamLoader:
    """B contiguous streams of a token file, read one step (bptt windows) at a time in order,
    as Transformer-XL's iterator does, so the state carried into a step belongs to its text."""

    def __init__(self, path, batch_size, span):
        data = np.memmap(path, dtype=np.uint16, mode="r")
        self.stream_len = len(data) // batch_size
        if self.stream_len < span + 1:
            fail(f"{path} has {len(data):,} tokens, too few for {batch_size} streams of one step "
                 f"({span + 1} tokens each): make more data or lower batch_size/bptt/window")
        self.streams = data[:batch_size * self.stream_len].reshape(batch_size, self.stream_len)
        self.span = span  # tokens per stream per step: bptt * W
        self.pos = 0  # where each stream reads next

    def steps_per_pass(self):
        return (self.stream_len - 1) // self.span

    def next(self):
        """x, y (B, span) int64, and whether the streams just started over from the top."""
        fresh = self.pos == 0 or self.pos + self.span + 1 > self.stream_len
        if self.pos + self.span + 1 > self.stream_len:
            self.pos = 0
        chunk = self.streams[:, self.pos:self.pos + self.span + 1].astype(np.int64)
        chunk = torch.from_numpy(chunk)  # (B, span + 1)
        self.pos += self.span
        return chunk[:, :-1], chunk[:, 1:], fresh


def model_config(cfg, vocab_size):
    names = {f.name for f in fields(FoldGPTConfig)} - {"vocab_size"}
    return FoldGPTConfig(vocab_size=vocab_size, **{n: getattr(cfg, n) for n in names})


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices, embeddings and the initial state, not on gains/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


def lr_at(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)


def train_step(model, optimizer, x, y, state, cfg, ctx=nullcontext()):
    """One optimizer step over x, y (B, bptt * W) from state; returns the loss and next state."""
    with ctx:
        _, loss, state = model.forward_stream(x, state, y, grad_ckpt=cfg.grad_ckpt)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    # The next step reads on from here, so the state goes on with it. Detached: gradients
    # stop at the step boundary (truncated BPTT), so memory stays O(bptt) windows however
    # long the stream, while the context itself flows forward without bound.
    return loss, state.detach()


@torch.no_grad()
def evaluate(model, loader, iters, ctx):
    """Mean loss over the first `iters` steps of the val streams, carrying the state."""
    model.eval()
    device = model.lm_head.weight.device
    loader.pos, state, losses = 0, None, []
    for _ in range(min(iters, loader.steps_per_pass())):
        x, y, _ = loader.next()
        with ctx:
            _, loss, state = model.forward_stream(x.to(device), state, y.to(device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def rng_states():
    """Every random generator a run may draw from, in types torch.load(weights_only) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=(name, torch.from_numpy(keys.copy()), pos,
                                                 has_gauss, gauss),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states):
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, ckpt):
    """Write a temporary file in the same folder, flush it to disk, then rename it over the old
    one: a crash at any moment leaves either the old checkpoint or the new one, whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_file(path, what, device="cpu"):
    """torch.load with weights_only=True: tensors and plain data load, code in a pickle never
    runs. Anything unreadable is a one-line error."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load {what} {path}: it is truncated, damaged, or holds more than "
             f"tensors and plain data ({reason[:120]})")


def load_checkpoint(out_dir, device):
    """The checkpoint dict and its model, or a one-line error saying how to make one."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train one with python train.py --out_dir={out_dir}")
    ckpt = read_file(path, "checkpoint", device)
    try:
        model = FoldGPT(FoldGPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        fail(f"checkpoint {path} does not hold a FoldGPT this code can build "
             f"({type(e).__name__}): train a new one")
    return ckpt, model.to(device)


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def read_meta(data_dir):
    for split in ("train.bin", "val.bin", "meta.json"):
        if not os.path.exists(os.path.join(data_dir, split)):
            fail(f"no {split} in {data_dir}: make the data with python prepare_data.py "
                 "(see its --help for your own text)")
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        vocab, tokenizer = meta["vocab_size"], meta["tokenizer"]
    except (ValueError, KeyError) as e:
        fail(f"{data_dir}/meta.json is damaged ({type(e).__name__}): remake the data with "
             "python prepare_data.py")
    if TOKENIZER_VOCAB.get(tokenizer) != vocab:
        fail(f"{data_dir}/meta.json says tokenizer {tokenizer!r} with vocab {vocab}, which do not "
             "go together: remake the data with python prepare_data.py")
    return meta


TOKENIZER_VOCAB = {"byte": 257, "gpt2": 50257}  # prepare_data.get_tokenizer(name).n_vocab


class Progress:
    """Times the training steps, not the evaluations, and prints the progress lines."""

    def __init__(self, cfg, it):
        self.tokens_per_step = cfg.batch_size * cfg.bptt * cfg.window
        self.max_iters, self.start_it, self.t_start = cfg.max_iters, it, time.time()
        self.log = []  # (iter, train loss) at each line
        self.restart(it)

    def restart(self, it):
        self.t0, self.it0 = time.time(), it

    def report(self, it, loss, lr):
        dt = (time.time() - self.t0) / (it - self.it0)
        eta = (time.time() - self.t_start) / (it - self.start_it) * (self.max_iters - it)
        print(f"iter {it:5d} | loss {loss:.4f} | lr {lr:.2e} | "
              f"{self.tokens_per_step / dt:7,.0f} tok/s | {dt * 1000:5.0f} ms/iter | "
              f"eta {eta / 60:.1f} min", flush=True)
        self.log.append((it, loss))
        self.restart(it)


def check_out_dir(out_dir):
    """Fail now, not after an hour of training, if checkpoints cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to out_dir {out_dir} ({e.strerror}): pick another --out_dir")


def train(cfg):
    """Run the training cfg describes; returns the list of (iter, train loss) it logged."""
    device = pick_device(cfg.device)
    device_type = "cuda" if device.startswith("cuda") else device
    ctx = (torch.autocast(device_type, dtype=torch.bfloat16)
           if device_type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
    torch.manual_seed(cfg.seed)
    meta = read_meta(cfg.data_dir)
    span = cfg.bptt * cfg.window
    train_data = StreamLoader(os.path.join(cfg.data_dir, "train.bin"), cfg.batch_size, span)
    val_data = StreamLoader(os.path.join(cfg.data_dir, "val.bin"), cfg.batch_size, span)
    if cfg.init_from not in ("scratch", "resume"):
        fail(f"init_from must be scratch or resume, got {cfg.init_from!r}")
    model_args = model_config(cfg, meta["vocab_size"])
    try:
        model_args.check()
    except ValueError as e:
        fail(str(e))
    it, best_val, state = 0, float("inf"), None
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "scratch":
        model = FoldGPT(model_args).to(device)
    else:
        ckpt, model = load_checkpoint(cfg.out_dir, device)
        if ckpt["model_args"] != asdict(model_args) or ckpt["meta"]["tokenizer"] != meta[
                "tokenizer"]:
            fail(f"{ckpt_path} was trained with another model or tokenizer than this config and "
                 f"{cfg.data_dir} give: resume with the settings it was trained with")
    optimizer = make_optimizer(model, cfg, device_type)
    if cfg.init_from == "resume":  # go on exactly where the checkpoint stopped
        optimizer.load_state_dict(ckpt["optimizer"])
        it, best_val, train_data.pos = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["train_pos"]
        state = None if ckpt["train_state"] is None else ckpt["train_state"].to(device)
        set_rng_states(ckpt["rng"])
        if it >= cfg.max_iters:
            fail(f"{ckpt_path} is at iter {it} already: give a larger --max_iters to go on")
    check_out_dir(cfg.out_dir)
    if cfg.compile:
        for block in model.transformer.h:
            block.compile()  # in place: the saved state_dict keeps its plain names

    def save():
        save_checkpoint(ckpt_path, dict(
            model_args=asdict(model.config), model=model.state_dict(),
            optimizer=optimizer.state_dict(), iter_num=it, best_val_loss=best_val,
            config=asdict(cfg), meta=meta, train_pos=train_data.pos,
            train_state=None if state is None else state.cpu(), rng=rng_states()))

    print(f"FoldGPT {model.num_params():,} parameters on {device}; W={cfg.window} "
          f"S={cfg.n_state} L={cfg.n_layer}; {cfg.batch_size} streams x {cfg.bptt} windows = "
          f"{cfg.batch_size * span:,} tokens per step; {meta['train_tokens']:,} train tokens")
    # Ctrl-C asks the loop to stop after the step under way, so the checkpoint is a whole step.
    interrupted = []
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    progress = Progress(cfg, it)
    try:
        while True:
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                val = evaluate(model, val_data, cfg.eval_iters, ctx)
                best_val = min(best_val, val)
                save()
                print(f"iter {it}: val loss {val:.4f}", flush=True)
                progress.restart(it)  # progress lines time the training steps only
            if it == cfg.max_iters:
                break
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # ---- one step: bptt windows per stream, the state carried through all of them ----
            x, y, fresh = train_data.next()
            if fresh:
                state = None  # the streams start over from the top: so does the state
            loss, state = train_step(model, optimizer, x.to(device), y.to(device), state, cfg,
                                     ctx)
            it += 1
            # ----------------------------------------------------------------------------------
            if not torch.isfinite(loss):
                print(f"error: the loss is {loss.item()} at iter {it}: stopped without saving; "
                      f"{ckpt_path} keeps the last good checkpoint. Try a lower learning_rate.",
                      file=sys.stderr)
                sys.exit(1)
            if interrupted:
                save()
                print(f"interrupted: saved iter {it} to {ckpt_path}; go on with "
                      "--init_from=resume", flush=True)
                sys.exit(130)
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                progress.report(it, loss.item(), lr)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    print(f"done in {(time.time() - progress.t_start) / 60:.1f} min: val loss {val:.4f}, "
          f"checkpoint at {ckpt_path}")
    return progress.log


if __name__ == "__main__":
    train(configure(TrainConfig(), sys.argv[1:]))
