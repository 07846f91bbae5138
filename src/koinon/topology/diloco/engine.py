"""The DiLoCo-family step machine, shared by the simulation and the worker processes.

An `IslandsEngine` holds a stack of K workers (all M in simulation, one in a worker process)
plus the *shared* state every worker agrees on bit for bit: the global parameters `theta`, the
outer momentum and, for CO2, the in-flight average. Communication goes through an `Exchange`:
each worker's pseudo-gradient is encoded by the codec into real bytes, every member receives
every member's bytes, and each decodes them and averages in ascending worker-id order. Because
decoding is deterministic and the summation order fixed, every worker computes the same new
`theta`, whichever mode it runs in.

Sync events happen every `inner_steps / fragments` inner steps; event i carries fragment
i mod P. With overlap tau > 0 a fragment's average is merged into the local parameters only tau
inner steps later: `local <- alpha * local + (1 - alpha) * theta`. CO2 applies each average one
sync event late.

Real overlap: an exchange that can run in the background (`OverlappingExchange`, the worker
processes) is *begun* at the sync event and *waited for* only where the math first needs its
result: tau inner steps later for Streaming DiLoCo (the outer step on the fragment, then the
merge), the next sync event for CO2. Nothing reads those values in between (fragment p's slice
of `theta` and `outer_state` is touched only by fragment p's events, and tau < inner_steps / P),
so the numbers are those of the one-process simulation, where the same update lands at once.
Plain DiLoCo (tau = 0) and `sync` need the result before the next inner step: they block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from koinon.compress.base import Codec, CodecState
from koinon.params import Layout
from koinon.topology.diloco import inner
from koinon.topology.diloco.fragments import fragment_at, fragment_indices
from koinon.topology.diloco.outer import co2_penalty, co2_step, outer_optimizer
from koinon.topology.diloco.spec import IslandsSpec

CodecFactory = Callable[[int], Codec]
"""Builds the codec for a fragment of n elements."""


class Exchange(Protocol):
    """Delivers every member's payload to every member (an all-gather of bytes)."""

    def gather(
        self, sync_index: int, payloads: dict[int, bytes], engine: IslandsEngine
    ) -> dict[int, bytes]:
        """All members' payloads by worker id; an empty payload is a member with nothing to
        add (a worker that has just joined and received the shared state from a peer)."""
        ...

    def after_sync(self, engine: IslandsEngine) -> None:
        """Called once the engine has applied a sync event (workers publish a hash here)."""
        ...


class InFlight(Protocol):
    """A begun exchange; `wait` returns what `Exchange.gather` would have returned."""

    def wait(self) -> dict[int, bytes]:
        ...


@runtime_checkable
class OverlappingExchange(Exchange, Protocol):
    """An exchange that can go on in the background while the worker keeps training."""

    overlap: bool  # False: the engine blocks on every exchange (for comparisons)

    def begin(
        self, sync_index: int, payloads: dict[int, bytes], engine: IslandsEngine
    ) -> InFlight:
        """Start the gather of sync event `sync_index` and return at once. `engine` is only
        read here (its shared state, for a joiner the peers may have to serve)."""
        ...


@dataclass
class Pending:
    """A sync event's exchange: its payloads are out; the result is `got` or `handle.wait()`."""

    sync_index: int
    fragment: int
    got: dict[int, bytes] | None = None
    handle: InFlight | None = None
    apply_at: int = 0  # Streaming DiLoCo: the inner step at which the math applies it


class LocalExchange:
    """Simulation: every worker lives in this process, so the gather is the payloads given."""

    def gather(
        self, sync_index: int, payloads: dict[int, bytes], engine: IslandsEngine
    ) -> dict[int, bytes]:
        return dict(sorted(payloads.items()))

    def after_sync(self, engine: IslandsEngine) -> None:
        """Nothing to publish in one process."""


def average_payloads(codec: Codec, payloads: dict[int, bytes]) -> torch.Tensor:
    """Decode every non-empty payload and average them, summing in ascending worker id (a
    fixed order, so every member computes the same float32 result bit for bit)."""
    total: torch.Tensor | None = None
    count = 0
    for w in sorted(payloads):
        if payloads[w]:
            decoded = codec.decode(payloads[w])
            total = decoded if total is None else total + decoded
            count += 1
    if total is None:
        raise RuntimeError("no member sent a pseudo-gradient")
    return total / count


