"""
Tests of FoldGPT and of the scripts around it, on tiny models. The model's invariants:
1. causality: changing token t never changes a logit before t, within or across windows;
2. streaming: one call over many windows, one call per window carrying the state, and token by
   token through the KV cache of sampling give the same logits;
3. the state's shape is fixed by the config, however many windows went in;
4. n_state = 0 gives independent windows (a plain windowed GPT);
5. a step's gradients reach its first window and none cross into the step before;
6. a state carried through thousands of windows stays finite.

    python -m pytest -q test_foldgpt.py
"""

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch

import prepare_data
import train
from configurator import configure
from foldgpt import FoldGPT, FoldGPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
# tiktoken's cache of the gpt2 BPE: where TIKTOKEN_CACHE_DIR points, else the project's shared/.
SHARED_CACHE = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(HERE, "..", "shared",
                                                                    "tiktoken_cache")
TINY = dict(vocab_size=32, window=4, n_state=8, n_layer=2, n_head=2, n_embd=16)


def tiny(**changes):
    torch.manual_seed(0)
    return FoldGPT(FoldGPTConfig(**{**TINY, **changes})).eval()


def tokens(n, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=generator)


def logits_token_by_token(model, idx):
    """The sampling path: one token at a time through the window's KV cache, folding when full."""
    W = model.config.window
    window, out = model.open_window(model.initial_state(idx.size(0)), W), []
    for t in range(idx.size(1)):
        if window.n == W:
            window = model.open_window(model.fold(window), W)
        out.append(model.lm_head(model.step(idx[:, t:t + 1], window)))
    return torch.cat(out, dim=1)


# ---- the invariants ------------------------------------------------------------------------

@pytest.mark.parametrize("n_state", [8, 0])
@pytest.mark.parametrize("t", [0, 2, 3, 4, 6, 9, 12, 13])
def test_causality_within_and_across_windows(n_state, t):
    model = tiny(n_state=n_state)
    idx = tokens(14)  # 3 full windows of 4, then a partial window of 2
    before, _, _ = model.forward_stream(idx)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY["vocab_size"]
    after, _, _ = model.forward_stream(changed)
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, t], after[:, t], atol=1e-4)  # token t itself does count


@torch.no_grad()
def test_streaming_equivalence_one_call_windows_and_tokens():
    model = tiny()
    idx = tokens(22)  # 5 full windows and a partial one
    whole, _, state_whole = model.forward_stream(idx)
    state, per_window = None, []
    for t in range(0, idx.size(1), model.config.window):
        logits, _, state = model(idx[:, t:t + model.config.window], state)
        per_window.append(logits)
    assert torch.allclose(whole, torch.cat(per_window, dim=1), atol=1e-5)
    assert torch.allclose(state_whole, state, atol=1e-5)
    assert torch.allclose(whole, logits_token_by_token(model, idx), atol=1e-5)


@torch.no_grad()
def test_generate_agrees_with_forward_stream():
    model = tiny()
    prompt = tokens(6)
    seen = []
    out, _ = model.generate(prompt, 13, temperature=0, on_token=seen.append)
    assert out.shape == (2, 19) and torch.equal(out[:, :6], prompt)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 6:])
    logits, _, _ = model.forward_stream(out)
    assert torch.equal(logits[:, 5:-1].argmax(dim=-1), out[:, 6:])  # greedy = argmax, each step


@torch.no_grad()
def test_generate_goes_on_from_its_state():
    model = tiny()
    W = model.config.window
    prompt = tokens(5)
    both, _ = model.generate(prompt, 17, temperature=0)
    first, state = model.generate(prompt, 6, temperature=0)
    tail = first[:, first.size(1) - ((first.size(1) - 1) % W + 1):]
    assert torch.equal(model.unfolded(first), tail)
    rest, _ = model.generate(tail, 11, temperature=0, state=state)
    assert torch.equal(torch.cat([first, rest[:, tail.size(1):]], dim=1), both)


