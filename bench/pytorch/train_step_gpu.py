#!/usr/bin/env python3
"""PyTorch + PEFT side of benches/train_step.rs's `train_step/cuda` group.

One LoRA training step of GPT-2 124M's shape (12 layers, d_model 768, 12 heads, vocab
50257, context 1024; random weights, no download), PEFT LoRA r=16, alpha=32, no dropout on
every ``c_attn``, batch 8 x 1024 tokens, bf16 autocast over fp32 weights, SDPA attention,
torch's fused AdamW; a step is zero_grad + forward + mean cross-entropy + backward + AdamW.
Prints tokens/s and peak device memory (torch.cuda.max_memory_allocated), and beside them
ours: tokens/s from criterion's results (--criterion, the group `train_step/cuda`) and the
peak our bench printed (--ours-log, the bench's log).

The GPU runner (scripts/gpu-runner.sh run --bench) runs it after the benches.
`--device cpu --small` runs a tiny config on the CPU, to check the script itself.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

BATCH, SEQ = 8, 1024


def torch_side(device, small, warmup, iters):
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    batch, seq = (2, 32) if small else (BATCH, SEQ)
    config = GPT2Config(
        n_embd=64 if small else 768, n_layer=2 if small else 12, n_head=4 if small else 12,
        n_positions=seq, vocab_size=512 if small else 50257,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["c_attn"], fan_in_fan_out=True))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=(device == "cuda"))
    g = torch.Generator(device="cpu").manual_seed(7)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"torch": torch.__version__, "peft": peft.__version__, "device": device,
           "batch": batch, "seq": seq, "step_ms": med * 1e3,
           "tokens_per_s": batch * seq / med}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def ours(criterion_root, log):
    """Our tokens/s (criterion mean) and peak bytes (from the bench's printed line)."""
    res = {}
    if criterion_root and os.path.isdir(criterion_root):
        for dirpath, _, files in os.walk(criterion_root):
            if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
                continue
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                meta = json.load(f)
            if not meta["full_id"].startswith("train_step/cuda/"):
                continue
            with open(os.path.join(dirpath, "estimates.json")) as f:
                est = json.load(f)
            ns = est["mean"]["point_estimate"]
            res["step_ms"] = ns / 1e6
            res["tokens_per_s"] = BATCH * SEQ / (ns / 1e9)
    if log and os.path.isfile(log):
        with open(log) as f:
            m = re.search(r"train_step/cuda: .*peak (\d+) MiB", f.read())
        if m:
            res["peak_bytes"] = int(m.group(1)) << 20
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--criterion", default=os.environ.get("CRITERION_HOME", "target/criterion"))
    ap.add_argument("--ours-log", default="logs/bench-train_step.log")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step_gpu: no CUDA device visible to torch", file=sys.stderr)
        return 2
    t = torch_side(args.device, args.small, args.warmup, args.iters)
    o = ours(args.criterion, args.ours_log)
    fmt = lambda v, s=1.0: "—" if v is None else f"{v / s:,.1f}"
    print(f"LoRA step, GPT-2 124M shape, {t['batch']}x{t['seq']} tokens, bf16 "
          f"({t.get('gpu', t['device'])}; torch {t['torch']}, peft {t['peft']})")
    print(f"{'':24} {'tokens/s':>12} {'step ms':>10} {'peak MiB':>10}")
    print(f"{'PyTorch + PEFT':24} {fmt(t['tokens_per_s']):>12} {fmt(t['step_ms']):>10} "
          f"{fmt(t.get('peak_bytes'), 2**20):>10}")
    print(f"{'lorafuse':24} {fmt(o.get('tokens_per_s')):>12} {fmt(o.get('step_ms')):>10} "
          f"{fmt(o.get('peak_bytes'), 2**20):>10}")
    if o.get("tokens_per_s") and not args.small:
        print(f"ours / PyTorch tokens/s: {o['tokens_per_s'] / t['tokens_per_s']:.3f}")
    print("RESULT " + json.dumps({"torch": t, "ours": o}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
