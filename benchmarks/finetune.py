"""Federated fine-tuning of a pretrained char transformer: full, bias-only, adapters, LoRA, prompt, CELLM.

The char transformer (dim 64, 2 layers, sequences of 32 characters) is pretrained centrally
(`koinon.experiment.pretrain`, what `koinon pretrain` runs) on the first 18 of Shakespeare's 37
plays, then fine-tuned federatedly on the other 19, dealt by play to 8 clients (4 a round,
local AdamW steps). Every method starts from the same file (`model.init`) and reports the
validation loss on the held-out tail of the 19 plays and the uplink bytes actually sent; CELLM
is LoRA with sparse (top-10%, fp16, error-feedback) updates.
Goal (issue 21): LoRA within 2% of full fine-tuning's validation loss with >= 20x fewer
uplink bytes.

    nice -n 10 .venv/bin/python benchmarks/finetune.py [--quick] [--rounds R] [--seed S]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from koinon.config import Config
from koinon.experiment.pretrain import pretrain
from koinon.experiment.runner import build_federation

DATA = {"data.name": "shakespeare", "data.partition": "natural", "data.test_fraction": 0.1,
        "data.seq_len": 32}
MODEL = {"model.name": "char_transformer", "model.dim": 64, "model.layers": 2, "model.heads": 4}
# method -> (model.peft, local learning rate): the small parts take larger steps, as is usual.
METHODS = {
    "full": ("none", 0.002),
    "bias": ({"name": "bias", "train": ["head"]}, 0.01),
    "adapter": ({"name": "adapter", "bottleneck": 8}, 0.005),
    "lora": ({"name": "lora", "rank": 4, "alpha": 8, "targets": ["blocks.0.qkv", "blocks.1.qkv", "blocks.0.fc",
                                                                    "blocks.1.fc"]}, 0.005),
    "prompt": ({"name": "prompt", "tokens": 16}, 0.02),
    # LoRA of rank 2 on every linear layer of the blocks, with the LayerNorms trained in full.
    "lora_ln": ({"name": "lora", "rank": 2, "alpha": 4,
                 "train": ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln"]}, 0.005),
}
LORA = METHODS["lora"]
# CELLM (Pau 2024): LoRA whose updates are sent sparse, top 10% by magnitude in fp16 with error
# feedback (the residual stays on the client): koinon's `ef` + `topk` codecs on the LoRA part.
METHODS["cellm"] = (LORA[0], LORA[1])
CODECS = {"cellm": {"codec.name": "ef", "codec.inner": {"name": "topk", "ratio": 0.1, "values": "fp16"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="a pretrained file to start from (skips pretraining)")
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="central pretraining steps")
    parser.add_argument("--only", nargs="*", default=None, help="methods to run (full is always run)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="another local lr")
    args = parser.parse_args()
    for item in args.lr:
        method, _, value = item.partition("=")
        METHODS[method] = (METHODS[method][0], float(value))
    chosen = {m: METHODS[m] for m in METHODS if args.only is None or m == "full" or m in args.only}
    pre_passes, pre_steps = (1, 30) if args.quick else (4, -(-args.pretrain_steps // 4))
    rounds, steps = (2, 5) if args.quick else (args.rounds, 20)
    work = Path(tempfile.mkdtemp(prefix="koinon-finetune-"))
    base = Path(args.base) if args.base else work / "charlm.safetensors"
    t0 = time.perf_counter()
    pre_cfg = Config().with_overrides({
        **DATA, **MODEL, "seed": args.seed, "data.plays": 18, "data.num_clients": 6,
        "client.optimizer": "adamw", "client.lr": 0.003, "client.batch_size": 32,
        "client.steps": pre_steps, "server.rounds": pre_passes})
    if not args.base:
        summary = pretrain(pre_cfg, base)
        print(f"pretrained on plays 1-18: {summary['steps']} steps, validation loss "
              f"{summary['history'][-1]['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s, "
              f"{summary['parameters']} parameters; {base})", flush=True)
    rows = []
    for method, (peft, lr) in chosen.items():
        t1 = time.perf_counter()
        cfg = Config().with_overrides({
            **DATA, **MODEL, "seed": args.seed, "data.skip_plays": 18, "data.num_clients": 8,
            "model.init": str(base), "model.peft": peft, "client.optimizer": "adamw", "client.lr": lr,
            "client.batch_size": 32, "client.steps": steps, "server.rounds": rounds,
            "server.clients_per_round": 4, "runtime.name": "inprocess", **CODECS.get(method, {})})
        fed = build_federation(cfg)
        start_loss = fed.evaluate()[1] if method == "full" else None
        for _ in range(rounds):
            fed.run_round(evaluate=False)
        accuracy, loss = fed.evaluate()
        rows.append((method, fed.layout.numel, lr, loss, accuracy, fed.uplink_total, time.perf_counter() - t1))
        if start_loss is not None:
            print(f"pretrained start on plays 19-37: validation loss {start_loss:.4f}")
        print(f"  {method}: validation loss {loss:.4f}, uplink {fed.uplink_total:,} bytes", flush=True)
        fed.close()
    full_loss, full_bytes = rows[0][3], rows[0][5]
    print(f"\nfine-tuning on plays 19-37 by play: 8 clients, 4 a round, {rounds} rounds of {steps} AdamW steps\n")
    print("| method | trained values | local lr | val loss | vs full | val accuracy | uplink bytes | fewer bytes | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, numel, lr, loss, acc, up, wall in rows:
        print(f"| {method} | {numel:,} | {lr:g} | {loss:.4f} | {100 * (loss / full_loss - 1):+.2f}% | {acc:.4f} | "
              f"{up:,} | {full_bytes / up:.1f}x | {wall:.0f} s |")
    lora = next((r for r in rows if r[0] == "lora"), None)
    if lora is None:
        return
    within, fewer = 100 * (lora[3] / full_loss - 1), full_bytes / lora[5]
    met = within <= 2.0 and fewer >= 20.0
    print(f"\ngoal (LoRA within 2% of full fine-tuning's validation loss, >= 20x fewer uplink bytes): "
          f"{'met' if met else 'MISSED'} ({within:+.2f}%, {fewer:.1f}x)")


if __name__ == "__main__":
    main()
