#!/usr/bin/env python3
"""PyTorch's side of `strata bench train`: the same decoder (Llama-style:
RoPE, grouped-query attention, RMSNorm, SwiGLU, optionally tied head), the
same size, batch, sequence length, synthetic tokens, learning rates and
AdamW settings, trained for the same number of steps; prints the same JSON
fields as strata's report.

    strata bench train RECIPE --json > strata.json
    python3 bench/torch_reference.py --like strata.json > torch.json

On CUDA it trains the way a PyTorch user would: bf16 autocast (f32 master
weights, f32 loss), fused AdamW, scaled-dot-product attention (flash
attention on Hopper), optionally torch.compile. On CPU: f32, foreach AdamW,
SDPA, torch's default threads (set OMP_NUM_THREADS / --threads to match
strata's).

Needs only torch (no transformers).
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

MASK = (1 << 64) - 1


def splitmix(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def synthetic_batch(seed, step, rows, seq, vocab):
    """strata's `bench::synthetic_batch`: each row repeats a random
    64-token phrase from the first 4,096 ids."""
    vocab = min(vocab, 4096)
    inputs, targets = [], []
    for r in range(rows):
        phrase = [
            splitmix(seed ^ splitmix(step) ^ splitmix((r << 8 | 1) & MASK) ^ i) % vocab
            for i in range(64)
        ]
        row = [phrase[i % 64] for i in range(seq + 1)]
        inputs.append(row[:seq])
        targets.append(row[1:])
    return torch.tensor(inputs), torch.tensor(targets)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).type_as(x)


def rope_tables(seq, head_dim, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    t = torch.arange(seq, device=device).float()
    freqs = torch.outer(t, inv)
    return freqs.cos(), freqs.sin()


def rope(x, cos, sin):
    # x: [b, h, t, q]; Hugging Face Llama's rotate-half convention.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, None].to(x.dtype), sin[None, None].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.q = heads, kv_heads, d // heads
        self.attn_norm = RMSNorm(d)
        self.wq = nn.Linear(d, heads * self.q, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.q, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.q, bias=False)
        self.wo = nn.Linear(heads * self.q, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.w1 = nn.Linear(d, ffn, bias=False)
        self.w3 = nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, self.heads, self.q).transpose(1, 2)
        k = self.wk(h).view(b, t, self.kv_heads, self.q).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv_heads, self.q).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.embed = nn.Embedding(c["vocab"], d)
        self.blocks = nn.ModuleList(
            Block(d, c["n_heads"], c["n_kv_heads"], c["d_ffn"]) for _ in range(c["n_layers"])
        )
        self.norm = RMSNorm(d)
        self.head = None if c["tie_embeddings"] else nn.Linear(d, c["vocab"], bias=False)
        self.head_dim = d // c["n_heads"]
        self.theta = c["rope_theta"]
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        t = tokens.shape[1]
        cos, sin = rope_tables(t, self.head_dim, self.theta, tokens.device)
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        logits = x @ w.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def flops_per_token(c, seq):
    """PaLM's 6N + 12·L·H·Q·T, N = non-embedding matrices + the head
    (strata's `ModelConfig::flops_per_token`)."""
    d, q = c["d_model"], c["d_model"] // c["n_heads"]
    kv = c["n_kv_heads"] * q
    non_emb = (2 * d * d + 2 * d * kv + 3 * d * c["d_ffn"]) * c["n_layers"]
    n = non_emb + c["vocab"] * d
    return 6.0 * n + 12.0 * c["n_layers"] * c["n_heads"] * q * seq


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--like", required=True, help="strata bench train --json output to mirror")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="measured steps (default: strata's)")
    ap.add_argument("--warmup", type=int, help="unmeasured steps (default: strata's)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], help="autocast dtype (default: bf16 on CUDA, f32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args()

    c = json.load(open(args.like))
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = args.dtype or ("bf16" if dev.type == "cuda" else "f32")
    steps = args.steps if args.steps is not None else c["steps"]
    warmup = args.warmup if args.warmup is not None else c["warmup"]
    seq, tps, micro = c["seq_len"], c["tokens_per_step"], c["microbatches"]
    rows = tps // seq // micro

    torch.manual_seed(c["seed"])
    model = Decoder(c).to(dev)
    params = sum(p.numel() for p in model.parameters())
    fwd = torch.compile(model) if args.compile else model
    o = c["optimizer"]
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(o["beta1"], o["beta2"]),
        eps=o["eps"],
        fused=dev.type == "cuda",
        foreach=None if dev.type == "cuda" else True,
    )
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses, lrs, times, fwd_t, bwd_t, opt_t = [], [], [], 0.0, 0.0, 0.0
    for step in range(1, warmup + steps + 1):
        inputs, targets = synthetic_batch(c["seed"], step, rows * micro, seq, c["vocab"])
        inputs, targets = inputs.to(dev), targets.to(dev)
        lrs_like = c["lrs"] or [1e-3]
        lr = lrs_like[min(step - 1, len(lrs_like) - 1)]
        for g in opt.param_groups:
            g["lr"] = lr
        sync()
        t0 = time.perf_counter()
        total = 0.0
        tf = tb = 0.0
        for m in range(micro):
            a = time.perf_counter()
            with autocast:
                loss = fwd(inputs[m * rows:(m + 1) * rows], targets[m * rows:(m + 1) * rows]) / micro
            b = time.perf_counter()
            loss.backward()
            tb += time.perf_counter() - b
            tf += b - a
            total += loss.detach()
        a = time.perf_counter()
        if o.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(total)  # synchronizes
        sync()
        t1 = time.perf_counter()
        losses.append(loss_value)
        lrs.append(lr)
        if step > warmup:
            times.append(t1 - t0)
            fwd_t += tf
            bwd_t += tb
            opt_t += t1 - a
    step_s = statistics.median(times)
    tokens_per_s = tps / step_s
    fpt = flops_per_token(c, seq)
    achieved = tokens_per_s * fpt / 1e12
    peak = c.get("peak") if dev.type == "cuda" else None
    n = max(len(times), 1)
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_reserved(dev)
        name = f"{torch.cuda.get_device_name(dev)} (torch {torch.__version__})"
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"
    out = {
        "implementation": "pytorch",
        "backend": f"torch{'-compile' if args.compile else ''}",
        "device": name,
        "compute_dtype": dtype,
        **{k: c[k] for k in ["n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab",
                             "rope_theta", "tie_embeddings"]},
        "params": params,
        "seed": c["seed"],
        "optimizer": o,
        "seq_len": seq,
        "tokens_per_step": tps,
        "microbatches": micro,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_s": tokens_per_s,
        "step_s": step_s,
        "forward_s": fwd_t / n,
        "backward_s": bwd_t / n,
        "optimizer_s": opt_t / n,
        "flops_per_token": fpt,
        "achieved_tflops": achieved,
        "peak": peak,
        "mfu": achieved / peak["tflops"] if peak else None,
        "peak_memory_bytes": mem,
        "host_elems_per_step": None,
        "lrs": lrs,
        "losses": losses,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    if not all(math.isfinite(x) for x in losses):
        sys.exit("non-finite loss")


if __name__ == "__main__":
    main()
