"""One DiLoCo worker process: `python -m koinon.islands.worker --store HOST:PORT ...`.

Started by `koinon launch` (or by hand / torchrun-style scripts on other machines). It builds
the same seeded parts as the simulation, runs the engine on a stack of one worker, exchanges
through `DistExchange`, and writes `worker-{id}.jsonl` (one line per round, with the shared
parameters' hash) and `final-{id}.json` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from koinon.errors import KoinonError
from koinon.experiment.config import load_config
from koinon.islands.build import build_parts
from koinon.islands.dist import DistExchange, Dropped
from koinon.islands.membership import connect
from koinon.islands.topology import DiLoCo, params_hash


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="koinon-islands-worker")
    p.add_argument("--store", required=True, help="HOST:PORT of the run's TCPStore")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--id", type=int, default=-1, help="worker id (-1: ask the store for one)")
    p.add_argument("--join", action="store_true", help="join a running job (state from a peer)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any wait may take")
    p.add_argument("--crash-at-step", type=int, default=0, help="fault injection: SIGKILL self")
    return p


def run_worker(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)  # M processes share the machine's cores
    host, _, port = args.store.rpartition(":")
    store = connect(host, int(port), args.timeout)
    if args.join:  # train with the running job's config, whatever was given locally
        Path(args.config).write_text(store.get("config").decode())
    cfg = load_config(args.config)
    parts = build_parts(cfg)
    worker_id = args.id if args.id >= 0 else int(store.add("next_id", 1)) - 1
    exchange = DistExchange(store, worker_id, args.timeout, joining=args.join)
    topo = DiLoCo(parts, cfg.seed, worker_ids=[worker_id], exchange=exchange)
    engine = topo.engine
    out = Path(args.out)
    spec = parts.spec
    total = cfg.server.rounds * spec.inner_steps
    log = (out / f"worker-{worker_id}.jsonl").open("a")
    if args.join:
        store.set(f"join/{worker_id}", "1")
        engine.sync(exchange, joining=True)
    test_loss: float | None = None
    test_acc: float | None = None
    while engine.step < total:
        todo = spec.inner_steps - engine.step % spec.inner_steps
        loss = 0.0
        for _ in range(todo):
            loss += engine.run_steps(1, exchange) / todo
            if args.crash_at_step and engine.step >= args.crash_at_step:
                log.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        round_index = engine.step // spec.inner_steps
        record = {"round": round_index, "inner_steps": engine.step, "worker": worker_id,
                  "train_loss": loss, "members": engine.last_members,
                  "uplink_bytes_total": engine.bytes_sent, "retries": exchange.attempts,
                  "params_sha256": params_hash(engine.theta), "test_loss": None,
                  "test_accuracy": None}
        reporter = worker_id == min(engine.last_members)
        if reporter and (round_index % cfg.server.eval_every == 0 or engine.step >= total):
            test_loss, test_acc = topo.evaluate()
            record["test_loss"], record["test_accuracy"] = test_loss, test_acc
        log.write(json.dumps(record) + "\n")
        log.flush()
    if test_loss is None:
        test_loss, test_acc = topo.evaluate()
    final = {"worker": worker_id, "inner_steps": engine.step, "sync_events": engine.sync_index,
             "params_sha256": params_hash(engine.theta), "test_loss": test_loss,
             "test_accuracy": test_acc, "uplink_bytes_total": engine.bytes_sent,
             "downlink_bytes_total": engine.bytes_received, "members": engine.last_members}
    (out / f"final-{worker_id}.json").write_text(json.dumps(final))
    torch.save(engine.theta, out / f"params-{worker_id}.pt")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_worker(sys.argv[1:] if argv is None else argv)
    except Dropped as exc:
        print(f"koinon worker: {exc}", file=sys.stderr)
        return 3
    except KoinonError as exc:
        print(f"koinon worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
