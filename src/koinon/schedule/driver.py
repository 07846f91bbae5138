"""A federation driven over simulated time: the event queue under every schedule.

`Scheduled` wraps a `Federation` (its server state machine, runtime, clients' states) and a
`Clock`. A schedule (`sync`, `fedasync`, `fedbuff`, `fedcompass`, `fedamd`; registered in
`SCHEDULES`) decides which clients start when and when the server steps; the driver does the
rest the same way for all of them:

- `train`: clients that start together from one model version train in one runtime call (so the
  vectorized runtime batches them), encode their updates with their own codec state, and become
  `Task`s whose arrival time is the clock's duration of their real bytes and samples; a task
  whose client goes offline first is lost, noticed by the server when the client leaves;
- an event queue ordered by (time, client) hands the schedule the next arrival;
- `keep`: once the server took an update, the client keeps the states that go with it.

One `run_round` is one server step (a round, a full buffer, a group, one FedAsync update); its
record carries `sim_time_s`, the simulated time at which the step happened.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from koinon.errors import KoinonError
from koinon.local import CohortTrainer
from koinon.personal import personal_downlinks
from koinon.records import Callback, folder
from koinon.registry import Registry
from koinon.schedule.clock import Clock
from koinon.topology.base import fit_rounds
from koinon.topology.federated import Federation
from koinon.topology.server import Buffered, RoundResult
from koinon.update import CohortResult, State

__all__ = ["SCHEDULES", "Schedule", "Scheduled", "Task"]


@dataclass
class Task:
    """One client's local training from one model version, and when its update arrives."""

    client: int
    version: int  # server steps done when it started
    start: float
    arrival: float  # when its update reaches the server (if not lost)
    end: float  # arrival, or when the client went offline (lost)
    lost: bool
    compute_s: float
    result: CohortResult  # the result of the group it trained with
    row: int  # its row there
    received: torch.Tensor  # the model it started from
    group: int = -1  # FedCompass: its arrival group

    @property
    def payloads(self) -> list[bytes]:
        assert self.result.payloads is not None
        return self.result.payloads[self.row] if self.client not in self.result.failed else []

    @property
    def num_samples(self) -> int:
        return int(self.result.num_samples[self.row])

    @property
    def num_steps(self) -> int:
        return int(self.result.num_steps[self.row])

    @property
    def train_loss(self) -> float:
        return float(self.result.train_loss[self.row])

    def buffered(self, weight: float = 1.0, offset: torch.Tensor | None = None) -> Buffered:
        return Buffered(self.client, self.payloads, self.num_samples, self.train_loss, weight,
                        self.num_steps, self.end - self.start, offset)


class Schedule(Protocol):
    """When clients start and when the server steps."""

    name: str

    def step(self, driver: Scheduled) -> RoundResult:
        """Advance simulated time until the server's next step; return its record."""
        ...


# A schedule may also keep state between steps (`state_dict() -> tensors`, `load_state_dict`),
# checkpointed with the driver's; `synchronous = True` marks one that steps in whole rounds.


SCHEDULES: Registry[Schedule] = Registry("schedule")
"""Factories are called with the `[schedule]` options they declare."""


@dataclass(order=True)
class _Event:
    time: float
    client: int
    task: Task = field(compare=False)


