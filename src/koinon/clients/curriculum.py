"""Curriculum ordering of local data (Vahidian et al. 2023, "When do curricula work in federated
learning?", arXiv:2212.12712): each client visits its samples easiest first.

Before local training, every sample of the client's passes is scored by its loss under the
model the client starts from; within each pass over the local data the samples are then visited
in order of that loss, ascending (`order = "easy"`: curriculum) or descending (`"hard"`:
anti-curriculum). Which samples a pass holds, and the batch layout, stay those of the seeded
shuffle; only the order within a pass changes, so the update is still plain local SGD.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD
from koinon.local import CohortTrainer
from koinon.update import CohortResult, State

__all__ = ["CurriculumOrder", "order_by_difficulty"]


@torch.no_grad()
def _losses(trainer: CohortTrainer, params: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of the flat model `params` on training samples `samples`."""
    out = functional_call(trainer.module, trainer.layout.views(params), (trainer.x_train[samples],))
    loss = trainer.loss_fn(out, trainer.y_train[samples])
    return loss.reshape(len(samples), -1).mean(dim=1)


def order_by_difficulty(trainer: CohortTrainer, start: torch.Tensor, client_ids: list[int], idx: torch.Tensor,
                        hardest_first: bool = False) -> torch.Tensor:
    """`idx` (`[K, S, B]` sample indices, -1 = padding) with each pass over a client's data
    sorted by loss under its starting model (`[P]` shared or `[K, P]`)."""
    k = idx.shape[0]
    flat = idx.reshape(k, -1).clone()
    sizes = trainer.sizes(client_ids).tolist()
    shared = None
    if start.dim() == 1:
        present = flat[flat >= 0].unique()
        # Indices and losses live on the host (the batch schedule does); a GPU trainer's
        # losses come back once.
        shared = torch.full((len(trainer.y_train),), float("nan"), device="cpu")
        if len(present):
            shared[present] = _losses(trainer, start, present).cpu()
    for i in range(k):
        where = (flat[i] >= 0).nonzero().flatten()
        values = flat[i, where]
        if not len(values):
            continue
        loss = shared[values] if shared is not None else _losses(trainer, start[i], values).cpu()
        n = max(int(sizes[i]), 1)
        for a in range(0, len(values), n):
            key = loss[a: a + n]
            order = torch.argsort(-key if hardest_first else key, stable=True)
            values[a: a + n] = values[a: a + n][order]
        flat[i, where] = values
    return flat.reshape(idx.shape)


@CLIENT_ALGORITHMS.register("curriculum")
class CurriculumOrder(LocalSGD):
    """Local SGD over local data ordered easiest first (curriculum) or hardest first."""

    name = "curriculum"

    def __init__(self, order: str = "easy") -> None:
        if order not in ("easy", "hard"):
            raise ValueError(f"client.order must be 'easy' (curriculum) or 'hard' (anti-curriculum), got {order!r}")
        self.order = order

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        ordered = order_by_difficulty(trainer, global_params, client_ids, idx, self.order == "hard")
        return trainer.run_steps(client_ids, global_params, server_state, client_states, ordered, steps,
                                 algorithm=self)
