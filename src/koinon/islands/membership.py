"""Membership for worker processes: a quorum per sync event, decided by one coordinator.

Why not torchft's Lighthouse and Manager (torchft 0.2.0's wheel ships them compiled;
tests/islands/test_torchft.py runs its DiLoCo against a live lighthouse and gets our parameters):
they cover the quorum, joins (healing from a live peer), drops and the commit vote, but their
collective is an all-reduce of float tensors, and we need (1) an all-gather of codec bytes of
varying size, decoded and summed in worker-id order so every member gets the same float32 bits
whatever the codec; (2) a failed exchange retried with the survivors within the same sync event
(torchft votes the step down and its DiLoCo drops the round's inner steps); (3) CO2's exchange in
flight for a whole round (torchft's overlap stays below one fragment period); (4) one store that
the launcher hosts, not a lighthouse process plus a store and a manager server per replica. We
keep their design: one coordinator decides, per sync event, which live workers form the quorum; the
workers then form a *fresh* gloo group among exactly those members; a joiner receives the shared
state from a live peer inside that group (torchft's "recovery" from a healthy replica); a failed
collective is retried with the survivors, and nothing is applied until every member of the
attempt has received every payload (a two-phase commit: `done` then `verdict`).

All control traffic goes through a `torch.distributed.TCPStore` hosted by the launcher. Keys:

    ready/{s}/{a}/{id}   worker id arrived at sync event s, attempt a
    join/{id}            a new worker asks to join
    quorum/{s}/{a}       JSON {"members", "joiners", "source"}: the coordinator's decision
    done/{s}/{a}/{id}    "ok" (received every payload) or "fail"
    verdict/{s}/{a}      "commit" or "retry"
    hash/{s}/{id}        SHA-256 of the shared parameters after sync event s

Every wait polls with a deadline (no unbounded blocking call anywhere), so a dead peer costs at
most one timeout, never a hang.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from torch.distributed import Store, TCPStore

from koinon.errors import KoinonError

POLL_S = 0.005


class MembershipTimeout(RuntimeError):
    """A store key did not appear before its deadline."""


def connect(host: str, port: int, timeout_s: float, who: str = "koinon launch") -> TCPStore:
    """A client of the run's store (`who` hosts it); a one-line KoinonError when nobody
    answers there."""
    try:
        return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # DistNetworkError and friends
        raise KoinonError(f"no {who} answers at {host}:{port} "
                          f"({type(exc).__name__} after {timeout_s:.0f} s)") from None


def wait_key(store: Store, key: str, timeout_s: float,
             abort: Callable[[], bool] | None = None) -> bytes:
    """The value of `key` once set; MembershipTimeout after `timeout_s` or when `abort()`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if store.check([key]):
            return store.get(key)
        if time.monotonic() > deadline or (abort is not None and abort()):
            raise MembershipTimeout(f"no {key!r} within {timeout_s:.1f} s")
        time.sleep(POLL_S)


@dataclass
class Quorum:
    members: list[int]  # ascending worker ids; rank = position
    joiners: list[int]  # members that have no state yet and receive it from `source`
    source: int

    def to_json(self) -> str:
        return json.dumps({"members": self.members, "joiners": self.joiners, "source": self.source})

    @staticmethod
    def from_json(raw: bytes) -> Quorum:
        d = json.loads(raw)
        return Quorum(list(d["members"]), list(d["joiners"]), int(d["source"]))


@dataclass
class CoordinatorLog:
    """What happened, for the launcher's summary and for tests."""

    committed: int = 0  # sync events committed
    retries: int = 0
    dropped: list[int] = field(default_factory=list)
    joined: list[int] = field(default_factory=list)
    hash_checks: int = 0
    hash_mismatches: list[int] = field(default_factory=list)  # sync events where hashes differed
    error: str = ""


