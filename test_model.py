"""
The model's invariants, on tiny models, in seconds: `python -m pytest -q test_model.py`.
docs/design.md lists the same invariants, one to one, with the test that holds each.
The scripts around the model (data, training, sampling, resume, torchrun) are tested in
test_scripts.py; `python -m pytest -q` runs both.
"""

import os
import re

import pytest
import torch
from torch.nn import functional as F

import train
from foldgpt import FoldGPT, FoldGPTConfig, State, rotate

TINY = dict(vocab_size=32, window=4, n_state=8, n_mem=0, n_layer=2, n_head=2, n_embd=16)
MEMORY = dict(n_state=10, n_mem=6)  # 6 memory rows and 4 recent rows per layer
SHIFT3 = dict(token_shift=3, **MEMORY)  # keys read 3 rows back, across memory and windows
STAY = dict(n_state=12, n_mem=4)  # 4 memory rows and 8 recent rows: 4 stay through a window
KEPT = dict(carry_kv=True, **SHIFT3)  # rows carried with the keys and values they were made with
CONTEXT = dict(keep_context=True, **STAY)  # keep scores read from the rows one layer up
RANKED = dict(keep_rank=0.1, memory_heads=1, memory_layers=2, **CONTEXT)  # a full memory lets
#                   its lowest-ranked row go; memory heads in both layers, rows evolving
KEPT_CONTEXT = dict(carry_kv=True, keep_context=True, token_shift=3, **STAY)
ALL_MEMORY = dict(carry_kv=True, n_state=8, n_mem=8)  # no recent rows: runs window by window
SHARED = dict(keep_shared=True, keep_rank=0.1, keep_rank_eval=1e-4, memory_heads=1, keep_hidden=8,
              keep_row_grad=0.1, **KEPT_CONTEXT)  # the last layer picks for all, by an MLP keep
#                   head that shapes the rows a tenth as much; out of training the memory ranks
#                   by score alone; the first layer's first head reads the memory
AT_ONCE = dict(SHARED, admit_after=0)  # the memory chooses among a window's rows at its own
#                   fold: from the next window on they are in the memory, and recent too
CONFIGS = [dict(), MEMORY, SHIFT3, STAY, KEPT, dict(carry_kv=True, **STAY), CONTEXT, RANKED,
           KEPT_CONTEXT, ALL_MEMORY, SHARED, AT_ONCE, dict(STAY, admit_after=1)]
IDS = ["S8", "mem", "shift3", "mem+stay", "kept", "kept+stay", "context", "ranked",
       "kept+context", "kept, all memory", "shared", "admitted at once", "admitted after 1"]


def tiny(**changes):
    torch.manual_seed(0)
    model = FoldGPT(FoldGPTConfig(**{**TINY, **changes})).eval()
    for block in model.transformer.h:
        if hasattr(block, "evolve"):
            block.evolve.data.fill_(0.5)  # 0 at init: make the tests see the carried rows evolve
        if model.config.n_mem:
            block.keep.bias.data.fill_(0.05)  # about half the rows enter the memory
            if model.config.keep_hidden:  # an MLP head's scores begin close to its bias
                block.keep.weight.data.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(1))
    return model


def tokens(n, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=generator)


