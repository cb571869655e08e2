"""
Train FoldGPT window by window, carrying the state along each of B contiguous streams.

    python prepare_data.py && python train.py          # the CPU quick start, about 13 minutes
    python train.py --max_iters=200 --n_state=0        # the plain windowed GPT, same recipe
    python train.py config/my_run.py --device=cuda     # `key = value` lines, then flags
    torchrun --standalone --nproc_per_node=8 train.py config/paper_24gb.py   # DDP, 8 GPUs

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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

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
    n_state: int = 96  # S: carried rows per layer (0: a plain GPT with a W-token context)
    n_mem: int = 32  # of the S rows, memory rows kept for their learned keep score
    mem_cost: float = 0.01  # a cost on the carried rows' keep probability (sigmoid of the
    #                        keep score), so that only the rows whose reading pays it stay
    keep_init: float = 2.0  # the keep score's bias at first (> 0: every row is kept)
    token_shift: int = 2  # rows before a row that its key reads (its query: one fewer); 0: none
    tie_embeddings: bool = False  # one matrix for the input embedding and the output layer
    evolve_gate: bool = True  # carried rows evolve by a learned share (0 at first), or fully
    n_layer: int = 4  # L: blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # C: channels
    dropout: float = 0.0  # dropout in attention and residual branches
    bias: bool = False  # biases in Linear and LayerNorm
    # one optimizer step: batch_size streams x bptt windows, state carried through them
    batch_size: int = 16  # B: streams read side by side, each a contiguous part of the corpus
    bptt: int = 4  # windows per step through which gradients flow (truncated BPTT)
    grad_accum: int = 1  # micro-steps of batch_size streams each per optimizer step (per process)
    grad_ckpt: bool = False  # recompute each window in backward: memory O(bptt) states
    # AdamW, with warmup then cosine decay to min_lr at max_iters
    max_iters: int = 1200  # optimizer steps
    learning_rate: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # learning rate at the end of the cosine
    warmup_iters: int = 100  # linear warmup steps
    recall_warmup: int = 300  # first steps whose loss counts only the recall targets, where
    #                           the data marks them (the built-in corpus does): see README
    recall_every: int = 2  # after recall_warmup, every recall_every-th step counts only the
    #                        recall targets too, so the memory keeps learning what to keep (0: none)
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
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA (float16 where bf16 is missing), float32
    #                      elsewhere; or 'float32', 'bfloat16', 'float16' (CUDA only)
    compile: bool = False  # torch.compile each block (slow to start, faster on GPUs)
    dry_run: bool = False  # print the model's size and the memory estimate, then stop
    seed: int = 1337


class StreamLoader:
    """n_streams contiguous streams of a token file, read one step (bptt windows) at a time in
    order, as Transformer-XL's iterator does, so the state carried into a step belongs to its
    text. rows picks this process's streams when several processes share the work."""

    def __init__(self, path, n_streams, span, rows=slice(None)):
        data = np.memmap(path, dtype=np.uint16, mode="r")
        self.stream_len = len(data) // n_streams
        if self.stream_len < span + 1:
            fail(f"{path} has {len(data):,} tokens, too few for {n_streams} streams of one step "
                 f"({span + 1} tokens each): make more data or lower batch_size/bptt/window")
        self.streams = data[:n_streams * self.stream_len].reshape(n_streams, -1)[rows]
        self.marks = None  # the built-in corpus marks its recall targets (prepare_data.py)
        marks_path = path.replace(".bin", "_recall.bin")
        if os.path.exists(marks_path):
            marks = np.memmap(marks_path, dtype=np.uint8, mode="r")
            if len(marks) != len(data):
                fail(f"{marks_path} does not match {path}: remake the data with prepare_data.py")
            self.marks = marks[:n_streams * self.stream_len].reshape(n_streams, -1)[rows]
        self.span = span  # tokens per stream per step: bptt * W
        self.pos = 0  # where each stream reads next

    def steps_per_pass(self):
        return (self.stream_len - 1) // self.span

    def next(self, recall_only=False):
        """x, y (streams, span) int64, and whether the streams just started over from the top.
        recall_only: y is -1 (no loss) but on the tokens marked as recall targets."""
        fresh = self.pos == 0 or self.pos + self.span + 1 > self.stream_len
        if self.pos + self.span + 1 > self.stream_len:
            self.pos = 0
        chunk = self.streams[:, self.pos:self.pos + self.span + 1].astype(np.int64)
        chunk = torch.from_numpy(chunk)  # (streams, span + 1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        if recall_only:
            marks = self.marks[:, self.pos + 1:self.pos + self.span + 1]
            y = y.masked_fill(torch.from_numpy(marks == 0), -1)
        self.pos += self.span
        return x, y, fresh


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