@torch.no_grad()
def test_written_out_attention_equals_fast_path():
    model = tiny()
    idx = tokens(11)
    fast, _, _ = model.forward_stream(idx)
    for block in model.transformer.h:
        block.attn.fast = False
    slow, _, _ = model.forward_stream(idx)
    assert torch.allclose(fast, slow, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("n_tokens", [1, 4, 7, 40])
def test_state_shape_is_fixed_by_the_config(n_tokens):
    model = tiny()
    _, _, state = model.forward_stream(tokens(n_tokens, batch=3))
    c = model.config
    assert state.shape == (3, c.n_layer, c.n_state, c.n_embd)
    _, state = model.generate(tokens(3, batch=3), n_tokens, temperature=0)
    assert state.shape == (3, c.n_layer, c.n_state, c.n_embd)


@torch.no_grad()
def test_no_state_gives_independent_windows():
    idx = tokens(12)
    other_past = idx.clone()
    other_past[:, :8] = tokens(8, seed=2)
    plain = tiny(n_state=0)
    whole, _, _ = plain.forward_stream(idx)
    alone, _, _ = plain(idx[:, 8:])
    assert torch.allclose(whole[:, 8:], alone, atol=1e-6)
    assert torch.allclose(whole[:, 8:], plain.forward_stream(other_past)[0][:, 8:], atol=1e-6)
    folded = tiny()  # with a state, the same change of the past does reach the third window
    assert not torch.allclose(folded.forward_stream(idx)[0][:, 8:],
                              folded.forward_stream(other_past)[0][:, 8:], atol=1e-4)


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
    assert state.grad_fn is None and not state.requires_grad
    first_window = embedded[0]
    assert first_window.grad is not None and first_window.grad.abs().sum() > 0
    grad_after_step_1 = first_window.grad.clone()
    train.train_step(model, optimizer, tokens(12, seed=4), tokens(12, seed=5), state, cfg)
    assert len(embedded) == 6 and embedded[3].grad.abs().sum() > 0  # step 2 did backpropagate
    assert torch.equal(first_window.grad, grad_after_step_1)  # ... and not into step 1


@torch.no_grad()
def test_state_carried_through_2000_windows_stays_finite():
    model = tiny()
    idx = tokens(2000 * model.config.window, batch=1)
    state = None
    for t in range(0, idx.size(1), model.config.window):
        logits, _, state = model(idx[:, t:t + model.config.window], state)
    assert torch.isfinite(state).all() and torch.isfinite(logits).all()
    assert state.shape == (1, 2, 8, 16)


# ---- data ----------------------------------------------------------------------------------

def read_bins(folder):
    return np.concatenate([np.fromfile(os.path.join(folder, s), dtype=np.uint16)
                           for s in ("train.bin", "val.bin")])


def test_byte_round_trip(tmp_path):
    text = "Plain ASCII,\nthen é, ß, 漢字 and 💡 — with\ttabs and a last line\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("second document", encoding="utf-8")
    out = prepare_data.prepare(prepare_data.PrepareConfig(
        input=str(tmp_path / "in"), out_dir=str(tmp_path / "data"), val_fraction=0.2))
    ids = read_bins(out).tolist()
    assert ids.count(256) == 2 and ids[-1] == 256  # each document ends with <|endoftext|>
    docs = bytes(ids[:ids.index(256)]), bytes(ids[ids.index(256) + 1:-1])
    assert docs[0].decode("utf-8") == text and docs[1] == b"second document"
    enc = prepare_data.get_tokenizer("byte")
    assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.skipif(not os.path.isdir(SHARED_CACHE), reason="no tiktoken cache beside the repo")
def test_gpt2_tokenizer_works_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(SHARED_CACHE))
    enc = prepare_data.get_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995] and enc.n_vocab == 50257
    (tmp_path / "t.txt").write_text("Hello world", encoding="utf-8")
    prepare_data.prepare(prepare_data.PrepareConfig(input=str(tmp_path / "t.txt"),
                                                    tokenizer="gpt2", out_dir=str(tmp_path),
                                                    val_fraction=0.0))
    assert read_bins(tmp_path).tolist() == [15496, 995, 50256]


def test_passkey_corpus_asks_for_keys_stated_earlier_at_many_distances():
    docs = prepare_data.passkey_corpus(size=200_000, max_gap=2048, seed=7)
    assert docs == prepare_data.passkey_corpus(size=200_000, max_gap=2048, seed=7)
    assert docs != prepare_data.passkey_corpus(size=200_000, max_gap=2048, seed=8)
    distances = []
    for doc in docs:
        stated = [(m.end(), m.group(1)) for m in re.finditer(r"The pass key is (\d+)\. Rem", doc)]
        asked = [(m.start(), m.group(1)) for m in re.finditer(r"What is the pass key\? "
                                                               r"The pass key is (\d+)\.", doc)]
        assert len(stated) == len(asked) >= 1
        for (said_at, key), (asked_at, answer) in zip(stated, asked):
            assert answer == key and asked_at > said_at
            distances.append(asked_at - said_at)
    assert min(distances) < 32 * 2 and max(distances) > 32 * 32  # windows of 32 bytes


