"""`DistExchange`: the engine's all-gather of codec bytes over torch.distributed (gloo).

Per sync event and attempt, the worker announces itself, reads the coordinator's quorum, forms
a fresh gloo group among exactly those members (a `PrefixStore` per attempt keeps groups from
colliding), sends the shared state to joiners, all-gathers the encoded payloads (sizes first,
then the bytes padded to the largest), and reports `done`. It returns the payloads only when
the coordinator commits, so a worker never applies an update that another member missed (a
joiner, likewise, loads the state it was sent only then).

Each attempt's group is a `ProcessGroupGloo` object of its own, not the process's default
group, and runs in a thread of its own: when a member dies, the coordinator's `retry` verdict
lets the others leave the broken attempt at once, instead of sitting in gloo's rendezvous or
connect until its timeout (which, with a member that died half way through connecting, can be
several timeouts: long enough to be dropped as silent). The abandoned attempt fails on its own
later; having no global state, it cannot disturb the next one.

`begin` runs the whole protocol (retries, drops, joiners and all) in a background thread while
the worker keeps training, and hands back a handle that the engine waits on where the math
needs the result. A failure surfaces there exactly as in the blocking call: a failed attempt is
retried with the survivors inside the thread, and `Dropped` is raised by `wait`. The engine
waits for one exchange before it begins the next. A joiner is served a snapshot taken when the
exchange begins: the peers' training goes on, but the state they serve is the sync event's.

`Link` emulates a slow network for measurements: after each all-gather the exchange sleeps
`latency + received bytes / bandwidth` (loopback is otherwise far faster than any WAN link).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from koinon.errors import KoinonError
from koinon.islands.membership import POLL_S, MembershipTimeout, Quorum, wait_key
from koinon.topology.diloco.diloco import params_hash
from koinon.topology.diloco.engine import IslandsEngine

T = TypeVar("T")


class Dropped(KoinonError):
    """This worker is not in the quorum (it was too slow): it leaves the run."""


def add_link_options(parser: argparse.ArgumentParser) -> None:
    """`--blocking` and the emulated link (`--link-latency-ms`, `--link-mbps`): the launcher
    passes them on to its workers, which take them too."""
    parser.add_argument("--blocking", action="store_true",
                        help="block on every exchange (no communication overlap; for comparisons)")
    parser.add_argument("--link-latency-ms", type=float, default=0.0,
                        help="emulated link: extra latency per all-gather")
    parser.add_argument("--link-mbps", type=float, default=0.0,
                        help="emulated link: bandwidth in Mbit/s (0: loopback speed)")


@dataclass(frozen=True)
class Link:
    """An emulated network link: each all-gather takes `latency_s + bytes * 8 / (mbps * 1e6)`
    seconds more (mbps 0: no bandwidth limit)."""

    latency_s: float = 0.0
    mbps: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.mbps < 0:
            raise KoinonError(f"link latency {self.latency_s} s, bandwidth {self.mbps} Mbit/s: "
                              "both must be >= 0")

    def delay_s(self, received_bytes: int) -> float:
        wire = received_bytes * 8 / (self.mbps * 1e6) if self.mbps else 0.0
        return self.latency_s + wire


class Background(Generic[T]):
    """`run()` in a daemon thread; `wait` returns its result or raises its error.

    The thread gets its creator's intra-op thread count: OpenMP's is per thread, and with a
    new thread's default (all cores) the exchange's larger byte copies would start a team of
    OpenMP threads that spin-wait next to the training thread (see `run_worker`)."""

    def __init__(self, run: Callable[[], T], deadline_s: float, name: str) -> None:
        self._run = run
        self._threads = torch.get_num_threads()
        self._deadline_s = deadline_s
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._target, name=name, daemon=True)
        self._thread.start()

    def _target(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            self._result = self._run()
        except BaseException as exc:  # handed to the waiting thread by `wait`
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> T:
        self._thread.join(self._deadline_s)  # every wait inside has its own deadline already
        if self._thread.is_alive():
            raise MembershipTimeout(f"{self._thread.name} took over {self._deadline_s:.0f} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


Received = tuple[dict[int, bytes], bytes]
"""One attempt's outcome: every member's payload by worker id, and the state blob a joiner was
sent (empty for everyone else)."""


class DistExchange:
    """One worker's side of the exchange: `gather` (blocking) or `begin` (in the background)
    for the engine, `after_sync` for hashes. `overlap=False` makes the engine block on every
    exchange, the behaviour to compare the overlap against."""

    def __init__(self, store: dist.Store, worker_id: int, timeout_s: float,
                 joining: bool = False, overlap: bool = True, link: Link | None = None) -> None:
        self.store = store
        self._background_store: dist.Store | None = None
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.joining = joining
        self.overlap = overlap
        self.link = link or Link()
        self.attempts = 0  # retries seen, for the worker's log
        self._inflight: Background[dict[int, bytes]] | None = None

    def begin(
        self, sync_index: int, payloads: dict[int, bytes], engine: IslandsEngine
    ) -> Background[dict[int, bytes]]:
        """`gather` in a background thread; the shared state a joiner may need is copied now,
        because this worker's engine moves on while the exchange is in flight."""
        if self._inflight is not None and not self._inflight.done():
            raise RuntimeError("DistExchange.begin: the previous exchange is still in flight")
        state = engine.shared_state()
        if self._background_store is None:
            # A TCPStore client serves one request at a time: a client of its own keeps the
            # background protocol and the training thread's store calls (hashes) apart.
            self._background_store = _new_client(self.store)
        store = self._background_store

        def run() -> dict[int, bytes]:
            return self.gather(sync_index, payloads, engine, state, store)

        # a bound far past the protocol's own: every wait in `gather` has a deadline
        self._inflight = Background(run, 40 * self.timeout_s, "koinon-exchange")
        return self._inflight

    def gather(
        self, sync_index: int, payloads: dict[int, bytes], engine: IslandsEngine,
        state: dict[str, torch.Tensor] | None = None, store: dist.Store | None = None,
    ) -> dict[int, bytes]:
        """The blocking exchange; `state`: what to serve a joiner (default: the engine's
        state now); `store`: the client to talk through (default: the main one)."""
        store = self.store if store is None else store
        # Deadlines are staggered so that the coordinator always decides before a worker
        # gives up on it: it waits `timeout_s` for arrivals (twice that on a retry), workers
        # wait longer; an attempt the coordinator has given up on is left at once.
        if self.joining:  # the next sync event may be a whole round away
            raw = wait_key(store, f"joinq/{self.worker_id}", 20 * self.timeout_s)
            s, a = (int(v) for v in raw.decode().split("/"))
        else:
            s, a = sync_index, 0
        while True:
            if not self.joining:
                store.set(f"ready/{s}/{a}/{self.worker_id}", "1")
            quorum = Quorum.from_json(
                wait_key(store, f"quorum/{s}/{a}", 4 * self.timeout_s))
            if self.worker_id not in quorum.members:
                raise Dropped(f"worker {self.worker_id} was left out of sync event {s}")
            if quorum.joiners and self.worker_id == quorum.source and state is None:
                state = engine.shared_state()
            got = self._attempt(store, s, a, quorum, payloads[self.worker_id], state)
            store.set(f"done/{s}/{a}/{self.worker_id}", "ok" if got is not None else "fail")
            verdict = wait_key(store, f"verdict/{s}/{a}", 3 * self.timeout_s)
            if verdict == b"commit" and got is not None:
                blobs, received_state = got
                if self.worker_id in quorum.joiners:
                    engine.load_shared_state(st_load(received_state))
                self.joining = False
                return blobs
            self.attempts += 1
            a += 1

    def after_sync(self, engine: IslandsEngine) -> None:
        """Publish the shared parameters' hash after sync event `engine.sync_index - 1`."""
        self.store.set(f"hash/{engine.sync_index - 1}/{self.worker_id}", params_hash(engine.params))

    def _attempt(self, store: dist.Store, s: int, a: int, quorum: Quorum, payload: bytes,
                 state: dict[str, torch.Tensor] | None) -> Received | None:
        """Run attempt (s, a) in a thread of its own; None when it failed (a peer died
        mid-collective) or when the coordinator gave up on it before it finished."""
        blob = st_save(state) if state is not None and self.worker_id == quorum.source else b""

        def run() -> Received:
            return self._collectives(store, s, a, quorum, payload, blob)

        attempt = Background(run, 4 * self.timeout_s, f"koinon-attempt-{s}-{a}")
        verdict = f"verdict/{s}/{a}"
        while not attempt.done():
            if store.check([verdict]):  # decided without us: a member died; leave it behind
                return None
            time.sleep(POLL_S)
        try:
            return attempt.wait()
        except (RuntimeError, ValueError, MembershipTimeout):
            return None

    def _collectives(self, store: dist.Store, s: int, a: int, quorum: Quorum, payload: bytes,
                     state_blob: bytes) -> Received:
        rank = quorum.members.index(self.worker_id)
        # gloo's rendezvous blocks in store gets, holding the client's lock: a client of its
        # own keeps `_attempt` able to read the verdict meanwhile
        group_store = dist.PrefixStore(f"pg/{s}/{a}", _new_client(store))
        group = dist.ProcessGroupGloo(group_store, rank,
                                      len(quorum.members), timedelta(seconds=self.timeout_s))
        received = b""
        if quorum.joiners:  # the source broadcasts its shared state; the others relay it
            received = _broadcast_bytes(group, state_blob, quorum.members.index(quorum.source))
        blobs = _all_gather_bytes(group, payload, len(quorum.members))
        delay = self.link.delay_s(sum(len(b) for b in blobs) - len(payload))
        if delay:
            time.sleep(delay)
        joiner = self.worker_id in quorum.joiners
        return dict(zip(quorum.members, blobs)), received if joiner else b""


def _new_client(store: dist.Store) -> dist.Store:
    """A new connection to the same store (`TCPStore.clone`, kept by a `PrefixStore`)."""
    return store.clone()  # type: ignore[attr-defined]  # missing from torch's stubs


# `group` is a gloo Backend: torch's stubs omit the collectives it has at run time
def _broadcast_bytes(group: Any, blob: bytes, src: int) -> bytes:
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    size = torch.tensor([len(blob)], dtype=torch.int64)
    group.broadcast([size], opts).wait()
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(
        int(size), dtype=torch.uint8)
    group.broadcast([buf], opts).wait()
    return buf.numpy().tobytes()


def _all_gather_bytes(group: Any, blob: bytes, world: int) -> list[bytes]:
    size = torch.tensor([len(blob)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    group.allgather([sizes], [size]).wait()
    longest = max(int(t) for t in sizes)
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if blob:
        buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    group.allgather([bufs], [buf]).wait()
    return [b[: int(n)].numpy().tobytes() for b, n in zip(bufs, sizes)]
