#!/usr/bin/env python3
"""Side by side on a GPU runner: lorafuse's kernel benches against PyTorch + PEFT.

The GPU-runner script (`gpu-runner.sh run --bench`) runs our criterion benches with
CRITERION_HOME pointing at a folder, then this script. It times the same shapes in
PyTorch (bf16, CUDA events, median of --iters after --warmup):

    peft_fwd / peft_fwd_bwd   PEFT LoRA Linear (r=16, alpha=32 -> scale 2, no dropout,
                              base frozen, x requiring grad), forward / forward+backward
    torch_linear              F.linear(x, W0): the dense base GEMM (cuBLAS underneath)
    torch_merge               W += (B @ A) * scale in bf16, as PEFT's merge does
    torch_copy                dst.copy_(src) of the merged weight's bytes
    torch_adamw               torch.optim.AdamW(fused=True) over the same tensor list as
                              benches/adamw.rs (torch keeps no f32 master copy of bf16
                              params and needs bf16 grads: it moves fewer bytes than we do)

reads our numbers from CRITERION_HOME (each benchmark's new/estimates.json mean and its
new/benchmark.json id and throughput), and prints one ratio table against DESIGN §10's
targets, then one `RESULT {json}` line for tools. A row whose numbers are missing says so
instead of guessing.

`--device cpu` runs the torch side on the CPU in f32 at the shapes of our benches' CPU
groups (`lora_matmul/cpu` etc.) and compares with those: a dry run of the script on a
machine without a GPU, and a CPU-vs-CPU comparison in its own right.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# The headline shape of DESIGN §2 and benches/lora_matmul.rs.
M, K, N, R = 8192, 4096, 4096, 16
ALPHA = 32.0  # scale = alpha / r = 2, benches' SCALE
MERGE_N, MERGE_K, MERGE_R = 4096, 4096, 16  # benches/merge.rs


def adamw_shapes():
    """The tensor list of benches/adamw.rs: GPT-2 124M's 148 parameter tensors (12 layers,
    d 768, vocab 50257, context 1024), bf16 parameters."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def timer(device):
    """Returns time_ms(fn, warmup, iters): the median wall time of fn() in ms, the device
    synchronised around every call."""
    def time_ms(fn, warmup, iters):
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return time_ms


def torch_side(device, warmup, iters, small):
    import peft
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # small: the CPU group of benches/lora_matmul.rs (f32, 512 x 256 x 256, r 16)
    m, k, n, r = (512, 256, 256, R) if small else (M, K, N, R)
    # small: the CPU group of benches/merge.rs (f32, 512 x 512, r 16)
    mn, mk, mr = (512, 512, MERGE_R) if small else (MERGE_N, MERGE_K, MERGE_R)
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.rand(*s, generator=g) * 2 - 1).mul_(scale).to(device, dtype)
    time_ms = timer(device)
    out = {"torch": torch.__version__, "peft": peft.__version__, "device": device,
           "dtype": str(dtype).replace("torch.", ""), "shape": [m, k, n, r]}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)

    base = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(device, dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=["0"], bias="none"))
    lora = model.base_model.model[0]
    with torch.no_grad():  # non-zero B, as in benches/lora_matmul.rs
        lora.lora_B["default"].weight.copy_(rand(n, r, scale=0.1))
    x = rand(m, k).requires_grad_(True)
    gy = rand(m, n)

    def fwd():
        with torch.no_grad():
            return model(x)

    def fwd_bwd():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        model(x).backward(gy)

    out["peft_fwd_ms"] = time_ms(fwd, warmup, iters)
    out["peft_fwd_bwd_ms"] = time_ms(fwd_bwd, warmup, iters)
    w0 = lora.base_layer.weight.detach()
    xd = x.detach()
    out["torch_linear_ms"] = time_ms(lambda: F.linear(xd, w0), warmup, iters)

    w = rand(mn, mk)
    a, b = rand(mr, mk), rand(mn, mr)
    scale = ALPHA / mr

    def merge():
        w.add_((b @ a) * scale)
    out["torch_merge_ms"] = time_ms(merge, warmup, iters)
    dst = torch.empty_like(w)
    out["torch_copy_ms"] = time_ms(lambda: dst.copy_(w), warmup, iters)
    out["merge_bytes"] = 2 * w.numel() * w.element_size()

    shapes = adamw_shapes() if not small else [(64, 32), (32,), (16, 32), (96, 16)]
    params = [torch.nn.Parameter(rand(*s, scale=0.02)) for s in shapes]
    for p in params:
        p.grad = rand(*p.shape, scale=1e-3)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01,
                            fused=(device == "cuda"))
    out["torch_adamw_ms"] = time_ms(opt.step, warmup, iters)
    out["adamw_params"] = sum(p.numel() for p in params)
    return out


def read_criterion(root):
    """{full_id: {"ms": mean ms, "throughput": {...}}} for every benchmark under root."""
    found = {}
    if not root or not os.path.isdir(root):
        return found
    for dirpath, _, files in os.walk(root):
        if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                meta = json.load(f)
            with open(os.path.join(dirpath, "estimates.json")) as f:
                est = json.load(f)
        except (OSError, ValueError):
            continue
        found[meta["full_id"]] = {"ms": est["mean"]["point_estimate"] / 1e6,
                                  "throughput": meta.get("throughput")}
    return found


