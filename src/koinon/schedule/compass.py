"""FedCompass (Li et al. 2024, arXiv:2309.14675): semi-asynchronous training with a computing
power aware scheduler.

The server estimates every client's seconds per local step and its communication seconds from
its earlier updates (the client reports how long it computed; the rest of the round trip is
communication). It gives each client a number of local steps Q in [min_steps, max_steps] so
that it arrives together with a group of clients: a client joins the earliest group it can
reach with Q >= min_steps and Q <= max_steps steps, else it opens a new group arriving after
max_steps steps. A group is one server step once all its members that are still online have
arrived (their updates scaled by s(staleness) and averaged, as FedBuff does); its members then
get new tasks. Clients whose speed is not known yet train max_steps steps in a group of their
own start time (FedCompass's first round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from koinon.errors import KoinonError
from koinon.schedule.driver import SCHEDULES, Scheduled, Task, pack_task, unpack_task
from koinon.schedule.staleness import staleness_fn
from koinon.topology.server import RoundResult

__all__ = ["FedCompass", "assign_steps"]


def assign_steps(now: float, step_s: float, comm_s: float, groups: dict[int, float], min_steps: int,
                 max_steps: int) -> tuple[int | None, int]:
    """(the group to join, or None for a new one; local steps) for a client that starts at `now`
    and takes `comm_s + Q * step_s` seconds for Q steps; `groups` maps group ids to their
    expected arrival times."""
    for gid, arrival in sorted(groups.items(), key=lambda kv: (kv[1], kv[0])):
        if math.isinf(arrival):
            continue
        q = math.floor((arrival - now - comm_s) / step_s * (1 + 1e-12))
        if min_steps <= q <= max_steps:
            return gid, q
    return None, max_steps


@dataclass
class Group:
    arrival: float  # expected arrival (inf: members of unknown speed)
    members: set[int] = field(default_factory=set)
    arrived: list[Task] = field(default_factory=list)


@SCHEDULES.register("fedcompass")
class FedCompass:
    """FedCompass: local step counts chosen so that groups of clients arrive together."""

    name = "fedcompass"
    synchronous = False

    def __init__(self, min_steps: int = 0, max_steps: int = 0, concurrency: int = 0,
                 staleness: str = "polynomial", a: float = 0.5, b: float = 4.0) -> None:
        if min_steps < 0 or max_steps < 0 or concurrency < 0:
            raise ValueError("schedule.min_steps, max_steps and concurrency must be >= 0 (0 = default)")
        if max_steps and min_steps > max_steps:
            raise ValueError(f"schedule.min_steps = {min_steps} exceeds max_steps = {max_steps}")
        self.min_steps, self.max_steps, self.concurrency = min_steps, max_steps, concurrency
        self.staleness = staleness_fn(staleness, a, b)
        self.estimates: dict[int, tuple[float, float]] = {}  # client -> (s per step, comm s)
        self.groups: dict[int, Group] = {}
        self.next_group = 0
        self.pending_downlink = 0

    def bounds(self, driver: Scheduled) -> tuple[int, int]:
        q_max = self.max_steps or driver.federation.local.steps
        if q_max < 1:
            raise KoinonError("schedule fedcompass needs schedule.max_steps or client.steps > 0")
        return (self.min_steps or max(1, q_max // 5)), q_max

    def fill(self, driver: Scheduled) -> None:
        server = driver.federation.server
        clients = driver.top_up(self.concurrency)
        if not clients:
            return
        q_min, q_max = self.bounds(driver)
        steps, groups = [], []
        probe: int | None = None
        for c in clients:
            if c in self.estimates:
                step_s, comm_s = self.estimates[c]
                open_groups = {g: grp.arrival for g, grp in self.groups.items()}
                gid, q = assign_steps(driver.now, step_s, comm_s, open_groups, q_min, q_max)
                if gid is None:
                    gid = self._new_group(driver.now + comm_s + q * step_s)
            else:
                if probe is None:
                    probe = self._new_group(math.inf)
                gid, q = probe, q_max
            self.groups[gid].members.add(c)
            steps.append(q)
            groups.append(gid)
        payloads, received, downloads = server.publish()
        down = sum(len(p) for _, p in payloads)
        self.pending_downlink += down * len(clients)
        tasks = driver.train(clients, received, downloads, down, trainer=driver.trainer(steps=q_max),
                             steps=steps)
        for task, gid in zip(tasks, groups):
            task.group = gid

    def state_dict(self) -> dict[str, torch.Tensor]:
        clients = sorted(self.estimates)
        out = {"estimates/clients": torch.tensor(clients, dtype=torch.long),
               "estimates/values": torch.tensor([self.estimates[c] for c in clients], dtype=torch.float64).view(-1, 2),
               "counters": torch.tensor([self.next_group, self.pending_downlink])}
        for gid, group in self.groups.items():
            out[f"group/{gid}/arrival"] = torch.tensor([group.arrival], dtype=torch.float64)
            out[f"group/{gid}/members"] = torch.tensor(sorted(group.members), dtype=torch.long)
            for i, task in enumerate(group.arrived):
                out.update(pack_task(task, f"group/{gid}/arrived/{i}/"))
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        clients = tensors["estimates/clients"].tolist()
        values = tensors["estimates/values"].tolist()
        self.estimates = {c: (float(a), float(b)) for c, (a, b) in zip(clients, values)}
        self.next_group, self.pending_downlink = (int(x) for x in tensors["counters"].tolist())
        self.groups = {}
        for gid in sorted({int(k.split("/")[1]) for k in tensors if k.startswith("group/")}):
            head = f"group/{gid}/"
            count = len({k.split("/")[3] for k in tensors if k.startswith(head + "arrived/")})
            self.groups[gid] = Group(float(tensors[head + "arrival"][0]),
                                     set(tensors[head + "members"].tolist()),
                                     [unpack_task(tensors, f"{head}arrived/{i}/") for i in range(count)])

    def _new_group(self, arrival: float) -> int:
        gid = self.next_group
        self.next_group += 1
        self.groups[gid] = Group(arrival)
        return gid

    def step(self, driver: Scheduled) -> RoundResult:
        while True:
            if not driver.due():
                self.fill(driver)
            task = driver.next_event()
            if task is None:
                driver.wait_for_clients()
                continue
            group = self.groups[task.group]
            if task.lost:
                group.members.discard(task.client)
            else:
                steps = max(task.num_steps, 1)
                self.estimates[task.client] = (task.compute_s / steps, task.end - task.start - task.compute_s)
                group.arrived.append(task)
            if len(group.arrived) < len(group.members):
                continue
            del self.groups[task.group]
            if not group.arrived:
                continue
            version = driver.federation.server.round_index
            updates = [t.buffered(self.staleness(version - t.version)) for t in group.arrived]
            out = driver.federation.server.apply_buffered(updates, self.pending_downlink)
            self.pending_downlink = 0
            driver.keep(group.arrived, out.accepted)
            out.extra["group_spread_s"] = round(max(t.end for t in group.arrived)
                                                - min(t.end for t in group.arrived), 6)
            return out
