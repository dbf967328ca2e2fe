#!/usr/bin/env python3
"""PyTorch CPU (+ PEFT) baseline: time of one training step of a small GPT-2.

This is the reference lorafuse is measured against. It builds the model from
the project's DESIGN config (no weights are downloaded), feeds random tokens,
and times

    zero_grad(set_to_none=True) + forward + mean cross-entropy + backward
    + AdamW step

in two modes:

    lora  PEFT LoRA (r=8, alpha=16, no dropout) on every ``c_attn``; only the
          adapters are trainable, the base model is frozen.
    full  every parameter is trainable.

Output: a human-readable table, then one line per mode starting with
``RESULT `` followed by a JSON object, for other tools to parse.

See README.md next to this file for setting up the virtual environment.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

# --- Fixed benchmark shape (DESIGN) -----------------------------------------
BATCH = 8
SEQ = 128
TOKENS_PER_STEP = BATCH * SEQ  # 1024
VOCAB = 256
LR = 1e-3
WEIGHT_DECAY = 0.01
SEED = 0


def build_model(attn: str) -> GPT2LMHeadModel:
    """GPT-2 with the DESIGN config, randomly initialised, float32, no dropout."""
    config = GPT2Config(
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_positions=128,
        vocab_size=VOCAB,
        # All dropouts off, so the step is deterministic and comparable.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,  # unused by the LM head; zeroed for clarity
        # GPT-2's default special ids (50256) lie outside a 256-token vocab.
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,  # training: no KV cache
        attn_implementation=attn,  # "eager" or "sdpa"
    )
    # Note: GPT-2 ties lm_head.weight to transformer.wte.weight (one tensor).
    return GPT2LMHeadModel(config).to(torch.float32)


def build(mode: str, attn: str):
    """Returns (model, optimizer, trainable_params, total_params)."""
    torch.manual_seed(SEED)  # same base weights for both modes
    model = build_model(attn)
    if mode == "lora":
        lora_config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["c_attn"],
            lora_dropout=0.0,
            fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
            bias="none",
        )
        model = get_peft_model(model, lora_config)
    elif mode != "full":
        raise ValueError(f"unknown mode {mode!r}")
    model.train()

    params = list(model.parameters())  # tied tensors are listed once
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    return (
        model,
        optimizer,
        sum(p.numel() for p in trainable),
        sum(p.numel() for p in params),
    )


def cpu_busy_seconds():
    """Busy CPU time of the whole machine in seconds (Linux /proc/stat), or None.

    Together with os.times() this tells how much CPU other processes used
    while we were timing: a loaded machine makes multi-threaded steps much
    slower (OpenMP threads wait for descheduled peers), so the results carry
    ``other_cpu_pct`` and the table warns when it is high.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def train_step(model, optimizer, input_ids) -> torch.Tensor:
    """One optimizer step; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    # labels = inputs: HF shifts them by one inside and returns the mean
    # cross-entropy over the BATCH * (SEQ - 1) predicted positions.
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def run_mode(mode: str, args) -> dict:
    model, optimizer, n_trainable, n_total = build(mode, args.attn)

    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)

    # Warm-up: first calls allocate buffers, pick kernels, create Adam state.
    first_loss = None
    for _ in range(args.warmup):
        loss = train_step(model, optimizer, input_ids)
        if first_loss is None:
            first_loss = loss.item()

    times_ms = []
    busy0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, input_ids)
        # CPU ops are synchronous; .item() also forces the loss to exist.
        loss_value = loss.item()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    busy1, own1, wall1 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    other_cpu_pct = None  # CPU used by other processes, % of all cores
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        other_cpu_pct = round(100.0 * other / ((wall1 - wall0) * os.cpu_count()), 1)
    if first_loss is None:
        first_loss = loss_value
    if not torch.isfinite(torch.tensor(loss_value)):
        raise RuntimeError(f"{mode}: loss is not finite ({loss_value})")

    median_ms = statistics.median(times_ms)
    return {
        "framework": "pytorch",
        "device": "cpu",
        "mode": mode,
        "attn": args.attn,
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "seq": SEQ,
        "tokens_per_step": TOKENS_PER_STEP,
        "warmup": args.warmup,
        "steps": args.steps,
        "median_ms": round(median_ms, 3),
        "min_ms": round(min(times_ms), 3),
        "mean_ms": round(statistics.fmean(times_ms), 3),
        "tokens_per_s": round(TOKENS_PER_STEP / (median_ms / 1e3), 1),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "first_loss": round(first_loss, 5),
        "last_loss": round(loss_value, 5),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "other_cpu_pct": other_cpu_pct,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --threads >= 1")

    torch.set_num_threads(args.threads)
    modes = ["lora", "full"] if args.mode == "both" else [args.mode]
    results = [run_mode(m, args) for m in modes]

    print(
        f"torch {torch.__version__}  transformers {transformers.__version__}  "
        f"peft {peft.__version__}  threads {torch.get_num_threads()}  "
        f"attn {args.attn}  batch {BATCH}x{SEQ}  warmup {args.warmup}  steps {args.steps}"
    )
    header = (
        f"{'mode':<5} {'median ms':>10} {'min ms':>9} {'tokens/s':>10} "
        f"{'trainable':>10} {'total':>10} {'loss first->last':>18} {'other cpu':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['mode']:<5} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
            f"{r['tokens_per_s']:>10.0f} {r['trainable_params']:>10,} "
            f"{r['total_params']:>10,} {r['first_loss']:>8.4f}->{r['last_loss']:<8.4f}"
            f" {'n/a' if r['other_cpu_pct'] is None else str(r['other_cpu_pct']) + '%':>9}"
        )
    busy = [r["mode"] for r in results if (r["other_cpu_pct"] or 0) > 5.0]
    if busy:
        print(
            f"WARNING: other processes used >5% of the CPUs while timing {busy}; "
            "these numbers are not a clean baseline (rerun on an idle machine)."
        )
    for r in results:
        print("RESULT " + json.dumps(r, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
