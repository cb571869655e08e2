"""
What one training step costs: the memory a process needs (parameters, gradients, AdamW's
moments, activations with and without grad_ckpt) and the FLOPs, for train.py's estimate line
and --dry_run; and the progress lines that report tokens/s and MFU as training goes. The test
suite checks the memory estimate against measured CPU steps.
"""

import time

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


def step_costs(cfg, model_config, n_params, dtype="float32"):
    """What one optimizer step of this process needs: a dict of bytes (parameters, gradients,
    AdamW's two moments, activations with and without grad_ckpt) and the step's FLOPs.

    Activations are counted per window and stream. A block saves about 18 C-wide rows of
    numbers for every row it runs (its input, LayerNorms, q/k/v, attention output, MLP input,
    GELU input and output at 4C), 4 for every carried row that only lends its keys and values,
    and 9 more for every memory row (with carry_kv no carried row runs a block, and a window
    saves about 9 for each of them, its key and value gathered, turned and read: fitted to the
    test's measured step, session 21); with token
    shift, K more for every row a block runs (the K rows before it, side by side); the head
    saves W x V log-probabilities. (Counted with
    torch.autograd.graph.saved_tensors_hooks on CPU in float32; bfloat16 autocast keeps 0.58
    of those bytes.) Without grad_ckpt a step keeps bptt windows of them; with it, the state
    entering each window plus 1.5 windows: the one being recomputed and its gradients (with
    carry_kv, layer by layer: what enters each layer plus 1.5 layers of every window). This is
    memory in use, as torch.cuda.max_memory_allocated counts it; on CPU, glibc's malloc keeps
    memory that was freed, so a plain process's resident size can run up to 1.5x higher."""
    W, S, M = model_config.window, model_config.n_state, model_config.n_mem
    L, C, vocab_size = model_config.n_layer, model_config.n_embd, model_config.vocab_size
    R = S - M
    gone = min(W, R)
    rows = W + (R - gone) + M  # rows through each block per window: tokens, staying rows, memory
    lend = gone + M  # rows whose keys and values are computed only to be read
    ran = W if model_config.carry_kv else W + S + M  # rows a block runs: tokens, carried, memory
    shifted = model_config.token_shift * ran  # token shift's K rows before each, side by side
    per_row = 18 * rows + 4 * lend + 9 * M + shifted  # C-wide rows a layer saves, per window
    if model_config.carry_kv:  # the tokens alone run the block, and each window gathers, turns
        per_row = 18 * W + 9 * S + shifted  # and reads every carried row's kept key and value
    kept = 0.58 if dtype in ("bfloat16", "float16") else 1.0  # autocast: train.py's dtype
    head = kept * 4 * W * vocab_size  # bytes
    per_window = kept * 4 * L * C * per_row + head
    B = cfg.batch_size  # one micro-step's streams: grad_accum micro-steps run one after another
    state = 4 * L * S * C  # bytes of one stream's carried state
    acts = B * cfg.bptt * per_window
    acts_ckpt = B * (cfg.bptt * state + 1.5 * per_window)
    if model_config.layer_by_layer():  # run_layers: with grad_ckpt, a step keeps what enters
        # each layer (the tokens' rows, and the carried rows with their keys and values) plus
        # 1.5 layers of every window, and the head's
        layer = (per_window - head) / L
        acts_ckpt = B * (cfg.bptt * (4 * L * W * C + 1.5 * layer + head) + 3 * state)
    # FLOPs: 2 per multiply-add forward, 4 more backward; every row through a block costs
    # its weights (12 C^2 per layer, and token shift's K C^2 into the key and K-1 into the
    # query), every (row, key) pair 4 C in attention.
    keys, shift = S + W, max(0, 2 * model_config.token_shift - 1)
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
