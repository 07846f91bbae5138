"""koinon's DiLoCo against torchft's own (`torchft.local_sgd.DiLoCo`) on one small workload.

Two replicas run torchft's DiLoCo as threads against a live `LighthouseServer` on 127.0.0.1
(quorum, gloo all-reduce of the pseudo-gradients, `should_commit`), each a `torch.optim.AdamW`
inner optimizer and a Nesterov `torch.optim.SGD` outer optimizer on the same tiny model; koinon's
`IslandsEngine` simulates the same two workers from the same initial model on the same batches.
After several outer steps both hold the same global parameters.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
from torch import nn
from torch.distributed import TCPStore
from torchft import Manager, ProcessGroupGloo
from torchft._torchft import LighthouseServer
from torchft.local_sgd import DiLoCo

from koinon.params import Layout
from koinon.topology.diloco import IslandsEngine, IslandsSpec, LocalExchange
from koinon.topology.diloco.build import build_codec_for
from koinon.topology.diloco.inner import batch_generator, sample_batch

SEED = 5
ROUNDS = 3
SPEC = IslandsSpec(workers=2, inner_steps=4, batch_size=8, inner_lr=0.01, weight_decay=0.1,
                   beta1=0.9, beta2=0.95, grad_clip=0.0, outer_optimizer="nesterov",
                   outer_lr=0.7, outer_momentum=0.9, vectorized=False)
TIMEOUT = timedelta(seconds=30)


def workload() -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(96, 6, generator=gen)
    y = torch.randint(3, (96,), generator=gen)
    shards = {w: torch.arange(w, 96, SPEC.workers) for w in range(SPEC.workers)}
    return model, x, y, shards


def torchft_replica(worker_id: int, lighthouse: str, model: nn.Module, x: torch.Tensor,
                    y: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """One torchft replica group of one rank: torchft's DiLoCo wrapped around a plain loop."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    inner = torch.optim.AdamW(model.parameters(), lr=SPEC.inner_lr, eps=1e-8,
                              betas=(SPEC.beta1, SPEC.beta2), weight_decay=SPEC.weight_decay)
    outer = torch.optim.SGD(model.parameters(), lr=SPEC.outer_lr, momentum=SPEC.outer_momentum,
                            nesterov=True)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner"])

    # init_sync=False: on step 0 torchft would heal every replica but the primary from it, and
    # a healing replica sits out that step's all-reduce, so the first average would be one
    # replica's pseudo-gradient. Both replicas start from the same model here.
    manager = Manager(
        pg=ProcessGroupGloo(timeout=TIMEOUT), load_state_dict=load_state_dict,
        state_dict=state_dict, min_replica_size=SPEC.workers, use_async_quorum=False,
        replica_id=f"replica{worker_id}", store_addr="127.0.0.1", store_port=store.port,
        rank=0, world_size=1, lighthouse_addr=lighthouse, hostname="127.0.0.1", init_sync=False,
        timeout=TIMEOUT, quorum_timeout=TIMEOUT, connect_timeout=TIMEOUT,
    )
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=SPEC.inner_steps,
                    pin_memory=False):
            for step in range(ROUNDS * SPEC.inner_steps):
                xb, yb = sample_batch(x, y, shard, SPEC.batch_size,
                                      batch_generator(SEED, worker_id, step))
                inner.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                inner.step()  # torchft's hook syncs after every `sync_every` steps
        assert manager.current_step() == ROUNDS
    finally:
        manager.shutdown(wait=False)
    return Layout.from_module(model).flatten(model)


def test_koinon_diloco_equals_torchft_diloco_against_a_live_lighthouse():
    model, x, y, shards = workload()
    engine = IslandsEngine(SPEC, model, Layout.from_module(model), x, y, shards,
                           lambda n: build_codec_for("identity", {}, n), SEED)
    start = engine.theta.clone()
    engine.run_steps(ROUNDS * SPEC.inner_steps, LocalExchange())

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=SPEC.workers)
    try:
        with ThreadPoolExecutor(SPEC.workers) as pool:
            futures = [pool.submit(torchft_replica, w, lighthouse.address(), copy.deepcopy(model),
                                   x, y, shards[w]) for w in range(SPEC.workers)]
            replicas = [f.result(timeout=120) for f in futures]
    finally:
        lighthouse.shutdown()

    assert engine.sync_index == ROUNDS
    assert not torch.allclose(engine.theta, start)  # it trained
    torch.testing.assert_close(replicas[0], replicas[1], rtol=0, atol=0)  # replicas agree
    torch.testing.assert_close(engine.theta, replicas[0], rtol=1e-5, atol=1e-6)