# ---- the scripts ---------------------------------------------------------------------------

TINY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--window=8", "--n_state=16",
            "--batch_size=4", "--bptt=2", "--eval_iters=2", "--log_interval=10",
            "--warmup_iters=10", "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on a small built-in corpus: (data dir, out dir, logged losses)."""
    root = tmp_path_factory.mktemp("run")
    data = prepare_data.prepare(prepare_data.PrepareConfig(size=60_000, max_gap=256,
                                                           out_dir=str(root / "data")))
    cfg = configure(train.TrainConfig(), TINY_RUN + [
        f"--data_dir={data}", f"--out_dir={root / 'out'}", "--max_iters=80",
        "--eval_interval=40"])
    return data, str(root / "out"), train.train(cfg)


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=HERE,
                          capture_output=True, text=True, timeout=120)


def test_training_loss_falls_and_the_checkpoint_loads(trained):
    _, out, log = trained
    assert log[-1][1] < log[0][1] - 1.0, log
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 80 and ckpt["meta"]["tokenizer"] == "byte"
    assert ckpt["train_state"].shape == (4, 2, 16, 32)


def test_sample_script_prints_a_continuation(trained):
    _, out, _ = trained
    result = run("sample.py", f"--out_dir={out}", "--prompt=The pass key is",
                 "--max_new_tokens=40", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The pass key is") and len(result.stdout) > 40


def test_train_defaults_are_the_model_defaults():
    model_defaults = FoldGPTConfig()
    for f in fields(FoldGPTConfig):
        if f.name != "vocab_size":
            assert getattr(train.TrainConfig(), f.name) == getattr(model_defaults, f.name)


def test_config_file_sets_values_and_refuses_code(tmp_path):
    good = tmp_path / "good.py"
    good.write_text('"""a preset"""\nmax_iters = 7\nlearning_rate = 1\nout_dir = "x"\n')
    cfg = configure(train.TrainConfig(), [str(good), "--max_iters=9"])
    assert (cfg.max_iters, cfg.learning_rate, cfg.out_dir) == (9, 1.0, "x")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    with pytest.raises(SystemExit) as e:
        configure(train.TrainConfig(), [str(bad)])
    assert e.value.code == 2


def files_under(*folders):
    """{path: bytes} of every file under the folders: to see that a failure damaged nothing."""
    return {os.path.join(root, f): open(os.path.join(root, f), "rb").read()
            for folder in folders for root, _, names in os.walk(folder) for f in names}


def copy_data(data, tmp, **meta_changes):
    """A copy of the data folder in tmp with some meta.json fields changed."""
    os.makedirs(tmp / "data")
    for name in ("train.bin", "val.bin"):
        (tmp / "data" / name).write_bytes(open(os.path.join(data, name), "rb").read())
    meta = json.load(open(os.path.join(data, "meta.json")))
    (tmp / "data" / "meta.json").write_text(json.dumps({**meta, **meta_changes}))
    return str(tmp / "data")


def new_file(path, text):
    path.write_text(text)
    return path


def truncated_checkpoint(out, tmp):
    whole = open(os.path.join(out, "ckpt.pt"), "rb").read()
    (tmp / "ckpt.pt").write_bytes(whole[:len(whole) // 2])
    return str(tmp)


# Each case: how to make its command line from (tmp folder, data, trained out), and what the one
# line on stderr must say. Every one must exit 2 with that line alone and damage no file.
BAD_INPUT = {
    "input missing": (lambda tmp, data, out: [
        "prepare_data.py", "--input=no/such.txt", f"--out_dir={tmp}"], "does not exist"),
    "input empty": (lambda tmp, data, out: [
        "prepare_data.py", f"--input={new_file(tmp / 'e.txt', '')}", f"--out_dir={tmp}"],
        "is empty"),
    "unknown tokenizer": (lambda tmp, data, out: [
        "prepare_data.py", "--tokenizer=sentencepiece", f"--out_dir={tmp}"],
        "unknown tokenizer 'sentencepiece'"),
    "unknown dataset": (lambda tmp, data, out: [
        "prepare_data.py", "--dataset=wiki", f"--out_dir={tmp}"], "unknown dataset 'wiki'"),
    "data missing": (lambda tmp, data, out: [
        "train.py", "--data_dir=no/such/dir", f"--out_dir={tmp}"], "python prepare_data.py"),
    "corpus too small": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--batch_size=100000", f"--out_dir={tmp}"],
        "too few for 100000 streams"),
    "meta vocab wrong": (lambda tmp, data, out: [
        "train.py", f"--data_dir={copy_data(data, tmp, vocab_size=100)}", f"--out_dir={tmp}"],
        "do not go together"),
    "meta tokenizer differs from the checkpoint's": (lambda tmp, data, out: [
        "train.py", *TINY_RUN, "--init_from=resume", "--max_iters=1000",
        f"--data_dir={copy_data(data, tmp, tokenizer='gpt2', vocab_size=50257)}",
        f"--out_dir={out}"], "trained with another model or tokenizer"),
    "unknown key": (lambda tmp, data, out: [
        "train.py", "--bogus=1", f"--out_dir={tmp}"], "unknown option --bogus; valid options:"),
    "wrong type": (lambda tmp, data, out: [
        "train.py", "--max_iters=ten", f"--out_dir={tmp}"],
        "--max_iters wants a value of type int"),
    "n_embd not a multiple of n_head": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--n_head=3", f"--out_dir={tmp}"],
        "n_embd (128) must be n_head (3)"),
    "window < 1": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--window=0", f"--out_dir={tmp}"],
        "window must be >= 1"),
    "n_state < 0": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--n_state=-1", f"--out_dir={tmp}"],
        "n_state must be >= 0"),
    "resume without a checkpoint": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--init_from=resume", f"--out_dir={tmp}"],
        "no checkpoint at"),
    "resume with another model shape": (lambda tmp, data, out: [
        "train.py", *TINY_RUN, "--n_layer=3", f"--data_dir={data}", "--init_from=resume",
        "--max_iters=1000", f"--out_dir={out}"], "trained with another model or tokenizer"),
    "resume past max_iters": (lambda tmp, data, out: [
        "train.py", *TINY_RUN, f"--data_dir={data}", "--init_from=resume", "--max_iters=80",
        f"--out_dir={out}"], "give a larger --max_iters"),
    "truncated checkpoint": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={truncated_checkpoint(out, tmp)}"], "cannot load checkpoint"),
    "no checkpoint to sample": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={tmp}"], "python train.py"),
    "out_dir not writable": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}",
        f"--out_dir={new_file(tmp / 'f', 'a file') / 'sub'}"],
        "cannot write to out_dir"),
    "prompt file missing": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", "--prompt=FILE:no/such.txt"],
        "prompt file no/such.txt does not exist"),
    "negative max_new_tokens": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", "--max_new_tokens=-5"], "max_new_tokens must be >= 0"),
    "state file missing": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", "--state_in=no/such.state"], "does not exist"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_damages_nothing(trained, tmp_path, case):
    data, out, _ = trained
    make_args, says = BAD_INPUT[case]
    args = make_args(tmp_path, data, out)
    before = files_under(data, out, tmp_path)
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr
    assert files_under(data, out, tmp_path) == before


