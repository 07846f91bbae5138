"""Schedules: synchronous rounds (with an optional deadline), FedAsync and FedBuff.

- `sync`: today's rounds over simulated time. A round samples its cohort from the clients online
  at its start and ends when every sampled client has delivered or left, or at `deadline_s`
  (0: no deadline), whichever comes first; updates that miss it are dropped (the stragglers
  stop). With every client delivering, the round is exactly the round of a run without a clock.
- `fedasync` (Xie et al. 2019, arXiv:1903.03934): `concurrency` clients train at any time; each
  arriving update is mixed in at once, x <- (1 - w) x + w x_client with w = mixing * s(tau),
  tau the versions it is behind.
- `fedbuff` (Nguyen et al. 2022, arXiv:2106.06639): `concurrency` clients train at any time;
  arriving updates, each scaled by s(tau), wait in a buffer; a full buffer of `buffer` updates is
  one server step (their weighted mean, then the server optimizer). With equal speeds and
  buffer = concurrency = clients_per_round, this is synchronous FedAvg, bit for bit.

A finished client is replaced at once by one sampled (with the run's sampler) from the idle
online clients, all replacements of one moment from one model version in one training call.
"""

from __future__ import annotations

import math

import torch

from koinon.errors import KoinonError
from koinon.schedule.driver import (
    SCHEDULES,
    Scheduled,
    Task,
    online_population,
    pack_task,
    unpack_task,
)
from koinon.schedule.staleness import staleness_fn
from koinon.topology.server import Buffered, Rejected, RoundResult


def close_sync_round(driver: Scheduled, cohort: list[int], tasks: list[Task], deadline_s: float,
                     start: float) -> RoundResult:
    """Wait for a round's tasks (until `deadline_s` after `start` when > 0), feed the arrivals
    to the open round and close it."""
    server = driver.federation.server
    r = server.round_index
    limit = start + deadline_s if deadline_s > 0 else math.inf
    end = min(max((t.end for t in tasks), default=start), limit)
    arrived = [t for t in tasks if not t.lost and t.arrival <= limit]
    results = {id(t.result) for t in tasks}
    if len(arrived) == len(cohort) and len(results) == 1:
        server.accept_cohort(tasks[0].result)  # everyone delivered: the run's own round
    else:
        for t in arrived:
            payloads = t.payloads
            try:
                rows = server.decode(t.client, payloads, t.num_steps)
                server.accept(t.client, r, rows, t.num_samples, t.train_loss, payloads)
            except Rejected as exc:
                server.reject(t.client, str(exc), sum(len(p) for p in payloads))
    out = server.close_round({t.client: t.end - t.start for t in arrived})
    driver.drain(tasks)
    driver.keep(arrived, out.accepted)
    driver.now = end
    return out


@SCHEDULES.register("sync")
class Sync:
    """Synchronous rounds over simulated time; stragglers past `deadline_s` are dropped."""

    name = "sync"
    synchronous = True

    def __init__(self, deadline_s: float = 0.0) -> None:
        if deadline_s < 0:
            raise ValueError(f"schedule.deadline_s must be >= 0 (0 = none), got {deadline_s}")
        self.deadline_s = deadline_s

    def step(self, driver: Scheduled) -> RoundResult:
        server = driver.federation.server
        population = online_population(driver)
        r = server.round_index
        cohort = driver.sample(r, population)
        rnd = server.open_round(r, cohort)
        down = sum(len(p) for _, p in rnd.payloads)
        rnd.downlink_bytes = down * len(cohort)
        start = driver.now
        tasks = driver.train(cohort, rnd.received, rnd.downloads, down)
        rnd.downlink_bytes += driver.personal_bytes  # FedCAC's customized models, as run_round counts them
        return close_sync_round(driver, cohort, tasks, self.deadline_s, start)


