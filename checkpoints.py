"""
Checkpoints and the machine: writing and reading checkpoint files safely, the random generators
a run must restore to go on exactly, the device, dtype and processes to run on. Shared by
train.py, sample.py, eval.py and bench.py.
"""

import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from configurator import fail
from foldgpt import FoldGPT, FoldGPTConfig
from prepare_data import TOKENIZER_VOCAB


def pick_device(name):
    """'auto': cuda, then mps, then cpu. A device asked for by name must be there: checked
    before anything is loaded onto it, so that a missing GPU is named as the cause."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        fail(f"--device={name} is not a device torch knows: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device={name}, but CUDA is not available on this machine: use --device=cpu "
             "or --device=auto")
    if kind == "cuda" and torch.device(name).index is not None and \
            torch.device(name).index >= torch.cuda.device_count():
        fail(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not torch.backends.mps.is_available():
        fail(f"--device={name}, but MPS is not available on this machine: use --device=cpu")
    return name


def rng_states():
    """Every random generator a run may draw from, in types torch.load(weights_only) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=(name, torch.from_numpy(keys.copy()), pos,
                                                 has_gauss, gauss),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states):
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, ckpt):
    """Write a temporary file in the same folder, flush it to disk, then rename it over the old
    one: a crash at any moment leaves either the old checkpoint or the new one, whole. A write
    that fails (a full disk, say) removes the temporary file and ends the run with exit code 1,
    in one line that says the previous file is intact."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        reason = (getattr(e, "strerror", None) or str(e).strip().splitlines()[0])[:120]
        kept = "the previous one is intact" if os.path.isfile(path) else "none was there before"
        print(f"error: cannot write {path} ({reason}); {kept}. Free some disk space or pick "
              "another folder", file=sys.stderr)
        sys.exit(1)


def read_file(path, what, device="cpu"):
    """torch.load with weights_only=True: tensors and plain data load, code in a pickle never
    runs. Anything unreadable is a one-line error."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load {what} {path}: it is truncated, damaged, or holds more than "
             f"tensors and plain data ({reason[:120]})")


def load_checkpoint(out_dir, device):
    """The checkpoint dict and its model, or a one-line error saying how to make one."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train one with python train.py --out_dir={out_dir}")
    if not os.path.isfile(path):
        fail(f"{path} is not a file: move it away, and train with python train.py")
    ckpt = read_file(path, "checkpoint", device)
    try:
        model = FoldGPT(FoldGPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        if ckpt["meta"]["tokenizer"] not in TOKENIZER_VOCAB:  # sample.py and eval.py need it
            raise ValueError(ckpt["meta"]["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        fail(f"checkpoint {path} does not hold a FoldGPT this code can build "
             f"({type(e).__name__}): train a new one")
    return ckpt, model.to(device)


def check_out_dir(out_dir):
    """Fail now, not after an hour of training, if checkpoints cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to out_dir {out_dir} ({e.strerror}): pick another --out_dir")


class Processes:
    """This process among those torchrun started (it sets RANK, WORLD_SIZE and LOCAL_RANK for
    each), or alone: a plain `python train.py` is rank 0 of 1. Picks the device, joins the
    process group (NCCL on GPUs, gloo on CPUs), and gathers and averages across processes."""

    def __init__(self, device):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.ddp, self.master = self.world > 1, self.rank == 0
        self.device = pick_device(device)
        if self.ddp:
            if self.device == "cuda":
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")
        self.device_type = "cuda" if self.device.startswith("cuda") else self.device

    def gather(self, tensor):
        """A tensor with every process's rows, in rank order (this process's own if alone)."""
        if not self.ddp:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def mean(self, value):
        """A float tensor's value, averaged over the processes."""
        total = value.detach().float().clone()
        if self.ddp:
            dist.all_reduce(total)
            total /= self.world
        return total.item()

    def rng_states(self):
        """Each process's own torch generators (dropout, admission), where there are several."""
        if not self.ddp:
            return None
        states = dict(torch=self.gather(torch.get_rng_state()[None].to(self.device)).cpu())
        if self.device_type == "cuda":
            states["cuda"] = self.gather(torch.cuda.get_rng_state()[None].to(self.device)).cpu()
        return states

    def close(self, barrier=False):
        if self.ddp:
            if barrier:  # every process done (rank 0 has written the checkpoint) before exit
                dist.barrier()
            dist.destroy_process_group()


def autocast_for(cfg, device_type):
    """The autocast context and, for float16, the GradScaler that keeps small gradients."""
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "float32" if device_type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if dtype == "float16" and device_type != "cuda":
        fail("dtype float16 needs CUDA: use --dtype=bfloat16 or float32 on this device")
    if dtype == "float32":
        return nullcontext(), None, dtype
    ctx = torch.autocast(device_type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    return ctx, scaler, dtype
