#!/usr/bin/env python3
"""Every kernel of a GPT-2 124M LoRA training step, timed in PyTorch at the step's shapes,
beside lorafuse's criterion groups for the same kernels (issue 12, item 6).

Shapes (DESIGN §10, benches/train_step.rs): batch 8 x context 1024 = M 8192 tokens,
d_model C 768, 12 heads of hd 64, vocabulary V 50257, bf16 activations, LoRA r 16 on c_attn.

    gemm/<linear>/fwd      F.linear(x [M, K], W [N, K])            (cuBLAS)  2·M·N·K FLOPs
    gemm/<linear>/bwd_dx   gy [M, N] @ W [N, K]                    (cuBLAS)  2·M·N·K FLOPs
    attention/fwd, /fwd_bwd  F.scaled_dot_product_attention, causal (FlashAttention-2)
    layer_norm/fwd, /fwd_bwd F.layer_norm over C                              bytes moved
    cross_entropy/fused    F.cross_entropy under bf16 autocast, forward + backward
    embedding/fwd, /fwd_bwd  wte[ids] + wpe
    gelu/fwd, /fwd_bwd     F.gelu(approximate="tanh") over [M, 4C]
    adamw/lora             torch.optim.AdamW(fused=True) over the 24 LoRA tensors (f32)
    ceiling/copy           dst.copy_(src), 1 GiB: the bandwidth ceiling (read + write)
    ceiling/matmul         8192^3 bf16 matmul: the tensor-core ceiling

Each row prints the median time of --iters CUDA-event-timed calls, its rate (TFLOP/s for
products, GB/s for passes), the fraction of the measured ceiling, and, when CRITERION_HOME
holds a criterion estimate for the matching lorafuse benchmark (OURS below: the gpt2 groups
of benches/lora_matmul.rs, benches/attention.rs, benches/membound.rs), ours and the ratio
torch / ours (> 1: we are faster). The AdamW row has no counterpart of ours at this tensor
list (benches/adamw.rs updates GPT-2's 148 tensors). A missing number says `missing`, never a guess.
The last line is `RESULT {json}` for tools.

`--device cpu --scale 64` is a dry run on a machine without a GPU (shapes divided by the
scale, f32; rates meaningless), so the script itself is checked without a GPU.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

# One timer for every side-by-side script (CUDA events, median): the bundle carries both
# files in one folder, as bench/pytorch/ does.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_kernels_gpu import timer  # noqa: E402

B, T, C, H, V, R = 8, 1024, 768, 12, 50257, 16
LINEARS = {  # name: (in K, out N) of GPT-2's linears, plus the tied LM head
    "c_attn": (C, 3 * C),
    "attn_c_proj": (C, C),
    "mlp_c_fc": (C, 4 * C),
    "mlp_c_proj": (4 * C, C),
    "lm_head": (C, V),
}
# lorafuse's criterion benchmarks for the same kernels, by the prefix of their full id (as
# criterion records it in new/benchmark.json); a row whose benchmark has no estimate in
# CRITERION_HOME prints `missing`.
GEMM_NAMES = {"c_attn": "c_attn", "attn_c_proj": "attn.c_proj", "mlp_c_fc": "mlp.c_fc",
              "mlp_c_proj": "mlp.c_proj", "lm_head": "lm_head"}
OURS = {
    **{f"gemm/{n}/fwd": f"lora_matmul/gpt2/{g}/y/" for n, g in GEMM_NAMES.items()},
    **{f"gemm/{n}/bwd_dx": f"lora_matmul/gpt2/{g}/gx/" for n, g in GEMM_NAMES.items()},
    "attention/fwd": "attention/cuda/fwd/",
    "attention/fwd_bwd": "attention/cuda/fwd_bwd/",
    "layer_norm/fwd": "membound/layer_norm_fwd",
    "layer_norm/fwd_bwd": "membound/layer_norm_fwd_bwd",
    "cross_entropy/fused": "membound/cross_entropy_fused",
    "embedding/fwd": "membound/embedding_fwd",
    "embedding/fwd_bwd": "membound/embedding_fwd_bwd",
    "gelu/fwd": "membound/gelu_fwd",
    "gelu/fwd_bwd": "membound/gelu_fwd_bwd",
}


def criterion_estimates(home):
    """{full id: mean ms} of every benchmark under CRITERION_HOME (empty when absent)."""
    out = {}
    if not home or not os.path.isdir(home):
        return out
    for root, _dirs, files in os.walk(home):
        if os.path.basename(root) != "new" or "benchmark.json" not in files:
            continue
        try:
            with open(os.path.join(root, "benchmark.json")) as f:
                full_id = json.load(f)["full_id"]
            with open(os.path.join(root, "estimates.json")) as f:
                out[full_id] = json.load(f)["mean"]["point_estimate"] / 1e6
        except (OSError, KeyError, ValueError):
            continue
    return out


def ours_ms(estimates, prefix):
    """Our time for the first benchmark whose id starts with `prefix`, or None."""
    hits = sorted(k for k in estimates if k.startswith(prefix))
    return estimates[hits[0]] if hits else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--scale", type=int, default=1, help="divide M, V and T by this (dry runs)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--criterion", default=os.environ.get("CRITERION_HOME"))
    a = ap.parse_args()
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("step_kernels_gpu: skipped (no CUDA device visible to torch)")
        return 0
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    bsz, t, v = max(1, B // a.scale if a.scale > 8 else B), max(16, T // a.scale), max(64, V // a.scale)
    m = bsz * t
    time_ms = timer(dev)
    w, it = a.warmup, a.iters
    rows = []

    def row(name, ms, work, unit):
        rows.append({"name": name, "ms": ms, "work": work, "unit": unit})

    # Ceilings first: the same call's measured copy bandwidth and matmul rate.
    n_copy = (1 << 30) // 2 // (a.scale * a.scale)
    src = torch.empty(n_copy, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    row("ceiling/copy", time_ms(lambda: dst.copy_(src), w, it), 2 * src.numel() * 2, "B")
    del src, dst
    s = 8192 // a.scale
    x = torch.randn(s, s, dtype=dt, device=dev)
    y = torch.randn(s, s, dtype=dt, device=dev)
    row("ceiling/matmul", time_ms(lambda: x @ y, w, it), 2 * s**3, "FLOP")
    del x, y

    for name, (k, n) in LINEARS.items():
        n = v if name == "lm_head" else n
        x = torch.randn(m, k, dtype=dt, device=dev)
        wt = torch.randn(n, k, dtype=dt, device=dev) * 0.02
        gy = torch.randn(m, n, dtype=dt, device=dev)
        row(f"gemm/{name}/fwd", time_ms(lambda: F.linear(x, wt), w, it), 2 * m * n * k, "FLOP")
        row(f"gemm/{name}/bwd_dx", time_ms(lambda: gy @ wt, w, it), 2 * m * n * k, "FLOP")
        del x, wt, gy

    hd = C // H
    q, kk, vv = (torch.randn(bsz, H, t, hd, dtype=dt, device=dev, requires_grad=True) for _ in range(3))
    att_flops = 4 * bsz * H * t * t * hd // 2  # causal: half the T x T products
    row("attention/fwd", time_ms(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True), w, it),
        att_flops, "FLOP")
    go = torch.randn(bsz, H, t, hd, dtype=dt, device=dev)

    def att_fwd_bwd():
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        torch.autograd.grad(o, (q, kk, vv), go)
    row("attention/fwd_bwd", time_ms(att_fwd_bwd, w, it), int(3.5 * att_flops), "FLOP")
    del q, kk, vv, go

    esz = torch.finfo(dt).bits // 8
    x = torch.randn(m, C, dtype=dt, device=dev, requires_grad=True)
    g, b = torch.ones(C, dtype=dt, device=dev, requires_grad=True), torch.zeros(C, dtype=dt, device=dev, requires_grad=True)
    row("layer_norm/fwd", time_ms(lambda: F.layer_norm(x, (C,), g, b), w, it), 2 * m * C * esz, "B")
    gy = torch.randn(m, C, dtype=dt, device=dev)
    row("layer_norm/fwd_bwd",
        time_ms(lambda: torch.autograd.grad(F.layer_norm(x, (C,), g, b), (x, g, b), gy), w, it),
        5 * m * C * esz, "B")
    del x, gy

    logits = torch.randn(m, v, dtype=dt, device=dev, requires_grad=True)
    tgt = torch.randint(0, v, (m,), device=dev)

    def xent():
        with torch.autocast(device_type=dev, dtype=dt, enabled=dev == "cuda"):
            loss = F.cross_entropy(logits, tgt)
        torch.autograd.grad(loss, logits)
    row("cross_entropy/fused", time_ms(xent, w, it), 2 * m * v * esz, "B")  # read + write, the floor
    del logits

    wte = torch.randn(v, C, dtype=dt, device=dev, requires_grad=True)
    wpe = torch.randn(t, C, dtype=dt, device=dev, requires_grad=True)
    ids = torch.randint(0, v, (bsz, t), device=dev)
    pos = torch.arange(t, device=dev)
    row("embedding/fwd", time_ms(lambda: F.embedding(ids, wte) + F.embedding(pos, wpe), w, it),
        2 * m * C * esz, "B")
    ge = torch.randn(bsz, t, C, dtype=dt, device=dev)
    row("embedding/fwd_bwd",
        time_ms(lambda: torch.autograd.grad(F.embedding(ids, wte) + F.embedding(pos, wpe), (wte, wpe), ge),
                w, it),
        3 * m * C * esz + (v + t) * C * esz, "B")
    del wte, wpe, ge

    h = torch.randn(m, 4 * C, dtype=dt, device=dev, requires_grad=True)
    row("gelu/fwd", time_ms(lambda: F.gelu(h, approximate="tanh"), w, it), 2 * h.numel() * esz, "B")
    gg = torch.randn_like(h)
    row("gelu/fwd_bwd",
        time_ms(lambda: torch.autograd.grad(F.gelu(h, approximate="tanh"), h, gg), w, it),
        5 * h.numel() * esz, "B")
    del h, gg

    params = []
    for _ in range(12):
        params += [torch.randn(R, C, device=dev, requires_grad=True),
                   torch.zeros(3 * C, R, device=dev, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    n_par = sum(p.numel() for p in params)
    row("adamw/lora", time_ms(opt.step, w, it), n_par * 16, "B")  # p, g, m, v: read + write

    estimates = criterion_estimates(a.criterion)
    copy_bw = rows[0]["work"] / (rows[0]["ms"] * 1e-3)
    mm_rate = rows[1]["work"] / (rows[1]["ms"] * 1e-3)
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"M {m}, V {v}, T {t}; ceilings: copy {copy_bw / 1e9:.0f} GB/s, matmul {mm_rate / 1e12:.0f} TFLOP/s")
    print(f"{'kernel':<24} {'torch ms':>9} {'rate':>14} {'of ceil':>8} {'ours ms':>9} {'torch/ours':>10}")
    for r in rows:
        rate = r["work"] / (r["ms"] * 1e-3)
        ceil = mm_rate if r["unit"] == "FLOP" else copy_bw
        r["fraction_of_ceiling"] = rate / ceil
        rate_s = f"{rate / 1e12:.1f} TFLOP/s" if r["unit"] == "FLOP" else f"{rate / 1e9:.0f} GB/s"
        ours = ours_ms(estimates, OURS[r["name"]]) if r["name"] in OURS else None
        r["ours_ms"] = ours
        ours_s = f"{ours:.3f}" if ours is not None else ("missing" if r["name"] in OURS else "-")
        ratio = f"{r['ms'] / ours:.2f}" if ours else "-"
        print(f"{r['name']:<24} {r['ms']:>9.3f} {rate_s:>14} {rate / ceil:>8.0%} {ours_s:>9} {ratio:>10}")
    print("RESULT " + json.dumps({"device": dev, "m": m, "v": v, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
