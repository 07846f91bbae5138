"""What every topology offers its drivers, and the registry of topologies (`topology.name`).

A topology is built from a checked `Config` by the builder registered under its name
(`federated`, `gossip`, `diloco`; see `koinon.topology.build`), so the runner, the robustness
matrix and the deployment drivers look a name up instead of branching on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from koinon.records import Callback, run_rounds
from koinon.records.folder import Trainable
from koinon.registry import Registry


class Topology(Trainable, Protocol):
    """What a driver needs of a topology: `Federation` (a server), `Gossip` (peers) or `DiLoCo`
    (compute islands): what the round loop and the run folder need (`Trainable`: layout,
    writable round counters so that a checkpoint can restore them, params, run_round,
    state_dict, load_state_dict), and fit, evaluate, close."""

    def fit(self, rounds: int, eval_every: int = 1) -> list[Any]: ...

    def evaluate(self) -> tuple[float, float]: ...

    def close(self) -> None: ...


TOPOLOGIES: Registry[Topology] = Registry("topology")
"""Topology builders, called as `builder(cfg)` with a loaded `Config`; each checks the sections
it reads and raises a one-line `ConfigError` before anything trains."""


def fit_rounds(topology, rounds: int, eval_every: int, callbacks: Iterable[Callback] = (),
               progress: bool = False) -> list:
    """`rounds` more rounds of any topology, evaluating every `eval_every` rounds and after the
    last; each result goes to `callbacks` as it finishes (`koinon.records.run_rounds`)."""
    if rounds < 0 or eval_every < 1:
        raise ValueError(f"need rounds >= 0 and eval_every >= 1, got {rounds} and {eval_every}")
    return run_rounds(topology, topology.round_index + rounds, eval_every, callbacks=callbacks,
                      progress=progress)
