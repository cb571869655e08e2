"""
Speed and memory of FoldGPT beside the plain GPTs a user would otherwise run, in one run, as
ratios (the machine may be shared and noisy): medians of repeats, warm-up excluded.

    python bench.py --quick      # about 5 minutes on 2 CPU cores
    python bench.py              # the full run: more repeats, 180 s each in the race
    python bench.py --carry_kv=False --race_bptt=4   # the paper's evolution (config/evolve.py)
    python bench.py --quick --race_steps=150  # also a race by steps: what a step learns
    python bench.py --n_embd=384 --n_layer=6 --n_head=6    # another model size

Sampling, batch 1, the same model size for all three:
  FoldGPT     the prompt folded window by window, then one row per token (generate)
  crop        nanoGPT's sampler: a plain GPT with block S + W (the rows FoldGPT attends to)
              that crops the context to its block and recomputes the block for every token
  kv cache    a plain GPT whose KV cache grows over the whole context
Training, the same model and tokens per step: FoldGPT over bptt windows (with and without
grad_ckpt) beside a plain GPT with block bptt x W; then a race on real prose: FoldGPT with
train.py's recipe and a plain GPT with block S + W, the same tokens per step, one step of each
in turn for the same seconds, then the val loss of both on held-out prose (with --race_steps,
again for the same steps: the part of the gap that is not speed). The plain GPTs are
FoldGPT with n_state = 0: the same code, so only the folding differs. Peak memory is what one
measurement adds to a fresh process, which does nothing else: its peak RSS above the RSS it had
once torch and the model code were loaded (Linux), or torch.cuda.max_memory_allocated on a GPU.
Prints a table, writes bench.csv, and bench.png when matplotlib is installed.
"""

import csv
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from configurator import configure, fail
from foldgpt import FoldGPT, FoldGPTConfig, State
from checkpoints import pick_device


@dataclass
class BenchConfig:
    quick: bool = False  # a smaller run: about 5 minutes on 2 CPU cores
    window: int = 32  # the model of every contender (defaults: the README's measured model)
    n_state: int = 96  # S: carried rows per layer
    n_mem: int = 32  # of the S rows, memory rows
    carry_kv: bool = True  # FoldGPT carries each row's keys and values as made (train.py's
    #                        default); False: the carried rows evolve every window (the paper's)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 257
    device: str = "auto"
    csv: str = "bench.csv"  # where the figures go; bench.png beside it
    child: str = ""  # internal: 'sample' or 'train', one memory measurement in a fresh process
    contender: str = ""  # internal
    tokens: int = 0  # internal
    batch_size: int = 1  # internal
    bptt: int = 1  # internal
    grad_ckpt: bool = False  # internal
    race_seconds: float = 0.0  # training seconds of each model on real prose (0: 45 quick, 180)
    race_bptt: int = 16  # FoldGPT's windows a step in the race, 64 // race_bptt streams: 2,048
    #                      tokens a step (16: train.py's default recipe; config/evolve.py's: 4)
    race_steps: int = 0  # > 0: a second race of this many steps each, no clock: how much of
    #                      the first race's gap is what a step learns rather than its speed


def model_for(cfg, contender, context=0):
    """FoldGPT, or a plain GPT (n_state = 0) whose window is the crop block or the context."""
    args = dict(vocab_size=cfg.vocab_size, window=cfg.window, n_state=cfg.n_state,
                n_mem=cfg.n_mem, carry_kv=cfg.carry_kv, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_embd=cfg.n_embd)
    if contender == "crop":
        args.update(window=cfg.n_state + cfg.window, n_state=0)
    elif contender in ("kv cache", "plain"):
        args.update(window=context, n_state=0)
    torch.manual_seed(0)
    return FoldGPT(FoldGPTConfig(**args)).to(pick_device(cfg.device))


def intervals(stamps):
    return [b - a for a, b in zip(stamps, stamps[1:])]