class IslandsEngine:
    """K workers' local training plus the shared DiLoCo/CO2/sync state."""

    def __init__(
        self, spec: IslandsSpec, model: nn.Module, layout: Layout, x_train: torch.Tensor,
        y_train: torch.Tensor, shards: dict[int, torch.Tensor], codec_factory: CodecFactory,
        seed: int, device: torch.device | None = None,
    ) -> None:
        self.spec = spec
        self.layout = layout
        # On a GPU: the data, theta, the local stack and all optimizer state live there; only
        # codec bytes (and checkpoints, `params`) cross to the host.
        self.device = device or torch.device("cpu")
        self.x_train, self.y_train = x_train.to(self.device), y_train.to(self.device)
        self.shards = dict(sorted(shards.items()))
        self.worker_ids = list(self.shards)
        self.seed = seed
        numel = layout.numel
        if spec.mode == "diloco":
            self.fragments = fragment_indices(layout, spec.fragments, spec.fragment_pattern)
        else:
            self.fragments = [torch.arange(numel)]
        self.fragments = [idx.to(self.device) for idx in self.fragments]
        self.codecs = [codec_factory(len(idx)) for idx in self.fragments]
        self.grad_fn = inner.make_stack_grad(inner.make_loss(model, layout), spec.vectorized)
        self.theta = layout.flatten(model).to(self.device)
        self.inner_opt = inner.inner_optimizer(spec)
        self.outer_opt = outer_optimizer(spec)
        # Outer optimizer state, on the whole of theta (a fragment's step reads its slice).
        self.outer_state = (self.outer_opt.init(self.theta) if spec.mode == "diloco"
                            else {"momentum": torch.zeros(numel, device=self.device)})
        self.step = 0
        self.sync_index = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_members: list[int] = list(self.worker_ids)
        self._reset_local()
        self.codec_states: dict[tuple[int, int], CodecState] = {}
        self.co2_pending: torch.Tensor | None = None
        self.co2_previous: torch.Tensor | None = None
        self.inflight: Pending | None = None  # a background exchange not applied yet
        self.background_exchanges = 0  # exchanges that overlapped training (worker processes)
        self.comm_wait_s = 0.0  # wall time training stood still waiting for an exchange

    def _reset_local(self) -> None:
        """Local parameters := theta, fresh local optimizer state (start, and after joining)."""
        k, numel = len(self.worker_ids), self.layout.numel
        self.local = self.theta.repeat(k, 1)
        self.round_start = self.local.clone()
        rows = 1 if self.spec.mode == "sync" else k  # sync: one optimizer, on theta
        with self.device:
            self.inner_state = self.inner_opt.init(rows, numel)
        self.inner_opt_steps = 0  # optimizer steps on this state (AdamW's bias correction)
        self.merges: list[tuple[int, int]] = []  # (apply at inner step, fragment)

    # ------------------------------------------------------------------ training

    @property
    def params(self) -> torch.Tensor:
        """The shared parameters on the host (`theta` itself on the CPU)."""
        return self.theta.cpu()

    def run_steps(self, num_steps: int, exchange: Exchange) -> float:
        """`num_steps` inner steps with every sync event that falls among them; mean train loss."""
        total = 0.0
        for _ in range(num_steps):
            total += self._inner_step(exchange)
        return total / max(num_steps, 1)

    def _batches(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for w in self.worker_ids:
            gen = inner.batch_generator(self.seed, w, self.step)
            x, y = inner.sample_batch(self.x_train, self.y_train, self.shards[w],
                                      self.spec.batch_size, gen)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def _inner_step(self, exchange: Exchange) -> float:
        xb, yb = self._batches()
        grads, losses = self.grad_fn(self.local, xb, yb)
        if self.spec.mode == "sync":
            self._sync_dp(exchange, grads, joining=False)
        else:
            self._inner_opt_step(self.local, inner.clip_rows(grads, self.spec.grad_clip))
            self.step += 1
            self._apply_due(exchange)
            if self.step % self.spec.sync_period == 0:
                self.sync(exchange)
        return float(losses.mean())

    def _inner_opt_step(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        """One inner optimizer step on a `[K, P]` stack, in place, at this step's lr."""
        self.inner_opt.step(params, grads, self.inner_state, self.inner_opt_steps,
                            self.spec.lr_at(self.step))
        self.inner_opt_steps += 1

    def _sync_dp(self, exchange: Exchange, grads: torch.Tensor, joining: bool) -> None:
        """Synchronous data parallel: average the gradients, one optimizer step on theta."""
        avg = self._exchange(exchange, grads, 0, joining)
        avg = inner.clip_rows(avg.unsqueeze(0), self.spec.grad_clip)
        theta = self.theta.unsqueeze(0)
        self._inner_opt_step(theta, avg)
        self.local = theta.expand(len(self.worker_ids), -1).clone()
        self.step += 1
        self.sync_index += 1
        exchange.after_sync(self)

    def sync(self, exchange: Exchange, joining: bool = False) -> None:
        """One sync event. `joining`: this engine has no pseudo-gradient yet; the exchange
        loads the shared state from a peer, then the engine applies the same update as all."""
        if self.spec.mode == "sync":
            self._sync_dp(exchange, torch.zeros_like(self.local), joining)
            return
        if self.spec.mode == "co2":
            self._sync_co2(exchange, joining)
            return
        p = fragment_at(self.sync_index, self.spec.fragments)
        idx = self.fragments[p]
        deltas = self.theta[idx].unsqueeze(0) - self.local[:, idx]
        pending = self._begin(exchange, deltas, p, joining, background=self.spec.overlap > 0)
        self.sync_index = pending.sync_index + 1
        if pending.handle is not None:  # in flight for tau inner steps, then `_apply_due`
            pending.apply_at = self.step + self.spec.overlap
            self.inflight = pending
            return
        self._apply_fragment(exchange, pending, merge_now=not self.spec.overlap)

    def _apply_fragment(self, exchange: Exchange, pending: Pending, merge_now: bool) -> None:
        """Outer step on the fragment's slice of the shared state; merge now or tau later."""
        avg = self._finish(pending)
        p = pending.fragment
        idx = self.fragments[p]
        # The fragment's slices are copies (index tensors): step them, then write them back.
        state = {k: v[idx] for k, v in self.outer_state.items()}
        self.theta[idx] = self.outer_opt.step(self.theta[idx], -avg, state)
        for k, v in state.items():
            self.outer_state[k][idx] = v
        if merge_now:
            self._merge(p)
        else:
            self.merges.append((self.step + self.spec.overlap, p))
        exchange.after_sync(self)

    def _sync_co2(self, exchange: Exchange, joining: bool) -> None:
        """CO2: apply last event's average (one stale), then send this round's progress; in
        worker processes that exchange runs in the background until the next sync event."""
        deltas = self.round_start - self.local
        self._settle_co2()
        s = self.spec
        if self.co2_pending is not None:
            lam = co2_penalty(self.co2_pending, self.co2_previous, s.co2_penalty)
            co2_step(self.theta, self.outer_state["momentum"], self.co2_pending, lam,
                     s.outer_lr, s.outer_momentum, s.co2_clip)
            self.co2_previous, self.co2_pending = self.co2_pending, None
        # Each worker keeps its own in-flight progress on top of the agreed parameters.
        self.local = self.theta.unsqueeze(0) - deltas
        self.round_start = self.local.clone()
        pending = self._begin(exchange, deltas, 0, joining, background=True)
        if pending.handle is None:
            self.co2_pending = self._finish(pending)
        else:
            self.inflight = pending
        self.sync_index = pending.sync_index + 1
        exchange.after_sync(self)

    def _settle_co2(self) -> None:
        """Wait for the previous CO2 exchange (if in the background): it is `co2_pending`."""
        if self.spec.mode == "co2" and self.inflight is not None:
            pending, self.inflight = self.inflight, None
            self.co2_pending = self._finish(pending)

    def flush(self, exchange: Exchange) -> None:
        """End of a run: wait for the exchange still in flight and settle it as the simulation
        has (a fragment's outer step is applied; CO2's last average stays pending)."""
        if self.spec.mode == "co2":
            self._settle_co2()
        elif self.inflight is not None:
            pending, self.inflight = self.inflight, None
            self._apply_fragment(exchange, pending, merge_now=True)

    @property
    def settled(self) -> bool:
        """Whether `theta` is what the simulation has now (no fragment update in flight)."""
        return self.spec.mode == "co2" or self.inflight is None

    def _apply_due(self, exchange: Exchange) -> None:
        if self.inflight is not None and self.spec.mode != "co2" \
                and self.inflight.apply_at <= self.step:
            pending, self.inflight = self.inflight, None
            self._apply_fragment(exchange, pending, merge_now=True)
        self._apply_due_merges()

    def _apply_due_merges(self) -> None:
        due = [p for at, p in self.merges if at <= self.step]
        self.merges = [(at, p) for at, p in self.merges if at > self.step]
        for p in due:
            self._merge(p)

    def _merge(self, p: int) -> None:
        idx = self.fragments[p]
        a = self.spec.alpha
        self.local[:, idx] = a * self.local[:, idx] + (1 - a) * self.theta[idx].unsqueeze(0)

    # ------------------------------------------------------------------ communication

    def _exchange(
        self, exchange: Exchange, rows: torch.Tensor, fragment: int, joining: bool = False
    ) -> torch.Tensor:
        """Encode each local row, gather every member's bytes, decode, average in id order."""
        return self._finish(self._begin(exchange, rows, fragment, joining, background=False))

    def _begin(
        self, exchange: Exchange, rows: torch.Tensor, fragment: int, joining: bool,
        background: bool,
    ) -> Pending:
        """Encode each local row and hand the payloads to the exchange: in the background when
        `background` and the exchange can (never for a joiner: it has no state to go on with)."""
        payloads: dict[int, bytes] = {}
        for k, w in enumerate(self.worker_ids):
            payloads[w] = b"" if joining else self._encode(w, fragment, rows[k])
        if background and not joining and isinstance(exchange, OverlappingExchange) \
                and exchange.overlap:
            handle = exchange.begin(self.sync_index, payloads, self)
            self.background_exchanges += 1
            return Pending(self.sync_index, fragment, handle=handle)
        started = time.perf_counter()
        got = exchange.gather(self.sync_index, payloads, self)
        self.comm_wait_s += time.perf_counter() - started
        if self.spec.mode == "diloco":  # a joiner learns the sync index only now
            fragment = fragment_at(self.sync_index, self.spec.fragments)
        return Pending(self.sync_index, fragment, got=got)

    def _finish(self, pending: Pending) -> torch.Tensor:
        """Wait for the exchange if it is in flight; count the bytes; the decoded average."""
        got = pending.got
        if pending.handle is not None:
            started = time.perf_counter()
            got = pending.handle.wait()
            self.comm_wait_s += time.perf_counter() - started
        assert got is not None
        sizes = sum(len(b) for b in got.values())
        self.bytes_sent += sizes
        self.bytes_received += (len(got) - 1) * sizes
        self.last_members = sorted(got)
        return average_payloads(self.codecs[pending.fragment], got).to(self.device)

    def _encode(self, worker_id: int, fragment: int, row: torch.Tensor) -> bytes:
        key = (worker_id, fragment)
        codec = self.codecs[fragment]
        state = self.codec_states.get(key)
        if state is None:
            state = codec.init_state()
        gen = torch.Generator().manual_seed(
            ((self.seed * 7919 + worker_id) * 1_000_003 + self.sync_index) * 64 + fragment
        )
        data, self.codec_states[key] = codec.encode(row.contiguous().cpu(), state, gen)
        return data

    # ------------------------------------------------------------------ state

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What a joining worker needs from a live peer to continue in lockstep."""
        out = {
            "theta": self.theta,
            "counters": torch.tensor([self.step, self.sync_index, self.inner_opt_steps],
                                     dtype=torch.float64),
        }
        out.update({f"outer.{k}": v for k, v in self.outer_state.items()})
        if self.co2_pending is not None:
            out["co2_pending"] = self.co2_pending
        if self.co2_previous is not None:
            out["co2_previous"] = self.co2_previous
        if self.spec.mode == "sync":
            out.update({f"opt.{k}": v for k, v in self.inner_state.items()})
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        state = {k: v.to(self.device) for k, v in state.items()}
        self.theta = state["theta"].clone()
        self.outer_state = {k[6:]: v.clone() for k, v in state.items() if k.startswith("outer.")}
        step, sync_index, inner_opt_steps = (int(v) for v in state["counters"].tolist())
        self.step, self.sync_index = step, sync_index
        self.co2_pending = state.get("co2_pending")
        self.co2_previous = state.get("co2_previous")
        self._reset_local()
        if self.spec.mode == "sync":
            self.inner_state = {k[4:]: v.clone() for k, v in state.items() if k.startswith("opt.")}
            self.inner_opt_steps = inner_opt_steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything (shared and local) for a bit-identical resume of the simulation."""
        out = self.shared_state()
        out["local"] = self.local.cpu().clone()
        out["round_start"] = self.round_start.cpu().clone()
        out["bytes"] = torch.tensor([self.bytes_sent, self.bytes_received], dtype=torch.float64)
        out["merges"] = torch.tensor(self.merges, dtype=torch.long).reshape(-1, 2)
        out.update({f"inner.{k}": v.cpu().clone() for k, v in self.inner_state.items()})
        for (w, p), st in self.codec_states.items():
            out.update({f"codec.{w}.{p}.{k}": v.clone() for k, v in st.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_shared_state(state)
        self.local = state["local"].to(self.device, copy=True)
        self.round_start = state["round_start"].to(self.device, copy=True)
        self.bytes_sent, self.bytes_received = (int(v) for v in state["bytes"].tolist())
        self.merges = [(int(a), int(b)) for a, b in state["merges"].tolist()]
        self.inner_state = {k[6:]: v.to(self.device, copy=True) for k, v in state.items() if k.startswith("inner.")}
        self.inner_opt_steps = int(state["counters"][2])
        self.codec_states = {}
        for key, value in state.items():
            if key.startswith("codec."):
                _, w, p, name = key.split(".", 3)
                self.codec_states.setdefault((int(w), int(p)), {})[name] = value.clone()