def train_step(model, optimizer, x, y, state, cfg, ctx=nullcontext(), scaler=None):
    """One optimizer step over x, y (grad_accum * B, bptt * W) from state: grad_accum
    micro-steps of B streams each, whose gradients add up. Returns the mean loss and the state
    after the step. model may be wrapped in DDP, which averages the gradients across processes."""
    raw = model.module if isinstance(model, DDP) else model
    A = cfg.grad_accum
    B = x.size(0) // A
    optimizer.zero_grad(set_to_none=True)
    losses, states = [], []
    for k in range(A):
        rows = slice(k * B, (k + 1) * B)
        # Under DDP, gradients are averaged across processes in the last micro-step's backward.
        sync = model.no_sync() if isinstance(model, DDP) and k < A - 1 else nullcontext()
        with sync:
            with ctx:
                _, loss, after = model(x[rows], None if state is None else state[rows], y[rows],
                                       grad_ckpt=cfg.grad_ckpt)
            total = loss / A
            if cfg.mem_cost and raw.config.n_mem:  # a cost on keeping: see mem_cost
                carried = raw.initial_state(B) if state is None else state[rows]
                kept = sum(torch.sigmoid(block.keep_score(carried[:, l].detach())).mean()
                           for l, block in enumerate(raw.transformer.h))
                total = total + cfg.mem_cost / A * kept
            (total if scaler is None else scaler.scale(total)).backward()
        losses.append(loss.detach())
        states.append(after.detach())
    if isinstance(model, DDP) and raw.state0.grad is not None:  # see train(): not DDP's
        dist.all_reduce(raw.state0.grad)
        raw.state0.grad /= dist.get_world_size()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when float16 overflowed, and lowers the scale
        scaler.update()
    else:
        optimizer.step()
    # The next step reads on from here, so the state goes on with it. Detached: gradients
    # stop at the step boundary (truncated BPTT), so memory stays O(bptt) windows however
    # long the stream, while the context itself flows forward without bound.
    return torch.stack(losses).mean(), torch.cat(states)


@torch.no_grad()
def evaluate(model, loader, iters, ctx):
    """Mean loss over the first `iters` steps of the val streams, carrying the state."""
    model.eval()
    device = model.lm_head.weight.device
    loader.pos, state, losses = 0, None, []
    for _ in range(min(iters, loader.steps_per_pass())):
        x, y, _ = loader.next()
        with ctx:
            _, loss, state = model(x.to(device), state, y.to(device))
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