def random_state(model, batch=2, seed=4):
    """A carried state whose rows differ from stream to stream (and from the initial state)."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    return State(torch.randn(batch, c.n_layer, c.n_state, c.n_embd, generator=generator))


def logits_token_by_token(model, idx):
    """The sampling path: one token at a time into the window's room (step_one), folding when
    full."""
    W = model.config.window
    window, out = model.open_window(model.initial_state(idx.size(0)).rows, W), []
    for t in range(idx.size(1)):
        if window.n == W:
            rows, kv = model.fold(window)
            window = model.open_window(rows, W, kv)
        out.append(model.lm_head(model.step_one(idx[:, t:t + 1], window)))
    return torch.cat(out, dim=1)


# ---- causality and streaming -----------------------------------------------------------------

@pytest.mark.parametrize("config", [*CONFIGS, dict(n_state=0)], ids=[*IDS, "S0"])
@pytest.mark.parametrize("t", [0, 3, 4, 6, 9, 13])
def test_causality_within_and_across_windows(config, t):
    model = tiny(**config)
    idx = tokens(14)  # 3 full windows of 4, then a partial window of 2
    before, _, _ = model(idx)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY["vocab_size"]
    after, _, _ = model(changed)
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, t], after[:, t], atol=1e-4)  # token t itself does count


@torch.no_grad()
@pytest.mark.parametrize("config", [*CONFIGS, dict(n_state=0)], ids=[*IDS, "S0"])
def test_streaming_equivalence_one_call_windows_and_tokens(config):
    model = tiny(**config)
    idx = tokens(22)  # 5 full windows and a partial one
    whole, _, state_whole = model(idx)
    state, per_window = None, []
    for t in range(0, idx.size(1), model.config.window):
        logits, _, state = model(idx[:, t:t + model.config.window], state)
        per_window.append(logits)
    assert torch.allclose(whole, torch.cat(per_window, dim=1), atol=1e-5)
    assert torch.allclose(state_whole.rows, state.rows, atol=1e-5)
    c = model.config
    assert (state.kv is None) == (not (c.carry_kv or c.keep_context and c.n_mem) or not c.n_state)
    if state.kv is not None:
        assert torch.allclose(state_whole.kv, state.kv, atol=1e-5)
    assert torch.allclose(whole, logits_token_by_token(model, idx), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("config", [*CONFIGS, dict(n_state=0), dict(n_state=0, bias=True)],
                         ids=[*IDS, "S0", "S0 biases"])
def test_tokens_sampled_into_the_room_read_on_as_step_would_have_left_them(config):
    """step_one writes each token into room made once per window; step, the keep scores and
    the fold after it read the window as if step had run those tokens (Window.settle). With
    biases, ln_1 of a zero row is not zero: where no row came before a token (a stream's
    start, n_state 0), zeros must stand in after ln_1, as Block.norm has them."""
    model = tiny(**config)
    for name, p in model.named_parameters():
        if name.endswith("ln_1.bias"):
            p.normal_()
    idx = tokens(16)  # 4 windows of 4
    whole, _, end = model(idx)
    W, out, t = model.config.window, [], 0
    rows, kv = model.initial_state(2).rows, None
    # per window, how its tokens come, one at a time: 1 by step_one, or by step
    for ways in [["step", 1, 1, "step"], [1, 1, "step", "step"], [1, "step", 1, 1], [1] * 4]:
        window, whole_window = model.open_window(rows, W, kv), model.open_window(rows, W, kv)
        model.step(idx[:, t:t + W], whole_window)
        for way in ways:
            out.append(model.lm_head(model.step_one(idx[:, t:t + 1], window) if way == 1
                                     else model.step(idx[:, t:t + 1], window)))
            t += 1
        if model.config.n_mem:  # the keep scores of the tokens, as the fold will see them
            assert torch.allclose(model.token_keep_scores(window),
                                  model.token_keep_scores(whole_window), atol=1e-5)
        rows, kv = model.fold(window)
    assert torch.allclose(torch.cat(out, dim=1), whole, atol=1e-5)
    assert torch.allclose(rows, end.rows, atol=1e-5)
    assert (kv is None) == (end.kv is None)
    if kv is not None:
        assert torch.allclose(kv, end.kv, atol=1e-5)


def test_step_one_with_gradients_on_is_step_and_passes_them():
    model = tiny(**MEMORY)
    idx, W = tokens(2), model.config.window
    rows = model.initial_state(2).rows
    one, ref = model.open_window(rows, W), model.open_window(rows, W)
    out = torch.cat([model.step_one(idx[:, t:t + 1], one) for t in range(2)], dim=1)
    assert not one.room and out.requires_grad  # no room: nothing written in place
    assert torch.allclose(out, model.step(idx, ref), atol=1e-6)
    out.sum().backward()
    assert model.transformer.wte.weight.grad is not None and model.state0.grad is not None


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_stream_split_anywhere_gives_what_one_call_gives(config):
    model = tiny(**config)
    idx, targets = tokens(19), tokens(19, seed=3)
    whole, _, end = model(idx)
    _, loss_whole, _ = model(idx, None, targets)
    for split in range(1, 19):
        a, _, state = model(idx[:, :split])
        assert state.pending.size(1) == split % 4  # a window not yet full waits in the state
        b, _, after = model(idx[:, split:], state)
        assert torch.allclose(torch.cat([a, b], dim=1), whole, atol=1e-5), split
        assert torch.allclose(after.rows, end.rows, atol=1e-5)
        assert torch.equal(after.pending, end.pending)
    # the loss of the second part counts its own tokens only, as one call would
    _, loss_b, _ = model(idx[:, 7:], model(idx[:, :7])[2], targets[:, 7:])
    assert torch.allclose(loss_b, F.cross_entropy(whole[:, 7:].flatten(0, 1),
                                                  targets[:, 7:].flatten()), atol=1e-5)
    assert not torch.allclose(loss_b, loss_whole)


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_batch_row_is_its_own_stream(config):
    model = tiny(**config)
    idx, state = tokens(22, batch=3), random_state(model, batch=3)
    logits, _, after = model(idx, state)
    out, end = model.generate(idx[:, :6], 9, temperature=0, state=state)
    for b in range(3):
        alone, _, after_b = model(idx[b:b + 1], state.select(slice(b, b + 1)))
        assert torch.allclose(alone, logits[b:b + 1], atol=1e-5), b
        assert torch.allclose(after_b.rows, after.rows[b:b + 1], atol=1e-5)
        out_b, end_b = model.generate(idx[b:b + 1, :6], 9, temperature=0,
                                      state=state.select(slice(b, b + 1)))
        assert torch.equal(out_b, out[b:b + 1])
        assert torch.allclose(end_b.rows, end.rows[b:b + 1], atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_restarted_stream_reads_on_as_a_stream_that_begins_there(config):
    """restart (train.py's fresh_every): a picked stream reads on as if nothing came before,
    from the initial state; the others as if nothing had happened."""
    model = tiny(**config)
    idx = tokens(24, batch=3)
    _, _, state = model(idx[:, :12])  # carried, with State.kv where the design has one
    picked = torch.tensor([True, False, True])
    logits, _, after = model(idx[:, 12:], model.restart(state, picked))
    fresh, _, fresh_after = model(idx[:, 12:])
    on, _, on_after = model(idx[:, 12:], state)
    for b, restarted in enumerate(picked.tolist()):
        want, want_after = (fresh, fresh_after) if restarted else (on, on_after)
        assert torch.allclose(logits[b], want[b], atol=1e-5), b
        assert torch.allclose(after.rows[b], want_after.rows[b], atol=1e-5), b
    assert not torch.allclose(fresh[1], on[1], atol=1e-3)  # the two differ: the test can fail
    # a state just begun (kv None) restarts too: its kv is made as the stream's start makes it
    begun = model.restart(model.initial_state(3), picked)
    assert torch.allclose(model(idx, begun)[0], model(idx)[0], atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_written_out_attention_equals_fast_path(config):
    """The same sums and, where the memory's bias needs a gradient (it then rides in a key
    channel of its own, see attend), the same gradients."""
    results = []
    for fast in (True, False):
        model = tiny(**config)
        for block in model.transformer.h:
            block.attn.fast = fast
        with torch.no_grad():
            logits = model(tokens(11), random_state(model))[0]
        _, loss, _ = model(tokens(11), random_state(model), tokens(11, seed=3))
        loss.backward()
        results.append((logits, loss, [p.grad for p in model.parameters()]))
    (fast, fast_loss, fast_grads), (slow, slow_loss, slow_grads) = results
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(fast_loss, slow_loss, atol=1e-6)
    for g, h in zip(fast_grads, slow_grads):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, atol=1e-5))


@torch.no_grad()
def test_eval_mode_is_deterministic():
    model = tiny(dropout=0.2, **STAY)  # dropout and the memory's draws act in training only
    idx = tokens(30)
    first, _, state = model(idx)
    again, _, state_again = model(idx)
    assert torch.equal(first, again) and torch.equal(state.rows, state_again.rows)
    assert not torch.allclose(model.train()(idx)[0], first)


@torch.no_grad()
@pytest.mark.parametrize("config", [STAY, dict(carry_kv=True, **STAY)], ids=["", "kept"])
def test_bfloat16_autocast_stays_within_its_tolerance_of_float32(config):
    """bf16 keeps 8 bits of mantissa: on CPU the tiny model's logits stay within 0.05 of float32
    (its logits are about 1 in size) across windows, window by window and (carry_kv) layer by
    layer; a row turned to a place 4,000 rows down a stream (turn_to) within 0.02."""
    model = tiny(**config)
    attn, rows = model.transformer.h[0].attn, torch.rand(4000, 16)  # turned 4,000 places down
    exact = attn.turn_to(rows, torch.arange(4000))
    assert (attn.turn_to(rows.bfloat16(), torch.arange(4000)).float() - exact).abs().max() < 0.02
    idx = tokens(30)
    full, _, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _, state = model(idx)
    assert half.dtype == torch.bfloat16 and torch.isfinite(state.rows).all()
    assert (half.float() - full).abs().max() < 0.05, (half.float() - full).abs().max()


# ---- generate ----------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("config", [*CONFIGS, dict(n_state=0)], ids=[*IDS, "S0"])
@pytest.mark.parametrize("P", [1, 4, 5, 8])  # 1, W, W + 1 and 2W tokens of prompt
def test_generate_agrees_with_forward(config, P):
    model = tiny(**config)
    prompt = tokens(P)
    seen = []
    out, _ = model.generate(prompt, 13, temperature=0, on_token=seen.append)
    assert out.shape == (2, P + 13) and torch.equal(out[:, :P], prompt)
    assert torch.equal(model.generate(prompt, 13, temperature=-1.0)[0], out)  # <= 0: greedy
    assert torch.equal(torch.cat(seen, dim=1), out[:, P:])
    logits, _, _ = model(out)
    assert torch.equal(logits[:, P - 1:-1].argmax(dim=-1), out[:, P:])  # greedy = argmax


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_generate_goes_on_from_its_state(config):
    model = tiny(**config)
    prompt = tokens(5)
    both, _ = model.generate(prompt, 17, temperature=0)
    first, state = model.generate(prompt, 6, temperature=0)
    assert 1 <= state.pending.size(1) <= 4 and torch.equal(
        state.pending, first[:, first.size(1) - state.pending.size(1):])
    rest, _ = model.generate(prompt[:, :0], 11, temperature=0, state=state)
    assert torch.equal(torch.cat([first, rest], dim=1), both)
    r = state.pending.size(1)  # a prompt as long as the pending tokens goes on from them too
    assert model.generate(both[:, 11:11 + r], 1, temperature=0, state=state)[0].shape == (2, r + 1)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(prompt[:, :0], 3)  # nothing to go on from
    logits, _, _ = model(both[:, 11:], model(both[:, :11])[2])  # forward goes on from it too
    assert torch.equal(logits[:, :-1].argmax(dim=-1), both[:, 12:])


@torch.no_grad()
@pytest.mark.parametrize("temperature, top_k", [(0.7, None), (0.7, 5), (None, None)],
                         ids=["T0.7", "T0.7-top5", "default"])  # the default temperature is 1
def test_sampling_draws_from_the_distribution_forward_gives(monkeypatch, temperature, top_k):
    model = tiny(**STAY)
    drawn_from = []
    multinomial = torch.multinomial

    def record(probs, num_samples):
        drawn_from.append(probs.clone())
        return multinomial(probs, num_samples)

    monkeypatch.setattr(torch, "multinomial", record)
    torch.manual_seed(3)
    chosen = {} if temperature is None else dict(temperature=temperature)
    out, _ = model.generate(tokens(3), 11, top_k=top_k, **chosen)  # crosses 3 windows
    logits, _, _ = model(out)
    assert len(drawn_from) == 11
    for i, probs in enumerate(drawn_from):
        want = logits[:, 2 + i] / (temperature or 1.0)
        if top_k is not None:
            kth = want.topk(top_k).values[:, -1:]
            want = want.masked_fill(want < kth, float("-inf"))
            assert ((probs > 0).sum(dim=-1) == top_k).all()
        assert torch.allclose(probs, F.softmax(want, dim=-1), atol=1e-5), i


def test_generate_samples_in_eval_mode_and_gives_the_mode_back():
    model = tiny(**MEMORY).train()  # in training, rows would enter the memory at random
    prompt = tokens(9)
    outs = [model.generate(prompt, 12, temperature=0)[0] for _ in range(3)]
    assert model.training
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(outs[0], model.eval().generate(prompt, 12, temperature=0)[0])
    assert not model.training


@pytest.mark.parametrize("config", [STAY, KEPT], ids=["mem+stay", "kept"])
def test_a_training_step_reads_on_from_what_generate_gives(config):
    """generate samples in inference mode, and hands back ordinary tensors: a training step
    reads on from its tokens and state, with gradients."""
    model = tiny(**config)
    out, state = model.generate(tokens(6), 7, temperature=0)
    assert not out.is_inference() and not state.rows.is_inference()
    _, loss, _ = model.train()(out[:, -4:], state, tokens(4, seed=3))
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


# ---- the state ---------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("n_tokens", [1, 4, 7, 40])
def test_state_shape_is_fixed_by_the_config(n_tokens):
    model = tiny()
    _, _, state = model(tokens(n_tokens, batch=3))
    c = model.config
    assert state.rows.shape == (3, c.n_layer, c.n_state, c.n_embd)
    assert state.pending.shape == (3, n_tokens % c.window)
    _, state = model.generate(tokens(3, batch=3), n_tokens, temperature=0)
    assert state.rows.shape == (3, c.n_layer, c.n_state, c.n_embd)


def test_carried_rows_evolve_by_the_gate_and_stay_as_written_at_0():
    model = tiny()  # W=4, S=8: after a window the state is [the 4 rows that stayed ; 4 tokens]
    state = random_state(model)
    stayed = state.rows[:, :, 4:]
    _, _, half = model(tokens(4), state)  # gate 0.5
    _, _, full = tiny(evolve_gate=False)(tokens(4), state)  # fully evolved
    assert not torch.allclose(half.rows[:, :, :4], stayed)
    assert torch.allclose(half.rows[:, :, :4], (stayed + full.rows[:, :, :4]) / 2, atol=1e-6)
    for block in model.transformer.h:
        block.evolve.data.zero_()
    _, _, after = model(tokens(4), state)
    assert torch.equal(after.rows[:, :, :4], stayed)  # gate 0: as written
    # where no row stays through a whole window there is nothing to gate, and no parameter
    # that a step would leave without a gradient
    assert not any(hasattr(tiny(n_state=S).transformer.h[0], "evolve") for S in (2, 4))


@torch.no_grad()
def test_staying_rows_read_every_carried_row_before_them_and_none_after():
    model = tiny()  # S=8, W=4: carried rows 0-3 make way (lend), rows 4-7 stay and are evolved
    state = random_state(model)
    _, _, base = model(tokens(4), state)
    for j in range(8):
        changed = State(state.rows.clone())
        changed.rows[:, 0, j] = torch.randn(2, 16)  # one carried row of layer 0
        _, _, after = model(tokens(4), changed)
        for i in range(4):  # the staying row in slot 4 + i, evolved, is row i of the next state
            moved = not torch.allclose(after.rows[:, 0, i], base.rows[:, 0, i], atol=1e-6)
            assert moved == (j <= 4 + i), (j, i)


@torch.no_grad()
def test_token_shift_gives_each_row_the_k_rows_before_it():
    block = tiny(token_shift=3).transformer.h[0]
    x, prev = torch.randn(2, 5, 16), torch.randn(2, 2, 16)  # only 2 rows came before
    h, before = block.norm(x, prev)
    rows = block.ln_1(torch.cat([torch.zeros(2, 1, 16), prev, x], dim=1))  # (2, 8, 16)
    rows[:, 0] = 0  # nothing there: a zero row, not ln_1 of one
    assert torch.equal(h, rows[:, 3:]) and before.shape == (2, 5, 3 * 16)
    for t in range(5):
        assert torch.allclose(before[:, t], torch.cat([rows[:, t + 2], rows[:, t + 1],
                                                       rows[:, t]], dim=-1))  # nearest first


def test_no_state_gives_independent_windows():
    idx = tokens(12)
    other_past = idx.clone()
    other_past[:, :8] = tokens(8, seed=2)
    plain = tiny(n_state=0, n_mem=4)  # nothing carried: no memory either
    assert plain.config.n_mem == 0 and not hasattr(plain.transformer.h[0], "keep")
    whole, _, _ = plain(idx)
    alone, _, _ = plain(idx[:, 8:])
    assert torch.allclose(whole[:, 8:], alone, atol=1e-6)
    assert torch.allclose(whole[:, 8:], plain(other_past)[0][:, 8:], atol=1e-6)
    folded = tiny()  # with a state, the same change of the past does reach the third window
    assert not torch.allclose(folded(idx)[0][:, 8:],
                              folded(other_past)[0][:, 8:], atol=1e-4)


@torch.no_grad()
def test_state_carried_through_1000_windows_stays_finite():
    model = tiny(n_state=8, n_mem=4)  # 4 memory rows, 4 recent rows
    idx = tokens(1000 * model.config.window, batch=1)
    logits, _, state = model(idx)
    assert torch.isfinite(state.rows).all() and torch.isfinite(logits).all()
    assert state.rows.shape == (1, 2, 8, 16)


def test_any_n_state_works_with_the_defaults():
    for S in (0, 1, 16, 40, 96):
        config = FoldGPTConfig(n_state=S, n_layer=1)
        assert config.n_mem == S // 3
        model = FoldGPT(config)
        assert model(torch.zeros(1, 40, dtype=torch.long))[2].rows.shape == (1, 1, S, 128)
    with pytest.raises(ValueError, match="n_mem must be at most n_state"):
        FoldGPT(FoldGPTConfig(n_state=8, n_mem=9))


# ---- training ------------------------------------------------------------------------------

def test_the_loss_is_the_mean_over_the_targets_that_count():
    model = tiny(**STAY)
    idx, targets = tokens(14), tokens(14, seed=3)
    targets[:, ::3] = -1
    targets[0, :10] = -1  # most targets ignored, as on the steps that count recall targets only
    logits, _, _ = model(idx)
    _, loss, _ = model(idx, None, targets)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                ignore_index=-1), atol=1e-6)
    one = torch.full_like(targets, -1)
    one[1, 9] = 5  # a single target counts: the loss is its own
    assert torch.allclose(model(idx, None, one)[1], F.cross_entropy(logits[1, 9], one[1, 9]))
    assert model(idx, None, torch.full_like(targets, -1))[1] == 0  # none counts: 0, not nan


def test_gradients_reach_the_first_window_and_stop_at_the_step():
    model = tiny().train()
    cfg = train.TrainConfig(grad_clip=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # steps that change nothing
    embedded = []  # the token embeddings of each window, as they enter block 0

    def keep(module, inputs, out):
        out.retain_grad()
        embedded.append(out)

    model.transformer.wte.register_forward_hook(keep)
    x, y = tokens(12), tokens(12, seed=3)
    y[:, :8] = -1  # only the last window's loss: its gradient must reach back two windows
    _, state = train.train_step(model, optimizer, x, y, None, cfg)
    assert state.rows.grad_fn is None and not state.rows.requires_grad
    first_window = embedded[0]
    assert first_window.grad is not None and first_window.grad.abs().sum() > 0
    grad_after_step_1 = first_window.grad.clone()
    train.train_step(model, optimizer, tokens(12, seed=4), tokens(12, seed=5), state, cfg)
    assert len(embedded) == 6 and embedded[3].grad.abs().sum() > 0  # step 2 did backpropagate
    assert torch.equal(first_window.grad, grad_after_step_1)  # ... and not into step 1


@pytest.mark.parametrize("carried", [False, True], ids=["from state0", "carried state"])
def test_grad_ckpt_gives_the_same_gradients(carried):
    grads = []
    for grad_ckpt in (False, True):
        model = tiny(dropout=0.1, **STAY).train()
        state = random_state(model) if carried else None  # carried: detached, as in training
        torch.manual_seed(5)  # the same dropout masks and admissions: checkpoint replays the RNG
        _, loss, _ = model(tokens(14), state, tokens(14, seed=3), grad_ckpt=grad_ckpt)
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p is not model.state0 or not carried])
    assert all(a is not None for a in grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("config", [KEPT, dict(carry_kv=True, **STAY),
                                    dict(carry_kv=True, keep_rank=0.1, **STAY),
                                    dict(carry_kv=True, n_state=6, n_mem=4),  # R < W
                                    dict(carry_kv=True, n_state=8, n_mem=0),
                                    KEPT_CONTEXT,  # waves of 3 windows: R = 2W
                                    dict(KEPT_CONTEXT, keep_rank=0.1, n_state=10),  # of 2: R = 6
                                    dict(KEPT_CONTEXT, n_state=6, token_shift=2),  # of 1
                                    SHARED,  # joint waves of 3: the last layer picks for all
                                    dict(SHARED, n_state=10, n_layer=3),  # of 2, 3 layers
                                    dict(SHARED, keep_context=False),  # its own rows' scores
                                    AT_ONCE,  # waves of 1 window
                                    dict(SHARED, admit_after=1),  # of 2
                                    dict(carry_kv=True, admit_after=0, **STAY)],  # of all
                         ids=["kept", "kept+stay", "kept+ranked", "kept, R < W", "kept, no memory",
                              "kept+context", "kept+context+ranked", "kept+context, R < W",
                              "shared", "shared, 3 layers", "shared, no context",
                              "shared, admitted at once", "shared, admitted after 1",
                              "kept+stay, admitted at once"])
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["", "grad_ckpt"])
def test_with_carry_kv_layer_by_layer_trains_as_window_by_window_does(config, grad_ckpt):
    """carry_kv runs every window of a call at once, layer by layer (run_layers): in training,
    the same loss, gradients, keep scores and state as running the windows one by one."""
    results = []
    for by_layer in (True, False):
        model = tiny(keep_supervise=0.5 if config["n_mem"] else 0.0, **config).train()
        model.by_threshold = True  # the same admissions in both (training's are drawn)
        assert model.layer_by_layer()  # the config runs layer by layer, unless told not to
        if not by_layer:
            model.layer_by_layer = lambda: False
        state = random_state(model)
        marks = tokens(18, seed=6) < 4  # where the keep scores are taught to pick
        _, loss, after = model(tokens(18), state, tokens(18, seed=3), grad_ckpt=grad_ckpt,
                               keep_targets=marks)
        _, loss2, end = model(tokens(9, seed=7), after, tokens(9, seed=8), grad_ckpt=grad_ckpt)
        (loss + loss2).backward()
        results.append((loss, loss2, end.rows, end.kv, end.pending,
                        [p.grad for p in model.parameters()]))
    (a, a2, rows_a, kv_a, pending_a, grads_a), (b, b2, rows_b, kv_b, pending_b, grads_b) = results
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a2, b2, atol=1e-6)
    assert torch.allclose(rows_a, rows_b, atol=1e-5) and torch.allclose(kv_a, kv_b, atol=1e-5)
    assert torch.equal(pending_a, pending_b) and pending_a.size(1) == 3  # 27 tokens: 3 wait
    assert sum(g is not None and g.abs().sum() > 0 for g in grads_a) >= len(grads_a) - 1
    for g, h in zip(grads_a, grads_b):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, atol=1e-5))


def test_with_carry_kv_and_fewer_recent_rows_than_token_shift_forward_goes_window_by_window():
    """Window by window, a window's first tokens' token shift reads the last rows it carries,
    memory rows among them where fewer than token_shift are recent; layer by layer they would
    read the tokens before them in the stream. So there forward runs window by window, as
    sampling does (test_streaming_equivalence_one_call_windows_and_tokens, "kept, all memory")."""
    assert tiny(**KEPT).layer_by_layer()  # 4 recent rows, token shift 3
    assert not tiny(**ALL_MEMORY).layer_by_layer()  # no recent rows
    assert not tiny(**dict(KEPT, n_state=8)).layer_by_layer()  # 2 recent rows, token shift 3


# ---- the parts -------------------------------------------------------------------------------

def test_defaults_are_the_papers_model_and_the_quick_start_carries_keys_and_values():
    """FoldGPTConfig's defaults are the model of config/evolve.py, the paper's evolution, of
    1,099,656 parameters; config/cpu_quick.py, the README's default run, is the same model with
    carry_kv and the memory's training on: 1,099,652 (no evolution gates)."""
    from configurator import read_config_file
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    config = FoldGPTConfig()
    for name, value in read_config_file(os.path.join(here, "evolve.py")).items():
        if hasattr(config, name):
            assert getattr(config, name) == value, name
    assert (config.n_mem, config.vocab_size, config.carry_kv) == (32, 257, False)
    assert FoldGPT(config).num_params() == 1_099_656
    quick = read_config_file(os.path.join(here, "cpu_quick.py"))
    default = FoldGPTConfig(**{k: v for k, v in quick.items() if hasattr(config, k)})
    assert (default.n_mem, default.carry_kv, default.keep_rank) == (32, True, 0.1)
    assert FoldGPT(default).num_params() == 1_099_652


