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
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed import Store

from koinon.config import Config, load_config
from koinon.errors import KoinonError
from koinon.islands.build import build_parts
from koinon.islands.dist import DistExchange, Link
from koinon.islands.membership import connect
from koinon.islands.topology import DiLoCo, params_hash


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
    train(cfg, store, worker_id, Path(args.out), exchange, join=args.join,
          crash_at_step=args.crash_at_step)
    return 0


def train(cfg: Config, store: Store, worker_id: int, out: Path, exchange: DistExchange, *,
          join: bool = False, crash_at_step: int = 0) -> dict[str, Any]:
    """The worker's run: every round's record to worker-{id}.jsonl, then final-{id}.json and
    params-{id}.pt; returns the final record."""
    parts = build_parts(cfg)
    topo = DiLoCo(parts, cfg.seed, worker_ids=[worker_id], exchange=exchange)
    engine = topo.engine
    spec = parts.spec
    total = cfg.server.rounds * spec.inner_steps
    log = (out / f"worker-{worker_id}.jsonl").open("a")
    if join:
        store.set(f"join/{worker_id}", "1")
        engine.sync(exchange, joining=True)
    started = time.monotonic()
    evaluated: list[tuple[float, float]] = []
    waiting: dict[str, Any] | None = None  # a round whose last fragment update is in flight

    def write(record: dict[str, Any]) -> None:
        """Complete a round's record once `theta` is the round's (its updates applied)."""
        record.update(members=engine.last_members, uplink_bytes_total=engine.bytes_sent,
                      retries=exchange.attempts, params_sha256=params_hash(engine.theta))
        record.setdefault("comm_wait_s", round(engine.comm_wait_s, 4))
        reporter = worker_id == min(engine.last_members)
        last = record["inner_steps"] >= total
        if reporter and (record["round"] % cfg.server.eval_every == 0 or last):
            evaluated.append(topo.evaluate())
            record["test_loss"], record["test_accuracy"] = evaluated[-1]
        log.write(json.dumps(record) + "\n")
        log.flush()

    while engine.step < total:
        todo = spec.inner_steps - engine.step % spec.inner_steps
        loss = 0.0
        for _ in range(todo):
            loss += engine.run_steps(1, exchange) / todo
            if waiting is not None and engine.settled:
                write(waiting)
                waiting = None
            if crash_at_step and engine.step >= crash_at_step:
                log.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        record = {"round": engine.step // spec.inner_steps, "inner_steps": engine.step,
                  "worker": worker_id, "train_loss": loss,
                  "wall_s": round(time.monotonic() - started, 4),
                  "comm_wait_s": round(engine.comm_wait_s, 4), "test_loss": None,
                  "test_accuracy": None}
        if engine.settled:
            write(record)
        else:
            waiting = record
    engine.flush(exchange)
    if waiting is not None:
        write(waiting)
    test_loss, test_acc = evaluated[-1] if evaluated else topo.evaluate()
    final = {"worker": worker_id, "inner_steps": engine.step, "sync_events": engine.sync_index,
             "params_sha256": params_hash(engine.theta), "test_loss": test_loss,
             "test_accuracy": test_acc, "uplink_bytes_total": engine.bytes_sent,
             "downlink_bytes_total": engine.bytes_received, "members": engine.last_members,
             "background_exchanges": engine.background_exchanges,
             "comm_wait_s": round(engine.comm_wait_s, 4),
             "wall_s": round(time.monotonic() - started, 4)}
    (out / f"final-{worker_id}.json").write_text(json.dumps(final))
    torch.save(engine.theta, out / f"params-{worker_id}.pt")
    return final


if __name__ == "__main__":
    from koinon.cli import main

    sys.exit(main(["worker", *sys.argv[1:]]))