def test_sampling_options_out_of_range_are_fixed_and_said_once(trained):
    _, out, _ = trained
    result = run("sample.py", f"--out_dir={out}", "--prompt=", "--temperature=0",
                 "--top_k=100000", "--max_new_tokens=20")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("greedy") == 1 and result.stderr.count("all of them") == 1
    assert len(result.stdout) > 1  # an empty prompt starts from <|endoftext|>


def test_text_that_is_not_utf8(tmp_path, monkeypatch):
    raw = b"caf\xe9 latin-1 \xff\xfe bytes\n"
    (tmp_path / "latin.txt").write_bytes(raw)
    out = prepare_data.prepare(prepare_data.PrepareConfig(
        input=str(tmp_path / "latin.txt"), out_dir=str(tmp_path / "byte"), val_fraction=0.0))
    assert bytes(read_bins(out).tolist()[:-1]) == raw  # the byte tokenizer keeps every byte
    if os.path.isdir(SHARED_CACHE):
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(SHARED_CACHE))
        result = run("prepare_data.py", f"--input={tmp_path / 'latin.txt'}", "--tokenizer=gpt2",
                     f"--out_dir={tmp_path / 'gpt2'}")
        assert result.returncode == 0 and "not valid UTF-8" in result.stdout


# ---- never lose work, never run untrusted code ---------------------------------------------

LONG_RUN = TINY_RUN + ["--max_iters=200", "--eval_interval=10", "--eval_iters=1",
                       "--dropout=0.1"]  # dropout: the RNG states must come back too


