"""
The copy probe: the fast signal of whether a design can learn to use its carried state at all.

Each sequence is 32 random letters, then the same 32 letters again, with the loss on the copy
only. With a window of 32 the copy sits wholly in the second window, so it can only come from
what the first window left in the state. We count the optimizer steps until the copy's loss
falls below --target (chance is ln 26 = 3.26).

    python probe.py                       # the default FoldGPT and the baselines, about 1 minute
    python probe.py --n_state=32 --max_steps=2000

Rows: full attention over both copies in one window of 64 (the bar to match), FoldGPT as
configured, and the same FoldGPT with its state reset at every window (which must stay at
chance: if it learns, the probe leaks).
"""

import sys
import time
from dataclasses import dataclass

import torch

from configurator import configure
from foldgpt import FoldGPT, FoldGPTConfig


@dataclass
class ProbeConfig:
    window: int = 32  # W; the copy is 32 letters, so with W = 32 it crosses one boundary
    n_state: int = 64  # S of the FoldGPT row
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 16
    learning_rate: float = 1e-3
    max_steps: int = 600  # give up after this many steps
    target: float = 0.3  # the copy counts as learned below this loss
    seed: int = 0


def steps_to_learn(cfg, window, n_state, reset_state=False):
    """Optimizer steps until the copy loss < cfg.target, or None within cfg.max_steps."""
    torch.manual_seed(cfg.seed)
    model = FoldGPT(FoldGPTConfig(vocab_size=27, window=window, n_state=n_state,
                                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.99))
    letters = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.max_steps):
        first = torch.randint(1, 27, (cfg.batch_size, 32), generator=letters)
        x = torch.cat([torch.zeros_like(first[:, :1]), first, first[:, :-1]], dim=1)  # (B, 64)
        y = torch.cat([torch.full_like(first, -1), first], dim=1)  # loss on the copy only
        if reset_state:  # each window alone, from the learned initial state
            start = model.initial_state(cfg.batch_size)
            loss = sum(model.run_window(x[:, t:t + window], start, y[:, t:t + window])[0]
                       for t in range(0, 64, window)) / (y != -1).sum()
        else:
            _, loss, _ = model(x, None, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if loss.item() < cfg.target:
            return step + 1
    return None


def main(cfg):
    rows = [("full attention, one window of 64", 64, 0, False),
            (f"FoldGPT W={cfg.window} S={cfg.n_state}", cfg.window, cfg.n_state, False),
            (f"FoldGPT W={cfg.window} S={cfg.n_state}, state reset every window",
             cfg.window, cfg.n_state, True)]
    print(f"copy probe: steps until the copy loss < {cfg.target} (chance 3.26), "
          f"at most {cfg.max_steps}; L={cfg.n_layer} C={cfg.n_embd} B={cfg.batch_size}")
    for name, window, n_state, reset in rows:
        t = time.time()
        steps = steps_to_learn(cfg, window, n_state, reset)
        found = f"{steps} steps" if steps else f"not within {cfg.max_steps}"
        print(f"  {name:55} {found:>18}  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(configure(ProbeConfig(), sys.argv[1:]))
