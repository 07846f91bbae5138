"""Runtime `ray`: the cohort split across Ray actors, each running a local runtime on its share.

What is notable:

- The `CohortTrainer`'s parts (model, data, client algorithm, local hyperparameters) go into the
  object store once, in `setup`; every actor builds its own `inprocess` or `vectorized` runtime
  from them once and keeps it across rounds. A round ships only the client ids, their states, and
  one `ray.put` of the global parameters and server state that all actors share.
- Actors encode their share's updates with the clients' codec states (`koinon.wire`) and return
  bytes: the driver never receives a `[K, P]` float stack.
- Shares are contiguous slices of the cohort in order, so `CohortResult.concat` gives rows in
  cohort order. The trainer seeds each client by `(seed, round, client_id)`, so the split does not
  change the result: it equals `inprocess` up to float32 summation order.
- No silent failures and no hangs: an actor that dies is replaced by a fresh one and its share
  retried (`max_retries`); an exception inside local training becomes a `KoinonError` naming the
  share's clients and the error; waiting for results is bounded by `timeout_s`.
- Ray is optional and imported in `setup`, so `koinon` works without it. This runtime shuts Ray
  down in `close` only if it started Ray itself; an already initialized Ray (a test fixture, a
  notebook, `runtime.address`) is reused and left running.
"""

from __future__ import annotations

import logging
import re
from itertools import pairwise
from typing import Any

import torch

from koinon.errors import ConfigError, KoinonError
from koinon.local import CohortTrainer
from koinon.local.device import DEVICES, check_precision
from koinon.log import notice
from koinon.runtime.base import RUNTIMES
from koinon.runtime.local import InProcess, Vectorized
from koinon.update import CohortResult, State
from koinon.wire import CohortEncoder

_INNER = ("vectorized", "inprocess")


class _Worker:
    """The body of one actor: a local runtime built once from the trainer in the object store."""

    def __init__(self, parts: dict[str, Any], inner: str, memory_mb: int, threads: int,
                 device: str = "cpu", precision: str = "fp32") -> None:
        trainer = CohortTrainer(**parts)
        # `device` is resolved here, in the actor: Ray shows it only the GPUs it was given.
        self.runtime = (
            Vectorized(memory_mb=memory_mb, threads=threads, device=device, precision=precision)
            if inner == "vectorized"
            else InProcess(threads=threads, device=device, precision=precision)
        )
        self.runtime.setup(trainer)

    def ready(self) -> bool:
        """True if a `vectorized` inner runtime fell back to `inprocess` (the driver says why)."""
        return bool(getattr(self.runtime, "fallback", False))

    def train(
        self,
        client_ids: list[int],
        shared: tuple[torch.Tensor, State],
        client_states: list[State],
        seed: int,
        round_index: int,
        offset: int = 0,
        encoder: CohortEncoder | None = None,
    ) -> CohortResult:
        global_params, server_state = shared
        if global_params.dim() == 2:  # one starting model per client: this share's rows
            global_params = global_params[offset : offset + len(client_ids)]
        return self.runtime.train(
            client_ids, global_params, server_state, client_states, seed, round_index, encoder
        )


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1].strip() if lines else type(exc).__name__


def _clients(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:10]))
    return f"{shown}, ... ({len(ids)} clients)" if len(ids) > 10 else shown


