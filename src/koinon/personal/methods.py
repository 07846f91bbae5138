"""The personalization baselines: FedAvg + fine-tuning, FedBN, FedPer, FedRep, Ditto.

Each is a registered client algorithm (`client.algorithm = "finetune"`, ...) with the
`personalize` hook of `koinon.personal.base`. What stays on a client (a head, normalization
layers, a personal model) is its persistent state: the trainer starts the unshared coordinates
from it (`shared_mask`, state `private`), uploads zero there, and the driver keeps the state
(in a deployment, in the client's `--state` file).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, FedProx, LocalSGD, State
from koinon.params import Layout
from koinon.personal.base import Frozen, head_mask, norm_mask, private_models, train_part
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def _check_steps(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"client.{name} must be an integer >= 0, got {value!r}")
    return value


@CLIENT_ALGORITHMS.register("finetune")
class FineTune(LocalSGD):
    """FedAvg, then local fine-tuning: each client serves the global model after `adapt_steps`
    steps of plain SGD on its own training data (the baseline personalization is measured
    against; Wang et al. 2019, https://arxiv.org/abs/1910.10252). Training is FedAvg's."""

    name = "finetune"

    def __init__(self, adapt_steps: int = 20) -> None:
        self.adapt_steps = _check_steps("adapt_steps", adapt_steps)

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        return train_part(trainer, client_ids, global_params, self.adapt_steps, seed, round_index)


class _MaskedMethod(LocalSGD):
    """A method whose unshared coordinates (`~shared_mask`) stay on the client."""

    def __init__(self, adapt_steps: int) -> None:
        self.adapt_steps = _check_steps("adapt_steps", adapt_steps)
        self._masks: dict[str, torch.Tensor] = {}

    def private_mask(self, layout: Layout) -> torch.Tensor:
        raise NotImplementedError

    def shared_mask(self, layout: Layout) -> torch.Tensor:
        key = layout.hash()
        if key not in self._masks:
            private = self.private_mask(layout)
            if not bool(private.any()):
                raise ValueError(f"client.algorithm = {self.name!r}: the model has no coordinates to keep "
                                 f"local (modules: {', '.join(e.name for e in layout.entries)})")
            self._masks[key] = ~private
        return self._masks[key]

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        """The global shared part with the client's own private part; a client without one (a
        new client) trains the private part alone for `adapt_steps` steps from the global one."""
        mask = self.shared_mask(trainer.layout)
        models = private_models(global_params, mask, client_states)
        fresh = [i for i, st in enumerate(client_states) if "private" not in st]
        if fresh and self.adapt_steps:
            trained = train_part(trainer, [client_ids[i] for i in fresh], global_params, self.adapt_steps,
                                 seed, round_index, frozen=mask)
            models[fresh] = trained
        return models


@CLIENT_ALGORITHMS.register("fedbn")
class FedBN(_MaskedMethod):
    """FedBN (Li et al. 2021, https://arxiv.org/abs/2102.07623): normalization layers (their
    weights, biases and running statistics) stay on each client and are never uploaded; the
    rest is FedAvg. `layers` names the normalization modules (default: every module whose
    parameters are all vectors, see `koinon.personal.base.norm_mask`). A new client trains its
    normalization layers alone on its data (`adapt_steps`), our choice: the paper has none."""

    name = "fedbn"

    def __init__(self, layers: list = [], adapt_steps: int = 20) -> None:  # noqa: B006
        super().__init__(adapt_steps)
        self.layers = [str(x) for x in layers]

    def private_mask(self, layout: Layout) -> torch.Tensor:
        return norm_mask(layout, self.layers)


@CLIENT_ALGORITHMS.register("fedper")
class FedPer(_MaskedMethod):
    """FedPer (Arivazhagan et al. 2019, https://arxiv.org/abs/1912.00818): a shared body and a
    private head (`head`: module names, default the output layer), trained jointly each round.
    A new client trains a head on the global body (`adapt_steps` steps, body frozen)."""

    name = "fedper"

    def __init__(self, head: list = [], adapt_steps: int = 20) -> None:  # noqa: B006
        super().__init__(adapt_steps)
        self.head = [str(x) for x in head]

    def private_mask(self, layout: Layout) -> torch.Tensor:
        return head_mask(layout, self.head)


@CLIENT_ALGORITHMS.register("fedrep")
class FedRep(FedPer):
    """FedRep (Collins et al. 2021, https://arxiv.org/abs/2102.07078): each round a client first
    trains its private head for `head_steps` steps with the body frozen, then the body for the
    round's local steps with the head frozen, and uploads the body's change only. Plain SGD in
    the head phase (the paper's), the configured local optimizer in the body phase."""

    name = "fedrep"

    def __init__(self, head: list = [], adapt_steps: int = 20, head_steps: int = 10) -> None:  # noqa: B006
        super().__init__(head, adapt_steps)
        self.head_steps = _check_steps("head_steps", head_steps)

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        mask = self.shared_mask(trainer.layout)
        starts = private_models(global_params, mask, client_states)
        with_head = train_part(trainer, client_ids, starts, self.head_steps, seed ^ 0x4EAD, round_index,
                               frozen=mask)
        result = trainer.run_steps(client_ids, with_head, server_state, client_states, idx, steps,
                                   algorithm=Frozen(~mask))
        assert result.deltas is not None
        # Relative to the received model: the body's change (the head's is zero: not uploaded).
        deltas = with_head + result.deltas - global_params
        result.deltas = torch.where(mask, deltas, torch.zeros_like(deltas))
        result.client_states = [{"private": with_head[i, ~mask].clone()} for i in range(len(client_ids))]
        return result


@CLIENT_ALGORITHMS.register("ditto")
class Ditto(LocalSGD):
    """Ditto (Li et al. 2021, https://arxiv.org/abs/2012.04221): the global model trains by local
    SGD as in FedAvg; each client also keeps a personal model v_k that trains on the same
    batches on its loss plus lam/2 ||v_k - w||^2 (w: the model it received) and never leaves
    the client. A client's first personal model starts from the received one, and so does a
    new client's, which trains it for `adapt_steps` steps (our choice; the paper has none)."""

    name = "ditto"

    def __init__(self, lam: float = 0.1, adapt_steps: int = 20) -> None:
        if not lam >= 0:
            raise ValueError(f"client.lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.adapt_steps = _check_steps("adapt_steps", adapt_steps)

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        shared = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                   algorithm=LocalSGD())
        starts = torch.stack([st.get("personal", global_params) for st in client_states])
        personal = trainer.run_steps(client_ids, starts, server_state, client_states, idx, steps,
                                     algorithm=_ProxTo(self.lam, global_params))
        assert personal.deltas is not None
        shared.client_states = [{"personal": starts[i] + personal.deltas[i]} for i in range(len(client_ids))]
        return shared

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        models = torch.stack([st.get("personal", global_params) for st in client_states])
        fresh = [i for i, st in enumerate(client_states) if "personal" not in st]
        if fresh and self.adapt_steps:
            models[fresh] = train_part(trainer, [client_ids[i] for i in fresh], global_params, self.adapt_steps,
                                       seed, round_index, algorithm=_ProxTo(self.lam, global_params))
        return models


class _ProxTo(FedProx):
    """The proximal pull towards a fixed model `anchor` (Ditto's), not towards the start."""

    name = "prox_to"

    def __init__(self, mu: float, anchor: torch.Tensor) -> None:
        super().__init__(mu)
        self.anchor = anchor

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        if self.mu:
            grad.add_(theta - self.anchor[: grad.shape[1]], alpha=self.mu)
