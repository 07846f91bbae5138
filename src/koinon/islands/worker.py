"""One DiLoCo worker process, started by `koinon launch` or by torchrun.

    python -m koinon.islands.worker --store HOST:PORT --config C --out DIR ...   (koinon launch)
    torchrun --nproc-per-node M -m koinon.islands.worker CONFIG.toml [--out DIR]  (torchrun)

Without `--store` the worker reads torchrun's environment (`koinon.islands.torchrun`). Either
way it builds the same seeded parts as the simulation, runs the engine on a stack of one worker,
exchanges through `DistExchange` (in the background where the math allows, see `engine`), and
writes `worker-{id}.jsonl` (one line per round, with the shared parameters' hash) and
`final-{id}.json` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from koinon.config import load_config
from koinon.errors import KoinonError
from koinon.islands.dist import DistExchange, Link
from koinon.islands.membership import connect
from koinon.islands.process import train


def run_worker(args: argparse.Namespace) -> int:
    """`koinon worker` (see `koinon.cli` for its arguments): join a launch through its store,
    or run under torchrun when no `--store` is given."""
    torch.set_num_threads(1)  # M processes share the machine's cores
    if args.timeout <= 0:
        raise KoinonError(f"--timeout = {args.timeout}: must be > 0")
    link = Link(args.link_latency_ms / 1000, args.link_mbps)
    if args.store is None:
        from koinon.islands.torchrun import run_under_torchrun

        return run_under_torchrun(args, link)
    if not args.config or not args.out:
        raise KoinonError("--store needs --config and --out (koinon launch passes them)")
    host, _, port = args.store.rpartition(":")
    store = connect(host, int(port), args.timeout)
    if args.join:  # train with the running job's config, whatever was given locally
        Path(args.config).write_text(store.get("config").decode())
    cfg = load_config(args.config)
    worker_id = args.id if args.id >= 0 else int(store.add("next_id", 1)) - 1
    exchange = DistExchange(store, worker_id, args.timeout, joining=args.join,
                            overlap=not args.blocking, link=link)
    if args.join:
        print(f"worker {worker_id}: joining the launch at {args.store} with its config "
              f"({args.config}); the state comes from a live peer at the next sync event", flush=True)
    final = train(cfg, store, worker_id, Path(args.out), exchange, join=args.join,
                  crash_at_step=args.crash_at_step)
    store.set(f"final/{worker_id}", json.dumps(final))  # the launcher's summary counts joiners from elsewhere
    if args.join:
        print(f"worker {worker_id}: done after {final['inner_steps']} inner steps and "
              f"{final['sync_events']} sync events, validation loss {final['test_loss']:.4f}, parameters "
              f"sha256 {final['params_sha256'][:16]}; results in {args.out}/ (worker-{worker_id}.jsonl, "
              f"final-{worker_id}.json)", flush=True)
    return 0


if __name__ == "__main__":
    from koinon.cli import main

    sys.exit(main(["worker", *sys.argv[1:]]))
