"""
Train FoldGPT on B contiguous streams side by side, carrying the state along each of them.

    python prepare_data.py && python train.py          # the CPU quick start, about 5 minutes
    python train.py --max_iters=200 --n_state=0        # the plain windowed GPT, same recipe
    python train.py config/my_run.py --device=cuda     # `key = value` lines, then flags
    torchrun --standalone --nproc_per_node=8 train.py config/paper_24gb.py   # DDP, 8 GPUs

Every knob is in TrainConfig below; `python train.py --help` lists them with their defaults.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (Processes, autocast_for, check_out_dir, load_checkpoint, rng_states,
                         save_checkpoint, set_rng_states)
from configurator import configure, fail
from costs import PEAK_FLOPS, Progress, describe_memory, step_costs
from foldgpt import FoldGPT, FoldGPTConfig, State
from prepare_data import read_meta


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = "data/passkeys"  # made by prepare_data.py: train.bin, val.bin, meta.json
    out_dir: str = "out"  # ckpt.pt is written here
    init_from: str = "scratch"  # 'scratch', or 'resume' from out_dir/ckpt.pt
    # the model (FoldGPTConfig; vocab_size comes from the data's meta.json)
    window: int = 32  # W: new tokens per window
    n_state: int = 96  # S: carried rows per layer (0: a plain GPT with a W-token context)
    n_mem: int = -1  # M: of the S rows, memory rows kept for their keep score; -1: S // 3
    mem_cost: float = 0.01  # a cost on keeping carried rows: a row stays if reading it pays
    keep_cost: str = "sigmoid"  # the cost per row: sigmoid(score), which fades as a score grows,
    #                             or softplus(score), which does not (a score settles at its worth)
    keep_init: float = 2.0  # the keep score's bias at first (> 0: every row is kept)
    token_shift: int = 2  # rows before a row that its key reads (its query: one fewer); 0: none
    tie_embeddings: bool = False  # one matrix for the input embedding and the output layer
    evolve_gate: bool = True  # carried rows evolve by a learned share (0 at first), or fully
    carry_kv: bool = True  # carry each row's keys and values as made, rows not evolved, and train
    #                        every window of a step at once; False: the paper's repetitive time
    #                        evolution, window by window (config/evolve.py)
    keep_context: bool = False  # the keep score reads a row one layer up, which knows its window
    keep_head_only: bool = True  # the read's gradient to the keep scores stops at the keep heads
    keep_head_only_until: int = 400  # > 0, with keep_head_only: it holds for the steps before this
    #                                  one only, then the keep scores' gradients reach the rows
    keep_row_grad: float = 1.0  # the share of those gradients that reaches the rows (1: all)
    keep_hidden: int = 0  # > 0: the keep head is an MLP with this many hidden units
    admit_reinforce: float = 0.0  # REINFORCE on the memory's admissions: by the loss after them
    keep_supervise: float = 1.0  # teach the keep scores to pick where the data says a key is
    #                              (the built-in corpus marks it; on text without marks: nothing)
    keep_hard: float = 0.05  # keep_supervise's unmarked side: only this share, scored highest
    keep_margin: float = 0.0  # keep_supervise: marked scores above +this, the others below -this
    keep_rank: float = 0.1  # a full memory lets go its lowest-ranked row (score + this per row
    #                         newer), not its oldest; 0: its oldest
    keep_rank_eval: float = -1.0  # out of training (eval, sample.py): the memory ranks by this
    #                               keep_rank instead; -1: by keep_rank
    keep_shared: bool = False  # every layer's memory lets in what the last layer's score picks
    #                            (with carry_kv, training runs in joint waves of windows)
    memory_heads: int = 0  # of the first layer's heads, this many read only its memory rows,
    #                        the others only its recent rows and tokens; 0: every head reads all
    admit_after: int = -1  # windows a row waits among the recent rows before the memory may
    #                        let it in (0: at its own window's fold); -1: when pushed out of them
    memory_layers: int = 1  # layers, from the first up, whose heads memory_heads splits
    n_layer: int = 4  # L: blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # C: channels
    dropout: float = 0.0  # dropout in attention and residual branches
    bias: bool = False  # biases in Linear and LayerNorm
    # one optimizer step: batch_size streams x bptt windows, state carried through them
    batch_size: int = 4  # B: streams read side by side, each a contiguous part of the corpus
    bptt: int = 16  # windows per step through which gradients flow (truncated BPTT)
    grad_accum: int = 1  # micro-steps of batch_size streams each per optimizer step (per process)
    grad_ckpt: bool = False  # recompute each window (with carry_kv, each layer) in backward
    fresh_every: int = 8  # > 0: each stream begins afresh from the initial state every this many
    #                       steps, the streams in turn, so the model learns to read a text's
    #                       start with nothing before it; 0: only where the streams start
    near_iters: int = 0  # the first this many steps read train_near.bin (prepare_data.py
    #                      --near_gap): keys asked for close by, where the copy from the memory
    #                      is learned; then train.bin, where keeping is learned
    # AdamW, with warmup then cosine decay to min_lr at lr_decay_iters
    max_iters: int = 1200  # optimizer steps
    lr_decay_iters: int = 0  # the cosine ends here, and min_lr holds after it; 0: max_iters
    learning_rate: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # learning rate at the end of the cosine
    warmup_iters: int = 100  # linear warmup steps
    recall_warmup: int = 300  # first steps whose loss counts only the recall targets the data marks
    recall_every: int = 0  # then every recall_every-th step counts them alone again (0: never)
    weight_decay: float = 0.1  # on matrices and embeddings only, decoupled (AdamW)
    beta1: float = 0.9  # AdamW's decay of the gradient's running mean
    beta2: float = 0.99  # AdamW's decay of the squared gradient's running mean
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 turns clipping off
    # evaluation and logging
    eval_interval: int = 250  # steps between val loss estimates (and checkpoints)
    eval_iters: int = 20  # steps of val streams per estimate
    log_interval: int = 25  # steps between progress lines
    # system
    device: str = "auto"  # 'auto' picks cuda, then mps, then cpu
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA (else float16), float32 elsewhere; or a name
    compile: bool = False  # torch.compile each block (slow to start, faster on GPUs)
    dry_run: bool = False  # print the model's size and the memory estimate, then stop
    seed: int = 1337  # seeds the weights, dropout and the memory's admission in training


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
        self.tokens = len(data)
        self.pos = 0  # where each stream reads next

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
            y = y.masked_fill(torch.from_numpy(marks != 1), -1)
        self.keep = None  # (streams, span) bool: x's tokens where a key is said (keep_supervise)
        if self.marks is not None:
            self.keep = torch.from_numpy(self.marks[:, self.pos:self.pos + self.span] > 0)
        self.pos += self.span
        return x, y, fresh


def fresh_streams(it, n_streams, every):
    """(n_streams,) bool: with fresh_every, the streams that begin afresh at step it, stream i
    on the steps where (it + i) % every == 0, so they take turns; None on steps where none
    does. A function of the step alone: a resumed run restarts the streams a straight one
    would."""
    if not every or it == 0:  # at step 0 every stream begins anyway
        return None
    fresh = (it + torch.arange(n_streams)) % every == 0
    return fresh if fresh.any() else None


def keep_head_only_at(it, cfg):
    """keep_head_only at step it: as given, and with keep_head_only_until a curriculum, the
    copy first (head-only before that step), then the rows' admission."""
    return cfg.keep_head_only and (not cfg.keep_head_only_until or it < cfg.keep_head_only_until)


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
    end = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)


