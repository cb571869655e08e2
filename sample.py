"""
Sample from a trained FoldGPT, streaming tokens to stdout as they are made.

    python sample.py --prompt="The pass key is"
    python sample.py --prompt=FILE:notes.txt --max_new_tokens=2000 --temperature=0
    python sample.py --prompt=FILE:book.txt --state_out=book.state   # read once, keep the state
    python sample.py --state_in=book.state --prompt="Who wrote it?"  # go on from it later

A prompt longer than one window is folded into the state window by window, so a prompt of any
length costs the same memory; then each new token is one row through the KV cache of the window.
A state file holds the folded state and the tokens of the unfinished window: its size is fixed
by the model, however much text went into it.
"""

import codecs
import hashlib
import os
import sys
from dataclasses import dataclass

import torch

from configurator import configure, fail
from prepare_data import get_tokenizer
from checkpoints import load_checkpoint, pick_device, read_file, save_checkpoint
from foldgpt import State


@dataclass
class SampleConfig:
    out_dir: str = "out"  # where train.py wrote ckpt.pt
    prompt: str = ""  # text to continue, or FILE:path; empty starts from <|endoftext|>
    num_samples: int = 1  # samples, one after another
    max_new_tokens: int = 300  # tokens to generate per sample
    temperature: float = 0.8  # < 1 sharpens, > 1 flattens; 0 picks the likeliest token
    top_k: int = 200  # sample among the k likeliest tokens; 0 for all of them
    seed: int = 1337
    device: str = "auto"  # 'auto' picks cuda, then mps, then cpu
    state_in: str = ""  # a state file from --state_out: go on from where it ended
    state_out: str = ""  # save the state and the unfinished window here when done


def read_prompt(prompt):
    if not prompt.startswith("FILE:"):
        return prompt
    path = prompt[len("FILE:"):]
    if not os.path.isfile(path):
        fail(f"prompt file {path} " + ("is not a file" if os.path.exists(path) else
                                        "does not exist"))
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def fingerprint(model):
    """A hash of the weights: a state file is only meaningful to the model that made it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_state(path, model, device):
    """The State (rows and pending tokens) in a state file made by this very model."""
    if not os.path.isfile(path):
        fail(f"state file {path} " + ("is not a file" if os.path.exists(path) else
                                       f"does not exist: make one with --state_out={path}"))
    saved = read_file(path, "state file", device)
    if not isinstance(saved, dict) or saved.get("model") != fingerprint(model):
        fail(f"state file {path} was made by another model than the checkpoint in this out_dir: "
             "use it with the checkpoint that made it")
    if not {"rows", "pending"} <= saved.keys():
        fail(f"state file {path} is from an older FoldGPT: make it again with --state_out")
    return State(saved["rows"], saved["pending"], saved.get("kv"))


def main(cfg):
    if cfg.max_new_tokens < 0:
        fail(f"max_new_tokens must be >= 0, got {cfg.max_new_tokens}")
    if cfg.state_out and cfg.num_samples != 1:
        fail("--state_out keeps one continuation: use it with --num_samples=1")
    device = pick_device(cfg.device)
    ckpt, model = load_checkpoint(cfg.out_dir, device)
    model.eval()  # generate runs in eval mode anyway: the memory admits by its threshold
    enc = get_tokenizer(ckpt["meta"]["tokenizer"])
    if cfg.temperature <= 0:
        print("note: temperature <= 0, so each token is the likeliest one (greedy)",
              file=sys.stderr)
    if cfg.top_k > enc.n_vocab:
        print(f"note: top_k {cfg.top_k} is more than the {enc.n_vocab} tokens there are: "
              "sampling among all of them", file=sys.stderr)
    prompt = read_prompt(cfg.prompt)
    state, ids = None, enc.encode_ordinary(prompt)
    if cfg.state_in:
        state = read_state(cfg.state_in, model, device)  # its unfinished window goes on
    if not ids and (state is None or state.pending.size(1) == 0):
        ids = [enc.eot_token]  # nothing to go on from: start where a document starts
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, P)
    torch.manual_seed(cfg.seed)
    for k in range(cfg.num_samples):
        # Tokens are bytes that may end inside a UTF-8 character: decode them incrementally.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def show(tok):
            sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(tok.item())))
            sys.stdout.flush()

        sys.stdout.write(prompt)
        out, end_state = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                                        top_k=cfg.top_k or None, state=state, on_token=show)
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        if k < cfg.num_samples - 1:
            print("---------------")
    if cfg.state_out:
        kv = None if end_state.kv is None else end_state.kv.cpu()
        save_checkpoint(cfg.state_out, dict(rows=end_state.rows.cpu(), kv=kv,
                                            pending=end_state.pending.cpu(),
                                            model=fingerprint(model)))


if __name__ == "__main__":
    main(configure(SampleConfig(), sys.argv[1:]))
