"""The runtime interface: where a cohort's local training runs.

A runtime is set up once with a `CohortTrainer` (model, data, client algorithm, local
hyperparameters) and then asked, round after round, to train a list of clients. It never knows
which algorithm it runs; the topology never knows where the work happens.
"""

from __future__ import annotations

from typing import Protocol

import torch

from koinon.local import CohortTrainer
from koinon.registry import Registry
from koinon.update import CohortResult, State
from koinon.wire import CohortEncoder


class Runtime(Protocol):
    name: str

    def setup(self, trainer: CohortTrainer) -> None: ...

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
        """Local training of `client_ids`; with `encoder`, each client's update is encoded where
        it was trained and the result carries bytes (`payloads`) instead of float stacks."""
        ...

    def close(self) -> None: ...


RUNTIMES: Registry[Runtime] = Registry("runtime")
"""Factories are called with the `[runtime]` options they declare."""
