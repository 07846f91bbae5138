"""Single-process runtimes: `inprocess` (one client after another) and `vectorized` (whole cohort)."""

from __future__ import annotations

import torch
from torch import nn

from koinon.local import CohortTrainer
from koinon.local.device import check_precision, resolve_device
from koinon.log import notice
from koinon.runtime.base import RUNTIMES
from koinon.update import CohortResult, State
from koinon.wire import CohortEncoder

SMALL_MODEL = 1_000_000


def _rows(params: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The starting models of clients start..stop: the shared `[P]` one, or their rows of `[K, P]`."""
    return params if params.dim() == 1 else params[start:stop]


def set_threads(threads: int, num_params: int) -> None:
    """Intra-op threads for this process; 0 picks one thread for small models.

    A small model's kernels are too short to split: a second thread only adds synchronization,
    and when the machine is busy the spin-waiting makes steps several times slower (measured on
    the digits MLP: 7 ms against 36 ms a backward pass with two threads on a loaded 2-core box).
    """
    if threads == 0:
        threads = 1 if num_params < SMALL_MODEL else torch.get_num_threads()
    torch.set_num_threads(threads)


@RUNTIMES.register("inprocess")
class InProcess:
    """Clients one after another in this process (the reference; supports any model).

    `device`: cpu, cuda, cuda:N or auto (see `koinon.local.device`); `precision`: fp32 or bf16.
    """

    name = "inprocess"

    def __init__(self, threads: int = 0, device: str = "cpu", precision: str = "fp32") -> None:
        if threads < 0:
            raise ValueError(f"runtime.threads must be >= 0 (0 = automatic), got {threads}")
        self.threads = threads
        self.device = resolve_device(device)  # checked now: a missing GPU fails before round 1
        self.precision = check_precision(precision)
        self.trainer: CohortTrainer | None = None

    def setup(self, trainer: CohortTrainer) -> None:
        self.trainer = trainer
        set_threads(self.threads, trainer.layout.numel)
        if self.device.type != "cpu" or self.precision != "fp32":
            trainer.place(self.device, self.precision)

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
        assert self.trainer is not None, "runtime.setup() was not called"
        idx, steps = self.trainer.schedule(client_ids, seed, round_index)  # all batches at once
        parts = [
            self.trainer.train([c], _rows(global_params, i, i + 1), server_state, [s], seed, round_index,
                               schedule=(idx[i : i + 1, : int(steps[i])], steps[i : i + 1]))
            for i, (c, s) in enumerate(zip(client_ids, client_states))
        ]
        result = CohortResult.concat(parts)
        return result if encoder is None else encoder.encode(result)

    def close(self) -> None:
        self.trainer = None


@RUNTIMES.register("vectorized")
class Vectorized(InProcess):
    """Whole cohort in lock-step on stacked parameters (batched kernels or vmap), chunked to a memory budget."""

    name = "vectorized"

    def __init__(self, memory_mb: int = 2048, max_chunk: int = 0, threads: int = 0, device: str = "cpu",
                 precision: str = "fp32") -> None:
        super().__init__(threads, device, precision)
        if memory_mb < 16:
            raise ValueError(f"runtime.memory_mb must be >= 16, got {memory_mb}")
        if max_chunk < 0:
            raise ValueError(f"runtime.max_chunk must be >= 0 (0 = no limit), got {max_chunk}")
        self.memory_mb = memory_mb
        self.max_chunk = max_chunk
        self.chunk = 1
        self.fallback = False

    def setup(self, trainer: CohortTrainer) -> None:
        super().setup(trainer)
        reason = self._cannot_vmap(trainer)
        if reason:
            notice(f"runtime 'vectorized' falls back to 'inprocess': {reason}")
            self.fallback = True
            return
        per_client = trainer.bytes_per_client()
        self.chunk = max(1, (self.memory_mb << 20) // max(per_client, 1))
        if self.max_chunk:
            self.chunk = min(self.chunk, self.max_chunk)

    @staticmethod
    def _cannot_vmap(trainer: CohortTrainer) -> str:
        # Frozen parameters stay constant and stack like the rest; buffers (BatchNorm's running
        # statistics) are updated in place by the forward pass, which vmap cannot do per client.
        buffers = [name for name, _ in trainer.module.named_buffers()]
        if buffers:
            return f"the model has buffers updated during training ({', '.join(buffers[:3])})"
        # Dropout draws a random mask in every forward pass, and torch.func.vmap refuses random
        # ops unless each client's randomness is managed; say so rather than vmap's raw error.
        dropout = [name or type(m).__name__ for name, m in trainer.module.named_modules()
                   if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
        if dropout:
            return (f"the model has dropout ({', '.join(dropout[:3])}), whose random masks "
                    "torch.func.vmap cannot draw per client")
        try:  # a dry run on two stacked copies: some modules (in-place ops, data-dependent control flow) cannot vmap
            x = trainer.data.dataset.x_train[:1]
            p = torch.zeros(2, trainer.layout.numel)
            with torch.no_grad():
                pt = trainer.layout.num_trainable
                trainer.forward_many(trainer.stack_params(p[:, :pt], p[:, pt:]), x.unsqueeze(0).expand(2, *x.shape))
        except Exception as exc:  # noqa: BLE001 - any failure means: do not vmap this model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "random" in first:
                return f"the model draws random numbers in its forward pass (dropout or similar), which torch.func.vmap cannot do per client ({first})"
            return f"torch.func.vmap cannot run this model ({first})"
        return ""

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
        if self.fallback:
            return super().train(client_ids, global_params, server_state, client_states, seed,
                                 round_index, encoder)
        assert self.trainer is not None, "runtime.setup() was not called"
        parts = []
        for start in range(0, len(client_ids), self.chunk):
            ids = client_ids[start : start + self.chunk]
            states = client_states[start : start + self.chunk]
            starts = _rows(global_params, start, start + self.chunk)
            parts.append(self.trainer.train(ids, starts, server_state, states, seed, round_index))
        result = CohortResult.concat(parts)
        return result if encoder is None else encoder.encode(result)
