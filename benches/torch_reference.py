"""The neurofm encoder in PyTorch eager, for a cells/s reference on the same machine.

Same shape as neurofm's model (gene + bin embeddings, pre-LayerNorm layers with
scaled_dot_product_attention, GELU feed-forward, final norm, a linear head over bins on the
masked positions), trained with AdamW on random tokens in bf16 autocast, as a PyTorch user
would write it. Prints one JSON line: cells/s, ms/step, the SDPA kernel seen by the profiler.

    python3 benches/torch_reference.py --d-model 512 --layers 12 --heads 8 --d-ff 2048 \
        --seq 2048 --batch 32 --genes 2000 --bins 51 --steps 30
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Layer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d)
        x = x + self.out(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    def __init__(self, genes, bins, d, heads, layers, ff):
        super().__init__()
        self.gene = nn.Embedding(genes + 3, d)
        self.bin = nn.Embedding(bins + 3, d)
        self.layers = nn.ModuleList(Layer(d, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, bins)

    def forward(self, genes, bins, masked):
        x = self.gene(genes) + self.bin(bins)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.head(x.reshape(-1, x.shape[-1])[masked])


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("d-model", 512), ("layers", 12), ("heads", 8), ("d-ff", 2048), ("seq", 2048), ("batch", 32), ("genes", 2000), ("bins", 51), ("steps", 30), ("warmup", 5)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = Encoder(a.genes, a.bins, a.d_model, a.heads, a.layers, a.d_ff).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    genes = torch.randint(0, a.genes, (a.batch, a.seq), device=dev)
    bins = torch.randint(0, a.bins, (a.batch, a.seq), device=dev)
    masked = torch.nonzero(torch.rand(a.batch * a.seq, device=dev) < 0.15).squeeze(1)
    targets = torch.randint(0, a.bins, (masked.numel(),), device=dev)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(genes, bins, masked).float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(a.warmup):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    secs = (time.perf_counter() - start) / a.steps
    kernel = "n/a"
    if dev.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        names = [e.key for e in prof.key_averages()]
        kernel = next((n for n in names if "flash" in n.lower() or "fmha" in n.lower() or "attention" in n.lower()), "none seen")
    print(json.dumps({
        "framework": f"torch {torch.__version__} eager, bf16 autocast",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cells_per_s": a.batch / secs,
        "ms_per_step": 1e3 * secs,
        "attention_kernel": kernel,
        "shape": vars(a),
    }))


if __name__ == "__main__":
    main()