def test_config_check_refuses_sizes_that_cannot_work():
    for bad in (dict(window=0), dict(n_state=-1), dict(n_state=8, n_mem=9), dict(n_layer=0),
                dict(vocab_size=0), dict(n_embd=30), dict(n_embd=12, n_head=4),
                dict(dropout=1.0), dict(dropout=1.5), dict(dropout=-0.1),
                dict(admit_after=-2), dict(admit_after=3, **STAY)):  # R = 8: 2 windows at most
        with pytest.raises(ValueError):
            FoldGPTConfig(**{**TINY, **bad}).check()
    for good in (dict(window=1), dict(n_state=8, n_mem=8), dict(n_layer=1, n_head=1),
                 dict(dropout=0.99)):
        FoldGPT(FoldGPTConfig(**{**TINY, **good}))


def test_rotary_positions_are_roformers_and_scores_depend_on_distance_only():
    attn = tiny().transformer.h[0].attn  # head size 8: 4 channel pairs, 12 slots
    slot, pair = torch.arange(12.0)[:, None], torch.arange(4.0)[None, :]
    angle = slot * 10000.0 ** (-2 * pair / 8)
    assert torch.allclose(attn.cos, angle.cos()) and torch.allclose(attn.sin, angle.sin())
    q, k = torch.randn(8), torch.randn(8)

    def score(a, b):  # q at slot a reads k at slot b
        return (rotate(q, attn.cos[a], attn.sin[a]) * rotate(k, attn.cos[b], attn.sin[b])).sum()

    assert torch.allclose(score(5, 2), score(9, 6), atol=1e-5)  # distance 3 both times
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_initialisation_is_gpt2s():
    torch.manual_seed(0)
    model = FoldGPT(FoldGPTConfig(n_layer=8))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):  # residual projections: 0.02 / sqrt(2 L)
            assert abs(p.std().item() / (0.02 / 4) - 1) < 0.05, name
            assert abs(p.mean().item()) < 3 * 0.005 / p.numel() ** 0.5, name
        elif name.endswith("keep.bias"):
            assert torch.all(p == 2.0)  # keep_init: at first every row enters the memory
        elif name.endswith("evolve"):
            assert p.item() == 0.0  # the gate starts closed: carried rows as written
        elif p.dim() >= 2 or name == "state0":  # within 3 standard errors of N(0, 0.02)
            n = p.numel()
            assert abs(p.std().item() / 0.02 - 1) < max(0.05, 3 / n ** 0.5), name
            assert abs(p.mean().item()) < 3 * 0.02 / n ** 0.5, name
        else:
            assert torch.all(p == 1.0) or torch.all(p == 0.0), name  # LayerNorm gains, biases


