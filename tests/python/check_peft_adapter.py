#!/usr/bin/env python3
"""Checks with transformers + PEFT that an adapter lorafuse wrote is exactly what PEFT reads.

    check_peft_adapter.py --model GPT2_DIR --adapter ADAPTER_DIR [--merged MERGED_DIR]

1. PEFT loads the adapter onto the base (PeftModel.from_pretrained), and every tensor of
   adapter_model.safetensors is, bit for bit, the tensor PEFT holds: none missing, none
   left over.
2. The adapter changes the logits (otherwise the rest checks nothing).
3. With --merged (the output of `lorafuse merge`): transformers loads it, its weights are
   PEFT's merge_and_unload() of the same adapter, and its logits are the unmerged PEFT
   model's (relative L2 within --tol).

It prints one line per check and a final `PASS` (exit 0) or `FAIL: ...` (exit 1). Without
torch, transformers or peft it prints `skipped (...)` and exits 0: tests/cli.rs runs it
when they import (see bench/pytorch/README.md for a virtual environment).
"""

import argparse
import json
import os
import sys


def rel_l2(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the base GPT-2 directory")
    ap.add_argument("--adapter", required=True, help="the adapter directory lorafuse wrote")
    ap.add_argument("--merged", help="`lorafuse merge`'s output for the same model and adapter")
    ap.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (f32)")
    args = ap.parse_args()
    try:
        import peft
        import safetensors.torch
        import torch
        import transformers
        from peft import PeftModel, get_peft_model_state_dict
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        print(f"skipped (needs torch, transformers and peft: {e})")
        return 0
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    torch.manual_seed(0)

    def load(path):
        return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()

    base = load(args.model)
    cfg = base.config
    ids = torch.randint(0, cfg.vocab_size, (2, min(16, cfg.n_positions)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(ids).logits.clone()

    failures = []
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    saved = safetensors.torch.load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    held = get_peft_model_state_dict(model)
    missing = sorted(set(saved) - set(held))
    extra = sorted(set(held) - set(saved))
    if missing or extra:
        failures.append(f"tensors PEFT does not hold: {missing}; PEFT holds and the file lacks: {extra}")
    differ = [k for k in saved if k in held and not torch.equal(saved[k], held[k].cpu())]
    if differ:
        failures.append(f"tensors PEFT holds with other values: {differ}")
    print(f"1. PEFT holds the {len(saved)} saved tensors exactly: {not (missing or extra or differ)}")

    with torch.no_grad():
        lora_logits = model(ids).logits.clone()
    moved = float((lora_logits - base_logits).abs().max())
    print(f"2. the adapter moves the logits by up to {moved:.3e}")
    if not moved > 0:
        failures.append("the adapter does not change the logits: nothing below would be checked")

    if args.merged:
        theirs = load(args.merged)
        merged = model.merge_and_unload()
        mine_sd, theirs_sd = merged.state_dict(), theirs.state_dict()
        worst = max(
            (rel_l2(theirs_sd[k].float(), mine_sd[k].float()), k)
            for k in mine_sd
            if k in theirs_sd and mine_sd[k].is_floating_point()
        )
        if set(mine_sd) != set(theirs_sd):
            failures.append(f"merged keys differ: {sorted(set(mine_sd) ^ set(theirs_sd))}")
        with torch.no_grad():
            merged_logits = theirs(ids).logits
        err = rel_l2(merged_logits, lora_logits)
        print(f"3. lorafuse merge vs PEFT merge_and_unload: worst weight rel-L2 {worst[0]:.2e} ({worst[1]}); logits rel-L2 {err:.2e}")
        if worst[0] > args.tol:
            failures.append(f"merged weight {worst[1]} differs from PEFT's by rel-L2 {worst[0]:.2e}")
        if err > args.tol:
            failures.append(f"merged logits differ from PEFT's unmerged logits by rel-L2 {err:.2e}")

    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        c = json.load(f)
    print(f"   config: r {c.get('r')}, target_modules {c.get('target_modules')}, rank_pattern {c.get('rank_pattern')}, lorafuse_targets {c.get('lorafuse_targets')}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
