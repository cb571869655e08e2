"""The paper's repetitive time evolution: every window, Block l runs the carried rows of layer l
once more before the tokens read them (foldgpt.py, open_window), window by window, with the
recipe the project trained it with before carry_kv became the default (docs/retention.md,
sections 1-12). FoldGPTConfig's defaults are this model.

    python prepare_data.py && python train.py config/evolve.py
    python eval.py --out_dir=out-evolve --haystack=filler --wording=marked

About 11 minutes on 2 CPU cores (the default: about 5): val 0.1270, the key kept to 16 windows
in seed 1337 and to 256 in seed 7 (README, "The paper's evolution").
"""
out_dir = "out-evolve"
carry_kv = False  # the carried rows evolve, window by window
bptt = 4  # 16 streams x 4 windows: 2,048 tokens a step
batch_size = 16
# the memory learns from the loss and mem_cost alone, and lets its oldest row go
keep_supervise = 0.0
keep_hard = 1.0
keep_rank = 0.0
keep_head_only = False
keep_head_only_until = 0
fresh_every = 0  # streams begin only where the corpus's streams do
recall_every = 2  # after the warm-up, every 2nd step counts the recall targets alone