# ---- the memory ----------------------------------------------------------------------------

@torch.no_grad()
def test_memory_rows_are_read_one_step_evolved_from_the_rows_as_they_entered():
    model = tiny(**MEMORY)
    rows = random_state(model).rows
    window = model.open_window(rows, 4)
    for l, block in enumerate(model.transformer.h):
        mem = rows[:, l, :6]
        read = mem + 0.5 * (block(mem)[0] - mem)  # gate 0.5
        assert torch.equal(window.mem[l], mem)  # kept as they entered
        assert torch.allclose(window.bias[l], F.logsigmoid(block.keep_score(read)), atol=1e-6)
        keys = block.attn.turn(block.attn.heads(block.attn.project(*block.norm(read))[1]), 0)
        assert torch.allclose(window.kv[l][0][:, :, :6], keys, atol=1e-5)  # the evolved rows'


@torch.no_grad()
def test_with_carry_kv_a_memory_row_keeps_the_keys_and_values_its_own_context_gave_it():
    model = tiny(**KEPT)  # S=10: 6 memory rows, 4 recent; token shift 3
    assert not any(hasattr(block, "evolve") for block in model.transformer.h)  # nothing evolves
    for block in model.transformer.h:
        block.keep.bias.data.fill_(50.0)  # every row pushed out enters the memory
    idx = tokens(8)
    window = model.open_window(model.initial_state(2).rows, 4)
    model.step(idx[:, :4], window)
    made = window.made  # per layer (B, 4, 2C): the first window's tokens' k|v, as made
    _, _, state = model(idx)  # two windows: the first window's tokens leave the recent rows
    reading = model.open_window(state.rows, 4, state.kv)  # the next window reads them so
    for l, block in enumerate(model.transformer.h):
        assert torch.allclose(state.kv[:, l, 2:6], made[l], atol=1e-6)  # the newest 4 of 6
        k = block.attn.turn(block.attn.heads(made[l][..., :16]), 2)  # turned to slots 2-5
        assert torch.allclose(reading.kv[l][0][:, :, 2:6], k, atol=1e-6)
        # the rows as written (the fold's batched run and step's may round apart, by 1e-9)
        assert torch.allclose(state.rows[:, l, 2:6], window.inputs[l], atol=1e-6)
        # Made again from the rows where they sit now, the keys would differ: token shift
        # would read the memory rows before them, not the tokens that came before them.
        again = block.attn.project(*block.norm(state.rows[:, l]))[1][:, 2:6]
        assert not torch.allclose(again, made[l][..., :16], atol=1e-3)


