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
the carried rows see only each other: they are evolved once more by Block l, every window, and
move that far towards their evolved selves as a learned gate says (0 at first: as written).
After the window, state[:, l] becomes the last S rows of [evolved state ; tokens at layer l].
(The carried rows that this pushes out are not evolved: they only lend their keys and values.)
With n_state = 0 nothing is carried and FoldGPT is a plain GPT whose context is one window.

Three choices of ours (not the paper's) make a copy by content, the look-back a pass key needs,
learnable in under a hundred steps (python probe.py --task=recall --digits=5): that gate, token
shift (each key also reads the two rows before it and each query the row before it, see
CausalSelfAttention), and untied input and output embeddings. Each is a switch in the config.

The memory: n_mem of the S rows per layer outlive the S - n_mem recent rows. A row pushed out
of the recent part enters the memory when a learned keep score says so (see admit), and stays
until n_mem newer rows have entered, however many windows that takes (see remember). Windows
read the memory rows one step evolved by the same gate, with the logsigmoid of their keep
score added to their attention logits: that is how the score learns what is worth keeping,
and train.py's mem_cost makes keeping cost a little. On the built-in corpus the first layer
learns to keep the '#' and the digits of each pass key and none of the filler, so the key is
there to be read hundreds of windows later (README, Retention). n_mem = 0: recent rows only.
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


def last_rows(x, k):
    """The last k rows of x (B, T, C), or all T of them if there are fewer (k = 0: none)."""
    return x[:, max(0, x.size(1) - k):]


class CausalSelfAttention(nn.Module):
    """The sum over paths: each new row gathers the values of the rows it may read."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        K, C = config.token_shift, config.n_embd
        if K:
            # Token shift: a row's key also says which K tokens came before it, and its query
            # which K-1 came before it. So one layer can find "the token that followed the
            # earlier '#'" (an induction step, which copying a pass key is) where a plain GPT
            # needs two: the first only to copy each token's predecessor into it (Anthropic's
            # "smeared keys" do this with K = 1). With K = 2 a query "3 after 0" finds the row
            # after the earlier "03", not after any "3": a copy of many digits stays on track.
            self.c_prev = nn.Linear(K * C, C, bias=False)  # the K rows before -> key
        if K > 1:
            self.c_prevq = nn.Linear((K - 1) * C, C, bias=False)  # the K-1 rows before -> query
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

    def project(self, x, before, P):
        """Queries, keys and values (B, nh, T, hs) of rows x (B, T, C) at slots P..P+T-1;
        before (B, T, K*C): the K rows before each, nearest first, read into the keys and the
        nearest K-1 into the queries (token shift), or None."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        if before is not None:
            k = k + self.c_prev(before)
            if before.size(-1) > C:
                q = q + self.c_prevq(before[..., :-C])
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        cos, sin = self.cos[P:P + T], self.sin[P:P + T]
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def forward(self, x, before=None, kv=None, bias=None):
        """x: (B, T, C) new rows, before: the row before each or None (see project); kv: the
        keys and values of the P rows before them, or None;
        bias: (B, N) added to the attention logits of the first N of the P + T rows, or None.
        Returns the new rows' outputs (B, T, C) and the keys and values of all P + T rows."""
        B, T, C = x.size()
        P = 0 if kv is None else kv[0].size(2)
        q, k, v = self.project(x, before, P)
        if kv is not None:
            k = torch.cat([kv[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([kv[1], v], dim=2)  # (B, nh, P+T, hs)
        # The same-time rule is one causal mask over the slots: slot r reads slots <= r. So a
        # token reads all S carried rows of its layer and the tokens up to itself, and a
        # carried row reads only older carried rows, never the window after it.
        mask = None  # one new row (T == 1, sampling) reads every row: no mask needed
        if T > 1:
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        if bias is not None:  # memory rows are read as strongly as their keep score says
            add = torch.zeros(B, 1, T, P + T, device=x.device, dtype=q.dtype)
            add[:, 0, :, :bias.size(1)] = bias[:, None, :].to(q.dtype)
            mask = add if mask is None else add.masked_fill(~mask, float("-inf"))
        if self.fast:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        else:  # the path sum written out: weights exp(q.k) / sum exp(q.k) over readable rows
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, P+T)
            if mask is not None:
                att = att + mask if mask.is_floating_point() else att.masked_fill(
                    ~mask, float("-inf"))
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
        if config.n_mem or (config.evolve_gate and config.n_state - config.n_mem > config.window):
            # A gate on how far each window evolves the carried rows: 0 at first, so they stay
            # as written, where the window's tokens learn to read them fastest. (Made only where
            # rows stay through a whole window: a parameter that no step uses stalls DDP.)
            self.evolve = nn.Parameter(torch.zeros(()))
        if config.n_mem:
            # The memory's keep score per row, which decides what enters the memory and biases
            # how strongly it is read (see FoldGPT.fold).
            self.keep = nn.Linear(config.n_embd, 1, bias=True)
        self.token_shift = config.token_shift

    def keep_score(self, x):
        """(B, T) keep scores of rows x (B, T, C): a row enters the memory when its score > 0."""
        return self.keep(self.ln_1(x)).squeeze(-1)

    def norm(self, x, prev=None):
        """ln_1 of rows x (B, T, C), and with token shift ln_1 of the K rows before each of them
        side by side, nearest first (B, T, K*C). prev (B, <=K, C): the rows before the first,
        or None; where fewer than K rows came before, zeros stand in for them."""
        K, T = self.token_shift, x.size(1)
        if not K:
            return self.ln_1(x), None
        h = self.ln_1(x if prev is None else torch.cat([prev, x], dim=1))
        h = F.pad(h, (0, 0, T + K - h.size(1), 0))  # (B, K+T, C): K rows before the first
        return h[:, K:], torch.cat([h[:, K - i:K - i + T] for i in range(1, K + 1)], dim=-1)

    def keys_values(self, x):
        """The keys and values this block reads from rows x at slots 0..T-1."""
        _, k, v = self.attn.project(*self.norm(x), 0)
        return k, v

    def forward(self, x, kv=None, bias=None, prev=None):
        a, kv = self.attn(*self.norm(x, prev), kv, bias)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


@dataclass
class FoldGPTConfig:
    vocab_size: int = 257  # 256 bytes + <|endoftext|>: prepare_data.py's default tokenizer
    window: int = 32  # W: new tokens per window (the paper used 12)
    n_state: int = 96  # S: carried rows per layer; 0 makes a plain GPT with a W-token context
    n_mem: int = 32  # of the S rows, how many are memory: rows kept for their keep score
    keep_init: float = 2.0  # the keep score's bias at first (> 0: every row is kept)
    token_shift: int = 2  # rows before a row that its key reads (its query: one fewer); 0: none
    tie_embeddings: bool = False  # one matrix for the input embedding and the output layer
    evolve_gate: bool = True  # carried rows evolve by a learned share (0 at first), or fully
    n_layer: int = 4  # L: blocks = time steps of evolution per window
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # C: channels of every token state
    dropout: float = 0.0  # dropout on attention weights and residual branches
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 had them; without is faster)

    def __post_init__(self):
        self.token_shift = int(self.token_shift)  # checkpoints before it was a count said True
        if self.n_state == 0:  # nothing carried, so no memory either: a plain GPT
            self.n_mem = 0

    def check(self):
        """Raise ValueError, in one line that says what to change, for sizes that cannot work."""
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.n_state < 0:
            raise ValueError(f"n_state must be >= 0, got {self.n_state}")
        if not 0 <= self.n_mem <= self.n_state:
            raise ValueError(f"n_mem must be between 0 and n_state ({self.n_state}), "
                             f"got {self.n_mem}: give a larger --n_state or a smaller --n_mem")
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
    mem: list  # per layer: (B, M, C) memory rows as they entered (kept so, not evolved)
    bias: list  # per layer: (B, M) how strongly the memory rows are read, or None
    gone: list  # per layer: (B, gone, C) recent rows that this window pushes out
    stay: list  # per layer: (B, R-gone, C) recent rows that stay; evolved by the first step
    kv: list  # per layer: (k, v) of the rows so far, each (B, nh, rows, hs), or None
    tail: list  # per layer: (B, <=K, C) the last K rows before the next ones (token shift)
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
        if config.tie_embeddings:  # GPT-2's choice; untied, a pass key is learned far sooner
            self.transformer.wte.weight = self.lm_head.weight
        # What the first window reads as its past: a learned state, S rows per layer.
        self.state0 = nn.Parameter(torch.zeros(config.n_layer, config.n_state, config.n_embd))
        self.apply(self._init_weights)
        nn.init.normal_(self.state0, mean=0.0, std=0.02)
        for block in self.transformer.h:
            if config.n_mem:  # at first every row enters the memory: it extends the recent rows
                nn.init.constant_(block.keep.bias, config.keep_init)
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
        """Start a window of size tokens on the carried state (B, L, S, C), whose rows at each
        layer are [M memory rows ; R = S - M recent rows]."""
        M = self.config.n_mem
        gone = min(size, self.config.n_state - M)  # the oldest recent rows make way
        window = Window(mem=[], bias=[], gone=[], stay=[], kv=[], tail=[], inputs=[], size=size)
        for l, block in enumerate(self.transformer.h):
            rows = state[:, l]  # (B, S, C): the past, at the same time (layer) as Block l
            mem, recent = rows[:, :M], rows[:, M:]
            bias = None
            read = mem  # the memory rows as this window reads them
            if M:  # one step evolved, each reading the older ones, by the gate's share; from
                # the rows as they entered, so that a row held for 1,000 windows reads as it did
                # after one (evolved again and again, even by a share of 0.001, a pass key
                # drifted away within 64 windows)
                evolved, _ = block(mem)  # (B, M, C)
                read = mem + block.evolve * (evolved - mem)
                bias = F.logsigmoid(block.keep_score(read))  # (B, M), <= 0
            past = torch.cat([read, recent[:, :gone]], dim=1)  # rows that only lend keys/values
            window.kv.append(block.keys_values(past) if past.size(1) else None)
            window.tail.append(last_rows(past, self.config.token_shift))
            window.mem.append(mem)
            window.bias.append(bias)
            window.gone.append(recent[:, :gone])  # (B, gone, C)
            window.stay.append(recent[:, gone:])  # (B, R-gone, C)
            window.inputs.append(rows[:, :0])  # (B, 0, C): no tokens yet
        return window

    def step(self, idx, window):
        """Run the next tokens idx (B, T) of the window; returns their final states (B, T, C)."""
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for l, block in enumerate(self.transformer.h):
            window.inputs[l] = torch.cat([window.inputs[l], x], dim=1)  # (B, n+T, C)
            m = window.stay[l].size(1) if window.n == 0 else 0  # rows riding with the first
            rows = torch.cat([window.stay[l], x], dim=1) if m else x  # (B, m+T, C)
            prev = window.tail[l]  # the rows before these, for token shift
            window.tail[l] = last_rows(torch.cat([prev, rows], dim=1), self.config.token_shift)
            out, window.kv[l] = block(rows, window.kv[l], window.bias[l], prev)
            if m and not self.config.evolve_gate:
                window.stay[l] = out[:, :m]  # the carried rows, evolved once more
            elif m and hasattr(block, "evolve"):  # ... by the gate's share (no gate: none)
                window.stay[l] = window.stay[l] + block.evolve * (out[:, :m] - window.stay[l])
            x = out[:, m:]  # (B, T, C)
        window.n += idx.size(1)
        return self.transformer.ln_f(x)

    def fold(self, window):
        """The next state. Per layer, the recent rows become the last R rows of [pushed-out
        rows ; evolved recent rows ; tokens at layer l]; the rows this pushes out of the recent
        part enter the memory if admit lets them (see remember)."""
        if window.n != window.size:
            raise ValueError(f"a window opened for {window.size} tokens holds {window.n}")
        R = self.config.n_state - self.config.n_mem
        state = []
        for l, block in enumerate(self.transformer.h):
            rows = torch.cat([window.gone[l], window.stay[l], window.inputs[l]], dim=1)
            recent, pushed = rows[:, rows.size(1) - R:], rows[:, :rows.size(1) - R]
            mem = (self.remember(window.mem[l], pushed, self.admit(block, pushed))
                   if self.config.n_mem else recent[:, :0])  # (B, M, C)
            state.append(torch.cat([mem, recent], dim=1))  # (B, S, C)
        return torch.stack(state, dim=1)  # (B, L, S, C)

    def admit(self, block, rows):
        """(B, G): which rows (B, G, C) pushed out of the recent part enter the memory. Those
        whose keep score is > 0; in training, each with probability sigmoid(score) instead, so
        that a row scored out still enters now and then, is read, and its score can learn back
        up (a hard threshold alone shuts a useful row out for good once its score dips < 0)."""
        score = block.keep_score(rows)
        if self.training:
            return torch.rand_like(score) < torch.sigmoid(score)
        return score > 0

    @staticmethod
    def remember(mem, pushed, keep):
        """The memory after a window: the newest M rows of [memory ; pushed-out rows that keep
        (B, G) admits], in their order. A row stays until M newer rows have been kept after it,
        however many windows that takes: what the keep score lets through sets the reach."""
        B, M, C = mem.size()
        keep = torch.cat([torch.ones_like(mem[..., 0], dtype=torch.bool), keep], dim=1)
        newer = keep.flip(1).cumsum(1).flip(1)  # kept rows at or after each row, (B, M+G)
        slot = torch.where(keep & (newer <= M), M - newer, M)  # slot M is the waste bin
        rows = torch.cat([mem, pushed], dim=1)  # (B, M+G, C)
        out = rows.new_zeros(B, M + 1, C).scatter(1, slot[..., None].expand(-1, -1, C), rows)
        return out[:, :M]  # (B, M, C)

    def forward(self, idx, state=None, targets=None, grad_ckpt=False):
        """A stream of any length, window by window, carrying the state: idx (B, N) -> logits
        (B, N, V), the mean loss over targets (B, N) or None, and the state after the stream.
        With targets, the logits are not kept (returned as None): each window turns its own
        into its loss, since for a large vocabulary they are the largest tensor of a step.
        grad_ckpt keeps only what enters and leaves each window for the backward pass, which
        runs the window again: activation memory O(windows) states plus one window."""
        W = self.config.window
        state = self.initial_state(idx.size(0)) if state is None else state
        logits, loss = [], 0.0
        for t in range(0, idx.size(1), W):
            args = (idx[:, t:t + W], state, None if targets is None else targets[:, t:t + W])
            if grad_ckpt and torch.is_grad_enabled():
                out, state = checkpoint(self.run_window, *args, use_reentrant=False)
            else:
                out, state = self.run_window(*args)
            if targets is None:
                logits.append(out)
            else:
                loss = loss + out
        if targets is None:
            return torch.cat(logits, dim=1), None, state  # (B, N, V)
        return None, loss / (targets != -1).sum().clamp(min=1), state

    def run_window(self, idx, state, targets=None):
        """One window, idx (B, T) with T <= W, on state: its logits (B, T, V), or with targets
        the sum of its tokens' losses; and the next state."""
        window = self.open_window(state, idx.size(1))
        logits = self.lm_head(self.step(idx, window))  # (B, T, V)
        if targets is not None:
            logits = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                     targets.reshape(-1), ignore_index=-1, reduction="sum")
        return logits, self.fold(window)

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
