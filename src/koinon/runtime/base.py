"""The runtime interface: where a cohort's local training runs.

A runtime is set up once with a `CohortTrainer` (model, data, client algorithm, local
hyperparameters) and then asked, round after round, to train a list of clients. It never knows
which algorithm it runs; the topology never knows where the work happens.
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch

from koinon.clients.base import State
from koinon.registry import Registry
from koinon.runtime.trainer import CohortResult, CohortTrainer


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
    ) -> CohortResult: ...

    def close(self) -> None: ...


RUNTIMES: Registry[Runtime] = Registry("runtime")
"""Factories are called with the `[runtime]` options they declare."""


def notice(message: str) -> None:
    """One-line message to the user on stderr (fallbacks, resumptions)."""
    print(f"koinon: {message}", file=sys.stderr, flush=True)