@torch.no_grad()
def test_with_keep_context_a_row_s_admission_depends_on_what_came_before_it():
    scores = {}
    for name, design in [("byte", MEMORY), ("context", dict(keep_context=True, **MEMORY))]:
        model = tiny(**design)
        for block in model.transformer.h:
            torch.nn.init.normal_(block.keep.weight, std=1.0)  # scores far from 0 either way
            block.keep.bias.zero_()
            torch.nn.init.normal_(block.attn.c_proj.weight, std=1.0)  # what a row reads counts
        recorded, admit = [], model.admit

        def recording(block, rows, logp=None):
            if block is model.transformer.h[0]:
                recorded.append(block.keep_score(rows))  # (B, G) of the rows pushed out
            return admit(block, rows, logp)

        model.admit = recording
        idx = tokens(12, batch=64)
        idx[1::2, 6:] = idx[::2, 6:]  # stream pairs: other tokens 0-5, the same 6-11
        model(idx)
        scores[name] = recorded[2][:, 2:]  # the third fold pushes out tokens 4-7: score 6, 7
    byte, context = (scores[n].view(32, 2, 2) for n in ("byte", "context"))  # pairs side by side
    assert torch.equal(byte[:, 0], byte[:, 1])  # the first layer's row is its token: by byte
    assert not torch.allclose(context[:, 0], context[:, 1], atol=1e-3)  # by what came before
    assert ((context[:, 0] > 0) != (context[:, 1] > 0)).any()  # the same token, in or out


@torch.no_grad()
def test_with_keep_shared_every_layer_lets_in_what_the_last_layer_picks():
    keeps = {}
    for shared in (False, True):
        model = tiny(**{**SHARED, "keep_shared": shared})
        model.layer_by_layer = lambda: False  # both window by window: the folds in turn
        assert model.config.layer_by_layer() and not model.layer_by_layer()
        recorded, remember = [], model.remember_ranked
        model.remember_ranked = lambda mem, pushed, keep, *rest: (
            recorded.append(keep), remember(mem, pushed, keep, *rest))[1]
        model(tokens(16, batch=8))  # 4 windows: 4 folds of 2 layers
        keeps[shared] = torch.stack(recorded).view(4, 2, 8, -1)  # (fold, layer, B, G)
    own, shared = keeps[False], keeps[True]
    assert torch.equal(shared[:, 0], shared[:, 1])  # every layer lets in the same rows ...
    assert torch.equal(shared[0, 0], own[0, 1])  # ... those the last layer's score picks
    assert not torch.equal(own[:, 0], own[:, 1])  # on its own, the first layer picks others


@torch.no_grad()
@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "written out"])
def test_memory_heads_read_only_the_memory_and_the_other_heads_never(fast):
    model = tiny(memory_heads=1, **KEPT)  # 2 heads of 8 channels; M = 6 memory rows of S = 10
    both = tiny(memory_heads=1, memory_layers=2, **KEPT)  # the second layer's heads split too
    M = 6
    x, bias = torch.randn(2, 4, 16), F.logsigmoid(torch.randn(2, M))
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)  # (B, nh, P, hs): 10 carried rows

    def heads(attn, **moved):  # each head's output, some of the carried values moved
        attn.fast = fast
        attn.c_proj.weight.copy_(torch.eye(16))  # the heads' outputs side by side, as they are
        moved_v = v.clone()
        for rows in moved.values():
            moved_v[:, :, rows] += 1.0
        y = attn(x, None, (k, moved_v), bias, 0)[0]  # (B, 4, 16), heads side by side
        return y.split(8, dim=-1)

    for attn in (model.transformer.h[0].attn, both.transformer.h[0].attn,
                 both.transformer.h[1].attn):
        still = heads(attn)
        memory, recent = heads(attn, memory=slice(0, M)), heads(attn, recent=slice(M, 10))
        assert torch.allclose(memory[0], still[0] + 1.0, atol=1e-5)  # head 0 reads only the
        assert torch.allclose(recent[0], still[0])  # memory: each of its weights on a memory row
        assert torch.allclose(memory[1], still[1])  # head 1 never reads the memory ...
        assert not torch.allclose(recent[1], still[1])  # ... but the recent rows (and tokens)
    unsplit = model.transformer.h[1].attn  # memory_layers=1: the first layer's only
    assert not torch.allclose(heads(unsplit, recent=slice(M, 10))[0], heads(unsplit)[0])
    with pytest.raises(ValueError, match="memory_layers"):
        FoldGPTConfig(**{**TINY, **KEPT, "memory_heads": 1, "memory_layers": 3}).check()
    with pytest.raises(ValueError, match="memory_heads"):
        FoldGPTConfig(**{**TINY, **KEPT, "memory_heads": 2}).check()  # one head must read the rest
    with pytest.raises(ValueError, match="memory_heads"):
        FoldGPTConfig(**{**TINY, "memory_heads": 1}).check()  # no memory rows to read


