"""A worker process's run, under `koinon launch` or torchrun: the engine on a stack of one.

Both entry points (`koinon.islands.worker` for a launch's store, `koinon.islands.torchrun`)
call `train`, so the two paths run the same loop.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed import Store

from koinon.config import Config
from koinon.islands.dist import DistExchange
from koinon.topology.diloco.build import build_parts
from koinon.topology.diloco.diloco import DiLoCo, params_hash


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
                      retries=exchange.attempts, params_sha256=params_hash(engine.params))
        record.setdefault("comm_wait_s", round(engine.comm_wait_s, 4))
        reporter = worker_id == min(engine.last_members)
        last = record["inner_steps"] >= total
        if reporter and (record["round"] % cfg.server.eval_every == 0 or last):
            evaluated.append(topo.evaluate())
            record["test_accuracy"], record["test_loss"] = evaluated[-1]
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
    test_acc, test_loss = evaluated[-1] if evaluated else topo.evaluate()
    final = {"worker": worker_id, "inner_steps": engine.step, "sync_events": engine.sync_index,
             "params_sha256": params_hash(engine.params), "test_loss": test_loss,
             "test_accuracy": test_acc, "uplink_bytes_total": engine.bytes_sent,
             "downlink_bytes_total": engine.bytes_received, "members": engine.last_members,
             "background_exchanges": engine.background_exchanges,
             "comm_wait_s": round(engine.comm_wait_s, 4),
             "wall_s": round(time.monotonic() - started, 4)}
    (out / f"final-{worker_id}.json").write_text(json.dumps(final))
    torch.save(engine.params, out / f"params-{worker_id}.pt")
    return final