class _Asynchronous:
    """What FedAsync and FedBuff share: keep `concurrency` clients training."""

    name = "async"
    synchronous = False

    def __init__(self, concurrency: int, staleness: str, a: float, b: float) -> None:
        if concurrency < 0:
            raise ValueError(f"schedule.concurrency must be >= 0 (0 = server.clients_per_round), got {concurrency}")
        self.concurrency = concurrency
        self.staleness = staleness_fn(staleness, a, b)
        self.pending_downlink = 0

    def fill(self, driver: Scheduled) -> None:
        """Start idle online clients until `concurrency` are training."""
        server = driver.federation.server
        clients = driver.top_up(self.concurrency)
        if not clients:
            return
        payloads, received, downloads = server.publish()
        down = sum(len(p) for _, p in payloads)
        self.pending_downlink += down * len(clients)
        driver.train(clients, received, downloads, down)
        self.pending_downlink += driver.personal_bytes

    def step(self, driver: Scheduled) -> RoundResult:
        while True:
            if not driver.due():
                self.fill(driver)
            task = driver.next_event()
            if task is None:
                before = driver.now
                driver.wait_for_clients()
                if driver.now == before and not driver.idle_online():
                    raise KoinonError("no client can train: every online client is busy and none will arrive")
                continue
            if task.lost:
                continue
            out = self.arrive(driver, task)
            if out is not None:
                return out

    def arrive(self, driver: Scheduled, task: Task) -> RoundResult | None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"pending_downlink": torch.tensor([self.pending_downlink])}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending_downlink = int(tensors["pending_downlink"][0])

    def apply(self, driver: Scheduled, tasks: list[Task], updates: list[Buffered]) -> RoundResult:
        out = driver.federation.server.apply_buffered(updates, self.pending_downlink)
        self.pending_downlink = 0
        driver.keep(tasks, out.accepted)
        return out


@SCHEDULES.register("fedasync")
class FedAsync(_Asynchronous):
    """FedAsync: every arriving update mixed in at once with weight mixing * s(staleness)."""

    name = "fedasync"

    def __init__(self, concurrency: int = 0, mixing: float = 0.6, staleness: str = "polynomial",
                 a: float = 0.5, b: float = 4.0) -> None:
        super().__init__(concurrency, staleness, a, b)
        if not 0.0 < mixing <= 1.0:
            raise ValueError(f"schedule.mixing must be in (0, 1], got {mixing}")
        self.mixing = mixing

    def arrive(self, driver: Scheduled, task: Task) -> RoundResult:
        server = driver.federation.server
        tau = server.round_index - task.version
        offset = task.received - server.params if tau else None
        update = task.buffered(self.mixing * self.staleness(tau), offset)
        return self.apply(driver, [task], [update])


@SCHEDULES.register("fedbuff")
class FedBuff(_Asynchronous):
    """FedBuff: a buffer of `buffer` staleness-scaled updates makes one server step."""

    name = "fedbuff"

    def __init__(self, buffer: int = 10, concurrency: int = 0, staleness: str = "polynomial",
                 a: float = 0.5, b: float = 4.0) -> None:
        super().__init__(concurrency, staleness, a, b)
        if buffer < 1:
            raise ValueError(f"schedule.buffer must be >= 1, got {buffer}")
        self.buffer = buffer
        self.waiting: list[Task] = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        for i, task in enumerate(self.waiting):
            out.update(pack_task(task, f"waiting/{i}/"))
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(tensors)
        count = len({k.split("/")[1] for k in tensors if k.startswith("waiting/")})
        self.waiting = [unpack_task(tensors, f"waiting/{i}/") for i in range(count)]

    def arrive(self, driver: Scheduled, task: Task) -> RoundResult | None:
        self.waiting.append(task)
        if len(self.waiting) < self.buffer:
            return None
        tasks, self.waiting = self.waiting, []
        version = driver.federation.server.round_index
        if getattr(driver.federation.server.privacy, "secure", None) is not None:  # privacy.secagg
            from koinon.schedule.secure import secure_buffer

            out = secure_buffer(driver, tasks, [self.staleness(version - t.version) for t in tasks],
                                self.pending_downlink)
            self.pending_downlink = 0
            driver.keep(tasks, out.accepted)
            return out
        updates = [t.buffered(self.staleness(version - t.version)) for t in tasks]
        return self.apply(driver, tasks, updates)
