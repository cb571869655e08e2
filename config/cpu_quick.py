"""The CPU quick start: what `python train.py` does with no arguments, written out as a preset
to copy and change. About 5 minutes on 2 CPU cores on the built-in corpus.

    python prepare_data.py && python train.py config/cpu_quick.py
"""
data_dir = "data/passkeys"
out_dir = "out"
window = 32
n_state = 96
n_mem = -1  # a third of n_state: 32 memory rows, 64 recent rows
mem_cost = 0.01
keep_init = 2.0
token_shift = 2
tie_embeddings = False
evolve_gate = True
carry_kv = True
keep_context = False
keep_head_only = True
keep_head_only_until = 400
keep_supervise = 1.0
keep_hard = 0.05
keep_rank = 0.1
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
batch_size = 4
bptt = 16
grad_accum = 1
grad_ckpt = False
fresh_every = 8
max_iters = 1200
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
recall_warmup = 300
recall_every = 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
log_interval = 25
dtype = "auto"