@torch.no_grad()
def sampler(model, contender, prompt):
    """Read prompt (1, P) once; returns run(n), which generates n greedy tokens from there and
    gives the n - 1 times between them, in seconds, as often as it is called."""
    if contender == "FoldGPT":
        _, state = model.generate(prompt, 0)  # fold the prompt; its last window stays pending

        def run(n, timed=True):
            stamps = []
            model.generate(prompt[:, :0], n, temperature=0, state=state,
                           on_token=(lambda tok: stamps.append(time.perf_counter())) if timed
                           else None)
            return intervals(stamps)
    elif contender == "crop":
        block = model.config.window

        def run(n, timed=True):
            ctx, stamps = prompt[:, -block:], []
            for _ in range(n):
                logits, _, _ = model(ctx)
                tok = logits[:, -1].argmax(dim=-1, keepdim=True)
                ctx = torch.cat([ctx, tok], dim=1)[:, -block:]
                if timed:
                    stamps.append(time.perf_counter())
            return intervals(stamps)
    else:  # kv cache: no state, one window as long as the context
        with torch.inference_mode():
            window = model.open_window(model.initial_state(1).rows, model.config.window)
            for t in range(0, prompt.size(1), 512):
                x_prompt = model.step(prompt[:, t:t + 512], window)
        kv, inputs, tail = list(window.kv), list(window.inputs), list(window.tail)
        n_prompt = window.n

        def run(n, timed=True):
            window.kv, window.inputs, window.tail = list(kv), list(inputs), list(tail)  # rewind
            window.n, window.room = n_prompt, []
            x, stamps = x_prompt, []
            for _ in range(n):
                tok = model.lm_head(x[:, -1]).argmax(dim=-1, keepdim=True)
                x = model.step_one(tok, window)  # as generate samples
                if timed:
                    stamps.append(time.perf_counter())
            return intervals(stamps)
    return torch.inference_mode()(run)  # all three as generate samples: no autograd at all


def sampling_latency(cfg, positions, repeats):
    """{contender: {position: median over repeats of the mean ms per token}}. Each prompt is read
    once; every repeat visits all positions in turn, the three contenders one after the other,
    so a change in the load of this shared machine reaches them alike (two of their ratios are
    targets). (Until the KV cache wrote into room made once, session 24, its large tensors made
    again every token slowed the contender timed after it, and it ran alone.)"""
    n = 2 * cfg.window + 1  # 2W intervals per repeat: two folds for FoldGPT
    device = pick_device(cfg.device)
    prompts = {p: torch.randint(0, cfg.vocab_size, (1, p), device=device) for p in positions}
    contenders, runs = ("FoldGPT", "crop", "kv cache"), {}
    for c in contenders:
        model = model_for(cfg, c, max(positions) + n + 1).eval()
        runs[c] = {p: sampler(model, c, prompt) for p, prompt in prompts.items()}
        for run in runs[c].values():
            run(8)  # warm-up
    means = {c: {p: [] for p in positions} for c in contenders}
    for _ in range(repeats):
        for p in positions:
            for c in contenders:
                means[c][p].append(statistics.mean(runs[c][p](n)))
    table = {c: {p: 1000 * statistics.median(means[c][p]) for p in positions} for c in contenders}
    del model, runs  # free the KV cache's tensors before anything else runs
    for p in positions:
        print(f"  position {p:6,}: " + "  ".join(f"{c} {table[c][p]:.2f} ms" for c in table))
    return table