def train_step(model, optimizer, x, y, state, cfg, ctx=nullcontext(), scaler=None, keep=None,
               fresh=None):
    """One optimizer step over x, y (grad_accum * B, bptt * W) from state (a State, or None at
    the streams' start): grad_accum micro-steps of B streams each, whose gradients add up.
    keep: x's tokens where the data says a key is (see keep_supervise), or None. fresh
    (grad_accum * B,) bool: the streams that begin afresh here (fresh_every), or None; under
    DDP every process passes one on the same steps (see fresh_streams).
    Returns the mean loss and the state after the step. model may be wrapped in DDP, which
    averages the gradients across processes."""
    raw = model.module if isinstance(model, DDP) else model
    A = cfg.grad_accum
    B = x.size(0) // A
    start = None
    if state is None or fresh is not None:  # streams start here, from the learned initial state
        # read through a copy whose gradient is handed to state0 below: DDP then never waits
        # for state0's gradient, which most steps do not have (see train)
        start = raw.state0.detach().requires_grad_()
        if state is None:
            state = State(start.unsqueeze(0).expand(x.size(0), -1, -1, -1))
    optimizer.zero_grad(set_to_none=True)
    losses, states = [], []
    for k in range(A):
        streams = slice(k * B, (k + 1) * B)
        # Under DDP, gradients are averaged across processes in the last micro-step's backward.
        sync = model.no_sync() if isinstance(model, DDP) and k < A - 1 else nullcontext()
        part = state.select(streams)
        if fresh is not None:  # here, not once for all: each micro-step's backward is its own
            part = raw.restart(part, fresh[streams], start)
        with sync:
            with ctx:
                _, loss, after = model(x[streams], part, y[streams],
                                       grad_ckpt=cfg.grad_ckpt,
                                       keep_targets=None if keep is None else keep[streams])
            total = loss / A
            if cfg.mem_cost and raw.config.n_mem:  # a cost on keeping: see mem_cost
                cost = torch.sigmoid if cfg.keep_cost == "sigmoid" else F.softplus
                kept = sum(cost(score).mean() for score in raw.keep_scores(
                    part.rows.detach(), None if part.kv is None else part.kv.detach()))
                total = total + cfg.mem_cost / A * kept
            (total if scaler is None else scaler.scale(total)).backward()
        losses.append(loss.detach())
        # The next step reads on from here, so the state goes on with it. Detached: gradients
        # stop at the step boundary (truncated BPTT), so memory stays O(bptt) windows however
        # long the stream, while the context itself flows forward without bound.
        states.append((after.rows.detach(), None if after.kv is None else after.kv.detach()))
    if start is not None:
        grad = torch.zeros_like(start) if start.grad is None else start.grad  # none restarted
        if isinstance(model, DDP):  # averaged across processes, as DDP does the others
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        raw.state0.grad = grad
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when float16 overflowed, and lowers the scale
        scaler.update()
    else:
        optimizer.step()
    rows, kv = zip(*states)  # steps end on a full window: nothing pending
    return torch.stack(losses).mean(), State(torch.cat(rows), None,
                                             None if kv[0] is None else torch.cat(kv))


