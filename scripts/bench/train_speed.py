#!/usr/bin/env python3
"""Training speed side by side: attn vs PyTorch on the same encoder-decoder.

Both train the model a config describes (default configs/de-en-transformer.toml:
the 2017 Transformer, post-norm, ReLU, dropout 0.1, shared and tied embeddings,
label smoothing 0.1, AdamW, gradient clipping) for the same number of steps
on the same synthetic batch shape (ROWS sentences of SEQ source and SEQ
target tokens, no padding), on CPU with the same thread count, and report
tokens/s (source + target tokens per second). The two runs alternate, and
the median of REPEATS is reported.

    ~/.venvs/torch/bin/python scripts/bench/train_speed.py [--config C] [--rows 32] [--seq 24] [--steps 10] [--threads 2]

Needs torch (a virtualenv outside the repo, e.g. ~/.venvs/torch) and a
release build of attn (cargo build --release -p attn-cli).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def torch_run(cfg, rows, seq, steps, threads, warmup=2):
    import torch
    import torch.nn as nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = cfg["model"]
    t = cfg["train"]
    vocab = cfg["tokenizer"].get("vocab_size", 8000)
    d = m["d_model"]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.tf = nn.Transformer(d, m["n_heads"], m["n_encoder_layers"], m["n_decoder_layers"], m["d_ff"],
                                     m.get("dropout", 0.1), batch_first=True)
            pe = torch.zeros(m.get("max_len", 1024), d)
            pos = torch.arange(pe.shape[0]).unsqueeze(1)
            div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
            pe[:, 0::2] = torch.sin(pos * div)
            pe[:, 1::2] = torch.cos(pos * div)
            self.register_buffer("pe", pe)
            self.drop = nn.Dropout(m.get("dropout", 0.1))
            self.bias = nn.Parameter(torch.zeros(vocab))

        def emb(self, x):
            return self.drop(self.embed(x) * math.sqrt(d) + self.pe[: x.shape[1]])

        def forward(self, src, tgt):
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            h = self.tf(self.emb(src), self.emb(tgt), tgt_mask=mask, tgt_is_causal=True)
            return h @ self.embed.weight.T + self.bias

    model = Model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(t.get("beta1", 0.9), t.get("beta2", 0.999)),
                            eps=t.get("eps", 1e-8), weight_decay=t.get("weight_decay", 0.01))
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, vocab, (rows, seq), generator=g)
    tgt = torch.randint(4, vocab, (rows, seq + 1), generator=g)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.get("label_smoothing", 0.0))
    timed = 0.0
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = model(src, tgt[:, :-1])
        loss = loss_fn(logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1))
        loss.backward()
        if t.get("clip_grad_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_grad_norm"])
        opt.step()
        if s >= warmup:
            timed += time.perf_counter() - t0
    return 2 * rows * seq * steps / timed


def attn_run(config, rows, seq, steps, threads):
    exe = os.path.join(ROOT, "target", "release", "attn")
    out = subprocess.run([exe, "bench", "--train", config, "--rows", str(rows), "--seq", str(seq),
                          "--steps", str(steps), "-t", str(threads), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "de-en-transformer.toml"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    if cfg["model"].get("arch") != "transformer":
        sys.exit("this script compares the encoder-decoder (arch = \"transformer\")")
    ours, theirs = [], []
    for _ in range(a.repeats):
        ours.append(attn_run(a.config, a.rows, a.seq, a.steps, a.threads))
        theirs.append(torch_run(cfg, a.rows, a.seq, a.steps, a.threads))
    o, p = statistics.median(ours), statistics.median(theirs)
    import torch
    print(f"config {os.path.relpath(a.config, ROOT)}: {a.rows} x ({a.seq} src + {a.seq} tgt) tokens/step, "
          f"{a.steps} steps, {a.threads} threads, median of {a.repeats}")
    print(f"attn     {o:10.0f} tokens/s   runs {[round(x) for x in ours]}")
    print(f"pytorch  {p:10.0f} tokens/s   runs {[round(x) for x in theirs]}  (torch {torch.__version__})")
    print(f"ratio attn/pytorch = {o / p:.2f}")


if __name__ == "__main__":
    main()
