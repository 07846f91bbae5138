"""FedAMD (Wu and Wang 2023, arXiv:2206.05891): anchor sampling under partial participation.

Every round the sampled cohort splits at random (probability `anchor_probability`) into anchors
and miners. An anchor computes a large-batch gradient ("bullseye") at the global model: one pass
over `anchor_batch` samples (0: its whole local data), sent through the codec like any update.
The server keeps each client's latest bullseye and their mean v. A miner runs the run's local
training with its gradient corrected towards the bullseyes, g + v - b_i (b_i: its own latest
bullseye, v when it has none), and only the miners' updates move the global model. Rounds run
over simulated time like `sync` (`deadline_s` drops stragglers).

Simplification, said plainly: the paper's miners correct with the anchor gradient taken at the
round's starting point for the same minibatch; here the correction uses the stored bullseyes
(a SCAFFOLD-like control variate built from large-batch anchors), which needs no second
gradient per step.
"""

from __future__ import annotations

import numpy as np
import torch

from koinon.clients import LocalSGD
from koinon.errors import ConfigError
from koinon.schedule.driver import SCHEDULES, Scheduled, online_population
from koinon.schedule.policies import close_sync_round
from koinon.topology.server import Rejected, RoundResult
from koinon.update import State
from koinon.wire import MODEL

__all__ = ["AnchorGuided", "FedAMD"]


class AnchorGuided(LocalSGD):
    """Local SGD whose gradient gets each client's `correction` row (v - b_i) added."""

    name = "fedamd_miner"

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        return {"correction": torch.stack([s["correction"] for s in client_states])}

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        grad.add_(ctx["correction"][:, : grad.shape[1]])


@SCHEDULES.register("fedamd")
class FedAMD:
    """FedAMD: anchors send large-batch gradients, miners train corrected towards them."""

    name = "fedamd"
    synchronous = True

    def __init__(self, anchor_probability: float = 0.3, anchor_batch: int = 0, deadline_s: float = 0.0) -> None:
        if not 0.0 <= anchor_probability < 1.0:
            raise ValueError(f"schedule.anchor_probability must be in [0, 1), got {anchor_probability}")
        if anchor_batch < 0 or deadline_s < 0:
            raise ValueError("schedule.anchor_batch and deadline_s must be >= 0")
        self.anchor_probability = anchor_probability
        self.anchor_batch = anchor_batch
        self.deadline_s = deadline_s
        self.bullseyes: dict[int, torch.Tensor] = {}
        self.miner = AnchorGuided()

    def step(self, driver: Scheduled) -> RoundResult:
        fed = driver.federation
        if type(fed.algorithm) is not LocalSGD:
            raise ConfigError(f"schedule fedamd trains its miners itself: needs client.algorithm = 'fedavg', "
                              f"got {fed.algorithm.name!r}")
        server = fed.server
        r = server.round_index
        population = online_population(driver)
        cohort = driver.sample(r, population)
        rng = np.random.default_rng([fed.seed, r, 0xA4C])
        is_anchor = rng.random(len(cohort)) < self.anchor_probability
        anchors = [c for c, a in zip(cohort, is_anchor) if a]
        miners = [c for c, a in zip(cohort, is_anchor) if not a]
        rnd = server.open_round(r, miners)
        down = sum(len(p) for _, p in rnd.payloads)
        rnd.downlink_bytes = down * len(cohort)
        start = driver.now
        anchor_tasks = []
        if anchors:
            batch = self.anchor_batch or int(fed.data.sizes.max())
            anchor_tasks = driver.train(anchors, rnd.received, rnd.downloads, down,
                                        trainer=driver.trainer(steps=1, batch_size=batch, lr=1.0, optimizer="sgd",
                                                               momentum=0.0, nesterov=False, weight_decay=0.0,
                                                               lr_schedule="constant", lr_warmup=0))
        numel = fed.params.numel()
        mean = (torch.stack(list(self.bullseyes.values())).mean(dim=0) if self.bullseyes
                else torch.zeros(numel))
        states = [{"correction": mean - self.bullseyes.get(c, mean)} for c in miners]
        miner_tasks = driver.train(miners, rnd.received, rnd.downloads, down,
                                   trainer=driver.trainer(algorithm=self.miner),
                                   client_states=states) if miners else []
        limit = start + self.deadline_s if self.deadline_s > 0 else float("inf")
        side = 0
        for t in anchor_tasks:
            if t.lost or t.arrival > limit:
                continue
            side += sum(len(p) for p in t.payloads)
            try:
                rows = server.decode(t.client, t.payloads, t.num_steps, round_index=r)
            except Rejected:
                continue
            self.bullseyes[t.client] = -rows[MODEL]  # one step at lr 1: the update is minus the gradient
        driver.drain(anchor_tasks)
        # Anchor uploads crossed the wire without joining the aggregate: the round counts them as
        # it counts read-and-refused updates.
        rnd.refused_bytes += side
        out = close_sync_round(driver, miners, miner_tasks, self.deadline_s, start)
        driver.now = max(driver.now, max((min(t.end, limit) for t in anchor_tasks), default=start))
        out.extra["anchors"] = len(anchors)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"bullseye/{c}": v for c, v in self.bullseyes.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bullseyes = {int(k.split("/")[1]): v.clone() for k, v in tensors.items() if k.startswith("bullseye/")}
