"""
FoldGPT: a GPT that reads text window by window and carries a small, fixed-size condensed
state from each window into the next, so it keeps context beyond its window at constant memory.

Paper: D. Kwon, W.-G. Paeng, "Folded context condensation in Path Integral formalism for
infinite context transformers", arXiv:2405.04620 (2024). The authors published no code; where
the paper is silent, the choices here are ours, and docs/design.md gives the measurement
behind each one.

How the paper's words map to this file (shape letters: B batch, T tokens in this call,
W window, S carried rows per layer, M of them memory, L layers, C channels, nh heads, hs head
size, V vocab):

  paper                                   code                               shape
  ------------------------------------    ---------------------------------  ------------
  token state at time t_l                 x entering Block l                 (B, T, C)
  one step of time evolution              Block l = attention + MLP
  sum over paths into a query token       CausalSelfAttention                att (B,nh,T,S+T)
  path weight exp(-S_path)                softmax(q.k / sqrt(hs))
  local evolution of each state           MLP
  input token window (12 in the paper)    config.window                      W
  folded, condensed context               State.rows                         (B, L, S, C)
  "key-token states in the same time"     State.rows[:, l] read by Block l   (B, S, C)
  repetitive time evolution               open_window: Block l runs the carried rows again
  folding                                 FoldGPT.fold                       -> (B, L, S, C)

A window at layer l works on [carried rows of layer l ; its tokens], under one causal mask: a
token reads every carried row of its layer and the tokens before it. The window opens by
evolving the carried rows once more through Block l (open_window), runs its tokens (step; when
sampling, one at a time: step_one), and folds: the last S - M token states of each layer stay as
recent rows, and the rows pushed out enter M memory rows when a learned keep score says so
(fold; with admit_after, a window's rows are offered sooner, while still recent). With n_state =
0 nothing is carried: a plain GPT with a W-token context, the baseline, from the same code. With
carry_kv the carried rows keep the keys and values they were made with and do not evolve, and
forward runs every window of a call at once, one layer after another (run_layers): the same
sums, faster.
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache, partial

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


@lru_cache(maxsize=64)
def causal_mask(n, m, offset, device):
    """(n, m) bool: row i may read columns <= i + offset. Made once per shape, then reused."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(offset)


