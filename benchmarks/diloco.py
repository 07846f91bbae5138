"""DiLoCo family vs synchronous data parallel on Shakespeare: validation loss against bytes.

M simulated islands (one process; the math the worker processes run too), each training a
character-level transformer on its own plays. Methods: synchronous data parallel (gradients
all-reduced every step), DiLoCo with H in {10, 50, 200}, Streaming DiLoCo (fragments, overlap,
alpha merge) and DiLoCo with 4-bit outer gradients. Every method takes the same number of
inner steps per worker (same compute, same tokens: sync DP's global batch is M per-worker
batches) and the same inner AdamW learning-rate schedule (linear warm-up, then cosine decay to
a tenth, over the whole run, indexed by the global inner step). Bytes are the real encoded payloads, summed over the
workers (what leaves the islands). Wall time is measured compute plus a *modeled* link: each
sync costs (M - 1) payloads received per worker over `--link-mbps` (default 10 Mbit/s, a slow
inter-island link); the simulation itself sends nothing over a network.

Prints the table and writes it with the plot to `--out` (default runs/bench-diloco/:
diloco_table.md, diloco.png); `--write-docs` writes them where the README shows them instead
(docs/diloco_table.md, docs/img/diloco.png). The goal from the issue: within 2% of the
synchronous validation loss with at least 100x fewer bytes.

    .venv/bin/python benchmarks/diloco.py [--steps 1600] [--workers 4] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from koinon.config import Config
from koinon.topology.diloco import DiLoCo, build_parts

ROOT = Path(__file__).resolve().parents[1]


def base_config(workers: int, seed: int, steps: int = 1600, partition: str = "natural",
                inner_lr: float = 0.01, schedule: str = "cosine", lr_warmup: int = 50,
                batch_size: int = 64) -> dict:
    return {
        "seed": seed,
        "data": {"name": "shakespeare", "partition": partition, "num_clients": workers,
                 "seq_len": 32, "test_fraction": 0.1},
        "model": {"name": "char_transformer", "dim": 32, "layers": 2, "heads": 4},
        "codec": {"name": "identity"},
        "topology": {"name": "diloco"},
        "diloco": {"workers": workers, "batch_size": batch_size, "inner_lr": inner_lr, "vectorized": False,
                   "eval_batches": 16, "lr_schedule": schedule,
                   "lr_warmup": min(lr_warmup, steps), "total_steps": steps},
    }


def methods(steps: int) -> list[tuple[str, dict, str]]:
    """(label, [diloco]/[codec] overrides, codec name)."""
    stream = {"fragments": 2, "overlap": 5, "alpha": 0.5}
    return [
        ("sync DP (fp32, every step)", {"mode": "sync", "inner_steps": 50}, "identity"),
        ("DiLoCo H=10", {"inner_steps": 10}, "identity"),
        ("DiLoCo H=50", {"inner_steps": 50}, "identity"),
        ("DiLoCo H=200", {"inner_steps": min(200, steps)}, "identity"),
        ("Streaming DiLoCo H=50 P=2 tau=5", {"inner_steps": 50, **stream}, "identity"),
        ("DiLoCo H=20 4-bit", {"inner_steps": 20}, "int4"),
        ("DiLoCo H=50 4-bit", {"inner_steps": 50}, "int4"),
        ("Streaming H=50 P=2 tau=5 4-bit", {"inner_steps": 50, **stream}, "int4"),
    ]


def run_method(raw: dict, steps: int, eval_every: int, link_mbps: float) -> dict:
    # One thread per method, methods in parallel processes: on a loaded 2-core machine,
    # multi-threaded kernels spin-wait on each other and run many times slower.
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = Config.from_dict(raw)
    parts = build_parts(cfg)
    topo = DiLoCo(parts, cfg.seed)
    engine = topo.engine
    m = parts.spec.workers
    points = [(0, 0, 0.0, 0.0, topo.evaluate()[1])]
    compute = 0.0
    while engine.step < steps:
        chunk = time.perf_counter()
        engine.run_steps(min(eval_every, steps - engine.step), topo.exchange)
        compute += time.perf_counter() - chunk
        # each worker receives the other M - 1 payloads of every sync: bytes_sent * (M-1) / M
        link_s = engine.bytes_sent * (m - 1) / m * 8 / (link_mbps * 1e6)
        points.append((engine.step, engine.bytes_sent, compute, compute + link_s,
                       topo.evaluate()[1]))
        if engine.step % (10 * eval_every) == 0:
            print(f"  {raw['diloco']} {raw['codec']['name']}: step {engine.step}, "
                  f"loss {points[-1][4]:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    return {"points": points, "final_loss": points[-1][4], "bytes": engine.bytes_sent,
            "compute_s": compute, "wall_s": points[-1][3], "syncs": engine.sync_index,
            "elapsed_s": time.perf_counter() - start, "num_params": parts.layout.numel}


def table(results: dict[str, dict]) -> str:
    ref = next(iter(results.values()))
    lines = ["| method | syncs | bytes sent | fewer bytes than sync | val. loss | vs sync | "
             "compute s | modeled wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        ratio = ref["bytes"] / r["bytes"]
        gap = 100 * (r["final_loss"] / ref["final_loss"] - 1)
        lines.append(f"| {label} | {r['syncs']} | {r['bytes'] / 1e6:.2f} MB | {ratio:.0f}x | "
                     f"{r['final_loss']:.4f} | {gap:+.2f}% | {r['compute_s']:.0f} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in results.items():
        pts = r["points"][1:]
        ax1.plot([p[1] / 1e6 for p in pts], [p[4] for p in pts], marker=".", label=label)
        ax2.plot([p[3] for p in pts], [p[4] for p in pts], marker=".", label=label)
    ax1.set_xscale("log")
    ax1.set_xlabel("bytes sent, all workers (MB, log scale)")
    ax2.set_xlabel("wall time: compute + modeled link (s)")
    for ax in (ax1, ax2):
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1600, help="inner steps per worker, every method")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--link-mbps", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partition", default="natural", choices=["natural", "iid"],
                   help="natural: each island trains on its own plays (non-IID); iid: shuffled")
    p.add_argument("--inner-lr", type=float, default=0.03,
                   help="peak inner AdamW lr, every method (0.03 was best for sync DP at batch 64)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="inner lr schedule over the run, the same for every method")
    p.add_argument("--lr-warmup", type=int, default=50, help="linear lr warm-up steps")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sequences per island per inner step (sync DP: workers x this); small "
                        "batches make each island's AdamW normalise its own noise")
    p.add_argument("--jobs", type=int, default=2, help="methods run in parallel processes")
    p.add_argument("--quick", action="store_true", help="60 steps, for a smoke test")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-diloco",
                   help="folder for diloco_table.md and diloco.png")
    p.add_argument("--write-docs", action="store_true",
                   help="write docs/diloco_table.md and docs/img/diloco.png (the README's) instead")
    args = p.parse_args()
    steps = 60 if args.quick else args.steps
    eval_every = 20 if args.quick else args.eval_every
    futures = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for label, options, codec in methods(steps):
            raw = base_config(args.workers, args.seed, steps, args.partition, args.inner_lr,
                              args.schedule, args.lr_warmup, args.batch_size)
            raw["diloco"].update(options)
            raw["codec"]["name"] = codec
            futures[label] = pool.submit(run_method, raw, steps, eval_every, args.link_mbps)
        results = {label: f.result() for label, f in futures.items()}
    for label, r in results.items():
        print(f"{label}: loss {r['final_loss']:.4f}, {r['bytes'] / 1e6:.2f} MB, "
              f"{r['elapsed_s']:.0f} s", flush=True)
    n_params = next(iter(results.values()))["num_params"]
    title = (f"Shakespeare char LM ({n_params:,} params), {args.workers} islands "
             f"({'split by play' if args.partition == 'natural' else 'IID shards'}), "
             f"{steps} inner steps of batch {args.batch_size} each, {args.schedule} lr "
             f"{args.inner_lr:g}")
    text = table(results)
    print(f"\n{title}\n\n{text}")
    if args.write_docs:
        plot_path, table_path = ROOT / "docs" / "img" / "diloco.png", ROOT / "docs" / "diloco_table.md"
    else:
        plot_path, table_path = args.out / "diloco.png", args.out / "diloco_table.md"
    plot(results, plot_path, title)
    table_path.write_text(f"{title}\n\n{text}\n")
    print(f"\nwrote {plot_path} and {table_path}")


if __name__ == "__main__":
    main()