def ours(bench, group, function):
    """Our mean ms for group/function (any parameter), or None."""
    for full_id, v in sorted(bench.items()):
        if full_id.startswith(f"{group}/{function}/") or full_id == f"{group}/{function}":
            return v
    return None


def bytes_of(v):
    t = (v or {}).get("throughput") or {}
    return t.get("Bytes") or t.get("BytesDecimal")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criterion", default=os.environ.get("CRITERION_HOME", "target/criterion"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lora_kernels_gpu: no CUDA device visible to torch", file=sys.stderr)
        return 2
    t = torch_side(args.device, args.warmup, args.iters, small=(args.device == "cpu"))
    bench = read_criterion(args.criterion)
    dev = args.device
    g = f"lora_matmul/{dev}"
    get = lambda grp, fn: (ours(bench, grp, fn) or {}).get("ms")
    rows = []

    def row(what, a_label, a, b_label, b, target, higher_is_better=True):
        ratio = (a / b) if (a and b) else None
        ok = None if ratio is None or target is None else (ratio >= target if higher_is_better else ratio <= target)
        rows.append({"what": what, "a": a_label, "a_ms": a, "b": b_label, "b_ms": b,
                     "ratio": ratio, "target": target,
                     "meets": ok, "direction": ">=" if higher_is_better else "<="})

    row("LoRA linear fwd+bwd: PEFT time / ours", "peft", t["peft_fwd_bwd_ms"], "ours fused",
        get(g, "fused_fwd_bwd"), 1.3)
    row("LoRA linear fwd: PEFT time / ours", "peft", t["peft_fwd_ms"], "ours fused",
        get(g, "fused_fwd"), None)
    row("fused fwd / our dense GEMM (time)", "ours fused", get(g, "fused_fwd"), "ours dense",
        get(g, "dense_ours"), 1.02, higher_is_better=False)
    row("our GEMM throughput / cuBLAS", "cublas", get(g, "dense_cublas"), "ours dense",
        get(g, "dense_ours"), 0.8)
    row("torch F.linear time / our dense GEMM", "torch", t["torch_linear_ms"], "ours dense",
        get(g, "dense_ours"), None)
    row("unfused / fused fwd+bwd (time)", "ours unfused", get(g, "unfused_fwd_bwd"),
        "ours fused", get(g, "fused_fwd_bwd"), None)
    merge, copy = ours(bench, f"merge/{dev}", "merge"), ours(bench, f"merge/{dev}", "copy")
    if merge and copy and bytes_of(merge) and bytes_of(copy):
        bw = lambda v: bytes_of(v) / (v["ms"] / 1e3)
        row("merge bandwidth / copy bandwidth", "merge GB/s", bw(merge) / 1e9, "copy GB/s",
            bw(copy) / 1e9, 0.85)
    else:
        row("merge bandwidth / copy bandwidth", "merge", None, "copy", None, 0.85)
    row("torch merge time / ours", "torch", t["torch_merge_ms"], "ours",
        (merge or {}).get("ms"), None)
    adam, acopy = ours(bench, f"adamw/{dev}", "multi_tensor"), ours(bench, f"adamw/{dev}", "device_copy")
    if adam and acopy and bytes_of(adam) and bytes_of(acopy):
        bw = lambda v: bytes_of(v) / (v["ms"] / 1e3)
        row("AdamW bandwidth / copy bandwidth", "adamw GB/s", bw(adam) / 1e9, "copy GB/s",
            bw(acopy) / 1e9, 0.85)
    else:
        row("AdamW bandwidth / copy bandwidth", "adamw", None, "copy", None, 0.85)
    row("torch fused AdamW time / ours", "torch", t["torch_adamw_ms"], "ours",
        (adam or {}).get("ms"), None)
    row("AdamW per-tensor / multi-tensor (time)", "per tensor",
        get(f"adamw/{dev}", "per_tensor"), "multi", (adam or {}).get("ms"), None)

    print(f"torch {t['torch']}  peft {t['peft']}  device {t.get('gpu', t['device'])}  "
          f"dtype {t['dtype']}  criterion: {args.criterion} ({len(bench)} benchmarks)")
    fmt = lambda v: "—" if v is None else f"{v:.4g}"
    print(f"{'what':44} {'A':>12} {'B':>12} {'A/B':>8} {'target':>9}  met")
    for r in rows:
        tgt = "" if r["target"] is None else f"{r['direction']} {r['target']}"
        met = {True: "yes", False: "NO", None: ""}[r["meets"]]
        print(f"{r['what']:44} {fmt(r['a_ms']):>12} {fmt(r['b_ms']):>12} "
              f"{fmt(r['ratio']):>8} {tgt:>9}  {met}")
    print("(A and B in ms unless the row says GB/s)")
    print("RESULT " + json.dumps({"torch": t, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