class Coordinator:
    """Decides the quorum of every sync event; runs in a thread of the launcher.

    `alive(id)` says whether a worker's process still runs (the launcher owns the processes, so
    a crash is seen at once); a worker that is alive but silent is dropped after
    `round_timeout_s`. `on_sync(s)` lets the launcher inject events (start a joiner).
    """

    def __init__(self, store: Store, initial: list[int], alive: Callable[[int], bool],
                 round_timeout_s: float, on_sync: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.members = sorted(initial)
        self.alive = alive
        self.round_timeout_s = round_timeout_s
        self.on_sync = on_sync
        self.log = CoordinatorLog()
        self.stopped = threading.Event()
        self._candidates = list(range(len(initial)))

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the launcher reports it; workers time out on their own
            self.log.error = f"{type(exc).__name__}: {exc}"

    def _pending_joiners(self) -> list[int]:
        upper = int(self.store.add("next_id", 0))
        return [w for w in range(upper) if w not in self.members
                and w not in self.log.dropped and self.store.check([f"join/{w}"]) and self.alive(w)]

    def _run(self) -> None:
        s = 0
        while not self.stopped.is_set():
            if self.on_sync is not None:
                self.on_sync(s)
            if not self._decide_sync(s):
                self._check_hashes(s - 1, self.members)  # the last sync event of the run
                return
            s += 1

    def _decide_sync(self, s: int) -> bool:
        """Run the attempts of sync event s until one commits; False when no one is left."""
        a = 0
        joiners: list[int] = []
        previous = list(self.members)
        while not self.stopped.is_set():
            ready = self._gather_ready(s, a)
            joiners = sorted(set(joiners) | set(self._pending_joiners()))
            joiners = [w for w in joiners if w not in ready and self.alive(w)]
            if not ready:
                return False  # every worker finished (or died): the run is over
            self._drop([w for w in self.members if w not in ready])
            quorum = Quorum(sorted(ready + joiners), joiners, ready[0])
            self.store.set(f"quorum/{s}/{a}", quorum.to_json())
            for w in joiners:
                self.store.set(f"joinq/{w}", f"{s}/{a}")
            if self._all_done(s, a, quorum.members):
                self.store.set(f"verdict/{s}/{a}", "commit")
                self.members = quorum.members
                self.log.committed += 1
                self.log.joined += joiners
                self._check_hashes(s - 1, [w for w in previous if w in quorum.members])
                return True
            self.store.set(f"verdict/{s}/{a}", "retry")
            self.log.retries += 1
            self._drop([w for w in quorum.members if not self.alive(w)])  # died in the attempt
            self.members = [w for w in quorum.members if self.alive(w) and w not in joiners]
            a += 1
        return False

    def _gather_ready(self, s: int, a: int) -> list[int]:
        deadline = time.monotonic() + self.round_timeout_s * (2 if a else 1)
        while True:
            ready = [w for w in self.members if self.store.check([f"ready/{s}/{a}/{w}"])]
            waiting = [w for w in self.members if w not in ready and self.alive(w)]
            if not waiting or time.monotonic() > deadline or self.stopped.is_set():
                return ready
            time.sleep(POLL_S)

    def _all_done(self, s: int, a: int, members: list[int]) -> bool:
        deadline = time.monotonic() + self.round_timeout_s
        while not self.stopped.is_set():
            states = {w: self.store.get(f"done/{s}/{a}/{w}")
                      for w in members if self.store.check([f"done/{s}/{a}/{w}"])}
            if any(v != b"ok" for v in states.values()):
                return False
            if len(states) == len(members):
                return True
            if any(not self.alive(w) for w in members if w not in states):
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return False

    def _drop(self, workers: list[int]) -> None:
        for w in workers:
            if w not in self.log.dropped:
                self.log.dropped.append(w)

    def _check_hashes(self, s: int, members: list[int]) -> None:
        """All members that committed sync event s must report the same parameter hash."""
        if s < 0:
            return
        hashes = {self.store.get(f"hash/{s}/{w}") for w in members
                  if self.store.check([f"hash/{s}/{w}"])}
        self.log.hash_checks += 1
        if len(hashes) > 1:
            self.log.hash_mismatches.append(s)
