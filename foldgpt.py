"""
FoldGPT: a GPT that reads text window by window and carries a small, fixed-size condensed
state from each window into the next, so it keeps context beyond its window at constant memory.

Paper: D. Kwon, W.-G. Paeng, "Folded context condensation in Path Integral formalism for
infinite context transformers", arXiv:2405.04620 (2024). The authors published no code; where
the paper is silent, the choices here are this project's own (the README lists them).

How the paper's words map to this file (shape letters: B batch, T tokens in this call,
W window, S carried rows per layer, L layers, C channels, nh heads, hs head size, V vocab):

  paper                                   code                               shape
  ------------------------------------    ---------------------------------  ------------
  token state at time t_l                 x entering Block l                 (B, T, C)
  one step of time evolution              Block l = attention + MLP
  sum over paths into a query token       CausalSelfAttention                att (B,nh,T,S+T)
  path weight exp(-S_path)                softmax(q.k / sqrt(hs))
  local evolution of each state           MLP
  input token window (12 in the paper)    config.window                      W
  folded, condensed context               state                              (B, L, S, C)
  "key-token states in the same time"     state[:, l] read by Block l        (B, S, C)
  repetitive time evolution               carried rows re-run by Block l     each window
  folding                                 FoldGPT.fold                       -> (B, L, S, C)

One window, at layer l, works on the rows [state[:, l] ; x]: the S carried token states of
layer l from earlier windows, then the T tokens of this window. Row r may read rows <= r, so a
token sees every carried row of its own layer (the same time) and the tokens before it, and
the carried rows see only each other: they are evolved once more by Block l, every window.
After the window, state[:, l] becomes the last S rows of [evolved state ; tokens at layer l].
(The carried rows that this pushes out are not evolved: they only lend their keys and values.)
With n_state = 0 nothing is carried and FoldGPT is a plain GPT whose context is one window.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def rotate(x, cos, sin):
    """Rotary position: turn each channel pair of a row by its slot's angle, so that q.k
    depends only on the distance between two slots (RoFormer, arXiv:2104.09864)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """The sum over paths: each new row gathers the values of the rows it may read."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.fast = True  # F.scaled_dot_product_attention; False runs the same sum written out
        # Slot positions for the rotary code. The rows of a window are its slots: 0..S-1 hold
        # the carried states, S..S+W-1 the tokens. The fold shifts every row down by the T
        # slots the window added, so the slot distance between two rows is their distance in
        # the stream, whichever window each came from.
        slots = config.n_state + config.window
        hs = config.n_embd // config.n_head
        freq = 10000.0 ** (-torch.arange(0, hs, 2).float() / hs)  # (hs/2,)
        angle = torch.arange(slots).float()[:, None] * freq[None, :]  # (S+W, hs/2)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def project(self, x, P):
        """Queries, keys and values (B, nh, T, hs) of rows x (B, T, C) at slots P..P+T-1."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        cos, sin = self.cos[P:P + T], self.sin[P:P + T]
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def forward(self, x, kv=None):
        """x: (B, T, C) new rows; kv: the keys and values of the P rows before them, or None.
        Returns the new rows' outputs (B, T, C) and the keys and values of all P + T rows."""
        B, T, C = x.size()
        P = 0 if kv is None else kv[0].size(2)
        q, k, v = self.project(x, P)
        if kv is not None:
            k = torch.cat([kv[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([kv[1], v], dim=2)  # (B, nh, P+T, hs)
        # The same-time rule is one causal mask over the slots: slot r reads slots <= r. So a
        # token reads all S carried rows of its layer and the tokens up to itself, and a
        # carried row reads only older carried rows, never the window after it.
        mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)  # (T, P+T)
        mask = None if T == 1 else mask  # one new row reads every row: no mask needed
        if self.fast:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        else:  # the path sum written out: weights exp(q.k) / sum exp(q.k) over readable rows
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, P+T)
            att = att if mask is None else att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    """The local evolution of each token state, row by row."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One step of time evolution, pre-LayerNorm as in GPT-2."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def keys_values(self, x):
        """The keys and values this block reads from rows x at slots 0..T-1."""
        _, k, v = self.attn.project(self.ln_1(x), 0)
        return k, v

    def forward(self, x, kv=None):
        a, kv = self.attn(self.ln_1(x), kv)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


@dataclass
class FoldGPTConfig:
    vocab_size: int = 257  # 256 bytes + <|endoftext|>: prepare_data.py's default tokenizer
    window: int = 32  # W: new tokens per window (the paper used 12)
    n_state: int = 64  # S: carried rows per layer; 0 makes a plain GPT with a W-token context
    n_layer: int = 4  # L: blocks = time steps of evolution per window
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # C: channels of every token state
    dropout: float = 0.0  # dropout on attention weights and residual branches
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 had them; without is faster)

    def check(self):
        """Raise ValueError, in one line that says what to change, for sizes that cannot work."""
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.n_state < 0:
            raise ValueError(f"n_state must be >= 0, got {self.n_state}")
        if min(self.vocab_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError("vocab_size, n_layer, n_head and n_embd must all be >= 1")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must be n_head ({self.n_head}) times an "
                             "even head size (the rotary code turns channel pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class Window:
    """A window under way. It opens knowing how many tokens it will hold (size), so the carried
    rows that the fold will push out only lend their keys and values, while the rows that stay
    ride through each block with the window's first tokens, which evolves them once more."""
    stay: list  # per layer: (B, S-gone, C) carried rows that stay; evolved by the first step
    kv: list  # per layer: (k, v) of the rows so far, each (B, nh, rows, hs), or None
    inputs: list  # per layer: (B, n, C), the token states that entered Block l
    size: int  # tokens the window will hold when it is folded
    n: int = 0  # tokens in the window so far


class FoldGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        config.check()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        # What the first window reads as its past: a learned state, S rows per layer.
        self.state0 = nn.Parameter(torch.zeros(config.n_layer, config.n_state, config.n_embd))
        self.apply(self._init_weights)
        nn.init.normal_(self.state0, mean=0.0, std=0.02)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def initial_state(self, batch_size):
        return self.state0.unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, L, S, C)

    # A window in three parts: open it on the carried state, step its tokens through (all at
    # once in training, one at a time when sampling), fold it into the next state.

    def open_window(self, state, size):
        """Start a window of size tokens on the carried state (B, L, S, C)."""
        gone = min(size, self.config.n_state)  # the oldest rows make way for the new tokens
        window = Window(stay=[], kv=[], inputs=[], size=size)
        for l, block in enumerate(self.transformer.h):
            rows = state[:, l]  # (B, S, C): the past, at the same time (layer) as Block l
            window.kv.append(block.keys_values(rows[:, :gone]) if gone else None)
            window.stay.append(rows[:, gone:])  # (B, S-gone, C)
            window.inputs.append(rows[:, :0])  # (B, 0, C): no tokens yet
        return window

    def step(self, idx, window):
        """Run the next tokens idx (B, T) of the window; returns their final states (B, T, C)."""
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for l, block in enumerate(self.transformer.h):
            window.inputs[l] = torch.cat([window.inputs[l], x], dim=1)  # (B, n+T, C)
            m = window.stay[l].size(1) if window.n == 0 else 0  # rows riding with the first
            rows = torch.cat([window.stay[l], x], dim=1) if m else x  # (B, m+T, C)
            out, window.kv[l] = block(rows, window.kv[l])
            if m:
                window.stay[l] = out[:, :m]  # the carried rows, evolved once more
            x = out[:, m:]  # (B, T, C)
        window.n += idx.size(1)
        return self.transformer.ln_f(x)

    def fold(self, window):
        """The next state: per layer, the last S rows of [evolved carried rows ; tokens at
        layer l]. The carried rows read only older carried rows, never the window's tokens."""
        if window.n != window.size:
            raise ValueError(f"a window opened for {window.size} tokens holds {window.n}")
        S = self.config.n_state
        rows = [torch.cat([stay, x], dim=1) for stay, x in zip(window.stay, window.inputs)]
        return torch.stack([r[:, r.size(1) - S:] for r in rows], dim=1)  # (B, L, S, C)

    def forward(self, idx, state=None, targets=None):
        """One window: idx (B, T) with T <= W -> logits (B, T, V), loss or None, next state."""
        B, T = idx.size()
        if T > self.config.window:
            raise ValueError(f"forward takes one window of at most {self.config.window} "
                             f"tokens, got {T}: use forward_stream for longer input")
        window = self.open_window(self.initial_state(B) if state is None else state, T)
        logits = self.lm_head(self.step(idx, window))  # (B, T, V)
        return logits, self.loss(logits, targets), self.fold(window)

    def forward_stream(self, idx, state=None, targets=None, grad_ckpt=False):
        """Many windows, carrying the state: idx (B, N) -> logits (B, N, V), loss, state.
        grad_ckpt keeps only what enters and leaves each window for the backward pass, which
        runs the window again: activation memory O(windows) states plus one window."""
        W = self.config.window
        logits = []
        for t in range(0, idx.size(1), W):
            if grad_ckpt and torch.is_grad_enabled():
                window_logits, _, state = checkpoint(self, idx[:, t:t + W], state,
                                                     use_reentrant=False)
            else:
                window_logits, _, state = self(idx[:, t:t + W], state)
            logits.append(window_logits)
        logits = torch.cat(logits, dim=1)  # (B, N, V)
        return logits, self.loss(logits, targets), state

    @staticmethod
    def loss(logits, targets):
        if targets is None:
            return None
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)

    def unfolded(self, idx):
        """The tokens of idx (B, P) that generate leaves in its last, unfolded window: it folds
        a window only when a token after it comes, so 1 to W of them, never 0."""
        return idx[:, idx.size(1) - ((idx.size(1) - 1) % self.config.window + 1):]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, state=None,
                 on_token=None):
        """Continue idx (B, P), P >= 1, by max_new_tokens tokens, calling on_token(tok) with each
        (B, 1) as it is made. temperature 0 picks the likeliest token. Returns all tokens
        (B, P + new) and the state after the last full window: the tokens after that window,
        unfolded(tokens), are what the next call must be given with this state."""
        W = self.config.window
        P = idx.size(1)
        if P < 1:
            raise ValueError("generate needs at least one token to start from")
        state = self.initial_state(idx.size(0)) if state is None else state
        for t in range(0, (P - 1) // W * W, W):  # fold whole windows, keep >= 1 token to go on
            window = self.open_window(state, W)
            self.step(idx[:, t:t + W], window)
            state = self.fold(window)
        window = self.open_window(state, W)
        x = self.step(idx[:, (P - 1) // W * W:], window)  # the rest fills the KV cache
        out = torch.cat([idx, idx.new_empty(idx.size(0), max_new_tokens)], dim=1)  # (B, P+new)
        for i in range(max_new_tokens):
            logits = self.lm_head(x[:, -1, :])  # (B, V)
            if temperature <= 0:
                tok = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                tok = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            out[:, P + i] = tok[:, 0]
            if on_token is not None:
                on_token(tok)
            if window.n == W:  # the window is full: fold it; the new token opens the next
                state = self.fold(window)
                window = self.open_window(state, W)
            if i < max_new_tokens - 1:
                x = self.step(tok, window)  # one row through every layer, reading the KV cache
        return out, state
