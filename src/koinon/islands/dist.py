"""`DistExchange`: the engine's all-gather of codec bytes over torch.distributed (gloo).

Per sync event and attempt, the worker announces itself, reads the coordinator's quorum, forms
a fresh gloo group among exactly those members (a `PrefixStore` per attempt keeps groups from
colliding), sends the shared state to joiners, all-gathers the encoded payloads (sizes first,
then the bytes padded to the largest), and reports `done`. It returns the payloads only when
the coordinator commits, so a worker never applies an update that another member missed.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from koinon.errors import KoinonError
from koinon.islands.engine import IslandsEngine
from koinon.islands.membership import MembershipTimeout, Quorum, wait_key
from koinon.islands.topology import params_hash


class Dropped(KoinonError):
    """This worker is not in the quorum (it was too slow): it leaves the run."""


class DistExchange:
    """One worker's side of the exchange: `gather` for the engine, `after_sync` for hashes."""

    def __init__(self, store: dist.Store, worker_id: int, timeout_s: float,
                 joining: bool = False) -> None:
        self.store = store
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.joining = joining
        self.attempts = 0  # retries seen, for the worker's log

    def gather(
        self, sync_index: int, payloads: dict[int, bytes], engine: IslandsEngine
    ) -> dict[int, bytes]:
        # Deadlines are staggered so that the coordinator always decides before a worker
        # gives up on it: it waits `timeout_s` for arrivals (twice that on a retry, since a
        # survivor may first have to time out of a broken collective), workers wait longer.
        if self.joining:  # the next sync event may be a whole round away
            raw = wait_key(self.store, f"joinq/{self.worker_id}", 20 * self.timeout_s)
            s, a = (int(v) for v in raw.decode().split("/"))
        else:
            s, a = sync_index, 0
        while True:
            if not self.joining:
                self.store.set(f"ready/{s}/{a}/{self.worker_id}", "1")
            quorum = Quorum.from_json(
                wait_key(self.store, f"quorum/{s}/{a}", 4 * self.timeout_s))
            if self.worker_id not in quorum.members:
                raise Dropped(f"worker {self.worker_id} was left out of sync event {s}")
            got: dict[int, bytes] | None = None
            try:
                got = self._attempt(s, a, quorum, payloads[self.worker_id], engine)
            except (RuntimeError, ValueError, MembershipTimeout):  # a peer died mid-collective
                got = None
            self.store.set(f"done/{s}/{a}/{self.worker_id}", "ok" if got is not None else "fail")
            verdict = wait_key(self.store, f"verdict/{s}/{a}", 3 * self.timeout_s)
            if verdict == b"commit" and got is not None:
                self.joining = False
                return got
            self.attempts += 1
            a += 1

    def after_sync(self, engine: IslandsEngine) -> None:
        """Publish the shared parameters' hash after sync event `engine.sync_index - 1`."""
        self.store.set(f"hash/{engine.sync_index - 1}/{self.worker_id}", params_hash(engine.theta))

    def _attempt(self, s: int, a: int, quorum: Quorum, payload: bytes,
                 engine: IslandsEngine) -> dict[int, bytes]:
        rank = quorum.members.index(self.worker_id)
        group_store = dist.PrefixStore(f"pg/{s}/{a}", self.store)
        dist.init_process_group("gloo", store=group_store, rank=rank,
                                world_size=len(quorum.members),
                                timeout=timedelta(seconds=self.timeout_s))
        try:
            if quorum.joiners:
                self._send_state(quorum, engine)
            blobs = _all_gather_bytes(payload, len(quorum.members))
        finally:
            dist.destroy_process_group()
        return dict(zip(quorum.members, blobs))

    def _send_state(self, quorum: Quorum, engine: IslandsEngine) -> None:
        """The source broadcasts its shared state; joiners load it (others just relay)."""
        src = quorum.members.index(quorum.source)
        blob = st_save(engine.shared_state()) if self.worker_id == quorum.source else b""
        data = _broadcast_bytes(blob, src)
        if self.worker_id in quorum.joiners:
            engine.load_shared_state(st_load(data))


def _broadcast_bytes(blob: bytes, src: int) -> bytes:
    size = torch.tensor([len(blob)], dtype=torch.int64)
    dist.broadcast(size, src)
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(
        int(size), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return buf.numpy().tobytes()


def _all_gather_bytes(blob: bytes, world: int) -> list[bytes]:
    size = torch.tensor([len(blob)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(t) for t in sizes)
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if blob:
        buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [b[: int(n)].numpy().tobytes() for b, n in zip(bufs, sizes)]