class CausalSelfAttention(nn.Module):
    """The sum over paths: each new row gathers the values of the rows it may read."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        K, C = config.token_shift, config.n_embd
        # Token shift (ours): a row's key also says which K tokens came before it, its query
        # which K-1 did, so one layer finds "the row after the earlier '#5'", as a copy needs.
        if K:
            self.c_prev = nn.Linear(K * C, C, bias=False)  # the K rows before -> key
        if K > 1:
            self.c_prevq = nn.Linear((K - 1) * C, C, bias=False)  # the K-1 rows before -> query
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.fast = True  # F.scaled_dot_product_attention; False runs the same sum written out
        self.memory_heads = 0  # heads that read only the memory rows (the first layer's: config)
        self._joined = None  # sampling's projection weights, joined (see joined)
        # Rotary slots: 0..S-1 hold the carried rows, S..S+W-1 the tokens. The fold shifts rows
        # down by the W slots a window adds, so slot distance is distance in the stream.
        hs = config.n_embd // config.n_head
        freq = 10000.0 ** (-torch.arange(0, hs, 2).float() / hs)  # (hs/2,)
        angle = torch.arange(config.n_state + config.window).float()[:, None] * freq  # (S+W, hs/2)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)
        self.register_buffer("freq", freq.double(), persistent=False)
        # For one row (forward_one): rotate as x * cos + [x2 ; x1] * [-sin ; sin], whole rows
        self.register_buffer("cos_row", torch.cat([angle.cos()] * 2, 1), persistent=False)
        self.register_buffer("sin_row", torch.cat([-angle.sin(), angle.sin()], 1),
                             persistent=False)

    def project(self, x, before):
        """Queries, keys and values (B, T, C) of rows x (B, T, C), before their slots are turned
        in; before (B, T, K*C): the K rows before each, nearest first, or None (see Block.norm)."""
        C = x.size(-1)
        q, k, v = self.c_attn(x).split(C, dim=2)
        if before is not None:
            k = k + self.c_prev(before)
            if before.size(-1) > C:
                q = q + self.c_prevq(before[..., :-C])
        return q, k, v

    def joined(self):
        """project's products as one, for one row: the weight (3C, (K+1)C) that maps the ln_1
        rows [K rows before ; the row], side by side in stream order, to [query ; key ; value],
        and the bias. Made again only when the weights have changed (a training step, a move
        to another device): sampling runs one product a layer (see Block.forward_one)."""
        parts = [self.c_attn.weight] + [getattr(self, name).weight for name in
                                        ("c_prev", "c_prevq") if hasattr(self, name)]
        made_of = tuple((t.data_ptr(), t._version) for t in parts)
        if self._joined is None or self._joined[0] != made_of:
            with torch.no_grad():
                weight = self.c_attn.weight  # (3C, C): [query ; key ; value] of the row itself
                if hasattr(self, "c_prev"):
                    C, K = weight.size(1), self.c_prev.in_features // weight.size(1)
                    prev = weight.new_zeros(3 * C, K * C)  # the K rows before, nearest first:
                    prev[C:2 * C] = self.c_prev.weight  # all K -> key
                    if hasattr(self, "c_prevq"):  # the nearest K-1 -> query
                        prev[:C, :self.c_prevq.in_features] = self.c_prevq.weight
                    prev = prev.view(3 * C, K, C).flip(1).flatten(1)  # oldest first
                    weight = torch.cat([prev, weight], dim=1)  # (3C, (K+1)C)
            self._joined = (made_of, weight)
        return self._joined[1], self.c_attn.bias

    def split_heads(self, mask, M):
        """With memory_heads, the bool mask (N, P) of which slots each row reads, per head (nh,
        N, P): the first memory_heads heads read only the first M slots (the memory rows), the
        others all but those. Without, the mask itself."""
        if not self.memory_heads:
            return mask
        memory = torch.arange(mask.size(-1), device=mask.device) < M  # (P,)
        heads = torch.arange(self.n_head, device=mask.device) < self.memory_heads  # (nh,)
        return mask & (heads[:, None] == memory)[:, None, :]  # (nh, N, P)

    def heads(self, t):
        """(B, T, C) -> (B, nh, T, hs): the heads side by side become a dimension of their own."""
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def turn(self, t, P):
        """Queries or keys t (B, nh, T, hs) turned to the slots P..P+T-1 (rotary)."""
        return rotate(t, self.cos[P:P + t.size(2)], self.sin[P:P + t.size(2)])

    def turn_to(self, t, slots):
        """Rows t (..., C) turned to slots (a tensor of t's shape without C), head by head:
        the angles made in float64, so that a slot far down a stream is turned as exactly as
        a near one (q.k depends only on the slots' distance, rounding apart)."""
        angle = slots.double()[..., None, None] * self.freq  # (..., 1, hs/2)
        heads = t.unflatten(-1, (self.n_head, -1))  # (..., nh, hs)
        return rotate(heads, angle.cos().to(t.dtype), angle.sin().to(t.dtype)).flatten(-2)

    def forward(self, x, before, kv, bias, lend):
        """x (B, T, C): new rows, the first `lend` of which only lend keys and values; kv: those
        of the P rows before, or None; bias (B, M): added to the logits of the first M rows.
        Returns the outputs of the N = T - lend rows that read (B, N, C), all P + T k, v (turned
        to their slots, per head), and the new rows' k, v as the state keeps them (B, T, C)."""
        B, T, C = x.size()
        P = 0 if kv is None else kv[0].size(2)
        new = self.project(x, before)
        q, k, v = (self.heads(t) for t in new)  # each (B, nh, T, hs)
        q, k = self.turn(q, P), self.turn(k, P)
        q, N = q[:, :, lend:], T - lend  # (B, nh, N, hs): the rows that read
        if kv is not None:
            k = torch.cat([kv[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([kv[1], v], dim=2)  # (B, nh, P+T, hs)
        # "All key-token states in the same time": one causal mask over the slots, slot r reads
        # slots <= r: a token reads every carried row of its layer, a carried row no token.
        mask = None  # one row that reads (N == 1, sampling) reads every row: no mask needed
        if N > 1 or (self.memory_heads and bias is not None):
            mask = causal_mask(N, P + T, P + lend, x.device)
        if bias is not None:  # memory rows are read as strongly as their keep score says
            mask = self.split_heads(mask, bias.size(1))  # memory_heads: (nh, N, P+T)
            bias = F.pad(bias, (0, P + T - bias.size(1)))  # (B, P+T)
        return self.attend(q, k, v, mask, bias), (k, v), new[1:]

    def forward_one(self, rows, room):
        """forward for one new row, as sampling runs it: the same sums in fewer operations,
        which is what a row's time is made of here. rows (B, (K+1)C): the row and the K before
        it, ln_1'd, side by side in stream order (Block.forward_one); one product makes the
        query, key and value (the weights' qkv, joined), and the query and key turn together. The
        key and value go into the room at the row's slot P, and the query reads slots 0..P.
        Returns the output (B, C) and the row's k|v (B, 2C) unturned."""
        w = room.weights  # the layer's tensors (Block.weights_one)
        new = F.linear(rows, *w["qkv"])  # (B, 3C)
        B, C, nh, P = new.size(0), new.size(1) // 3, self.n_head, room.slot()
        # rotate's sums for the query's and key's heads at once, (B, 2nh, 1, hs), at slot P:
        # x * cos + [x2 ; x1] * [-sin ; sin], the halves swapped by a flip
        qk = new[:, :2 * C].view(B, 2 * nh, 2, -1)  # each head in its two halves
        turned = qk.flip(2).view(B, 2 * nh, 1, -1) * w["sin"][P]
        q, k = torch.addcmul(turned, qk.view(B, 2 * nh, 1, -1), w["cos"][P]).split(nh, 1)
        room.k[:, :, P] = k[:, :, 0]  # (B, nh, hs)
        room.v[:, :, P] = new[:, 2 * C:].view(B, nh, -1)
        k, v = room.k[:, :, :P + 1], room.v[:, :, :P + 1]  # (B, nh, P+1, hs): views, no copy
        bias = None if room.bias is None else room.bias[..., :P + 1]  # (B, 1 or nh, 1, P+1)
        if self.fast:  # attend's sum, with nothing to decide: one row reads every row
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            y = F.linear(y.view(B, C), *w["proj"])  # heads side by side
        else:
            y = self.attend(q, k, v, None, bias).view(B, C)
        return y, new[:, C:]

    def attend(self, q, k, v, mask, bias=None, channel=False):
        """The sum itself: queries q (B, nh, N, hs) read keys and values k, v (B, nh, P, hs) as
        the bool mask (N, P), (nh, N, P) or (B, 1, N, P) allows (None: all); bias (B, P) or
        (B, 1 or nh, N, P), or None: added to the logits of each key. channel: q, k and v carry
        such a bias already, in a last channel of their own, as below (read_windows builds them
        so). Returns (B, N, C)."""
        hs = q.size(-1) - channel
        if self.fast:
            if bias is not None and bias.requires_grad:  # a mask of logits that needs a
                # gradient sends the call to its slower unfused path, so the bias rides in a
                # channel of its own: q.k gains sqrt(hs) * bias (a copy of the keys: only where
                # a gradient needs it)
                q = F.pad(q, (0, 1), value=math.sqrt(hs))
                k = torch.cat([k, bias.to(k.dtype)[:, None, :, None].expand(-1, k.size(1), -1, 1)],
                              dim=-1)
                v = F.pad(v, (0, 1))
            elif bias is not None:  # sampling, eval: a mask of logits, no copy
                add = bias.to(q.dtype) if bias.dim() == 4 else bias.to(q.dtype)[:, None, None, :]
                mask = add if mask is None else add.masked_fill(~mask, float("-inf"))
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                scale=1.0 / math.sqrt(hs))
        else:  # the path sum written out: weights exp(q.k) / sum exp(q.k) over readable rows
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, N, P)
            if bias is not None:
                att = att + (bias if bias.dim() == 4 else bias[:, None, None, :]).to(att.dtype)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, N, hs)
        y = y[..., :hs]  # without a bias channel's output, where there is one
        B, nh, N, hs = y.size()
        y = y.transpose(1, 2).contiguous().view(B, N, nh * hs)  # (B, N, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


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
        if not config.carry_kv and (config.n_mem or (
                config.evolve_gate and config.n_state - config.n_mem > config.window)):
            # How far each window evolves the carried rows: 0 at first, as written, where tokens
            # learn to read them fastest. (Only where rows stay: else it would get no gradient.)
            self.evolve = nn.Parameter(torch.zeros(()))
        if config.n_mem:  # the keep score: which rows enter the memory (see FoldGPT.admit)
            H = config.keep_hidden  # > 0: the score is an MLP of the row, not a linear map
            self.keep_in = nn.Sequential(nn.Linear(config.n_embd, H), nn.GELU()) if H else None
            self.keep = nn.Linear(H or config.n_embd, 1, bias=True)
            self.keep_row_grad = config.keep_row_grad
        self.token_shift = config.token_shift

    def keep_score(self, x, head_only=False):
        """(B, T) keep scores of rows x (B, T, C): a row enters the memory when its score > 0.
        head_only: the gradient stops at the keep head (the rows and ln_1 are not its to shape);
        else the share keep_row_grad of it reaches them."""
        x = self.ln_1(x)
        if head_only:
            x = x.detach()
        elif self.keep_row_grad != 1:  # the same rows, the gradient through them scaled
            x = x.detach() + self.keep_row_grad * (x - x.detach())
        if self.keep_in is not None:
            x = self.keep_in(x)
        return self.keep(x).squeeze(-1)

    def norm(self, x, prev=None):
        """ln_1 of rows x (B, T, C), and with token shift ln_1 of the K rows before each of them
        side by side, nearest first (B, T, K*C). prev (B, <=K, C): the rows before the first,
        or None; where fewer than K rows came before, zeros stand in for them."""
        K, T = self.token_shift, x.size(1)
        if not K:
            return self.ln_1(x), None
        h = self.ln_1(x if prev is None else torch.cat([prev, x], dim=1))
        if h.size(1) < T + K:  # (B, K+T, C): K rows before the first
            h = F.pad(h, (0, 0, T + K - h.size(1), 0))
        return h[:, K:], torch.cat([h[:, K - i:K - i + T] for i in range(1, K + 1)], dim=-1)

    def own_kv(self, rows):
        """carry_kv at a stream's start: the keys (not yet turned to a slot) and values of the
        carried rows (B, S, C), each reading the rows before it in the state, side by side
        (B, S, 2C)."""
        return torch.cat(self.attn.project(*self.norm(rows))[1:], dim=-1)

    def forward(self, x, kv=None, bias=None, prev=None, lend=0):
        """Rows x (B, T, C) after those in kv (the last K of them: prev) -> (B, T-lend, C), kv,
        and x's own k, v as the state keeps them, a tuple whose parts go side by side (see
        CausalSelfAttention.forward). Sampling's one row at a time: forward_one."""
        a, kv, new = self.attn(*self.norm(x, prev), kv, bias, lend)
        x = x.split([lend, x.size(1) - lend], dim=1)[1] + a  # the rows that read
        x = x + self.mlp(self.ln_2(x))
        return x, kv, new

    def forward_one(self, x, room):
        """forward for one new row x (B, C), as sampling runs it (FoldGPT.step_one): the row
        goes into its layer's room; it and the K rows before it go through ln_1 together, and
        side by side they are what the one product of CausalSelfAttention.forward_one reads
        (norm's shifted copies are not needed). Returns the row out (B, C) and its k|v (B, 2C)."""
        K, (B, C), t, w = self.token_shift, x.size(), room.t, room.weights
        room.rows[:, K + t] = x
        h = F.layer_norm(room.rows[:, t:K + t + 1], (C,), *w["ln_1"])  # (B, K+1, C)
        if room.short > t:  # where fewer than K rows came before, zeros stand in
            h[:, :room.short - t] = 0
        a, made = self.attn.forward_one(h.view(B, -1), room)  # rows as (B, C) ...
        x = x + a  # ... through the products: their shortest road
        h = F.gelu(F.linear(F.layer_norm(x, (C,), *w["ln_2"]), *w["fc"]))  # the MLP, no dropout
        return x + F.linear(h, *w["mlp_proj"]), made

    def weights_one(self):
        """The tensors forward_one reads, looked up once a window (FoldGPT.make_room): a
        module's attribute costs about a microsecond to look up, and much of a sampled token's
        time is such costs. The same weights: a training step changes them in place."""
        attn, mlp = self.attn, self.mlp
        return dict(ln_1=(self.ln_1.weight, self.ln_1.bias), qkv=attn.joined(),
                    sin=attn.sin_row, cos=attn.cos_row, proj=(attn.c_proj.weight, attn.c_proj.bias),
                    ln_2=(self.ln_2.weight, self.ln_2.bias), fc=(mlp.c_fc.weight, mlp.c_fc.bias),
                    mlp_proj=(mlp.c_proj.weight, mlp.c_proj.bias))


@dataclass
class FoldGPTConfig:
    vocab_size: int = 257  # 256 bytes + <|endoftext|>: prepare_data.py's default tokenizer
    window: int = 32  # W: new tokens per window (the paper used 12)
    n_state: int = 96  # S: carried rows per layer; 0 makes a plain GPT with a W-token context
    n_mem: int = -1  # M: of the S rows, memory rows kept for their keep score; -1: S // 3
    keep_init: float = 2.0  # the keep score's bias at first (> 0: every row is kept)
    token_shift: int = 2  # rows before a row that its key reads (its query: one fewer); 0: none
    tie_embeddings: bool = False  # one matrix for the input embedding and the output layer
    evolve_gate: bool = True  # carried rows evolve by a learned share (0 at first), or fully
    carry_kv: bool = False  # carry each row's keys and values as they were made; rows not evolved
    keep_context: bool = False  # a row's keep score is read from its position's row one layer
    #                             up, which has read its window (the last layer: its own row);
    #                             False: from the row itself (at the first layer: its byte)
    keep_head_only: bool = False  # the gradient of how strongly memory rows are read stops at
    #                               the keep heads: the rows it reads are not the score's to shape
    keep_row_grad: float = 1.0  # without keep_head_only, the share of the keep scores' gradient
    #                             that reaches the rows they read (0.1: the score learns its
    #                             own features, the rows stay the language model's)
    keep_hidden: int = 0  # > 0: the keep head is an MLP with this many hidden units (GELU),
    #                       which can pick by features a linear map of the row cannot
    admit_reinforce: float = 0.0  # in training, push each admission toward what lowered the loss
    #                               of the windows after it (REINFORCE); 0: no gradient to it.
    #                               Measured, it learns to admit everything (docs/retention.md)
    keep_supervise: float = 0.0  # in training, teach the keep scores of a window's tokens to
    #                              pick those the data marks as where a key is said (forward's
    #                              keep_targets); 0: the scores learn only from the loss
    keep_hard: float = 1.0  # keep_supervise's unmarked side counts only this share of its
    #                         tokens, in each layer those scored highest: the rows that would
    #                         outrank a key; 1: all of them
    keep_margin: float = 0.0  # keep_supervise teaches the marked tokens' scores to rise above
    #                           +keep_margin and the others' to fall below -keep_margin, not
    #                           just to either side of 0: room for the scores of text not seen
    keep_rank: float = 0.0  # 0: a full memory lets its oldest row go; > 0: its lowest-ranked,
    #                         a row's rank being its keep score plus keep_rank for each row it
    #                         is newer, so a key outlasts the lesser rows let in after it
    keep_rank_eval: float = -1.0  # out of training (eval, sampling): the keep_rank the memory
    #                               ranks by; -1: keep_rank. Trained with 0.1 and ranked by score
    #                               alone (1e-4) out of it, the far key holds better; trained by
    #                               score alone, the copy was not learned (docs/retention.md, 26)
    keep_shared: bool = False  # every layer's memory lets in (and ranks) the rows the last
    #                            layer's keep score picks, the score that has read the most
    #                            context; False: each layer by its own score. With carry_kv,
    #                            training runs in waves of windows up through every layer (the
    #                            first layer's next memory waits for the last layer's scores):
    #                            docs/retention.md, section 18
    memory_heads: int = 0  # of the first layer's heads, this many read only its memory rows and
    #                        the others only its recent rows and tokens; 0: every head reads
    #                        all. The first layer's query knows a token and the one before it:
    #                        in one softmax, a number near the question outbids the key in the
    #                        memory (docs/retention.md, section 23); apart, both are read and the
    #                        layers above, which know the question, choose
    admit_after: int = -1  # windows a token's row waits among the recent rows before the
    #                        memory may let it in (0: at the fold of its own window, so from the
    #                        next window on the memory heads can read it while it is still
    #                        recent too); -1: when it is pushed out of them, (S - M) // W
    memory_layers: int = 1  # with memory_heads, how many layers from the first up split their
    #                         heads so, each with a memory head whose query has read more than
    #                         two bytes (4: no gain over 1 in two seeds, and one seed never
    #                         learned the copy; docs/retention.md, section 27)
    n_layer: int = 4  # L: blocks = time steps of evolution per window
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # C: channels of every token state
    dropout: float = 0.0  # dropout on attention weights and residual branches
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 had them; without is faster)

    def __post_init__(self):
        self.token_shift = int(self.token_shift)  # older checkpoints said True for 1
        if self.n_mem < 0 or self.n_state == 0:  # -1: a third of the rows; S = 0: a plain GPT
            self.n_mem = max(0, self.n_state) // 3

    def admit_from(self):
        """Where the rows the memory may let in at a fold begin in [R recent rows ; W tokens]
        (the fold's rows, oldest first): 0, the oldest W, as they are pushed out; with
        admit_after = d, those of the window d windows back."""
        if self.admit_after < 0:
            return 0
        return self.n_state - self.n_mem - self.admit_after * self.window

    def layer_by_layer(self):
        """Whether forward runs layer by layer (FoldGPT.run_layers): with carry_kv (REINFORCE
        needs the windows' draws one by one), where a
        window's first tokens' token shift reads the tokens before them, not a memory row: at
        least token_shift recent rows. Sampling always runs window by window."""
        return bool(self.carry_kv and self.n_state > 0 and not self.admit_reinforce
                    and self.n_state - self.n_mem >= self.token_shift)

    def check(self):
        """Raise ValueError, in one line that says what to change, for sizes that cannot work."""
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.n_state < 0:
            raise ValueError(f"n_state must be >= 0, got {self.n_state}")
        if self.n_mem > self.n_state:
            raise ValueError(f"n_mem must be at most n_state ({self.n_state}), got {self.n_mem}: "
                             "give a larger --n_state, a smaller --n_mem, or -1 for S // 3")
        if min(self.vocab_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError("vocab_size, n_layer, n_head and n_embd must all be >= 1")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must be n_head ({self.n_head}) times an "
                             "even head size (the rotary code turns channel pairs)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.keep_margin < 0:
            raise ValueError(f"keep_margin must be >= 0, got {self.keep_margin}")
        if self.keep_rank < 0 or (self.keep_rank_eval < 0 and self.keep_rank_eval != -1):
            raise ValueError(f"keep_rank must be >= 0 and keep_rank_eval >= 0 or -1 (as in "
                             f"training), got {self.keep_rank:g} and {self.keep_rank_eval:g}")
        if not 0.0 <= self.keep_row_grad <= 1.0:
            raise ValueError(f"keep_row_grad must be in [0, 1], got {self.keep_row_grad}")
        if self.keep_hidden < 0:
            raise ValueError(f"keep_hidden must be >= 0 (0: a linear keep head), got "
                             f"{self.keep_hidden}")
        if not 0.0 < self.keep_hard <= 1.0:
            raise ValueError(f"keep_hard must be in (0, 1], got {self.keep_hard}")
        if self.memory_heads and not 0 < self.memory_heads < self.n_head:
            raise ValueError(f"memory_heads must be 0 or 1 to n_head - 1 ({self.n_head - 1}), "
                             f"got {self.memory_heads}")
        if self.memory_heads and not self.n_mem:
            raise ValueError("memory_heads needs memory rows: give --n_mem > 0 (or -1)")
        R = self.n_state - self.n_mem
        if not -1 <= self.admit_after <= R // self.window:
            raise ValueError(f"admit_after must be -1 (when pushed out) or 0 to (n_state - "
                             f"n_mem) // window ({R // self.window}): a row waits among the "
                             f"recent rows, got {self.admit_after}")
        if not 1 <= self.memory_layers <= self.n_layer:
            raise ValueError(f"memory_layers must be 1 to n_layer ({self.n_layer}), got "
                             f"{self.memory_layers}")


@dataclass
class State:
    """What a stream carries from one call to the next: the folded rows, and the tokens of a
    window not yet full, which the next call reads first (so a stream may be cut anywhere)."""
    rows: torch.Tensor  # (B, L, S, C): the condensed context, S rows per layer
    pending: torch.Tensor = None  # (B, r), r <= W: tokens since the last fold; None: none
    kv: torch.Tensor = None  # (B, L, S, 2C) with carry_kv: the rows' keys (not yet turned to a
    #                          slot) and values as they were made, and with keep_context too
    #                          (B, L, S, 3C): beside them the row each one's keep score reads;
    #                          with keep_context alone (B, L, M, C): each memory row's row one
    #                          layer up (FoldGPT.context); None: made from the rows

    def __post_init__(self):
        if self.pending is None:
            self.pending = torch.zeros(self.rows.size(0), 0, dtype=torch.long,
                                       device=self.rows.device)

    def select(self, streams):
        """The state of some of the streams (an index or slice of the batch)."""
        return State(self.rows[streams], self.pending[streams],
                     None if self.kv is None else self.kv[streams])


@dataclass
class Window:
    """A window under way: what its tokens read at each layer, and what the fold needs."""
    mem: list = field(default_factory=list)  # per layer: (B, M, C) memory rows as they entered
    bias: list = field(default_factory=list)  # per layer: (B, M) how strongly memory is read
    recent: list = field(default_factory=list)  # per layer: (B, R, C), the staying ones evolved
    kv: list = field(default_factory=list)  # per layer: (k, v) of every row the next token reads
    tail: list = field(default_factory=list)  # per layer: (B, <=K, C) the last K rows so far
    inputs: list = field(default_factory=list)  # per layer: (B, n, C) tokens entering Block l
    kept: list = field(default_factory=list)  # carry_kv, per layer: (B, S, 2C) carried rows' k|v
    #                                           (with keep_context 3C: and their scores' rows)
    made: list = field(default_factory=list)  # carry_kv, per layer: (B, n, 2C) the tokens' k|v
    #                                           (with keep_context 3C, as kept)
    context: list = field(default_factory=list)  # keep_context, per layer: (B, M, C) the memory
    #                                              rows' rows one layer up, their keep scores' input
    logp: list = field(default_factory=list)  # admit_reinforce, per layer: (B,) log-probability
    #                                           of the fold's admissions, as drawn in training
    room: list = field(default_factory=list)  # sampling, per layer: a Room (step_one)
    n: int = 0  # tokens in the window so far

    def settle(self):
        """Put what sampling wrote into the rooms (step_one) where step and fold read it: each
        layer's inputs, tail, k|v made and KV cache, as step would have left them."""
        for l, room in enumerate(self.room):
            K, t = room.K, room.t
            self.inputs[l] = torch.cat([self.inputs[l], room.rows[:, K:K + t]], dim=1)
            self.tail[l] = room.rows[:, max(room.short, t):K + t]  # the last K that came
            if room.made is not None:
                self.made[l] = torch.cat([self.made[l], room.made[:, :t]], dim=1)
            self.kv[l] = room.k[:, :, :room.slot()], room.v[:, :, :room.slot()]
        self.room = []


@dataclass
class Room:
    """Sampling's room for one layer of a window: made at the window's first one-token step
    (FoldGPT.step_one), as large as the window can grow, so each token writes its own row, key
    and value in, where torch.cat would copy every row before them again. left: the tokens the
    window still had room for when the room was made."""
    rows: torch.Tensor  # (B, K + left, C): the K rows before the room's first token, then its
    #                     tokens' rows (the first `short` of the K are zeros: no row came there)
    k: torch.Tensor  # (B, nh, P + left, hs): the keys the tokens read, slot by slot, turned
    v: torch.Tensor  # (B, nh, P + left, hs): and their values
    made: torch.Tensor  # carry_kv: (B, left, 2C or 3C) each token's k|v, as Window.made; or None
    bias: torch.Tensor  # (B, 1, 1, P + left): what each slot's logit gains (the memory rows'
    #                     logsigmoid keep score, 0 elsewhere), or None; with memory_heads
    #                     (B, nh, 1, P + left), -inf where a head does not read
    weights: dict  # the layer's tensors that forward_one reads (Block.weights_one)
    P: int  # slots filled when the room was made
    K: int  # rows before the room's first token that its token shift reads
    short: int  # of those K, how many never came (a stream's start)
    t: int = 0  # tokens written so far

    def slot(self):
        """The next token's slot."""
        return self.P + self.t


@dataclass
class Lane:
    """A layer in layer-by-layer training (FoldGPT.run_layers): its stream so far, in stream
    order [carried rows ; tokens], as the waves of windows add to it."""
    block: nn.Module  # the layer's Block
    stream: torch.Tensor  # (B, S+t, C): the rows entering the layer
    keys: torch.Tensor  # (B, S+t, C): their keys, not yet turned to a slot ...
    values: torch.Tensor  # (B, S+t, C): ... and values, as made
    up: bool  # keep_context below the last layer: the keep scores read the rows it makes
    read: list  # the rows the keep scores read, in stream order, in parts
    scored: int = 0  # how many of read's parts have been scored
    score: torch.Tensor = None  # (B, rows scored): their keep scores
    admitted: torch.Tensor = None  # (B, rows scored): which of them enter the memory if pushed out
    held: list = None  # per window so far: which rows its memory holds, (B, M) stream indices


class FoldGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        config.check()
        self.config = config
        self.by_threshold = False  # in training too, admit by the threshold (threshold_losses)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # GPT-2's choice; untied, a pass key is learned sooner
            self.transformer.wte.weight = self.lm_head.weight
        # What the first window reads as its past: a learned state, S rows per layer.
        self.state0 = nn.Parameter(torch.zeros(config.n_layer, config.n_state, config.n_embd))
        self.apply(self._init_weights)
        nn.init.normal_(self.state0, mean=0.0, std=0.02)
        for block in self.transformer.h[:config.memory_layers]:
            block.attn.memory_heads = config.memory_heads
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
        return State(self.state0.unsqueeze(0).expand(batch_size, -1, -1, -1))  # (B, L, S, C)

    def restart(self, state, streams, start=None):
        """The state with the streams that streams (B,) bool picks begun afresh, as a stream
        begins (initial_state), the others as they were; start (L, S, C): the initial rows
        (state0, or a copy of it whose gradient the caller collects). Pending tokens stay."""
        start = self.state0 if start is None else start
        pick = streams.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        rows = torch.where(pick, start.unsqueeze(0), state.rows)  # (B, L, S, C)
        fresh_kv = self.start_kv(start.unsqueeze(0))  # (1, L, *, *) or None
        kv = None
        if fresh_kv is not None:
            kv = torch.where(pick, fresh_kv, self.start_kv(state.rows)
                             if state.kv is None else state.kv)
        return State(rows, state.pending, kv)

    def start_kv(self, rows):
        """What a stream's start (State.kv None) makes of its rows (B, L, S, C) for State.kv:
        with carry_kv each row's k|v (and score's row), with keep_context alone the memory rows'
        rows one layer up; None where the state carries nothing beside its rows."""
        c = self.config
        if c.carry_kv and c.n_state:
            return torch.stack([self.own_kept(rows, l) for l in range(c.n_layer)], dim=1)
        if c.keep_context and c.n_mem:
            return self.context(rows, None)
        return None

    # A window in three parts: open it on the carried rows (evolving them once more), step its
    # tokens through (all at once in training, one at a time when sampling), fold it.

    def open_window(self, rows, size, kv=None):
        """Start a window of size tokens on the carried rows (B, L, S, C), which at each layer
        are [M memory rows ; R = S - M recent rows, oldest first]; kv: their keys and values
        (carry_kv), or None."""
        if self.config.carry_kv and self.config.n_state:
            return self.open_window_kept(rows, size, kv)
        M, K = self.config.n_mem, self.config.token_shift
        R = self.config.n_state - M
        G = min(size, R)  # the oldest G recent rows make way for the tokens
        window = Window()
        context = self.context(rows, kv) if self.config.keep_context and M else None
        # unbind, not rows[:, l]: the backward of indexing fills a zero tensor of the whole
        # state for each layer; unbind's stacks the layers' gradients once (docs/performance.md)
        for l, (block, layer) in enumerate(zip(self.transformer.h, rows.unbind(1))):
            mem, recent = layer.split([M, R], dim=1)  # (B, M, C), (B, R, C)
            read, bias = mem, None
            if M:  # memory rows: read one step evolved, always from the rows as they entered
                evolved = block(mem)[0]  # (B, M, C), each reading the older memory rows
                read = mem + block.evolve * (evolved - mem)
                scored = read if context is None else context[:, l]  # (B, M, C)
                bias = F.logsigmoid(block.keep_score(scored, self.config.keep_head_only))  # (B, M)
                if context is not None:
                    window.context.append(context[:, l])
            # The memory rows and the rows that make way only lend their keys and values; the
            # recent rows that stay read them and each other: Block l evolves them once more.
            carried = torch.cat([read, recent], dim=1)  # (B, S, C)
            gone, stay = recent.split([G, R - G], dim=1)  # (B, G, C), (B, R-G, C)
            kv = None
            if carried.size(1):
                out, kv = block(carried, None, bias, None, lend=M + G)[:2]  # (B, R-G, C)
                if not self.config.evolve_gate:  # fully evolved
                    stay = out
                elif hasattr(block, "evolve"):  # by the gate's share (no gate: no row stays)
                    stay = stay + block.evolve * (out - stay)
            window.kv.append(kv)
            window.tail.append(last_rows(carried, K))
            window.mem.append(mem)
            window.bias.append(bias)
            window.recent.append(torch.cat([gone, stay], dim=1))  # (B, R, C)
            window.inputs.append(recent[:, :0])  # (B, 0, C): no tokens yet
        return window

    def open_window_kept(self, rows, size, kv=None):
        """open_window with carry_kv: the carried rows are not evolved, and their keys and
        values are those made when they were tokens, so a memory row keeps the key its own
        context gave it (token shift), however far from that context it now sits. Only the
        keys are turned to the rows' slots now. kv None: made from the rows (a stream's start)."""
        M, K, C = self.config.n_mem, self.config.token_shift, self.config.n_embd
        window = Window()
        for l, (block, layer) in enumerate(zip(self.transformer.h, rows.unbind(1))):
            mem, recent = layer.split([M, layer.size(1) - M], dim=1)  # (B, M, C), (B, R, C)
            kept = self.own_kept(rows, l) if kv is None else kv[:, l]  # (B, S, 2C or 3C)
            k, v = (block.attn.heads(t) for t in kept[..., :2 * C].split(C, dim=-1))
            window.kv.append((block.attn.turn(k, 0), v))  # (B, nh, S, hs) each
            window.kept.append(kept)
            window.made.append(kept[:, :0])  # (B, 0, 2C or 3C): no tokens yet
            window.tail.append(last_rows(layer, K))
            window.mem.append(mem)
            scored = kept[:, :M, 2 * C:] if self.config.keep_context else mem  # (B, M, C)
            window.bias.append(F.logsigmoid(block.keep_score(scored, self.config.keep_head_only))
                               if M else None)  # (B, M)
            window.recent.append(recent)
            window.inputs.append(layer[:, :0])  # (B, 0, C): no tokens yet
        return window

    def own_kept(self, rows, l):
        """carry_kv at a stream's start: what layer l's carried rows carry (B, S, 2C), their
        keys and values (Block.own_kv), and with keep_context beside them (B, S, 3C) the rows
        their keep scores read: the rows (B, L, S, C) one layer up (the last layer: its own)."""
        kept = self.transformer.h[l].own_kv(rows[:, l])
        if not self.config.keep_context:
            return kept
        return torch.cat([kept, rows[:, min(l + 1, self.config.n_layer - 1)]], dim=-1)

    def context(self, rows, kv):
        """keep_context: the rows (B, L, M, C) the memory rows' keep scores read, each memory
        row's row one layer up (kv, carried beside the rows), or at a stream's start (kv None)
        the initial state's memory rows one layer up; the last layer reads its own."""
        L, M, C = self.config.n_layer, self.config.n_mem, self.config.n_embd
        if kv is not None:
            return kv[:, :, :M, 2 * C:] if self.config.carry_kv else kv
        return rows[:, [min(l + 1, L - 1) for l in range(L)], :M]  # (B, L, M, C)

    def keep_scores(self, rows, kv=None):
        """Per layer, the keep scores (B, S) of the carried rows (B, L, S, C) as admit and the
        memory's reading see them: of the rows themselves, or with keep_context, for the memory
        rows of their context (kv, see context) and for the recent ones of the rows one layer
        up at the same positions."""
        if not self.config.keep_context:
            return [block.keep_score(rows[:, l]) for l, block in enumerate(self.transformer.h)]
        L, M = self.config.n_layer, self.config.n_mem
        context = self.context(rows, kv)
        return [block.keep_score(torch.cat([context[:, l], rows[:, min(l + 1, L - 1), M:]], 1))
                for l, block in enumerate(self.transformer.h)]

    def step(self, idx, window):
        """Run the next tokens idx (B, T) of the window; returns their final states (B, T, C)."""
        L, K = self.config.n_layer, self.config.token_shift
        window.settle()  # what sampling wrote one token at a time (step_one), if anything
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for l, block in enumerate(self.transformer.h):
            inputs = window.inputs[l] = torch.cat([window.inputs[l], x], dim=1)  # (B, n+T, C)
            prev = window.tail[l]  # the rows before these, for token shift
            window.tail[l] = last_rows(inputs if inputs.size(1) >= K else
                                       torch.cat([prev, x], dim=1), K)
            row, (x, window.kv[l], made) = x, block(x, window.kv[l], window.bias[l], prev)
            if window.kept:  # carry_kv: the tokens' own k, v go into the state at the fold ...
                if self.config.keep_context:  # ... and the rows their keep scores read
                    made = (*made, x if l < L - 1 else row)
                made = made[0] if len(made) == 1 else torch.cat(made, dim=-1)
                window.made[l] = torch.cat([window.made[l], made], dim=1)
        window.n += idx.size(1)
        return self.transformer.ln_f(x)

    def step_one(self, idx, window):
        """step for one token idx (B, 1) as sampling runs it, in eval mode without gradients:
        the same sums, each layer's row, key and value written into room made once per window
        (make_room) instead of concatenated to the rows before them, and one row through each
        block's shortest road (Block.forward_one). Returns the token's final state (B, 1, C).
        In training mode or with gradients on it is step: the rooms are written in place."""
        if self.training or torch.is_grad_enabled():
            return self.step(idx, window)
        if not window.room:
            self.make_room(window)
        L = self.config.n_layer
        x = self.transformer.wte(idx[:, 0])  # (B, C); eval mode: no dropout
        for l, (block, room) in enumerate(zip(self.transformer.h, window.room)):
            row, (x, made) = x, block.forward_one(x, room)
            if room.made is not None:  # carry_kv: the token's k|v go into the state at the fold
                if self.config.keep_context:  # ... with the row its keep score reads
                    made = torch.cat([made, x if l < L - 1 else row], dim=-1)
                room.made[:, room.t] = made
            room.t += 1
        window.n += 1
        return self.transformer.ln_f(x)[:, None]

    def make_room(self, window):
        """Each layer's Room for the rest of the window (step_one), holding what the window's
        tokens read so far: its KV cache, the K rows before the next token, the memory's bias."""
        K = self.config.token_shift
        left = self.config.window - window.n  # tokens still to come in this window
        for l, block in enumerate(self.transformer.h):
            kv, tail, bias = window.kv[l], window.tail[l], window.bias[l]
            B, C, nh = tail.size(0), tail.size(2), block.attn.n_head
            P = 0 if kv is None else kv[0].size(2)
            k, v = tail.new_empty(2, B, nh, P + left, C // nh).unbind(0)
            if kv is not None:
                k[:, :, :P], v[:, :, :P] = kv
            rows = tail.new_zeros(B, K + left, C)
            rows[:, K - tail.size(1):K] = tail
            if bias is not None:  # (B, M) -> (B, 1, 1, P + left): the first M slots' logits
                M = bias.size(1)
                bias = F.pad(bias, (0, P + left - M)).to(k.dtype)[:, None, None]
                if block.attn.memory_heads:  # (B, nh, 1, P + left): -inf where a head reads not
                    reads = block.attn.split_heads(torch.ones(1, P + left, dtype=torch.bool,
                                                              device=k.device), M)
                    bias = bias.masked_fill(~reads, float("-inf"))
            made = None  # carry_kv: room for the tokens' k|v, as window.made has them
            if window.kept:
                made = window.made[l].new_empty(B, left, window.made[l].size(2))
            window.room.append(Room(rows, k, v, made, bias, block.weights_one(), P, K,
                                    short=K - tail.size(1)))

    def fold(self, window):
        """The next rows (B, L, S, C), and with carry_kv their k|v (B, L, S, 2C; with keep_context
        too 3C, see State.kv), with keep_context alone the memory rows' rows one layer up
        (B, L, M, C), else None: per layer, the last R of [recent rows ; tokens at layer l] stay
        recent; those pushed out (with admit_after, those of the window admit_after windows
        back) enter the memory if admit lets them (see remember)."""
        window.settle()  # what sampling wrote into the rooms, if anything (step_one)
        C, M, L, W = self.config.n_embd, self.config.n_mem, self.config.n_layer, self.config.window
        rank = self.memory_rank()  # 0: the oldest row goes first
        R, a = self.config.n_state - M, self.config.admit_from()
        layers = [torch.cat([recent, inputs], dim=1)  # per layer (B, R+W, C), the same positions
                  for recent, inputs in zip(window.recent, window.inputs)]
        parts = []  # per layer: the memory and the rows pushed out and staying, side by side
        for l in range(L):  # with what they carry
            layer = layers[l]  # (B, R+W, C)
            mem = window.mem[l]  # (B, M, C)
            if window.kept:  # carry_kv: each row's k|v go with it, side by side, (B, *, 3C)
                made = torch.cat([window.kept[l][:, M:], window.made[l]], dim=1)  # (B, R+W, 2C)
                layer = torch.cat([layer, made], dim=-1)  # (with keep_context: and its score's
                mem = torch.cat([mem, window.kept[l][:, :M]], dim=-1)  # row, (B, *, 4C))
            elif window.context:  # keep_context: each row's row one layer up goes with it, 2C
                layer = torch.cat([layer, layers[min(l + 1, L - 1)]], dim=-1)
                mem = torch.cat([mem, window.context[l]], dim=-1)
            parts.append((mem, layer[:, a:a + W], layer[:, W:]))  # W offered, R staying

        def choose(l):  # which rows layer l's memory lets in (B, G), and the ranks' scores
            block, (mem, pushed, _) = self.transformer.h[l], parts[l]
            up = self.config.keep_context  # the rows the scores read: the last C channels
            scored = pushed[..., -C:] if up else pushed[..., :C]  # (B, G, C)
            keep = self.admit(block, scored, window.logp if self.config.admit_reinforce else None)
            if not rank:
                return keep, None
            held = mem[..., -C:] if up else mem[..., :C]  # (B, M, C): the scores of [memory ;
            return keep, block.keep_score(torch.cat([held, scored], dim=1)).detach()  # pushed]

        shared = choose(L - 1) if M and self.config.keep_shared else None
        rows, context = [], []
        for l, (mem, pushed, recent) in enumerate(parts):
            if M:
                keep, score = shared or choose(l)
                if rank:
                    mem = self.remember_ranked(mem, pushed, keep, score, rank)
                else:
                    mem = self.remember(mem, pushed, keep)
            if window.context:
                mem, kept_context = mem.split(C, dim=-1)
                recent = recent[..., :C]
                context.append(kept_context)  # (B, M, C)
            rows.append(torch.cat([mem, recent], dim=1))  # (B, S, C), or with carry_kv 3C, 4C
        rows = torch.stack(rows, dim=1)  # (B, L, S, C), or (B, L, S, 3C or 4C)
        if context:
            return rows, torch.stack(context, dim=1)  # (B, L, S, C), (B, L, M, C)
        return (rows, None) if not window.kept else rows.split([C, rows.size(-1) - C], dim=-1)

    def memory_rank(self):
        """The keep_rank a full memory ranks its rows by: keep_rank in training, and out of it
        keep_rank_eval where that is given (>= 0)."""
        c = self.config
        return c.keep_rank if self.training or c.keep_rank_eval < 0 else c.keep_rank_eval

    def admit(self, block, rows, logp=None):
        """(B, G): which rows (B, G, C) pushed out of the recent part enter the memory: score > 0;
        in training, with probability sigmoid(score), so a row scored out can learn back up.
        logp: a list that gets the draws' log-probability (B,), in training (see reinforce)."""
        score = block.keep_score(rows)
        keep = self.admitted(score)
        if logp is not None and self.training and not self.by_threshold:
            score = block.keep_score(rows, head_only=True)
            logp.append(torch.where(keep, F.logsigmoid(score), F.logsigmoid(-score)).sum(1))
        return keep

    def admitted(self, score):
        """Which rows of keep scores score enter the memory if pushed out: score > 0, or in
        training drawn with probability sigmoid(score)."""
        if self.training and not self.by_threshold:
            return torch.rand_like(score) < torch.sigmoid(score)
        return score > 0

    @staticmethod
    def remember(mem, pushed, keep):
        """The newest M of [memory ; pushed-out rows that keep (B, G) admits], in stream order:
        a row stays until M newer rows have entered, however many windows that takes."""
        B, M, C = mem.size()
        keep = torch.cat([torch.ones_like(mem[..., 0], dtype=torch.bool), keep], dim=1)
        newer = keep.flip(1).cumsum(1).flip(1)  # kept rows at or after each row, (B, M+G)
        slot = torch.where(keep & (newer <= M), M - newer, M)  # slot M is the waste bin
        rows = torch.cat([mem, pushed], dim=1)  # (B, M+G, C)
        out = rows.new_zeros(B, M + 1, C).scatter(1, slot[..., None].expand(-1, -1, C), rows)
        return out[:, :M]  # (B, M, C)

    @staticmethod
    def remember_ranked(mem, pushed, keep, score, newer):
        """keep_rank: the M best of [memory ; pushed-out rows that keep (B, G) admits], in stream
        order, a row's rank being its keep score (score (B, M+G)) plus `newer` for each row of
        them it comes after: a high-scored row stays while lesser ones come and go."""
        B, M, C = mem.size()
        keep = torch.cat([torch.ones_like(mem[..., 0], dtype=torch.bool), keep], dim=1)
        order = torch.arange(keep.size(1), device=mem.device)  # stream order, oldest first
        rank = (score + newer * order).masked_fill(~keep, float("-inf"))  # (B, M+G)
        best = rank.topk(M, dim=1).indices.sort(dim=1).values  # (B, M), in stream order
        rows = torch.cat([mem, pushed], dim=1)  # (B, M+G, C)
        return rows.gather(1, best[..., None].expand(-1, -1, rows.size(-1)))  # (B, M, C)

    def forward(self, idx, state=None, targets=None, grad_ckpt=False, keep_targets=None):
        """A stream of any length, window by window: idx (B, N) -> logits (B, N, V), the mean
        loss over targets (B, N) (-1: none) or None, and the State after it. The state's pending
        tokens are read first, so model(a) then model(b, state) gives what model(a + b) gives.
        With targets, logits are not kept (None): each window turns its own into its loss.
        grad_ckpt keeps only what enters each window, and backward runs the window again.
        keep_targets (B, N) bool, with keep_supervise in training: which tokens of idx the keep
        scores should pick (see keep_loss)."""
        W = self.config.window
        state = self.initial_state(idx.size(0)) if state is None else state
        r = state.pending.size(1)
        idx = torch.cat([state.pending, idx], dim=1)  # (B, r+N)
        if targets is not None:
            targets = F.pad(targets, (r, 0), value=-1)  # no loss on tokens read before
        run = self.run_window
        if grad_ckpt and torch.is_grad_enabled():
            run = partial(checkpoint, self.run_window, use_reentrant=False)
        supervise = (keep_targets is not None and self.training and self.config.n_mem > 0
                     and self.config.keep_supervise > 0)
        if self.layer_by_layer():
            outs, logps, scores, rows, kv = self.run_layers(idx, state.rows, state.kv, targets,
                                                            supervise, grad_ckpt)
        else:
            outs, logps, scores, rows, kv = self.run_windows(run, idx, state.rows, state.kv,
                                                             targets, supervise)
        after = State(rows, idx[:, idx.size(1) // W * W:], kv)  # a window not yet full waits
        if targets is None:
            return torch.cat(outs, dim=1)[:, r:], None, after  # (B, N, V)
        losses = torch.stack(outs, dim=1)  # (B, windows): each stream's loss in each window
        loss = losses.sum()
        if self.config.admit_reinforce and self.training:
            loss = loss + self.reinforce(losses, logps, self.threshold_losses(idx, state, targets))
        loss = loss / (targets != -1).sum().clamp(min=1)
        if supervise:
            loss = loss + self.keep_loss(torch.cat(scores, dim=2),
                                         F.pad(keep_targets.long(), (r, 0), value=-1))
        return None, loss, after

    def run_windows(self, run, idx, rows, kv, targets, scores=False):
        """run (run_window, or it checkpointed) on each window of idx in turn, the rows going
        on: the windows' outputs, admissions' log-probabilities and (scores) their tokens' keep
        scores, and the last rows and kv."""
        W, outs, logps, keeps = self.config.window, [], [], []
        for t in range(0, idx.size(1), W):
            out, rows, kv, logp, keep = run(idx[:, t:t + W], rows, kv,
                                            None if targets is None else targets[:, t:t + W],
                                            scores)
            outs.append(out)
            logps.append(logp)
            keeps.append(keep)
        return outs, logps, keeps, rows, kv

    # With carry_kv nothing evolves the carried rows, so a layer's rows are known for the whole
    # stream before the layer runs: its keys, values and keep scores, and so which rows the
    # memory holds at each window. A layer then runs every window of the call at once, as one
    # batch of windows, and the stream goes up layer by layer instead of window by window: the
    # same sums (test_with_carry_kv_layer_by_layer_trains_as_window_by_window_does), in a few
    # large operations where window by window takes many small ones (docs/performance.md).
    # Window w's memory holds rows that the folds before it pushed out, the last of them pushed
    # out by window w - 1 - R/W. Where the scores that choose them are read from rows a layer
    # makes (keep_context: a layer's outputs; keep_shared: the last layer's inputs), the
    # windows run in waves of 1 + R/W, a wave once the scores its memories depend on are made.

    def layer_by_layer(self):
        """Whether forward runs layer by layer (FoldGPTConfig.layer_by_layer)."""
        return self.config.layer_by_layer()

    def run_layers(self, idx, rows, kv, targets, scores=False, grad_ckpt=False):
        """carry_kv: what run_windows returns for the windows of idx (B, n), layer by layer (the
        last window may be part full; it is not folded). grad_ckpt keeps only what enters each
        layer's wave, and backward runs it again."""
        W, L, M, S = self.config.window, self.config.n_layer, self.config.n_mem, self.config.n_state
        B, n = idx.shape
        windows, full = -(-n // W), n // W  # every window, and the full ones that fold
        x = self.transformer.drop(self.transformer.wte(F.pad(idx, (0, windows * W - n))))
        kept = [self.own_kept(rows, l) for l in range(L)] if kv is None else kv.unbind(1)
        lanes = [self.lane(l, layer, kept[l]) for l, layer in enumerate(rows.unbind(1))]
        shared = bool(self.config.keep_shared and M)  # the last layer's scores choose for all
        choosers = [lanes[-1] if shared else lane for lane in lanes]  # whose scores choose

        def waves(size):  # (first, last + 1) of each wave of `size` windows
            return [(a, min(a + size, windows)) for a in range(0, windows, size)]

        joint = 1 + (S - M - self.config.admit_from()) // W  # windows a wave: the scores
        #                                                     made by a layer choose after it
        if shared:  # wave by wave, each up through every layer
            outs = []
            for a, b in waves(joint):
                y = x[:, a * W:b * W]
                for lane, chooser in zip(lanes, choosers):
                    y = self.lane_wave(lane, y, a, b, chooser, grad_ckpt)
                outs.append(y)
            x = torch.cat(outs, dim=1) if outs else x
        else:  # layer by layer, each layer's windows in its waves, its own scores choosing
            for lane in lanes:
                size = joint if M and lane.up else max(1, windows)
                x = torch.cat([self.lane_wave(lane, x[:, a * W:b * W], a, b, lane, grad_ckpt)
                               for a, b in waves(size)] or [x], dim=1)  # (B, windows*W, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, windows*W, V)
        if targets is None:
            outs = [logits[:, :n]]
        else:  # each stream's sum of its tokens' losses in each window, as run_window gives it
            targets = F.pad(targets, (0, windows * W - n), value=-1)
            outs = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=-1, reduction="none").view(B, windows, W).sum(2)
            outs = list(outs.unbind(1))
        keeps = None
        if M:
            for lane, chooser in zip(lanes, choosers):
                self.lane_scores(lane, grad_ckpt)  # the last wave's
                self.lane_held(chooser, full + 1)
            keeps = torch.stack([lane.score[:, S:S + n] for lane in lanes], dim=1)  # (B, L, n)
        if full:  # each layer's rows after the last fold, holding its memory's (B, M) rows
            held = [chooser.held[full] if M else idx.new_zeros(B, 0) for chooser in choosers]
            rows, kv = (torch.stack(t, dim=1) for t in zip(*[  # (B, L, S, C), State.kv's
                self.lane_after(lane, h, full) for lane, h in zip(lanes, held)]))
        return outs, [None] * windows, [keeps if scores else None], rows, kv

    def lane(self, l, layer, kept):
        """Layer l's Lane before the call's first window: its carried rows layer (B, S, C) and
        what they carry, kept (B, S, 2C or 3C)."""
        C, M, L, B = self.config.n_embd, self.config.n_mem, self.config.n_layer, layer.size(0)
        up = self.config.keep_context and l < L - 1  # the scores read this layer's outputs
        held = [torch.arange(M, device=layer.device).expand(B, M)]  # the carried memory rows
        return Lane(self.transformer.h[l], layer, kept[..., :C], kept[..., C:2 * C], up,
                    [kept[..., 2 * C:] if up else layer], held=held)

    def lane_scores(self, lane, grad_ckpt=False):
        """Score the rows of lane.read not scored yet, all at once, and draw which of them the
        memory admits (see admitted). grad_ckpt: backward scores them again."""
        if lane.scored < len(lane.read):
            def score(*rows):  # (B, rows)
                return lane.block.keep_score(torch.cat(rows, dim=1), self.config.keep_head_only)
            if grad_ckpt and torch.is_grad_enabled():
                score = partial(checkpoint, score, use_reentrant=False)
            s = score(*lane.read[lane.scored:])
            lane.score = s if lane.score is None else torch.cat([lane.score, s], dim=1)
            drawn = self.admitted(s.detach())
            lane.admitted = drawn if lane.admitted is None else torch.cat([lane.admitted, drawn],
                                                                          dim=1)
            lane.scored = len(lane.read)

    def lane_held(self, lane, windows):
        """Fold a lane's memory on by its own scores until `windows` windows have what it
        holds as they open."""
        while len(lane.held) < windows:
            lane.held.append(self.fold_memory(lane.held[-1], lane.score.detach(), lane.admitted,
                                              len(lane.held) - 1))

    def lane_wave(self, lane, x, a, b, chooser, grad_ckpt=False):
        """Windows a .. b-1 of a lane's layer: x (B, (b-a)W, C), their tokens entering it. Adds
        them to the lane and returns the next layer's tokens; chooser: the lane whose keep
        scores choose what the memories hold (the lane itself, or keep_shared's last layer)."""
        M, K, B = self.config.n_mem, self.config.token_shift, x.size(0)
        prev = last_rows(lane.stream, K)  # the rows before these, for token shift
        lane.stream = torch.cat([lane.stream, x], dim=1)
        if not lane.up:
            lane.read.append(x)
        held = [x.new_zeros(B, 0, dtype=torch.long)] * (b - a)  # no memory
        if M:
            self.lane_scores(lane, grad_ckpt)  # how strongly this layer reads its memory rows
            self.lane_scores(chooser, grad_ckpt)
            self.lane_held(chooser, b)
            held = chooser.held[a:b]
        run = self.layer_wave
        if grad_ckpt and torch.is_grad_enabled():
            run = partial(checkpoint, self.layer_wave, use_reentrant=False)
        y, lane.keys, lane.values = run(lane.block, x, prev, lane.keys, lane.values, lane.score,
                                        held, a)
        if lane.up:
            lane.read.append(y)
        return y

    def layer_wave(self, block, x, prev, keys, values, score, held, first):
        """Block l on w windows from window `first` on, x (B, w*W, C) their tokens, after the
        layer's stream so far: its last K rows prev, its keys (not yet turned) and values (B,
        S+t, C), its keep scores score and the windows' memories held (see read_windows).
        Returns the next layer's tokens (B, w*W, C), and the keys and values with theirs."""
        S, W, attn = self.config.n_state, self.config.window, block.attn
        q, k, v = attn.project(*block.norm(x, prev))  # (B, w*W, C) each
        keys, values = torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1)
        start = S + first * W  # the tokens' slots: S.., plus first*W (see read_windows)
        q = attn.turn_to(q, torch.arange(start, start + x.size(1), device=x.device))
        return self.read_windows(block, x, q, keys, values, score, held, first), keys, values

    def lane_after(self, lane, held, full):
        """A lane's rows (B, S, C) and what they carry (see State.kv) after its first `full`
        windows have folded, held (B, M) the memory's rows then."""
        W, M, S = self.config.window, self.config.n_mem, self.config.n_state
        stays = slice(M + full * W, S + full * W)  # the R rows recent after the last fold

        def after(t):  # (B, S+n, D) -> (B, S, D): the memory and recent rows
            return torch.cat([t.gather(1, held[..., None].expand(-1, -1, t.size(-1))),
                              t[:, stays]], dim=1)

        carried = [lane.keys, lane.values]
        if self.config.keep_context:  # and the rows the keep scores read
            carried.append(torch.cat(lane.read, dim=1))
        return after(lane.stream), torch.cat([after(t) for t in carried], dim=-1)

    def read_windows(self, block, x, q, keys, values, score, held, first):
        """Block l's output (B, w*W, C) for w windows from window `first` on: their tokens x
        and turned queries q (B, w*W, C), reading the layer's stream of keys (not yet turned)
        and values (B, S+n, C) through their memories held (w of (B, M) indices into the
        stream, or (B, 0)), whose rows are read as strongly as their keep scores score say."""
        W, M, S = self.config.window, self.config.n_mem, self.config.n_state
        R, (B, T, C), attn = S - M, x.size(), block.attn
        w = T // W
        ids = torch.stack(held, dim=1).flatten(1)  # (B, w*M)
        # Window first + i reads the M rows its memory holds (slots 0..M-1), then its R recent
        # rows and its W tokens: stream rows M + (first + i)W .. S + (first + i)W + W - 1, a
        # slice the windows overlap in, at slots M..S+W-1. Only slot distances count, so a
        # stream row is turned once to its place in the stream, and window first + i's queries
        # and memory rows to their slots plus (first + i)W.
        lo, hi = M + first * W, S + (first + w) * W  # the windows' recent rows and tokens
        span = torch.arange(lo, hi, device=x.device)  # their slots in the stream

        def memory(t):  # (B, S+n, C) -> (B, w, M, C): the rows each window's memory holds
            return t.gather(1, ids[..., None].expand(-1, -1, C)).view(B, w, M, C)

        def near(t):  # (B, span, ...) -> parts of (B, w, R+W, ...): each window's recent rows
            if R % W:  # and tokens, side by side along dim 2
                return [t.unfold(1, R + W, W).movedim(-1, 2)]
            # R a whole number of windows: window i's rows are chunks i .. i + R/W of W rows,
            # shifted views of the stream (whose backward is far cheaper than unfold's)
            chunks = t.unflatten(1, (-1, W))  # (B, w + R/W, W, ...)
            return [chunks[:, j:j + w] for j in range(R // W + 1)]

        slot = torch.arange(M, device=x.device) + W * torch.arange(first, first + w,
                                                                    device=x.device)[:, None]
        nh, hs = attn.n_head, C // attn.n_head
        parts = [attn.turn_to(memory(keys), slot),  # slot (w, M): 0..M-1, plus the shift
                 attn.turn_to(keys[:, lo:hi], span), memory(values), values[:, lo:hi]]
        parts = [t.unflatten(-1, (nh, hs)) for t in parts]  # (..., nh, hs): heads
        q = attn.heads(q.reshape(B * w, W, C))  # (B*w, nh, W, hs)
        # memory rows are read as strongly as their keep scores say: (B, w, M)
        bias = None if not M else F.logsigmoid(score.gather(1, ids)).view(B, w, M)
        channel = bias is not None and bias.requires_grad
        if channel:  # as in attend, the bias rides in a channel of its own (q.k gains
            # sqrt(hs) * bias), put in as the keys and values are put together, not after
            parts[0] = torch.cat([parts[0], bias[..., None, None].expand(-1, -1, -1, nh, 1)
                                  .to(parts[0].dtype)], dim=-1)
            parts[1:] = [F.pad(t, (0, 1)) for t in parts[1:]]
            q, bias = F.pad(q, (0, 1), value=math.sqrt(hs)), None
        elif bias is not None:
            bias = F.pad(bias.view(B * w, M), (0, R + W))  # (B*w, S+W)
        k = torch.cat([parts[0], *near(parts[1])], dim=2)  # (B, w, S+W, nh, hs or hs+1)
        v = torch.cat([parts[2], *near(parts[3])], dim=2)
        k, v = (t.flatten(0, 1).transpose(1, 2) for t in (k, v))  # (B*w, nh, S+W, hs or hs+1)
        mask = causal_mask(W, S + W, S, x.device)  # a token reads all S rows and tokens before it
        if M:
            mask = attn.split_heads(mask, M)  # memory_heads: (nh, W, S+W)
        x = x + attn.attend(q, k, v, mask, bias, channel).view(B, T, C)
        return x + block.mlp(block.ln_2(x))

    def fold_memory(self, held, score, admitted, w):
        """Which rows (B, M) the memory holds after window w's fold, from those it held before
        (held: indices into a layer's stream [memory ; recent ; tokens]); score (B, >= M + wW +
        W): the stream's keep scores, admitted: which of them enter when pushed out (see
        admitted). Window w's fold pushes out stream rows M + wW .. M + wW + W - 1 (see fold),
        and its memory chooses among those, or with admit_after among the rows a
        (admit_from) on from them."""
        W, M, B = self.config.window, self.config.n_mem, held.size(0)
        first = M + w * W + self.config.admit_from()
        pushed = torch.arange(first, first + W, device=score.device).expand(B, W)
        keep = admitted[:, first:first + W]  # (B, W): those the memory lets in
        rank = self.memory_rank()
        if rank:
            ranked = score.gather(1, torch.cat([held, pushed], dim=1))  # (B, M+W)
            return self.remember_ranked(held[..., None], pushed[..., None], keep, ranked,
                                        rank)[..., 0]
        return self.remember(held[..., None], pushed[..., None], keep)[..., 0]

    @torch.no_grad()
    def threshold_losses(self, idx, state, targets):
        """reinforce's baseline: each stream's loss in each window (B, windows) of the same
        tokens from the same state, with the memory admitting by its threshold, as in eval."""
        self.by_threshold = True
        try:
            return torch.stack(self.run_windows(self.run_window, idx, state.rows, state.kv,
                                                targets)[0], dim=1)
        finally:
            self.by_threshold = False

    def reinforce(self, losses, logps, baseline):
        """A term worth exactly 0 whose gradient is REINFORCE's for the memory's admissions:
        each window's draws (logps: (B,) or None per window) are made likelier where the loss
        of the windows after it (losses (B, windows), summed) came out below the baseline's
        (B, windows: the same stream admitting by threshold, see threshold_losses), and less
        likely where above. The draws are discrete, so the loss gives the keep score no
        gradient through what entered; this term does, to the keep heads alone (let into the
        rows too, its noise kept the copy from being learned)."""
        def after(loss):  # (B, windows): the loss of the windows after each
            loss = loss.detach()
            return loss.flip(1).cumsum(1).flip(1) - loss
        advantage = after(losses) - after(baseline)
        term = losses.new_zeros(())
        for w, logp in enumerate(logps):
            if logp is not None:
                term = term + (advantage[:, w] * (logp - logp.detach())).sum()
        return self.config.admit_reinforce * term

    def run_window(self, idx, rows, kv=None, targets=None, scores=False):
        """One window, idx (B, T) with T <= W, on the carried rows (and their kv, or None): its
        logits (B, T, V), or with targets each stream's sum of its tokens' losses (B,); the rows
        and kv after it, folded if it is full (a window not yet full is read again by the next
        call); with admit_reinforce, in training, the fold's log-probability (B,), else None;
        and if scores, the keep scores of its tokens (B, L, T) as the fold will see them, else
        None."""
        window = self.open_window(rows, idx.size(1), kv)
        logits = self.lm_head(self.step(idx, window))  # (B, T, V)
        if targets is not None:
            logits = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=-1, reduction="none").view(targets.shape).sum(1)
        keep = self.token_keep_scores(window) if scores else None
        if window.n < self.config.window:
            return logits, rows, kv, None, keep
        rows, kv = self.fold(window)
        return logits, rows, kv, sum(window.logp) if window.logp else None, keep

    def token_keep_scores(self, window):
        """(B, L, T): each layer's keep score of the window's T tokens, read as the fold reads
        it when they are pushed out (of the row itself, or with keep_context one layer up). With
        keep_head_only their gradient too stops at the keep heads."""
        L, up = self.config.n_layer, self.config.keep_context
        window.settle()
        return torch.stack([block.keep_score(window.inputs[min(l + 1, L - 1) if up else l],
                                             self.config.keep_head_only)
                            for l, block in enumerate(self.transformer.h)], dim=1)

    def keep_loss(self, scores, targets):
        """keep_supervise: a term worth exactly 0 whose gradient teaches the keep scores (B, L,
        N) to pick the tokens targets (B, N) marks 1 and no other (0; -1: neither), each layer
        alike: binary cross-entropy, the marked tokens and the others weighing half each, so
        that a few marked tokens among many count; of the others, only the keep_hard share that
        each layer scores highest. The printed loss stays the model's own."""
        targets = targets[:, None, :].expand_as(scores)
        side = targets.clamp(min=0).float()  # 1: marked, 0: not
        bce = F.binary_cross_entropy_with_logits(  # with keep_margin: s - m marked, s + m not
            scores.float() - self.config.keep_margin * (2 * side - 1), side, reduction="none")
        term = scores.new_zeros((), dtype=torch.float32)
        marked, others = targets == 1, targets == 0
        if marked.any():
            term = term + 0.5 * bce[marked].mean()
        n = int(others[:, 0].sum())  # the unmarked tokens, the same in every layer
        hard = max(1, round(self.config.keep_hard * n))
        if n and hard < n:  # per layer, the `hard` unmarked tokens scored highest
            ranked = scores.detach().masked_fill(~others, float("-inf")).transpose(0, 1)
            top = ranked.flatten(1).topk(hard, dim=1).indices  # (L, hard)
            term = term + 0.5 * bce.transpose(0, 1).flatten(1).gather(1, top).mean()
        elif n:
            term = term + 0.5 * bce[others].mean()
        term = self.config.keep_supervise * term
        return term - term.detach()

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, state=None,
                 on_token=None):
        """Continue idx (B, P) by max_new_tokens tokens, calling on_token(tok) with each (B, 1)
        as it is made; temperature <= 0 picks the likeliest. Returns idx with the new tokens
        (B, P + new) and the State after them, to go on from. Sampling runs in eval mode (the
        memory admits by its threshold, not by training's random draws); the mode is restored."""
        with torch.inference_mode():  # no autograd bookkeeping at all (docs/performance.md)
            out, state = self._generate(idx, max_new_tokens, temperature, top_k, state, on_token)
        # copies made outside inference mode, which a training step may read on from
        return out.clone(), State(*(None if t is None else t.clone()
                                    for t in (state.rows, state.pending, state.kv)))

    def _generate(self, idx, max_new_tokens, temperature, top_k, state, on_token):
        """generate's work, in inference mode: its tensors are for reading, not training on."""
        W, P = self.config.window, idx.size(1)
        state = self.initial_state(idx.size(0)) if state is None else state
        idx = torch.cat([state.pending, idx], dim=1)  # the unfinished window goes on
        r = state.pending.size(1)
        if r + P < 1:
            raise ValueError("generate needs at least one token to start from")
        training = self.training
        self.eval()
        rows, kv, last = state.rows, state.kv, (r + P - 1) // W * W  # keep >= 1 token to go on
        for t in range(0, last, W):  # fold the whole windows of the prompt
            window = self.open_window(rows, W, kv)
            self.step(idx[:, t:t + W], window)
            rows, kv = self.fold(window)
        window = self.open_window(rows, W, kv)
        x = self.step(idx[:, last:], window)  # the rest of the prompt fills the KV cache
        out = torch.cat([idx, idx.new_empty(idx.size(0), max_new_tokens)], dim=1)
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
            out[:, r + P + i] = tok[:, 0]
            if on_token is not None:
                on_token(tok)
            if window.n == W:  # the window is full: fold it; the new token opens the next
                (rows, kv), last = self.fold(window), last + W
                window = self.open_window(rows, W, kv)
            if i < max_new_tokens - 1:
                x = self.step_one(tok, window)  # one row through every layer, into the room
        self.train(training)
        return out[:, r:], State(rows, out[:, last:], kv)