@torch.no_grad()
def evaluate(model, loader, iters, ctx):
    """Mean loss over the first `iters` steps of the val streams, carrying the state."""
    model.eval()
    device = model.lm_head.weight.device
    loader.pos, state, losses = 0, None, []
    for _ in range(min(iters, (loader.stream_len - 1) // loader.span)):  # at most one pass
        x, y, _ = loader.next()
        with ctx:
            _, loss, state = model(x.to(device), state, y.to(device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def resume(ckpt, train_data, n_streams, mine, procs, cfg, say):
    """Put the run back where the checkpoint stopped: the streams' place and carried states and
    the random generators. Returns the carried state of this process's streams, or None."""
    state, span, rank = None, train_data.span, procs.rank
    if ckpt["train_streams"] == n_streams:  # same streams: each process takes its own back
        train_data.pos = ckpt["train_pos"]
        if ckpt["train_state"] is not None:
            def own(t):  # this process's streams
                return None if t is None else t[rank * mine:(rank + 1) * mine].to(procs.device)
            state = State(own(ckpt["train_state"]), None, own(ckpt.get("train_kv")))
    else:  # other streams: read on from the same share of the corpus, with a fresh state
        share = ckpt["train_pos"] / (train_data.tokens // ckpt["train_streams"])
        train_data.pos = int(share * train_data.stream_len) // span * span
        say(f"note: the checkpoint read {ckpt['train_streams']} streams and this run reads "
            f"{n_streams}, so the carried states start afresh")
    set_rng_states(ckpt["rng"])  # process 0's generators, exactly
    rank_rng = ckpt["rank_rng"]
    if procs.ddp and rank_rng is not None and len(rank_rng["torch"]) == procs.world:
        torch.set_rng_state(rank_rng["torch"][rank])
        if "cuda" in rank_rng and procs.device_type == "cuda":
            torch.cuda.set_rng_state(rank_rng["cuda"][rank], procs.device)
    elif procs.ddp:  # another number of processes: new draws, still one stream per process
        torch.manual_seed(cfg.seed + 1000 * ckpt["iter_num"] + rank)
    return state


def build(cfg, meta, procs, ckpt_path):
    """The model and optimizer, new or from the checkpoint, and the checkpoint (or None)."""
    model_args = model_config(cfg, meta["vocab_size"])
    try:
        model_args.check()
    except ValueError as e:
        fail(str(e))
    if cfg.init_from == "scratch":
        model = FoldGPT(model_args).to(procs.device)
        return model, make_optimizer(model, cfg, procs.device_type), None
    ckpt, model = load_checkpoint(cfg.out_dir, procs.device)
    # model.config: the saved settings, with the defaults of any added since (a switch, off)
    if asdict(model.config) != asdict(model_args) or ckpt["meta"]["tokenizer"] != meta["tokenizer"]:
        fail(f"{ckpt_path} was trained with another model or tokenizer than this config and "
             f"{cfg.data_dir} give: resume with the settings it was trained with")
    optimizer = make_optimizer(model, cfg, procs.device_type)
    missing = sorted({"iter_num", "best_val_loss", "train_pos", "train_streams", "train_state",
                      "rng", "rank_rng"} - ckpt.keys())
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, TypeError):
        missing.insert(0, "optimizer")
    if missing:
        fail(f"{ckpt_path} holds a model but not the training state resume needs "
             f"({', '.join(missing)}): resume from a checkpoint train.py wrote, or train anew "
             "with --init_from=scratch")
    if ckpt["iter_num"] >= cfg.max_iters:
        fail(f"{ckpt_path} is at iter {ckpt['iter_num']} already: give a larger --max_iters")
    return model, optimizer, ckpt


def train(cfg):
    """Run the training cfg describes; returns the list of (iter, train loss) it logged.
    Under torchrun each process trains its own grad_accum x batch_size streams, DDP averages
    the gradients, and process 0 alone evaluates, logs and saves."""
    procs = Processes(cfg.device)
    device, world = procs.device, procs.world
    ctx, scaler, dtype = autocast_for(cfg, procs.device_type)
    say = print if procs.master else (lambda *args, **kwargs: None)
    torch.manual_seed(cfg.seed)
    meta = read_meta(cfg.data_dir)
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.bptt < 1:
        fail("batch_size, bptt and grad_accum must all be >= 1")
    if cfg.init_from not in ("scratch", "resume"):
        fail(f"init_from must be scratch or resume, got {cfg.init_from!r}")
    if cfg.keep_cost not in ("sigmoid", "softplus"):
        fail(f"keep_cost must be sigmoid or softplus, got {cfg.keep_cost!r}")
    if cfg.fresh_every < 0:
        fail(f"fresh_every must be >= 0 (0: off), got {cfg.fresh_every}")
    span = cfg.bptt * cfg.window
    mine = cfg.grad_accum * cfg.batch_size  # streams of this process
    n_streams = world * mine  # streams of all processes; process r reads its own `mine` of them
    if cfg.near_iters < 0 or cfg.near_iters and not meta.get("near_tokens"):
        fail(f"near_iters needs train_near.bin in {cfg.data_dir}: make the data with "
             "python prepare_data.py --near_gap=64, or give --near_iters=0")
    rows = slice(procs.rank * mine, (procs.rank + 1) * mine)
    train_data = StreamLoader(os.path.join(cfg.data_dir, "train.bin"), n_streams, span, rows)
    far_data = train_data  # read from step near_iters on; the near keys' file before it
    if cfg.near_iters:
        train_data = StreamLoader(os.path.join(cfg.data_dir, "train_near.bin"), n_streams,
                                  span, rows)
    val_data = StreamLoader(os.path.join(cfg.data_dir, "val.bin"), cfg.batch_size, span)
    marked = train_data.marks is not None  # recall targets to count alone on some steps
    recall_warmup, recall_every = (cfg.recall_warmup, cfg.recall_every) if marked else (0, 0)
    supervise = cfg.keep_supervise > 0 and marked and bool((train_data.marks == 2).any())
    if cfg.keep_supervise and not supervise and model_config(cfg, meta["vocab_size"]).n_mem:
        say(f"note: {cfg.data_dir} marks no pass keys, so keep_supervise has nothing to teach: "
            "the memory learns what to keep from the loss alone")
    if cfg.recall_warmup and not marked:
        say(f"note: {cfg.data_dir} marks no recall targets, so no recall_warmup: the loss "
            "counts every token from the first step")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    model, optimizer, ckpt = build(cfg, meta, procs, ckpt_path)
    it, best_val, state, val, loss = 0, float("inf"), None, float("nan"), None
    if ckpt is None:
        torch.manual_seed(cfg.seed + procs.rank)  # the same weights everywhere, own draws
    else:  # go on exactly where the checkpoint stopped
        it, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        if it >= cfg.near_iters:
            train_data = far_data
        state = resume(ckpt, train_data, n_streams, mine, procs, cfg, say)
    if procs.master:
        check_out_dir(cfg.out_dir)
    if cfg.compile:
        for block in model.transformer.h:
            block.compile()  # in place: the saved state_dict keeps its plain names
    trainer = model
    if procs.ddp:
        # The learned initial state is read only where the streams start, and then through a
        # copy (see train_step): DDP never sees it used, and must be told not to wait for it.
        trainer = DDP(model, device_ids=[procs.local_rank] if device.startswith("cuda") else None,
                      find_unused_parameters=True)

    def save():  # every process takes part (gathers); process 0 writes
        states = None if state is None else procs.gather(state.rows).cpu()
        kv = None if state is None or state.kv is None else procs.gather(state.kv).cpu()
        rank_rng = procs.rng_states()
        if procs.master:
            args = dict(asdict(model.config), keep_head_only=cfg.keep_head_only)  # as given:
            save_checkpoint(ckpt_path, dict(  # keep_head_only_until may have ended it in the loop
                model_args=args, model=model.state_dict(),
                optimizer=optimizer.state_dict(), iter_num=it, best_val_loss=best_val,
                config=asdict(cfg), meta=meta, train_pos=train_data.pos,
                train_streams=n_streams, train_state=states, train_kv=kv, rng=rng_states(),
                rank_rng=rank_rng))

    def stop_if_not_finite(value):
        if not math.isfinite(value):
            say(f"error: the loss is {value} at iter {it}: stopped without saving; "
                f"{ckpt_path} keeps the last good checkpoint. Try a lower learning_rate.",
                file=sys.stderr)
            sys.exit(1)

    costs = step_costs(cfg, model.config, model.num_params(), dtype)
    peak = next((f for name, f in PEAK_FLOPS.items() if procs.device_type == "cuda"
                 and name in torch.cuda.get_device_name(device)), 0.0)
    say(f"FoldGPT {model.num_params():,} parameters on {device} x {world}, {dtype}; "
        f"W={cfg.window} S={cfg.n_state} (memory {model.config.n_mem}) L={cfg.n_layer}; "
        f"{n_streams} streams x {cfg.bptt} windows = {n_streams * span:,} tokens per step; "
        f"{meta['train_tokens']:,} train tokens")
    say(describe_memory(costs, cfg.grad_ckpt))
    if it < recall_warmup:
        say(f"iters {it}-{recall_warmup}: the loss counts only the recall targets (recall_warmup); "
            "then every token" + (f", but for one step in {recall_every} (recall_every)"
                                  if recall_every else ""))
    if cfg.dry_run:
        procs.close()
        return []
    # Ctrl-C asks the loop to stop after the step under way, so the checkpoint is a whole step.
    # (Under torchrun, torchrun handles Ctrl-C: resume from the last checkpoint.)
    interrupted = []
    old_handler = None if procs.ddp else signal.signal(signal.SIGINT,
                                                       lambda *_: interrupted.append(True))
    progress = Progress(cfg, it, n_streams * span, world * costs["flops"], world * peak)
    try:
        while True:
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                if loss is not None:
                    stop_if_not_finite(procs.mean(loss))  # never save weights a blow-up spoiled
                if procs.master:
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
            if it == cfg.near_iters > 0 and train_data is not far_data:  # on at the same place,
                far_data.pos, train_data = train_data.pos, far_data  # the state carried on
                say(f"iter {it}: near_iters ends: the keys come from up to the whole max_gap "
                    "back (train.bin) from here on")
            model.config.keep_head_only = keep_head_only_at(it, cfg)
            if cfg.keep_head_only and it == cfg.keep_head_only_until > 0:
                say(f"iter {it}: keep_head_only ends (keep_head_only_until): the keep scores' "
                    "gradients reach the rows from here on")
            # ---- one step: bptt windows per stream, the state carried through all of them ----
            recall_only = it < recall_warmup or bool(recall_every and it % recall_every == 0)
            x, y, fresh = train_data.next(recall_only=recall_only)
            if fresh:
                state = None  # the streams start over from the top: so does the state
            restart = None if state is None else fresh_streams(it, n_streams, cfg.fresh_every)
            if restart is not None:  # this process's own streams (all-False here and there)
                restart = restart[procs.rank * mine:(procs.rank + 1) * mine].to(device)
            keep = train_data.keep if supervise else None  # the model asks n_mem
            loss, state = train_step(trainer, optimizer, x.to(device), y.to(device), state, cfg,
                                     ctx, scaler, None if keep is None else keep.to(device),
                                     restart)
            it += 1
            # ----------------------------------------------------------------------------------
            if interrupted:
                stop_if_not_finite(procs.mean(loss))
                save()
                print(f"interrupted: saved iter {it} to {ckpt_path}; go on with "
                      "--init_from=resume", flush=True)
                sys.exit(130)
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                value = procs.mean(loss)  # the one sync with the device per log line
                stop_if_not_finite(value)
                if procs.master:
                    progress.report(it, value, lr, recall_only)
        procs.close(barrier=True)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if procs.ddp and dist.is_initialized():
            dist.destroy_process_group()
    if procs.device_type == "cuda":
        say(f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB "
            "(torch.cuda.max_memory_allocated)")
    say(f"done in {(time.time() - progress.t_start) / 60:.1f} min: val loss {val:.4f}, "
        f"checkpoint at {ckpt_path}")
    return progress.log


if __name__ == "__main__":
    train(configure(TrainConfig(), sys.argv[1:]))