class Scheduled:
    """A `Federation` run by a schedule over simulated time (see the module docstring)."""

    def __init__(self, federation: Federation, clock: Clock, schedule: Schedule) -> None:
        if clock.num_clients != federation.data.num_clients:
            raise ValueError(f"the clock has {clock.num_clients} clients, the federation "
                             f"{federation.data.num_clients}")
        self.federation = federation
        self.clock = clock
        self.schedule = schedule
        self.layout = federation.layout
        self.now = 0.0
        self.in_flight: dict[int, Task] = {}
        self.tasks_started = 0  # training calls so far: seeds each call's batches and encoding
        self.personal_bytes = 0  # the last training call's models made for one client (FedCAC's)
        self._events: list[_Event] = []
        self._trainers: dict[tuple[Any, ...], CohortTrainer] = {}

    # ------------------------------------------------------------- Trainable

    @property
    def params(self) -> torch.Tensor:
        return self.federation.params

    @property
    def round_index(self) -> int:
        return self.federation.round_index

    @round_index.setter
    def round_index(self, value: int) -> None:
        self.federation.round_index = value

    @property
    def uplink_total(self) -> int:
        return self.federation.uplink_total

    @uplink_total.setter
    def uplink_total(self, value: int) -> None:
        self.federation.uplink_total = value

    @property
    def downlink_total(self) -> int:
        return self.federation.downlink_total

    @downlink_total.setter
    def downlink_total(self, value: int) -> None:
        self.federation.downlink_total = value

    def run_round(self, evaluate: bool = True) -> RoundResult:
        """One server step of the schedule."""
        out = self.schedule.step(self)
        out.extra["sim_time_s"] = round(self.now, 6)
        if evaluate:
            self.federation.evaluate_into(out)
        return out

    def fit(self, rounds: int, eval_every: int = 1, *, callbacks: Iterable[Callback] = (),
            progress: bool = False, out: str | Path | None = None, overwrite: bool = False) -> list[RoundResult]:
        """`rounds` more server steps; afterwards the federation's module holds the weights.
        With `out`, the run folder `Federation.fit(out=...)` writes (metrics with `sim_time_s`,
        checkpoints, model, plot with the simulated-time panel, summary)."""
        if out is None:
            results = fit_rounds(self, rounds, eval_every, callbacks, progress)
        else:
            folder_path = Path(out)
            folder.start(folder_path, overwrite, ("federation.json", json.dumps(self.describe(), indent=1)))
            start = time.perf_counter()
            results = folder.run_rounds(self, self.round_index + rounds, eval_every, out=folder_path,
                                        callbacks=callbacks, progress=progress)
            folder.finish(self, folder_path, time.perf_counter() - start, title=self.title(),
                          seed=self.federation.seed)
        self.layout.load_into(self.federation.model, self.params)
        return results

    def evaluate(self) -> tuple[float, float]:
        return self.federation.evaluate()

    def close(self) -> None:
        self.federation.close()

    def describe(self) -> dict[str, Any]:
        return {**self.federation.describe(), "schedule": self.schedule.name}

    def title(self) -> str:
        return f"{self.federation.title()} / schedule {self.schedule.name}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The federation's state, the simulated time, every update in flight (what its client
        started from, its bytes, states and timing) and the schedule's own state (buffers,
        groups): a resumed run goes on exactly as an uninterrupted one."""
        out = self.federation.state_dict()
        out["schedule/now"] = torch.tensor([self.now], dtype=torch.float64)
        out["schedule/tasks_started"] = torch.tensor([self.tasks_started], dtype=torch.long)
        for c, task in self.in_flight.items():
            out.update(pack_task(task, f"schedule/flight/{c}/"))
        extra = getattr(self.schedule, "state_dict", None)
        if extra is not None:
            out.update({f"schedule/state/{k}": v for k, v in extra().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.federation.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("schedule/")})
        self.now = float(tensors["schedule/now"][0])
        self.tasks_started = int(tensors["schedule/tasks_started"][0])
        flight = {k[len("schedule/flight/"):]: v for k, v in tensors.items() if k.startswith("schedule/flight/")}
        self.in_flight = {}
        for c in sorted({int(k.split("/")[0]) for k in flight}):
            self.in_flight[c] = unpack_task(flight, f"{c}/")
        self._events = [_Event(t.end, c, t) for c, t in self.in_flight.items()]
        heapq.heapify(self._events)
        load = getattr(self.schedule, "load_state_dict", None)
        if load is not None:
            prefix = "schedule/state/"
            load({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    # ---------------------------------------------------------------- clients

    def idle_online(self) -> list[int]:
        """Clients online now and not training."""
        return [c for c in range(self.clock.num_clients)
                if c not in self.in_flight and self.clock.available(c, self.now)]

    def sample(self, index: int, population: list[int] | np.ndarray, k: int | None = None) -> list[int]:
        """The server's seeded sample of `k` clients (default: clients_per_round) out of
        `population`; a sampler that plans by availability (`remaining(seconds)`) is first told
        how long each client stays online from now, as the trace says."""
        population = np.asarray(population, dtype=np.int64)
        remaining = getattr(self.federation.server.sampler, "remaining", None)
        if remaining is not None:
            remaining({int(c): self.clock.offline_at(int(c), self.now) - self.now for c in population})
        return self.federation.server.sample(index, population, k=k)

    def top_up(self, concurrency: int) -> list[int]:
        """The seeded sample of idle online clients that brings the clients training up to
        `concurrency` (0: clients_per_round); empty when none is free or no slot is."""
        slots = (concurrency or self.federation.server.clients_per_round) - len(self.in_flight)
        population = self.idle_online() if slots > 0 else []
        if not population:
            return []
        return self.sample(self.tasks_started, population, k=min(slots, len(population)))

    def wait_for_clients(self) -> None:
        """Move the clock to when some client is online next (now if one is)."""
        t = self.clock.next_online(self.now)
        if t is None:
            raise KoinonError(f"no client is online at or after t = {self.now:.1f} s and none is "
                              "training: every client has left (clock.dropout, clock.trace)")
        self.now = max(self.now, t)

    def trainer(self, **local: Any) -> CohortTrainer:
        """A cohort trainer with the federation's local training changed by `local` (e.g. steps,
        batch size, lr) and optionally another client `algorithm`; built once per variant."""
        import dataclasses

        fed = self.federation
        algorithm = local.pop("algorithm", fed.algorithm)
        key = (id(algorithm), tuple(sorted(local.items())))
        if key not in self._trainers:
            t = CohortTrainer(fed.model, fed.layout, fed.data, algorithm,
                              dataclasses.replace(fed.local, **local), loss_fn=fed.loss_fn)
            rt = fed.runtime  # on the runtime's device and precision, as the runtime's own trainer
            if getattr(rt, "device", None) is not None and (rt.device.type != "cpu" or rt.precision != "fp32"):
                t.place(rt.device, rt.precision)
            self._trainers[key] = t
        return self._trainers[key]

    def train(self, clients: list[int], received: torch.Tensor, downloads: State, down_bytes: int,
              trainer: CohortTrainer | None = None, steps: list[int] | None = None,
              client_states: list[State] | None = None, group: int = -1) -> list[Task]:
        """Train `clients`, all starting now from `received`, in one call: on the federation's
        runtime, or with `trainer` (when their local training differs from the run's), each with
        its own number of local `steps` if given. Returns their tasks, queued by arrival."""
        fed = self.federation
        index = self.tasks_started
        self.tasks_started += 1
        personal = [0] * len(clients)
        if client_states is None:  # the run's algorithm: what the server sends to each client alone
            states = []
            for i, c in enumerate(clients):  # one by one: each client's own bytes delay only it
                st, personal[i] = personal_downlinks(fed.algorithm, fed.server.server_state, [c],
                                                     [fed.client_states.get(c, {})], fed.downlink, fed.seed,
                                                     fed.round_index)
                states += st
        else:
            states = client_states
        self.personal_bytes = sum(personal)
        encoder = fed.sender.for_cohort(clients, index)
        if trainer is None and steps is None:
            result = fed.runtime.train(clients, received, downloads, states, fed.seed, index, encoder)
            batch = fed.local.batch_size
        else:
            trainer = trainer or self.trainer()
            plan = None
            if steps is not None:
                idx, _ = trainer.schedule(clients, fed.seed, index)
                count = torch.as_tensor(steps, dtype=torch.long)
                count = torch.where(trainer.sizes(clients) > 0, count, 0)
                width = int(count.max()) if len(clients) else 0
                if idx.shape[1] < width:
                    raise ValueError(f"{width} local steps planned, the trainer made {idx.shape[1]}")
                idx = idx[:, :width].clone()
                idx[torch.arange(width).view(1, -1) >= count.view(-1, 1)] = -1
                plan = (idx, count)
            result = encoder.encode(trainer.train(clients, received, downloads, states, fed.seed, index,
                                                  schedule=plan))
            batch = trainer.local.batch_size
        tasks = []
        for row, c in enumerate(clients):
            task = Task(c, fed.round_index, self.now, 0.0, 0.0, False, 0.0, result, row, received, group)
            samples = int(result.num_steps[row]) * batch
            up = sum(len(p) for p in task.payloads)
            task.compute_s = self.clock.compute_s(c, samples)
            task.arrival = self.now + self.clock.duration(c, samples, down_bytes + personal[row], up)
            offline = self.clock.offline_at(c, self.now)
            task.lost = offline <= task.arrival
            task.end = offline if task.lost else task.arrival
            self.in_flight[c] = task
            heapq.heappush(self._events, _Event(task.end, c, task))
            tasks.append(task)
        return tasks

    def due(self) -> bool:
        """An arrival or loss is pending at the current time: handle every event of one moment
        before starting new tasks (they then all start from the same model version)."""
        return bool(self._events) and self._events[0].time <= self.now

    def next_event(self) -> Task | None:
        """The next arrival or loss, in (time, client) order; the clock moves to it."""
        if not self._events:
            return None
        event = heapq.heappop(self._events)
        self.now = max(self.now, event.time)
        del self.in_flight[event.client]
        return event.task

    def drain(self, tasks: list[Task]) -> None:
        """Forget `tasks` (a round's cohort: the server has stopped waiting for them)."""
        gone = {t.client for t in tasks}
        self._events = [e for e in self._events if e.client not in gone]
        heapq.heapify(self._events)
        for c in gone:
            self.in_flight.pop(c, None)

    def keep(self, tasks: Iterable[Task], accepted: Iterable[int]) -> None:
        """Clients whose updates the server took keep their new codec and algorithm states."""
        fed = self.federation
        taken = set(accepted)
        for t in tasks:
            if t.client in taken:
                fed.sender.keep(t.result, {t.client})
                state = t.result.client_states[t.row]
                if state:
                    fed.client_states[t.client] = state


def pack_task(task: Task, prefix: str) -> dict[str, torch.Tensor]:
    """A task as tensors under `prefix` (a checkpoint's part): its timing, the model it started
    from, its payload bytes, and the client's algorithm and codec states that go with it."""
    r, i = task.result, task.row
    out = {
        prefix + "times": torch.tensor([task.start, task.arrival, task.end, task.compute_s], dtype=torch.float64),
        prefix + "ints": torch.tensor([task.client, task.version, int(task.lost), task.group,
                                       task.num_samples, task.num_steps, int(task.client in r.failed)]),
        prefix + "loss": torch.tensor([task.train_loss], dtype=torch.float64),
        prefix + "received": task.received,
    }
    for j, p in enumerate(task.payloads):
        out[f"{prefix}payload/{j}"] = torch.frombuffer(bytearray(p), dtype=torch.uint8) if p else torch.zeros(0, dtype=torch.uint8)
    out.update({f"{prefix}state/{k}": v for k, v in r.client_states[i].items()})
    codec = r.codec_states[i] if r.codec_states is not None else {}
    for stream, state in codec.items():
        out.update({f"{prefix}codec/{stream}/{k}": v for k, v in state.items()})
    # Clones: tasks of one group share their starting model, and a checkpoint stores no aliases.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def unpack_task(tensors: dict[str, torch.Tensor], prefix: str) -> Task:
    """The task `pack_task` wrote under `prefix`."""
    start, arrival, end, compute_s = tensors[prefix + "times"].tolist()
    client, version, lost, group, samples, steps, failed = (int(x) for x in tensors[prefix + "ints"].tolist())
    payloads: list[bytes] = []
    state: State = {}
    codec: dict[str, State] = {}
    j = 0
    while f"{prefix}payload/{j}" in tensors:
        payloads.append(tensors[f"{prefix}payload/{j}"].numpy().tobytes())
        j += 1
    for key, v in tensors.items():
        if key.startswith(prefix + "state/"):
            state[key[len(prefix + "state/"):]] = v.clone()
        elif key.startswith(prefix + "codec/"):
            stream, name = key[len(prefix + "codec/"):].split("/", 1)
            codec.setdefault(stream, {})[name] = v.clone()
    result = CohortResult([client], None, {}, torch.tensor([samples]), torch.tensor([steps]),
                          torch.tensor([float(tensors[prefix + "loss"][0])]), [state], payloads=[payloads],
                          codec_states=[codec], failed={client: "could not encode its update"} if failed else {})
    return Task(client, version, start, arrival, end, bool(lost), compute_s, result, 0,
                tensors[prefix + "received"].clone(), group)


def online_population(driver: Scheduled) -> np.ndarray:
    """Idle online clients, waiting (moving the clock) until there is one."""
    population = driver.idle_online()
    while not population:
        before = driver.now
        driver.wait_for_clients()
        population = driver.idle_online()
        if not population and driver.now == before:
            driver.now = math.nextafter(driver.now, math.inf)
    return np.asarray(population, dtype=np.int64)