def train_figures(cfg, contender, batch_size, bptt, steps, grad_ckpt):
    """(median tokens/s over steps after the first two, of one training configuration)."""
    span = bptt * cfg.window
    model = model_for(cfg, contender, context=span).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = pick_device(cfg.device)
    data = torch.randint(0, cfg.vocab_size, (batch_size, steps * span + 1), device=device)
    state, times = None, []
    for i in range(steps):  # ordered streams: step i reads on where step i - 1 stopped
        x, y = data[:, i * span:(i + 1) * span], data[:, i * span + 1:(i + 1) * span + 1]
        t = time.perf_counter()
        _, loss, state = model(x, state, y, grad_ckpt=grad_ckpt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state = State(state.rows.detach(), None,  # truncated BPTT, as train.py does
                      None if state.kv is None else state.kv.detach())
        times.append(time.perf_counter() - t)
    return batch_size * span / statistics.median(times[2:])


def race(cfg, seconds, min_steps=0):
    """Train FoldGPT (64 // race_bptt streams x race_bptt windows a step, train.py's recipe)
    and the plain GPT with block S + W (16 streams x 1 window of S + W: the same 2,048 tokens a
    step at the default size) on the carried
    prose's training part, one step of each in turn, until each has trained for `seconds` of its
    own steps' time (the first step, which warms torch up, is not on the clock); the learning
    rate follows train.py's schedule over the budget. Then the val loss of each on the held-out
    part, which neither trained on (as train.py's val loss: the streams read in order, FoldGPT
    carrying its state). min_steps: a floor, each trains at least that many steps on the clock
    (for a busy machine: the tests); with seconds 0, each trains exactly that many, whatever
    they take. Returns {name: (val loss, median tokens/s of its steps, steps, seconds on the
    clock)}."""
    if not seconds and not min_steps:
        raise ValueError("race needs seconds, min_steps or both")
    import tempfile
    import numpy as np
    from train import (StreamLoader, TrainConfig, evaluate, fresh_streams, keep_head_only_at,
                       lr_at, make_optimizer, model_config, train_step)
    from prepare_data import prose
    S, W = cfg.n_state, cfg.window
    device = pick_device(cfg.device)
    streams = max(1, 64 // cfg.race_bptt)
    recipes = {"FoldGPT": dict(window=W, n_state=S, bptt=cfg.race_bptt, batch_size=streams),
               f"GPT block {S + W}": dict(window=S + W, n_state=0, bptt=1, batch_size=16)}
    shared = dict(n_mem=cfg.n_mem, carry_kv=cfg.carry_kv, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, n_embd=cfg.n_embd, max_iters=1200)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for part in ("train", "held-out"):  # bytes: the default tokenizer
            paths[part] = f"{tmp}/{part}.bin"
            np.frombuffer(prose(part).encode(), dtype=np.uint8).astype(np.uint16).tofile(
                paths[part])
        runs = {}
        for name, recipe in recipes.items():
            tcfg = TrainConfig(**shared, **recipe)
            torch.manual_seed(0)
            model = FoldGPT(model_config(tcfg, 257)).to(device)  # 257: the byte tokens
            span = tcfg.bptt * tcfg.window
            runs[name] = dict(cfg=tcfg, model=model, state=None, clock=0.0, times=[],
                              optimizer=make_optimizer(model, tcfg, torch.device(device).type),
                              train=StreamLoader(paths["train"], tcfg.batch_size, span),
                              val=StreamLoader(paths["held-out"], tcfg.batch_size, span))

        def spent(r):  # the share of its budget a run has used: the seconds, the steps, or both
            shares = [r["clock"] / seconds] if seconds else []
            return min(shares + [(len(r["times"]) - 1) / min_steps] if min_steps else shares)

        done = 1  # a progress line per quarter of the race
        while any(spent(r) < 1 for r in runs.values()):
            for r in runs.values():
                if spent(r) >= 1:
                    continue
                lr = lr_at(int(spent(r) * r["cfg"].max_iters), r["cfg"])
                for group in r["optimizer"].param_groups:
                    group["lr"] = lr
                x, y, fresh = r["train"].next()
                c, step = r["cfg"], len(r["times"])
                r["model"].config.keep_head_only = keep_head_only_at(step, c)  # as train.py
                restart = None  # train.py's fresh starts, FoldGPT's streams in turn
                if c.n_state and not fresh:
                    restart = fresh_streams(step, x.size(0), c.fresh_every)
                t = time.perf_counter()
                _, r["state"] = train_step(r["model"], r["optimizer"], x.to(device),
                                              y.to(device), None if fresh else r["state"],
                                              c, fresh=None if restart is None
                                              else restart.to(device))
                r["times"].append(time.perf_counter() - t)
                if len(r["times"]) > 1:  # the first step warms torch up: not on the clock
                    r["clock"] += r["times"][-1]
            if sum(min(spent(r), 1) for r in runs.values()) >= done * len(runs) / 4:
                done += 1
                print("  " + "  ".join(f"{n} {len(r['times'])} steps {r['clock']:5.0f} s"
                                       for n, r in runs.items()), flush=True)
        return {n: (evaluate(r["model"], r["val"], 10 ** 9, nullcontext()),
                    r["cfg"].batch_size * r["train"].span / statistics.median(r["times"][1:]),
                    len(r["times"]),
                    r["clock"])
                for n, r in runs.items()}


def rss_mb(field):
    with open("/proc/self/status") as f:  # Linux
        return int([line for line in f if line.startswith(field + ":")][0].split()[1]) / 1024


def reset_peak_memory():
    """Start counting here: importing torch alone takes (and peaks) far above a small model.
    Returns the memory in use now, which peak_memory_mb leaves out."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM)
        f.write("5")
    return rss_mb("VmRSS")


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mb("VmHWM")


def child(cfg):
    """One measurement in this fresh process; prints one JSON line."""
    # Warm up torch's one-time machinery (thread pools, kernels) on one tiny window first.
    warm = model_for(cfg, "FoldGPT")
    warm(torch.randint(0, cfg.vocab_size, (1, 8)), None,
         torch.randint(0, cfg.vocab_size, (1, 8)))[1].backward()
    del warm
    before = reset_peak_memory()
    if cfg.child == "sample":
        prompt = torch.randint(0, cfg.vocab_size, (1, 1), device=pick_device(cfg.device))
        model = model_for(cfg, cfg.contender, cfg.tokens + 2).eval()
        sampler(model, cfg.contender, prompt)(cfg.tokens, timed=False)  # no list of times
        print(json.dumps(dict(peak_mb=peak_memory_mb() - before, process_mb=peak_memory_mb())))
    else:
        tok_s = train_figures(cfg, cfg.contender, cfg.batch_size, cfg.bptt, cfg.tokens,
                              cfg.grad_ckpt)
        print(json.dumps(dict(peak_mb=peak_memory_mb() - before, tok_s=tok_s)))


def measure(cfg, **child_args):
    """Run one measurement in a fresh process, so its peak memory is its own."""
    model = {k: v for k, v in asdict(cfg).items() if k in (
        "window", "n_state", "n_mem", "carry_kv", "n_layer", "n_head", "n_embd", "vocab_size",
        "device")}
    args = [f"--{k}={v}" for k, v in {**model, **child_args}.items()]
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: measurement {child_args} failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(cfg):
    if cfg.race_steps < 0 or cfg.race_seconds < 0 or not 1 <= cfg.race_bptt <= 64:
        fail(f"--race_steps and --race_seconds must be >= 0 and --race_bptt from 1 to 64, got "
             f"{cfg.race_steps}, {cfg.race_seconds} and {cfg.race_bptt}")
    quick = cfg.quick
    positions = [256, 1024, 4096, 16384]
    repeats = 7 if quick else 25
    rows, verdicts = [], []
    n_params = model_for(cfg, "FoldGPT").num_params()
    print(f"model: W={cfg.window} S={cfg.n_state} (memory {cfg.n_mem}) L={cfg.n_layer} "
          f"C={cfg.n_embd}, {n_params:,} parameters, device {pick_device(cfg.device)}; "
          f"{'quick' if quick else 'full'} run\n")

    print(f"sampling, batch 1: mean ms per token over {2 * cfg.window} tokens at each position, "
          f"median of {repeats} repeats (the three in turn)")
    lat = sampling_latency(cfg, positions, repeats)
    for c, by_pos in lat.items():
        rows += [("sampling ms/token", c, f"position {p}", round(v, 4)) for p, v in by_pos.items()]

    # Tokens of the long generation: the crop and kv cache samplers are slow to get far.
    long_run = {"FoldGPT": 8192 if quick else 32768, "crop": 2048 if quick else 8192,
                "kv cache": 4096 if quick else 8192}
    print("\nsampling, peak memory after "
          "1,024 tokens and after " + ", ".join(f"{n:,} ({c})" for c, n in long_run.items()))
    mem = {}
    for c, n_long in long_run.items():
        figures = [measure(cfg, child="sample", contender=c, tokens=n) for n in (1024, n_long)]
        mem[c] = [f["process_mb"] for f in figures]
        added = [f["peak_mb"] for f in figures]
        print(f"  {c:9}: adds {added[0]:6.1f} MB -> {added[1]:6.1f} MB; process peak "
              f"{mem[c][0]:6.1f} MB -> {mem[c][1]:6.1f} MB ({mem[c][1] / mem[c][0] - 1:+.1%})",
              flush=True)
        rows += [("sampling MB added", c, f"{n} tokens", round(m, 2))
                 for n, m in zip((1024, n_long), added)]
        rows += [("sampling process peak MB", c, f"{n} tokens", round(m, 1))
                 for n, m in zip((1024, n_long), mem[c])]

    B, span_windows = (8, 4)
    steps = 6 if quick else 12
    print(f"\ntraining, FoldGPT, {B} streams x {span_windows} windows per step: the stream "
          f"{steps} steps long, then 10x longer")
    short = measure(cfg, child="train", contender="FoldGPT", batch_size=B, bptt=span_windows,
                    tokens=steps)
    long = measure(cfg, child="train", contender="FoldGPT", batch_size=B, bptt=span_windows,
                   tokens=10 * steps)
    stream_growth = long["peak_mb"] / short["peak_mb"] - 1
    print(f"  {steps} steps: {short['tok_s']:,.0f} tok/s, {short['peak_mb']:.1f} MB; "
          f"{10 * steps} steps: {long['tok_s']:,.0f} tok/s, {long['peak_mb']:.1f} MB "
          f"({stream_growth:+.1%})", flush=True)
    rows += [("training", "FoldGPT", f"{steps} steps", short["peak_mb"]),
             ("training", "FoldGPT", f"{10 * steps} steps", long["peak_mb"])]

    bptts = [8, 128] if quick else [1, 4, 16, 64, 128]
    print("\ntraining, 4,096 tokens per step as bptt grows: FoldGPT (grad_ckpt off / on) "
          "beside a plain GPT with block bptt x W")
    train = {}
    for bptt in bptts:
        batch = 4096 // (bptt * cfg.window)
        if batch < 1:
            continue
        figures = {(c, g): measure(cfg, child="train", contender=c, batch_size=batch, bptt=bptt,
                                   tokens=4 if quick else 8, grad_ckpt=g)
                   for c, g in (("FoldGPT", False), ("FoldGPT", True), ("plain", False))}
        train[bptt] = figures
        print(f"  bptt {bptt:4} (B={batch:3}): " + "  ".join(
            f"{c}{' ckpt' if g else ''} {f['tok_s']:7,.0f} tok/s {f['peak_mb']:7.1f} MB"
            for (c, g), f in figures.items()), flush=True)
        rows += [("training tok/s", c + (" ckpt" if g else ""), f"bptt {bptt}", round(f["tok_s"]))
                 for (c, g), f in figures.items()]
        rows += [("training peak MB", c + (" ckpt" if g else ""), f"bptt {bptt}", f["peak_mb"])
                 for (c, g), f in figures.items()]

    top = train[max(train)]
    fold, plain = top[("FoldGPT", True)], top[("plain", False)]

    seconds = cfg.race_seconds or (45 if quick else 180)
    gpt = f"GPT block {cfg.n_state + cfg.window}"
    print(f"\ntraining on real prose (the carried Shakespeare, bytes), {seconds:.0f} s of steps "
          f"each, one step of each in turn; then val loss on its held-out part")
    raced = race(cfg, seconds)
    for name, (val, tok_s, steps, _) in raced.items():
        print(f"  {name:14} {steps:5} steps  {tok_s:7,.0f} tok/s  val loss {val:.4f}")
        rows += [("race val loss", name, f"{seconds:.0f} s", round(val, 4)),
                 ("race tok/s", name, f"{seconds:.0f} s", round(tok_s))]
    if cfg.race_steps:  # the same race by steps: what a step learns, whatever it costs
        print(f"the same, {cfg.race_steps} steps each whatever they take")
        stepped = race(cfg, 0, min_steps=cfg.race_steps)
        for name, (val, _, steps, clock) in stepped.items():
            print(f"  {name:14} {steps:5} steps  {clock:7.1f} s    val loss {val:.4f}")
            rows.append(("race val loss", name, f"{steps} steps", round(val, 4)))
        print(f"  FoldGPT - {gpt} after as many steps: "
              f"{stepped['FoldGPT'][0] - stepped[gpt][0]:+.3f} (after as many seconds: "
              f"{raced['FoldGPT'][0] - raced[gpt][0]:+.3f})")
    verdicts = [
        ("FoldGPT latency at 16k / at 256", lat["FoldGPT"][16384] / lat["FoldGPT"][256],
         "<=", 1.10),
        (f"FoldGPT peak memory growth, 1k -> {long_run['FoldGPT'] // 1024}k tokens",
         mem["FoldGPT"][1] / mem["FoldGPT"][0] - 1, "<=", 0.02),
        ("FoldGPT tokens/s / crop sampler tokens/s (at 1k)",
         lat["crop"][1024] / lat["FoldGPT"][1024], ">=", 5.0),
        ("FoldGPT latency / kv cache latency at 256", lat["FoldGPT"][256] / lat["kv cache"][256],
         "<=", 1.25),
        ("training peak memory growth, stream 10x", stream_growth, "<=", 0.05),
        (f"training peak memory, FoldGPT ckpt / plain GPT (4,096 tokens, bptt {max(train)})",
         fold["peak_mb"] / plain["peak_mb"], "<=", 0.5),
        (f"training tokens/s, FoldGPT / {gpt} (bptt {cfg.race_bptt}, in turn)",
         raced["FoldGPT"][1] / raced[gpt][1], ">=", 0.7),
        (f"val loss on held-out prose after {seconds:.0f} s, FoldGPT - {gpt}",
         raced["FoldGPT"][0] - raced[gpt][0], "<=", 0.0),
    ]
    print("\nratios against the targets")
    for name, value, op, target in verdicts:
        ok = value <= target if op == "<=" else value >= target
        print(f"  {name:68} {value:7.3f}  {op} {target:<5} {'met' if ok else 'NOT MET'}")
        rows.append(("ratio", name, f"{op} {target}", round(value, 4)))

    with open(cfg.csv, "w", newline="") as f:
        csv.writer(f).writerows([("measure", "contender", "setting", "value")] + rows)
    print(f"\nwrote {cfg.csv}", end="")
    png = cfg.csv.rsplit(".", 1)[0] + ".png"
    print(f" and {png}" if save_plot(lat, png) else " (no plot: matplotlib is not installed)")


def save_plot(lat, png):
    """Latency against position, one line per contender; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, by_pos in lat.items():
        ax.plot(list(by_pos), list(by_pos.values()), marker="o", label=c)
    ax.set(xscale="log", yscale="log", xlabel="position in the context (tokens)",
           ylabel="ms per token", title="sampling latency, batch 1")
    ax.legend()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


if __name__ == "__main__":
    config = configure(BenchConfig(), sys.argv[1:])
    child(config) if config.child else main(config)
