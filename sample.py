"""
Sample from a trained FoldGPT, streaming tokens to stdout as they are made.

    python sample.py --prompt="The pass key is"
    python sample.py --prompt=FILE:notes.txt --max_new_tokens=2000 --temperature=0

A prompt longer than one window is folded into the state window by window, so a prompt of any
length costs the same memory; then each new token is one row through the KV cache of the window.
"""

import codecs
import os
import sys
from dataclasses import dataclass

import torch

from configurator import configure, fail
from prepare_data import get_tokenizer
from train import load_checkpoint, pick_device


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


def read_prompt(prompt):
    if not prompt.startswith("FILE:"):
        return prompt
    path = prompt[len("FILE:"):]
    if not os.path.isfile(path):
        fail(f"prompt file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def main(cfg):
    if cfg.max_new_tokens < 0:
        fail(f"max_new_tokens must be >= 0, got {cfg.max_new_tokens}")
    device = pick_device(cfg.device)
    ckpt, model = load_checkpoint(cfg.out_dir, device)
    model.eval()
    enc = get_tokenizer(ckpt["meta"]["tokenizer"])
    prompt = read_prompt(cfg.prompt)
    ids = enc.encode_ordinary(prompt) if prompt else [enc.eot_token]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, P)
    torch.manual_seed(cfg.seed)
    for k in range(cfg.num_samples):
        # Tokens are bytes that may end inside a UTF-8 character: decode them incrementally.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def show(tok):
            sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(tok.item())))
            sys.stdout.flush()

        sys.stdout.write(prompt)
        model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k or None, on_token=show)
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        if k < cfg.num_samples - 1:
            print("---------------")


if __name__ == "__main__":
    main(configure(SampleConfig(), sys.argv[1:]))
