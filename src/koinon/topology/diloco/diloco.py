"""`DiLoCo`: the simulation topology (all workers in one process, trained as one vmapped stack).

It is what `koinon run` drives for `topology.name = "diloco"`: one round is `inner_steps` inner
steps of every worker (P sync events for Streaming DiLoCo, one per step for `sync`), followed
by an optional validation of the shared parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from koinon.local.losses import evaluate
from koinon.topology.base import fit_rounds
from koinon.topology.diloco.build import IslandsParts
from koinon.topology.diloco.engine import Exchange, IslandsEngine, LocalExchange
from koinon.topology.diloco.spec import island_device


@dataclass
class IslandsRound:
    round: int
    inner_steps: int  # total inner steps per worker so far
    num_workers: int
    train_loss: float
    uplink_bytes: int
    downlink_bytes: int
    test_loss: float | None = None
    test_accuracy: float | None = None
    params_sha256: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "round": self.round, "test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
            "train_loss": self.train_loss, "num_clients": self.num_workers,
            "inner_steps": self.inner_steps, "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes, "params_sha256": self.params_sha256,
            **self.extra,
        }


def params_hash(flat: torch.Tensor) -> str:
    """SHA-256 of the exact float32 bytes: equal hashes mean bit-identical parameters."""
    return hashlib.sha256(flat.detach().contiguous().numpy().tobytes()).hexdigest()


def eval_subset(parts: IslandsParts) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, evenly spaced slice of the validation windows (every play is represented)."""
    n = len(parts.dataset.x_test)
    want = min(n, parts.spec.eval_batches * parts.spec.batch_size * 4)
    idx = torch.linspace(0, n - 1, want).round().long()
    return parts.dataset.x_test[idx], parts.dataset.y_test[idx]


class DiLoCo:
    """DiLoCo / Streaming DiLoCo / CO2 / synchronous data parallel over `worker_ids`."""

    def __init__(
        self, parts: IslandsParts, seed: int, worker_ids: list[int] | None = None,
        exchange: Exchange | None = None,
    ) -> None:
        self.parts = parts
        self.layout = parts.layout
        ids = list(range(parts.spec.workers)) if worker_ids is None else worker_ids
        self.engine = IslandsEngine(
            parts.spec, parts.model, parts.layout, parts.dataset.x_train, parts.dataset.y_train,
            {w: parts.shard(w) for w in ids}, parts.codec_for, seed, island_device(parts.spec.device),
        )
        self.exchange = exchange or LocalExchange()
        self.round_index = 0
        self._eval = eval_subset(parts)

    @property
    def uplink_total(self) -> int:
        return self.engine.bytes_sent

    @uplink_total.setter
    def uplink_total(self, value: int) -> None:
        self.engine.bytes_sent = value

    @property
    def downlink_total(self) -> int:
        return self.engine.bytes_received

    @downlink_total.setter
    def downlink_total(self, value: int) -> None:
        self.engine.bytes_received = value

    @property
    def params(self) -> torch.Tensor:
        return self.engine.params

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean loss) on the held-out windows, as every topology's `evaluate`."""
        x, y = self._eval
        return evaluate(self.parts.model, self.layout, self.engine.params, x, y,
                        batch_size=self.parts.spec.batch_size * 4)

    def run_round(self, evaluate: bool = True) -> IslandsRound:
        sent, received = self.engine.bytes_sent, self.engine.bytes_received
        loss = self.engine.run_steps(self.parts.spec.inner_steps, self.exchange)
        self.round_index += 1
        result = IslandsRound(
            self.round_index, self.engine.step, len(self.engine.last_members), loss,
            self.engine.bytes_sent - sent, self.engine.bytes_received - received,
            params_sha256=params_hash(self.engine.params),
        )
        if evaluate:
            result.test_accuracy, result.test_loss = self.evaluate()
        return result

    def fit(self, rounds: int, eval_every: int = 1) -> list[IslandsRound]:

        return fit_rounds(self, rounds, eval_every)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.engine.load_state_dict(tensors)

    def close(self) -> None:
        """Nothing to release in one process."""