@RUNTIMES.register("ray")
class RayRuntime:
    """Cohort split across Ray actors (local or `address` cluster), each vectorized or in-process."""

    name = "ray"

    def __init__(
        self,
        address: str = "",
        num_workers: int = 2,
        inner: str = "vectorized",
        memory_mb: int = 2048,
        max_retries: int = 2,
        threads: int = 1,
        timeout_s: float = 600.0,
        device: str = "cpu",
        precision: str = "fp32",
        gpus: float = 0.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"runtime.num_workers must be >= 1, got {num_workers}")
        if inner not in _INNER:
            raise ValueError(f"runtime.inner = {inner!r}: allowed: {', '.join(_INNER)}")
        if memory_mb < 16:
            raise ValueError(f"runtime.memory_mb must be >= 16, got {memory_mb}")
        if max_retries < 0:
            raise ValueError(f"runtime.max_retries must be >= 0, got {max_retries}")
        # Each actor reserves `threads` CPUs from Ray, so there is no "automatic" 0 here as in
        # the local runtimes: the reservation is what spreads actors over a cluster's nodes.
        if threads < 1:
            raise ValueError(
                f"runtime.threads must be >= 1 (torch threads and Ray CPUs per actor), got {threads}"
            )
        if timeout_s <= 0:
            raise ValueError(f"runtime.timeout_s must be > 0, got {timeout_s}")
        # The driver may have no GPU (a cluster's head node): only the value's form is checked
        # here; each actor resolves it among the GPUs Ray assigned to it (`gpus` per actor).
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(device)):
            raise ConfigError(f"runtime.device = {device!r}: allowed: {', '.join(DEVICES)}")
        check_precision(precision)
        if gpus < 0:
            raise ValueError(f"runtime.gpus must be >= 0 (GPUs Ray reserves per actor), got {gpus}")
        if str(device).startswith("cuda") and gpus == 0:
            raise ConfigError(f"runtime.device = {device!r} needs runtime.gpus > 0: Ray shows an actor "
                              "only the GPUs it reserves (e.g. gpus = 1, or 0.5 to share one between two actors)")
        self.device = str(device)
        self.precision = precision
        self.gpus = float(gpus)
        self.address = address
        self.num_workers = num_workers
        self.inner = inner
        self.memory_mb = memory_mb
        self.max_retries = max_retries
        self.threads = threads
        self.timeout_s = float(timeout_s)
        self._ray: Any = None
        self._actor_class: Any = None
        self._parts_ref: Any = None
        self._actors: list[Any] = []
        self._started_ray = False

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: CohortTrainer) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("runtime 'ray' needs Ray: pip install 'koinon[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            local: dict[str, Any] = {} if self.address else {"num_cpus": self.num_workers * self.threads}
            try:
                ray.init(
                    address=self.address or None,
                    include_dashboard=False,
                    # Actors' stdout/stderr stay in Ray's log files: errors reach the driver as
                    # exceptions (below); streamed worker logs would interleave with koinon's output.
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    ignore_reinit_error=True,
                    **local,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = (
                    f"join the cluster at {self.address!r}" if self.address else "start a local Ray"
                )
                raise KoinonError(f"runtime 'ray': cannot {where}: {_last_line(exc)}") from None
            self._started_ray = True
        # The constructor's inputs rather than the trainer itself: the trainer holds derived
        # callables (a vmap closure), which each actor rebuilds for itself.
        parts = {
            "module": trainer.module,
            "layout": trainer.layout,
            "data": trainer.data,
            "algorithm": trainer.algorithm,
            "local": trainer.local,
            "loss_fn": trainer.loss_fn,
        }
        self._parts_ref = ray.put(parts)
        self._actor_class = ray.remote(num_cpus=self.threads, num_gpus=self.gpus)(_Worker)
        self._actors = [self._new_actor() for _ in range(self.num_workers)]
        fallback = self._wait_ready(self._actors)
        if fallback:
            reason = Vectorized._cannot_vmap(trainer)
            notice(f"runtime 'ray': actors fall back to 'inprocess': {reason}")

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self._parts_ref, self.inner, self.memory_mb, self.threads,
                                        self.device, self.precision)

    def _wait_ready(self, actors: list[Any]) -> bool:
        ray = self._ray
        try:
            flags = ray.get([a.ready.remote() for a in actors], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise KoinonError(
                f"runtime 'ray': {len(actors)} actors did not start within {self.timeout_s:g} s; "
                f"each needs {self.threads} CPU(s): {ray.cluster_resources().get('CPU', 0):g} in the cluster"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            raise KoinonError(
                f"runtime 'ray': an actor failed to build its trainer: {_last_line(exc)}"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise KoinonError(
                f"runtime 'ray': an actor died while starting: {_last_line(exc)}"
            ) from None
        return any(flags)

    # ------------------------------------------------------------------ round

    def train(
        self,
        client_ids: list[int],
        global_params: torch.Tensor,
        server_state: State,
        client_states: list[State],
        seed: int,
        round_index: int,
        encoder: CohortEncoder | None = None,
    ) -> CohortResult:
        assert self._actors, "runtime.setup() was not called"
        ray = self._ray
        k = len(client_ids)
        n = min(self.num_workers, k)
        # Contiguous shares as even as possible (the first k % n get one more client).
        bounds = [i * (k // n) + min(i, k % n) for i in range(n + 1)]
        shares = [(client_ids[a:b], client_states[a:b], a) for a, b in pairwise(bounds)]
        # One copy in the object store for all actors, not one serialization per task.
        shared = ray.put((global_params, server_state))

        def submit(i: int) -> Any:
            # Each actor encodes its share with the clients' codec states: it returns bytes.
            ids, states, offset = shares[i]
            rows = None if encoder is None else encoder.rows(offset, offset + len(ids))
            return self._actors[i].train.remote(ids, shared, states, seed, round_index, offset, rows)

        pending = {submit(i): i for i in range(n)}
        attempts = [0] * n
        results: list[CohortResult | None] = [None] * n
        while pending:
            # Each wait is bounded: no share finishing within timeout_s is reported, never waited out.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not ready:
                waiting = [c for i in pending.values() for c in shares[i][0]]
                raise KoinonError(
                    f"runtime 'ray': round {round_index + 1}: no result within {self.timeout_s:g} s "
                    f"(runtime.timeout_s) from clients {_clients(waiting)}"
                )
            ref = ready[0]
            i = pending.pop(ref)
            ids = shares[i][0]
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                # Raised by local training itself (bad data, a loss that fails): retrying cannot help.
                raise KoinonError(
                    f"runtime 'ray': round {round_index + 1}: clients {_clients(ids)} failed: {_last_line(exc)}"
                ) from None
            except ray.exceptions.RayActorError as exc:
                # The actor's process died (killed, out of memory, node lost): a fresh one can retry.
                if attempts[i] >= self.max_retries:
                    raise KoinonError(
                        f"runtime 'ray': round {round_index + 1}: clients {_clients(ids)} lost their actor "
                        f"{attempts[i] + 1} times (runtime.max_retries = {self.max_retries}): {_last_line(exc)}"
                    ) from None
                attempts[i] += 1
                notice(
                    f"runtime 'ray': actor {i} died; replacing it and retrying clients {_clients(ids)}"
                )
                ray.kill(self._actors[i])
                self._actors[i] = self._new_actor()
                pending[submit(i)] = i
        return CohortResult.concat([r for r in results if r is not None])

    def close(self) -> None:
        if self._ray is None:
            return
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        self._parts_ref = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
        self._ray = None