@torch.no_grad()
def test_with_keep_context_each_memory_row_carries_its_row_one_layer_up():
    model = tiny(**CONTEXT)  # S=12: 4 memory rows, 8 recent; 2 layers
    for block in model.transformer.h:
        block.keep.bias.fill_(50.0)  # every row pushed out enters the memory
    _, _, state = model(tokens(12))  # 3 windows: the rows of tokens 0-3 have left
    window = model.open_window(state.rows, 4, state.kv)
    model.step(tokens(4, seed=5), window)
    rows, context = model.fold(window)  # tokens 4-7 leave the recent rows, enter the memory
    assert context.shape == (2, 2, 4, 16)
    assert torch.equal(rows[:, 0], torch.cat([window.recent[0][:, :4], rows[:, 0, 4:]], 1))
    assert torch.equal(context[:, 0], window.recent[1][:, :4])  # the same rows one layer up
    assert torch.equal(context[:, 1], window.recent[1][:, :4])  # the last layer: its own
    reading = model.open_window(rows, 4, context)  # read as strongly as they scored to enter
    for l, block in enumerate(model.transformer.h):
        assert torch.equal(reading.bias[l], F.logsigmoid(block.keep_score(context[:, l])))
        assert torch.equal(model.keep_scores(rows, context)[l][:, :4],
                           block.keep_score(context[:, l]))


def test_memory_keeps_the_newest_rows_whose_keep_score_is_positive():
    mem = torch.arange(1.0, 4.0).view(1, 3, 1)  # rows 1, 2, 3, oldest first
    pushed = torch.arange(4.0, 8.0).view(1, 4, 1)  # rows 4 .. 7 leave the recent part
    admitted = torch.tensor([[False, True, False, True]])  # rows 5 and 7 enter, 4 and 6 not
    kept = FoldGPT.remember(mem, pushed, admitted)
    assert kept.view(-1).tolist() == [3.0, 5.0, 7.0]  # the newest 3 of 1, 2, 3, 5, 7, in order


