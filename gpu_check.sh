#!/usr/bin/env bash
# Train the paper_24gb preset for a few steps on one GPU, without and with grad_ckpt, and
# print peak memory (torch.cuda.max_memory_allocated), tokens/s and MFU: about 2 minutes.
# One micro-step of the preset (grad_accum=1) sets the peak memory and the speed; the preset's
# 4 micro-steps per step would take 4 times as long and need no more memory.
#
#   python prepare_data.py --input=path/to/text --tokenizer=gpt2 --out_dir=data/check_gpt2
#   bash gpu_check.sh data/check_gpt2 [--compile]
#
# Any text will do: the check measures speed and memory, not what the model learns.
set -euo pipefail
data=${1:?give a data folder made with --tokenizer=gpt2}
shift
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for ckpt in False True; do
    echo "== paper_24gb, grad_ckpt=$ckpt $*"
    python train.py config/paper_24gb.py --data_dir="$data" --out_dir=out-gpu-check \
        --grad_ckpt=$ckpt --grad_accum=1 --max_iters=6 --warmup_iters=2 --log_interval=2 \
        --eval_iters=1 --eval_interval=100000 "$@"
done
