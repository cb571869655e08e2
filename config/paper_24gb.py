"""GPT-2 small's shape (131M parameters, 7.1M of them token shift's) with the paper's 12-token
window, sized for one 24 GB GPU.

    python prepare_data.py --input=path/to/corpus/ --tokenizer=gpt2 --workers=8 --out_dir=data/corpus_gpt2
    python train.py config/paper_24gb.py --data_dir=data/corpus_gpt2
    torchrun --standalone --nproc_per_node=8 train.py config/paper_24gb.py --grad_accum=1 ...

The memory estimate train.py prints for it: 2.0 GB of weights, gradients and AdamW, plus
13.5 GB of activations without grad_ckpt (3.5 GB in all with it), so it fits 24 GB with
about a third to spare. Each optimizer step is 4 micro-steps x 16 streams x 32 windows of 12
tokens: 24,576 tokens.
"""
data_dir = "data/corpus_gpt2"
out_dir = "out-paper"
# the model: GPT-2 small's shape, FoldGPT's window and state
window = 12
n_state = 48
n_mem = 24
token_shift = 1  # keys read one row back (2, the small default, adds 14.2M parameters here)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
tie_embeddings = True  # untied would add 50,257 x 768 = 38.6M parameters
carry_kv = False  # the paper's repetitive time evolution (the memory estimate above is of it)
# the memory learns from the loss alone (a corpus of your own marks no keys)
keep_supervise = 0.0
keep_hard = 1.0
keep_rank = 0.0
keep_head_only = False
keep_head_only_until = 0
fresh_every = 0
# one optimizer step
batch_size = 16
bptt = 32
grad_accum = 4
grad_ckpt = False
# AdamW as nanoGPT trains GPT-2 small
max_iters = 50000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 1000
eval_iters = 50
log_interval = 50
dtype = "auto"