def first_layer_scores_by_token(model, kept_tokens, amount=0.5, best=()):
    """Set the first layer so that a token's row scores > 0 exactly when it is in kept_tokens
    (there the rows are the token embeddings, so admission is by token); returns nothing.
    The tokens in best score C (n_embd), the most any row can; the others less, the more so
    the larger the amount of noise in their embeddings."""
    C = model.config.n_embd
    pattern = torch.tensor([1.0, -1.0]).repeat(C // 2)  # mean 0, std 1: unchanged by ln_1
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(model.config.vocab_size, C, generator=generator)
    noise -= noise.mean(dim=1, keepdim=True)
    noise -= (noise @ pattern)[:, None] * pattern / C  # orthogonal to pattern, mean 0
    sign = torch.tensor([1.0 if t in kept_tokens else -1.0 for t in range(noise.size(0))])
    scale = torch.tensor([0.0 if t in best else amount for t in range(noise.size(0))])
    with torch.no_grad():
        model.transformer.wte.weight.copy_(sign[:, None] * pattern + scale[:, None] * noise)
        block = model.transformer.h[0]
        block.keep.weight.copy_(pattern[None])
        block.keep.bias.zero_()


@torch.no_grad()
def test_the_memory_holds_the_last_admitted_rows_in_stream_order():
    model = tiny(**MEMORY)  # M = 6 memory rows, R = 4 recent rows, W = 4
    kept_tokens = {1, 3, 5, 8, 11, 14, 20, 27}
    first_layer_scores_by_token(model, kept_tokens)
    idx = tokens(64)  # 16 windows; the last 4 tokens are the recent rows, the rest pushed out
    _, _, state = model(idx)
    wte = model.transformer.wte.weight
    for b in range(2):
        admitted = [t for t in idx[b, :-4].tolist() if t in kept_tokens]
        assert len(admitted) >= 6
        assert torch.equal(state.rows[b, 0, :6], wte[admitted[-6:]])  # the newest, oldest first
        assert torch.equal(state.rows[b, 0, 6:], wte[idx[b, -4:]])  # the recent rows
    # no row scores > 0: nothing enters, the memory rows stay the initial state's
    model.transformer.h[0].keep.bias.fill_(-100.0)
    _, _, state = model(idx)
    assert torch.equal(state.rows[:, 0, :6], model.state0[0, :6].expand(2, -1, -1))


@torch.no_grad()
@pytest.mark.parametrize("after", [0, 1, 2])
def test_admit_after_lets_a_row_into_the_memory_that_many_windows_after_its_own(after):
    model = tiny(carry_kv=True, **STAY, admit_after=after)  # M = 4 memory rows, R = 8 recent
    #                                                        rows, W = 4, none evolved
    kept_tokens = {1, 3, 5, 8, 11, 14, 20, 27}
    first_layer_scores_by_token(model, kept_tokens)
    idx = tokens(64)  # 16 windows, the memory chooses among all but the last `after` of them
    _, _, state = model(idx)
    wte, chosen = model.transformer.wte.weight, idx[:, :64 - 4 * after]
    for b in range(2):
        admitted = [t for t in chosen[b].tolist() if t in kept_tokens]
        assert len(admitted) >= 4 and set(admitted[-4:]) != set(admitted[-5:-1])
        assert torch.equal(state.rows[b, 0, :4], wte[admitted[-4:]])  # the newest, oldest first
        assert torch.equal(state.rows[b, 0, 4:], wte[idx[b, -8:]])  # the recent rows


def test_a_ranked_memory_lets_its_lowest_ranked_row_go_and_is_the_fifo_when_newness_rules():
    mem = torch.arange(1.0, 4.0).view(1, 3, 1)  # rows 1, 2, 3, oldest first
    pushed = torch.arange(4.0, 8.0).view(1, 4, 1)  # rows 4 .. 7 leave the recent part
    admitted = torch.tensor([[False, True, False, True]])  # rows 5 and 7 enter, 4 and 6 not
    score = torch.tensor([[9.0, 1.0, 2.0, 8.0, 3.0, 9.5, 1.5]])  # of rows 1 .. 7
    kept = FoldGPT.remember_ranked(mem, pushed, admitted, score, 0.1)
    assert kept.view(-1).tolist() == [1.0, 3.0, 5.0]  # ranks 9.0, 2.2, 3.4 beat 1.1 and 2.1
    kept = FoldGPT.remember_ranked(mem, pushed, admitted, score, 0.5)
    assert kept.view(-1).tolist() == [1.0, 5.0, 7.0]  # now 7 (1.5 + 3.0) beats 3 (2.0 + 1.0)
    generator = torch.Generator().manual_seed(3)
    mem, pushed = (torch.randn(4, n, 5, generator=generator) for n in (6, 9))
    admitted = torch.rand(4, 9, generator=generator) < 0.5
    score = 10 * torch.randn(4, 15, generator=generator)
    assert torch.equal(FoldGPT.remember_ranked(mem, pushed, admitted, score, 1e3),
                       FoldGPT.remember(mem, pushed, admitted))  # newness outweighs any score


@torch.no_grad()
def test_with_keep_rank_a_high_scored_row_outlasts_the_lesser_rows_let_in_after_it():
    kept_tokens = {1, 3, 5, 8, 11, 14, 20, 27, 30}
    idx = tokens(96)
    idx[idx == 30] = 2
    idx[:, 5] = 30  # the "key": scored highest, in the second window, once
    # (keep_rank, keep_rank_eval): the model runs in eval mode, where keep_rank_eval, if
    # given, ranks in keep_rank's place
    for trained, ranked in ((0.0, -1.0), (0.1, -1.0), (0.0, 0.1), (0.1, 0.0)):
        rank = trained if ranked < 0 else ranked
        model = tiny(keep_rank=trained, keep_rank_eval=ranked, **MEMORY)  # M = 6, R = 4, W = 4
        assert model.memory_rank() == rank and model.train().memory_rank() == trained
        model.eval()
        first_layer_scores_by_token(model, kept_tokens, amount=1.5, best={30})
        model.state0[0, :6] = -model.transformer.h[0].keep.weight  # scored lowest: first out
        _, _, state = model(idx)
        wte = model.transformer.wte.weight
        for b in range(2):
            admitted = [t for t in idx[b, 6:-4].tolist() if t in kept_tokens]
            assert len(admitted) >= 12  # twice the memory let in after the key
            held = (state.rows[b, 0, :6, None] == wte[None]).all(-1).nonzero()[:, 1].tolist()
            assert len(held) == 6 and set(held) <= kept_tokens  # admitted rows, nothing else
            assert (30 in held) == (rank > 0)  # the first-in-first-out memory lost it
            if rank == 0:
                assert held == admitted[-6:]  # the newest six


@torch.no_grad()
def test_rows_scored_out_still_enter_the_memory_now_and_then_in_training():
    model = tiny(**MEMORY)
    block, rows = model.transformer.h[0], torch.randn(4, 1000, 16)
    block.keep.weight.zero_()
    block.keep.bias.fill_(-1.0)  # every row scores -1: sigmoid(-1) = 0.27
    assert not model.eval().admit(block, rows).any()  # sampling and eval: score > 0 only
    torch.manual_seed(0)
    share = model.train().admit(block, rows).float().mean().item()
    assert 0.25 < share < 0.29, share  # training: each row with probability sigmoid(score)
    block.keep.bias.fill_(1.0)
    assert model.eval().admit(block, rows).all()  # scored > 0: every row enters


def test_reinforce_credits_each_window_s_draws_with_the_loss_of_the_windows_after_it():
    model = tiny(admit_reinforce=2.0, **MEMORY)
    score = torch.zeros(2, requires_grad=True)  # two streams' admissions, drawn "kept"
    logp = F.logsigmoid(score)
    # window 0's draws: stream 0 then lost 5 in window 1, stream 1 lost 1; by threshold both 3
    term = model.reinforce(torch.tensor([[1.0, 5.0], [1.0, 1.0]]), [logp, None],
                           torch.tensor([[1.0, 3.0], [1.0, 3.0]]))
    term.backward()
    assert term.item() == 0.0  # worth nothing: the loss printed is the loss
    # advantage +-2 against the threshold's 3, weight 2, d logsigmoid(0) = 0.5: the draw before
    # the higher loss gets less likely (descent takes a positive gradient's score down)
    assert torch.allclose(score.grad, torch.tensor([2.0, -2.0]))
    score.grad = None
    # a window's own loss, or a loss before it, is not its draws' doing: no gradient
    model.reinforce(torch.tensor([[5.0, 3.0], [1.0, 1.0]]), [None, F.logsigmoid(score)],
                    torch.ones(2, 2)).backward()
    assert score.grad is None or not score.grad.any()


def test_admit_reinforce_changes_the_gradient_of_training_only_never_the_loss():
    idx, targets = tokens(40), tokens(40, seed=3)
    results = {}
    for weight in (0.0, 1.0):
        model = tiny(admit_reinforce=weight, **MEMORY).train()
        torch.manual_seed(5)  # the same admissions drawn
        _, loss, state = model(idx, None, targets)
        loss.backward()
        results[weight] = (loss, state.rows, model.eval()(idx)[0],
                           {name: p.grad.clone() for name, p in model.named_parameters()})
    (loss0, rows0, eval0, grads0), (loss1, rows1, eval1, grads1) = results[0.0], results[1.0]
    assert torch.equal(loss0, loss1) and torch.equal(rows0, rows1) and torch.equal(eval0, eval1)
    for name, grad in grads0.items():  # the admissions' own gradient reaches the keep scores
        assert torch.equal(grad, grads1[name]) != (".keep." in name), name  # and nothing else
    # the baseline: the same windows admitting by threshold, as eval does, even in training
    model = tiny(admit_reinforce=1.0, **MEMORY).train()
    baseline = model.threshold_losses(idx, model.initial_state(2), targets)
    assert baseline.shape == (2, 10) and not model.by_threshold  # 40 tokens, windows of 4
    assert torch.allclose(baseline.sum() / targets.numel(), model.eval()(idx, None, targets)[1])


def test_keep_score_learns_from_how_strongly_the_memory_is_read():
    model = tiny(**MEMORY).train()
    _, loss, _ = model(tokens(24), None, tokens(24, seed=3))
    loss.backward()
    for block in model.transformer.h:
        assert block.keep.weight.grad.abs().sum() > 0 and block.evolve.grad != 0


@pytest.mark.parametrize("design", [MEMORY, CONTEXT], ids=["byte", "context"])
def test_keep_head_only_stops_the_read_s_gradient_at_the_keep_heads(design):
    idx, targets = tokens(24), tokens(24, seed=3)
    grads = {}
    for head_only in (False, True):
        model = tiny(keep_head_only=head_only, **design)  # eval mode: the same admissions
        _, loss, _ = model(idx, None, targets)
        loss.backward()
        grads[head_only] = loss, {name: p.grad.clone() for name, p in model.named_parameters()}
    (loss0, grads0), (loss1, grads1) = grads[False], grads[True]
    assert torch.equal(loss0, loss1)  # the same model, the same loss
    for name, grad in grads0.items():
        if ".keep." in name:  # the keep heads learn as before
            assert torch.allclose(grad, grads1[name], atol=1e-6) and grad.abs().sum() > 0, name
    assert not torch.allclose(grads0["transformer.wte.weight"], grads1["transformer.wte.weight"])


def test_keep_row_grad_scales_what_reaches_the_rows_and_nothing_else():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    seen = {}
    for share in (1.0, 0.25, 0.0):
        block = tiny(keep_hidden=8, keep_row_grad=share, **MEMORY).transformer.h[0]
        rows = x.clone().requires_grad_()
        score = block.keep_score(rows)
        (score * weight).sum().backward()
        heads = {n: p.grad.clone() for n, p in block.named_parameters() if n.startswith("keep")}
        seen[share] = score.detach(), heads, rows.grad, block.ln_1.weight.grad.clone()
    (score1, heads1, rows1, ln1) = seen[1.0]
    for share, (score, heads, rows, ln) in seen.items():
        assert torch.equal(score, score1)  # the same scores ...
        assert heads.keys() == heads1.keys() and len(heads) == 4  # keep_in's Linear and keep
        for name, grad in heads.items():  # ... the heads learn the same ...
            assert torch.allclose(grad, heads1[name], atol=1e-6) and grad.abs().sum() > 0, name
        # ... and the rows (and ln_1) get the share of what they got
        assert torch.allclose(rows, share * rows1, atol=1e-6)
        assert torch.allclose(ln, share * ln1, atol=1e-6)
    assert rows1.abs().sum() > 0


def test_keep_row_grad_0_trains_as_keep_head_only_does():
    idx, targets = tokens(24), tokens(24, seed=3)
    grads = []
    for change in (dict(keep_row_grad=0.0), dict(keep_head_only=True)):
        model = tiny(keep_supervise=1.0, **change, **CONTEXT)
        _, loss, _ = model(idx, None, targets, keep_targets=tokens(24, seed=5) % 2)
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_an_mlp_keep_head_picks_rows_that_no_linear_keep_head_can():
    """Keep rows x and -x, let y and -y go: ln_1 (no bias) turns -x into -ln_1(x), so a linear
    head scores x and -x to a sum of twice its bias, as it does y and -y, and cannot keep one
    pair and not the other. An MLP head learns to."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, generator=g), torch.randn(16, generator=g)
    rows, keep = torch.stack([x, -x, y, -y])[None], torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    for hidden in (0, 32):
        block = tiny(keep_hidden=hidden, **MEMORY).transformer.h[0]
        heads = [p for n, p in block.named_parameters() if n.startswith("keep")]
        optimizer = torch.optim.Adam(heads, lr=0.03)
        for _ in range(200):
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(block.keep_score(rows), keep).backward()
            optimizer.step()
        score = block.keep_score(rows).detach()[0]
        if hidden:
            assert ((score > 0) == keep[0].bool()).all(), score
        else:
            assert torch.allclose(score[0] + score[1], score[2] + score[3], atol=1e-4), score
            assert ((score > 0) != keep[0].bool()).any()


@torch.no_grad()
def test_keep_scores_weigh_how_strongly_the_memory_rows_are_read():
    model = tiny(token_shift=0, **MEMORY)  # no token shift: memory rows reach tokens by reading
    idx, state = tokens(4), random_state(model)
    other = State(state.rows.clone())
    other.rows[:, :, :6] = torch.randn(2, 2, 6, 16)  # other memory rows, the same recent rows
    for keep_bias, same in [(-60.0, True), (60.0, False)]:
        for block in model.transformer.h:
            block.keep.bias.fill_(keep_bias)
        a, b = (model(idx, s)[0] for s in (state, other))
        assert torch.allclose(a, b, atol=1e-5) == same  # -60: the memory is not read at all


@pytest.mark.parametrize("design", [MEMORY, CONTEXT], ids=["byte", "context"])
def test_mem_cost_lowers_the_keep_scores_of_the_carried_rows(design):
    x, y = tokens(16, batch=4), tokens(16, batch=4, seed=2)
    kept = []
    for mem_cost in (0.0, 10.0):
        model = tiny(**design).train()
        cfg = train.TrainConfig(mem_cost=mem_cost, learning_rate=0.1)
        optimizer = train.make_optimizer(model, cfg, "cpu")
        state = None
        for _ in range(10):
            _, state = train.train_step(model, optimizer, x, y, state, cfg)
        with torch.no_grad():
            kept.append(sum(torch.sigmoid(score).mean()
                            for score in model.keep_scores(state.rows, state.kv)).item())
    assert kept[1] < kept[0] - 0.2, kept


def test_a_softplus_keep_cost_keeps_pushing_a_high_score_down_where_sigmoid_fades():
    x, y = tokens(16, batch=4), tokens(16, batch=4, seed=2)
    fall = {}
    for keep_cost in ("sigmoid", "softplus"):
        model = tiny(**MEMORY).train()
        for block in model.transformer.h:
            block.keep.bias.data.fill_(8.0)  # every row kept, far above the threshold
        cfg = train.TrainConfig(mem_cost=1.0, keep_cost=keep_cost)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # steps as large as gradients
        state = None
        for _ in range(4):
            _, state = train.train_step(model, optimizer, x, y, state, cfg)
        fall[keep_cost] = 8.0 - model.transformer.h[0].keep.bias.item()
    # sigmoid's slope at 8 is 0.0003: the cost has all but stopped; softplus's is 1
    assert fall["sigmoid"] < 0.01 and fall["softplus"] > 0.5, fall


@pytest.mark.parametrize("design", [STAY, CONTEXT], ids=["byte", "context"])
@torch.no_grad()
def test_the_supervised_keep_scores_are_those_the_fold_admits_by(design):
    model = tiny(**design)  # 4 memory rows, 8 recent: a window's 4 tokens stay a window more
    for block in model.transformer.h:
        block.evolve.fill_(0.0)  # the recent rows stay as written
    _, _, state = model(tokens(8))
    window = model.open_window(state.rows, 4, state.kv)
    model.step(tokens(4, seed=5), window)
    supervised = model.token_keep_scores(window)  # (B, L, 4): what keep_supervise teaches
    rows, kv = model.fold(window)  # the window's tokens are now the newest 4 recent rows
    for l, scores in enumerate(model.keep_scores(rows, kv)):  # what admit will read
        assert torch.allclose(supervised[:, l], scores[:, -4:], atol=1e-6)


@pytest.mark.parametrize("design", [STAY, CONTEXT], ids=["byte", "context"])
def test_keep_supervise_moves_the_keep_scores_toward_the_marks_and_not_the_loss(design):
    idx, targets = tokens(16), tokens(16, seed=3)
    marked = torch.zeros(2, 16, dtype=torch.bool)
    marked[:, [5, 6, 9, 14]] = True  # the tokens the keep scores should pick
    model = tiny(keep_supervise=1.0, **design).train()
    grads, losses = [], []
    for keep_targets in (None, marked):
        model.zero_grad()
        torch.manual_seed(3)  # the same admissions in both
        _, loss, _ = model(idx, None, targets, keep_targets=keep_targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])  # the printed loss is the model's own
    teach = {name: grads[1][name] - grads[0][name] for name in grads[0]}  # the keep term's
    assert all(teach[f"transformer.h.{l}.keep.weight"].abs().sum() > 0 for l in range(2))

    def scores():  # each layer's keep scores of the 16 tokens, window by window
        rows, kv, out = None, None, []
        model.eval()  # admission by the threshold: the same rows before and after the step
        with torch.no_grad():
            for t in range(0, 16, 4):
                rows = model.initial_state(2).rows if rows is None else rows
                _, rows, kv, _, keep = model.run_window(idx[:, t:t + 4], rows, kv, None, True)
                out.append(keep)
        return torch.cat(out, dim=2)  # (B, L, 16)

    before = scores()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p -= 0.5 * teach[name]
    change = scores() - before
    # on average over each stream and layer, the marked tokens' scores rose, the others' fell
    assert (change[:, :, marked[0]].mean(2) > 0).all(), change
    assert (change[:, :, ~marked[0]].mean(2) < 0).all(), change


def test_keep_hard_teaches_only_the_unmarked_tokens_each_layer_scores_highest():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 10, requires_grad=True)  # (B, L, N)
    targets = torch.zeros(2, 10, dtype=torch.long)
    targets[:, 4] = 1  # one marked token per stream
    targets[:, 0] = -1  # one neither
    full = tiny(keep_supervise=1.0).keep_loss(scores, targets)
    assert full.item() == 0.0  # worth nothing: only its gradient teaches
    full.backward()
    assert (scores.grad[:, :, 1:] != 0).all() and (scores.grad[:, :, 0] == 0).all()
    scores.grad = None
    tiny(keep_supervise=1.0, keep_hard=0.25).keep_loss(scores, targets).backward()
    others = scores.detach().clone()
    others[:, :, [0, 4]] = float("-inf")
    for l in range(3):  # 16 unmarked tokens a layer: its 4 scored highest, and the marked
        top = others[:, l].flatten().topk(4).indices
        taught = torch.zeros(20, dtype=torch.bool)
        taught[top] = True
        taught = taught.view(2, 10)
        taught[:, 4] = True
        assert torch.equal(scores.grad[:, l] != 0, taught), l
        assert (scores.grad[:, l][taught & (targets == 0)] > 0).all()  # pushed down


def test_keep_margin_teaches_the_marked_scores_above_it_and_the_others_below_minus_it():
    scores = torch.tensor([[[1.0, -1.0, 0.0, 0.0]]], requires_grad=True)  # (B, L, N)
    targets = torch.tensor([[1, 0, 1, 0]])  # 1.0 marked and -1.0 not: either side of 0 already
    grads = []
    for margin in (0.0, 3.0):
        scores.grad = None
        tiny(keep_supervise=1.0, keep_margin=margin).keep_loss(scores, targets).backward()
        grads.append(scores.grad[0, 0].clone())
    # binary cross-entropy of s - m (marked) and s + m (not), each side weighing half
    for grad, m in zip(grads, (0.0, 3.0)):
        want = 0.5 * torch.tensor([torch.sigmoid(torch.tensor(1.0 - m)) - 1,
                                   torch.sigmoid(torch.tensor(-1.0 + m)),
                                   torch.sigmoid(torch.tensor(-m)) - 1,
                                   torch.sigmoid(torch.tensor(m))]) / 2
        assert torch.allclose(grad, want, atol=1e-6), (m, grad)
    # with the margin, a score on the right side of 0 but inside it is pushed 3 times harder
    assert grads[1][0] < 3 * grads[0][0] < 0 and grads[1][1] > 3 * grads[0][1] > 0
    with pytest.raises(ValueError, match="keep_margin"):
        FoldGPTConfig(keep_margin=-1.0).check()

# ---- the design document -------------------------------------------------------------------

def test_design_lists_every_model_test():
    here = os.path.dirname(os.path.abspath(__file__))
    listed = re.findall(r"^\| .* \| `(test_\w+)` \|$",
                        open(os.path.join(here, "docs", "design.md")).read(), re.M)
    tests = re.findall(r"^def (test_\w+)", open(os.path.abspath(__file__)).read(), re.M)
    assert listed == tests