def ckpt_tensors(out):
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    opt = [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    return ckpt["iter_num"], list(ckpt["model"].values()) + opt


@pytest.fixture(scope="module")
def straight(trained, tmp_path_factory):
    """The 200-step run done in one go, which a stopped and resumed run must match bit for bit."""
    data, _, _ = trained
    out = str(tmp_path_factory.mktemp("straight"))
    result = run("train.py", *LONG_RUN, f"--data_dir={data}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    return data, ckpt_tensors(out)


def stop_then_resume(data, out, sig):
    """Start the long run, send sig once the checkpoint of iter 20 is written, then resume."""
    proc = subprocess.Popen([sys.executable, "train.py", *LONG_RUN, f"--data_dir={data}",
                             f"--out_dir={out}"], cwd=HERE, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 20: val loss"):
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    stopped_at, _ = ckpt_tensors(out)
    assert 20 <= stopped_at < 200, "the run ended before it could be stopped"
    resumed = run("train.py", *LONG_RUN, f"--data_dir={data}", f"--out_dir={out}",
                  "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    return proc.returncode, rest


def test_resume_after_sigkill_is_bit_identical(straight, tmp_path):
    data, (iters, expected) = straight
    code, _ = stop_then_resume(data, str(tmp_path), signal.SIGKILL)
    assert code == -signal.SIGKILL
    got_iters, got = ckpt_tensors(str(tmp_path))
    assert got_iters == iters == 200 and len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_ctrl_c_saves_and_resume_is_bit_identical(straight, tmp_path):
    data, (_, expected) = straight
    code, printed = stop_then_resume(data, str(tmp_path), signal.SIGINT)
    assert code == 130 and "interrupted: saved iter" in printed
    _, got = ckpt_tensors(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


class Trap:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_and_state_files_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(dict(model=Trap(str(marker))), tmp_path / "ckpt.pt")
    result = run("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode == 2 and "cannot load checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def test_state_file_carries_generation_across_runs(trained, tmp_path):
    _, out, _ = trained
    state = str(tmp_path / "a.state")
    greedy = [f"--out_dir={out}", "--temperature=0", "--prompt=The pass key is"]
    whole = run("sample.py", *greedy, "--max_new_tokens=50")
    first = run("sample.py", *greedy, "--max_new_tokens=21", f"--state_out={state}")
    second = run("sample.py", f"--out_dir={out}", "--temperature=0", "--max_new_tokens=29",
                 f"--state_in={state}")
    assert whole.returncode == first.returncode == second.returncode == 0, second.stderr
    assert first.stdout[:-1] + second.stdout == whole.stdout
    saved = torch.load(state, weights_only=True)
    assert saved["state"].shape == (1, 2, 16, 32)  # fixed by the model, not by the text


def test_state_file_from_another_model_is_refused(trained, tmp_path):
    _, out, _ = trained
    state = str(tmp_path / "a.state")
    assert run("sample.py", f"--out_dir={out}", "--max_new_tokens=5",
               f"--state_out={state}").returncode == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ckpt["model"]["lm_head.weight"] += 0.01  # the same shape, other weights
    torch.save(ckpt, tmp_path / "ckpt.pt")
    result = run("sample.py", f"--out_dir={tmp_path}", f"--state_in={state}")
    assert result.returncode == 2 and "made by another model" in result.stderr


def test_a_loss_that_blows_up_stops_the_run_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    data, _, _ = trained
    result = run("train.py", *TINY_RUN, f"--data_dir={data}", f"--out_dir={tmp_path}",
                 "--learning_rate=1e12", "--warmup_iters=1", "--grad_clip=0",
                 "--weight_decay=0", "--max_iters=50", "--eval_interval=40")
    assert result.returncode == 1 and "keeps the last good checkpoint" in result.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 0  # saved before training began, not overwritten since
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_grad_ckpt_gives_the_same_gradients():
    grads = []
    for grad_ckpt in (False, True):
        model = tiny(dropout=0.1).train()
        torch.manual_seed(5)  # the same dropout masks: checkpoint replays the RNG state
        _, loss, _ = model.forward_stream(tokens(14), None, tokens(14, seed=3), grad_ckpt=grad_ckpt)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_crash_while_writing_a_checkpoint_leaves_the_old_one_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, dict(iter_num=1, weights=torch.ones(1000)))

    def crash(obj, f):  # write part of the file, then die as a killed process would
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, dict(iter_num=2, weights=torch.zeros(1000)))
    kept = torch.load(path, weights_only=True)
    assert kept["iter_num"] == 1 and torch.equal(kept["weights"], torch.ones(1000))


def test_bench_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency of bench.py
    import bench
    lat = {"FoldGPT": {256: 1.0, 16384: 1.0}, "kv cache": {256: 1.0, 16384: 9.0}}
    assert bench.save_plot(lat, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