def step_costs(cfg, vocab_size, n_params, dtype="float32"):
    """What one optimizer step of this process needs: a dict of bytes (parameters, gradients,
    AdamW's two moments, activations with and without grad_ckpt) and the step's FLOPs.

    Activations are counted per window and stream. A block saves about 18 C-wide rows of
    numbers for every row it runs (its input, LayerNorms, q/k/v, attention output, MLP input,
    GELU input and output at 4C), 4 for every carried row that only lends its keys and values,
    and 9 more for every memory row; the head saves W x V log-probabilities. (Counted with
    torch.autograd.graph.saved_tensors_hooks on CPU in float32; bfloat16 autocast keeps 0.58
    of those bytes.) Without grad_ckpt a step keeps bptt windows of them; with it, the state
    entering each window plus 1.5 windows: the one being recomputed and its gradients. This is
    memory in use, as torch.cuda.max_memory_allocated counts it; on CPU, glibc's malloc keeps
    memory that was freed, so a plain process's resident size can run up to 1.5x higher."""
    W, S, M, L, C = cfg.window, cfg.n_state, cfg.n_mem, cfg.n_layer, cfg.n_embd
    R = S - M
    gone = min(W, R)
    rows = W + (R - gone) + M  # rows through each block per window: tokens, staying rows, memory
    lend = gone + M  # rows whose keys and values are computed only to be read
    per_window = 4 * (L * C * (18 * rows + 4 * lend + 9 * M) + W * vocab_size)  # bytes/stream
    if dtype in ("bfloat16", "float16"):  # autocast: the dtype train.py resolved
        per_window *= 0.58
    B = cfg.batch_size  # one micro-step's streams: grad_accum micro-steps run one after another
    state = 4 * L * S * C  # bytes of one stream's carried state
    acts = B * cfg.bptt * per_window
    acts_ckpt = B * (cfg.bptt * state + 1.5 * per_window)
    # FLOPs: 2 per multiply-add forward, 4 more backward; every row through a block costs
    # its weights (12 C^2 per layer, and token shift's K C^2 into the key and K-1 into the
    # query), every (row, key) pair 4 C in attention.
    keys, shift = S + W, max(0, 2 * int(cfg.token_shift) - 1)
    flops_window = 2 * (L * ((12 + shift) * C * C * rows + 2 * C * (W + R - gone) * keys
                             + 2 * C * M * M)
                        + (3 + shift) * lend * L * C * C + W * C * vocab_size)
    return dict(params=4 * n_params, grads=4 * n_params, adamw=8 * n_params,
                activations=acts, activations_ckpt=acts_ckpt,
                flops=3 * flops_window * B * cfg.bptt * cfg.grad_accum)


def describe_memory(costs, grad_ckpt):
    MB = 2 ** 20
    fixed = costs["params"] + costs["grads"] + costs["adamw"]
    acts = costs["activations_ckpt" if grad_ckpt else "activations"]
    other = costs["activations" if grad_ckpt else "activations_ckpt"]
    return (f"memory estimate per process: {fixed / MB:,.0f} MB for parameters, gradients and "
            f"AdamW + {acts / MB:,.0f} MB activations = {(fixed + acts) / MB:,.0f} MB "
            f"({(fixed + other) / MB:,.0f} MB {'without' if grad_ckpt else 'with'} grad_ckpt)")


class Progress:
    """Times the training steps, not the evaluations, and prints the progress lines."""

    def __init__(self, cfg, it, tokens_per_step, flops_per_step=0.0, peak_flops=0.0):
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak_flops = peak_flops  # of all processes together; 0 where unknown
        self.max_iters, self.start_it, self.t_start = cfg.max_iters, it, time.time()
        self.log = []  # (iter, train loss, whether it counted the recall targets only)
        self.restart(it)

    def restart(self, it):
        self.t0, self.it0 = time.time(), it

    def report(self, it, loss, lr, recall=False):
        dt = (time.time() - self.t0) / (it - self.it0)
        eta = (time.time() - self.t_start) / (it - self.start_it) * (self.max_iters - it)
        mfu = (f" | mfu {100 * self.flops_per_step / dt / self.peak_flops:4.1f}%"
               if self.peak_flops else "")
        kind = "recall loss" if recall else "loss"  # a step on the recall targets only, or all
        print(f"iter {it:5d} | {kind} {loss:.4f} | lr {lr:.2e} | "
              f"{self.tokens_per_step / dt:7,.0f} tok/s | {dt * 1000:5.0f} ms/iter{mfu} | "
              f"eta {eta / 60:.1f} min", flush=True)
        self.log.append((it, loss, recall))
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


def ddp_env():
    """(rank, world size, local rank): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each
    process it starts; a plain `python train.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def autocast_for(cfg, device_type):
    """The autocast context and, for float16, the GradScaler that keeps small gradients."""
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "float32" if device_type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if dtype == "float16" and device_type != "cuda":
        fail("dtype float16 needs CUDA: use --dtype=bfloat16 or float32 on this device")
    if dtype == "float32":
        return nullcontext(), None, dtype
    ctx = torch.autocast(device_type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    return ctx, scaler, dtype


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


def train(cfg):
    """Run the training cfg describes; returns the list of (iter, train loss) it logged.
    Under torchrun each process trains its own grad_accum x batch_size streams, DDP averages
    the gradients, and process 0 alone evaluates, logs and saves."""
    rank, world, local_rank = ddp_env()
    ddp, master = world > 1, rank == 0
    device = pick_device(cfg.device)
    if ddp:
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else device
    ctx, scaler, dtype = autocast_for(cfg, device_type)
    say = print if master else (lambda *args, **kwargs: None)
    torch.manual_seed(cfg.seed)
    meta = read_meta(cfg.data_dir)
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.bptt < 1:
        fail("batch_size, bptt and grad_accum must all be >= 1")
    span = cfg.bptt * cfg.window
    mine = cfg.grad_accum * cfg.batch_size  # streams of this process
    n_streams = world * mine  # streams of all processes; process r reads its own `mine` of them
    train_data = StreamLoader(os.path.join(cfg.data_dir, "train.bin"), n_streams, span,
                              rows=slice(rank * mine, (rank + 1) * mine))
    val_data = StreamLoader(os.path.join(cfg.data_dir, "val.bin"), cfg.batch_size, span)
    recall_warmup = cfg.recall_warmup if train_data.marks is not None else 0
    recall_every = cfg.recall_every if train_data.marks is not None else 0
    if cfg.recall_warmup and not recall_warmup:
        say(f"note: {cfg.data_dir} marks no recall targets, so no recall_warmup: the loss "
            "counts every token from the first step")
    if cfg.init_from not in ("scratch", "resume"):
        fail(f"init_from must be scratch or resume, got {cfg.init_from!r}")
    model_args = model_config(cfg, meta["vocab_size"])
    try:
        model_args.check()
    except ValueError as e:
        fail(str(e))
    it, best_val, state, val, loss = 0, float("inf"), None, float("nan"), None
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
        it, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        if it >= cfg.max_iters:
            fail(f"{ckpt_path} is at iter {it} already: give a larger --max_iters to go on")
        saved_streams, rank_rng = ckpt["train_streams"], ckpt["rank_rng"]
        if saved_streams == n_streams:  # same streams: each process takes its own rows back
            train_data.pos = ckpt["train_pos"]
            if ckpt["train_state"] is not None:
                state = ckpt["train_state"][rank * mine:(rank + 1) * mine].to(device)
        else:  # other streams: read on from the same share of the corpus, with a fresh state
            share = ckpt["train_pos"] / (meta["train_tokens"] // saved_streams)
            train_data.pos = int(share * train_data.stream_len) // span * span
            say(f"note: the checkpoint read {saved_streams} streams and this run reads "
                f"{n_streams}, so the carried states start afresh")
        set_rng_states(ckpt["rng"])  # process 0's generators, exactly
        if ddp and rank_rng is not None and len(rank_rng["torch"]) == world:
            torch.set_rng_state(rank_rng["torch"][rank])
            if device_type == "cuda" and "cuda" in rank_rng:
                torch.cuda.set_rng_state(rank_rng["cuda"][rank], device)
        elif ddp:  # another number of processes: new draws, still one stream per process
            torch.manual_seed(cfg.seed + 1000 * it + rank)
    else:
        torch.manual_seed(cfg.seed + rank)  # the same weights everywhere, own dropout draws
    if master:
        check_out_dir(cfg.out_dir)
    if cfg.compile:
        for block in model.transformer.h:
            block.compile()  # in place: the saved state_dict keeps its plain names
    trainer = model
    if ddp:
        # The learned initial state is read only where the streams start, so most steps leave
        # it without a gradient, which DDP cannot wait for. DDP leaves it alone and train_step
        # averages its gradient itself, on the steps that have one (the same on every process).
        # (DDP names a parameter of the model itself ".state0": module name "", a dot, name.)
        DDP._set_params_and_buffers_to_ignore_for_model(model, [".state0"])
        trainer = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    def gathered(tensor):
        """A tensor with every process's rows, in rank order (this process's own if alone)."""
        if not ddp:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def mean_loss():
        """The last step's loss, averaged over the processes."""
        total = loss.detach().float().clone()
        if ddp:
            dist.all_reduce(total)
            total /= world
        return total.item()

    def save():  # every process takes part (gathers); process 0 writes
        states = None if state is None else gathered(state).cpu()
        rank_rng = None  # each process's own torch generators (dropout), when there are several
        if ddp:
            rank_rng = dict(torch=gathered(torch.get_rng_state()[None].to(device)).cpu())
            if device_type == "cuda":
                rank_rng["cuda"] = gathered(torch.cuda.get_rng_state(device)[None].to(device))
                rank_rng["cuda"] = rank_rng["cuda"].cpu()
        if master:
            save_checkpoint(ckpt_path, dict(
                model_args=asdict(model.config), model=model.state_dict(),
                optimizer=optimizer.state_dict(), iter_num=it, best_val_loss=best_val,
                config=asdict(cfg), meta=meta, train_pos=train_data.pos,
                train_streams=n_streams, train_state=states, rng=rng_states(),
                rank_rng=rank_rng))

    def stop_if_not_finite(value):
        if not math.isfinite(value):
            say(f"error: the loss is {value} at iter {it}: stopped without saving; "
                f"{ckpt_path} keeps the last good checkpoint. Try a lower learning_rate.",
                file=sys.stderr)
            sys.exit(1)

    costs = step_costs(cfg, meta["vocab_size"], model.num_params(), dtype)
    peak = next((f for name, f in PEAK_FLOPS.items() if device_type == "cuda"
                 and name in torch.cuda.get_device_name(device)), 0.0)
    say(f"FoldGPT {model.num_params():,} parameters on {device} x {world}, {dtype}; "
        f"W={cfg.window} S={cfg.n_state} (memory {cfg.n_mem}) L={cfg.n_layer}; "
        f"{n_streams} streams x {cfg.bptt} windows = {n_streams * span:,} tokens per step; "
        f"{meta['train_tokens']:,} train tokens")
    say(describe_memory(costs, cfg.grad_ckpt))
    if it < recall_warmup:
        say(f"iters {it}-{recall_warmup}: the loss counts only the recall targets (recall_warmup); "
            "then every token" + (f", but for one step in {recall_every} (recall_every)"
                                  if recall_every else ""))
    if cfg.dry_run:
        if ddp:
            dist.destroy_process_group()
        return []
    # Ctrl-C asks the loop to stop after the step under way, so the checkpoint is a whole step.
    # (Under torchrun, torchrun itself handles Ctrl-C and stops every process: resume from the
    # last checkpoint.)
    interrupted = []
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if not ddp \
        else None
    progress = Progress(cfg, it, n_streams * span, world * costs["flops"], world * peak)
    try:
        while True:
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                if loss is not None:
                    stop_if_not_finite(mean_loss())  # never save weights a blow-up has spoiled
                if master:
                    val = evaluate(model, val_data, cfg.eval_iters, ctx)
                    best_val = min(best_val, val)
                save()
                say(f"iter {it}: val loss {val:.4f}", flush=True)
                progress.restart(it)  # progress lines time the training steps only
            if it == cfg.max_iters:
                break
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # ---- one step: bptt windows per stream, the state carried through all of them ----
            recall_only = it < recall_warmup or bool(recall_every and it % recall_every == 0)
            x, y, fresh = train_data.next(recall_only=recall_only)
            if fresh:
                state = None  # the streams start over from the top: so does the state
            loss, state = train_step(trainer, optimizer, x.to(device), y.to(device), state, cfg,
                                     ctx, scaler)
            it += 1
            # ----------------------------------------------------------------------------------
            if interrupted:
                stop_if_not_finite(mean_loss())
                save()
                print(f"interrupted: saved iter {it} to {ckpt_path}; go on with "
                      "--init_from=resume", flush=True)
                sys.exit(130)
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                value = mean_loss()  # the one sync with the device per log line
                stop_if_not_finite(value)
                if master:
                    progress.report(it, value, lr, recall_only)
        if ddp:
            dist.barrier()  # every process done (rank 0 has written the checkpoint) before exit
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if ddp:
            dist.destroy_process_group()
    if device_type == "cuda":
        say(f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB "
            "(torch.cuda.max_memory_allocated)")
    say(f"done in {(time.time() - progress.t_start) / 60:.1f} min: val loss {val:.4f}, "
        f"checkpoint at {ckpt_path}")
    return progress.log


if __name__ == "__main__":
    train(configure(TrainConfig(), sys.argv[1:]))
