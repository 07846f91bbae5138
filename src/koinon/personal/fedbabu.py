"""FedBABU: federated training of the body only, under a head that never moves; then fine-tuning.

Oh, Kim & Yun 2022, https://arxiv.org/abs/2106.06042. During federated training every client
updates the body (all modules but the head) and leaves the head (`head`: module names, default
the output layer) at its random initialization: its gradient is zeroed in every local step and
its update is zero, and the server zeroes the head's share of every aggregate (`server_delta`), so
the global head is the initial one in every round, whatever noise (central or local DP), a
Byzantine client's update or a robust rule puts there. A client then serves
the global model fine-tuned on its own training data for `adapt_steps` steps of plain SGD:
head and body together (`adapt_part = "all"`, the fine-tuning the paper evaluates), or the head
alone with the body frozen (`"head"`, as the abstract puts it); a new client does the same. The
protocol is FedAvg's: no state stays on a client.

Our choices where the paper leaves room: the head is the model's own seeded initialization
(the paper's random init, not an orthogonal one); the head's update is also zeroed after the
local steps, so the global head stays fixed whatever the optimizer (with SGD, momentum and
coupled weight decay the zeroed gradient already keeps it fixed; AdamW's decoupled decay would
move it within a round, which the body's training sees but the server does not). Zeroing the
head of a released aggregate is post-processing, so DP's guarantee holds; the noise drawn for
those coordinates is spent for nothing. A server hook means FedBABU is refused where the server
does not apply one to each aggregate (SecAgg+, FedBuff/FedAsync, the ledger's replays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout
from koinon.personal.base import Frozen, head_mask, train_part
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


@CLIENT_ALGORITHMS.register("fedbabu")
class FedBABU(LocalSGD):
    """FedBABU (see the module docstring): the body trains federatedly under the fixed initial
    head, then every client fine-tunes the whole model (`adapt_part = "all"`) or its head
    (`"head"`) for `adapt_steps` steps."""

    name = "fedbabu"

    def __init__(self, head: list = [], adapt_steps: int = 20, adapt_part: str = "all") -> None:  # noqa: B006
        if not isinstance(adapt_steps, int) or isinstance(adapt_steps, bool) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        if adapt_part not in ("all", "head"):
            raise ValueError(f"client.adapt_part must be 'all' (head and body) or 'head', got {adapt_part!r}")
        self.adapt_part = adapt_part
        self.head = [str(x) for x in head]
        self.adapt_steps = adapt_steps
        self._masks: dict[str, torch.Tensor] = {}

    def head_mask(self, layout: Layout) -> torch.Tensor:
        """`[P]` bool: the head's coordinates (they never move in federated training)."""
        key = layout.hash()
        if key not in self._masks:
            mask = head_mask(layout, self.head)
            if bool(mask.all()):
                raise ValueError(f"client.algorithm = 'fedbabu': the head is the whole model, no body to train "
                                 f"(modules: {', '.join(e.name for e in layout.entries)}); name the head in "
                                 f"client.head or use a model with more than one layer")
            self._masks[key] = mask
        return self._masks[key]

    def attach(self, model: torch.nn.Module, layout: Layout, *public: torch.Tensor) -> None:
        """The server's layout, for `server_delta` (and a model that is all head is refused here)."""
        self._layout = layout
        self.head_mask(layout)

    def server_delta(self, server_state: State, delta: torch.Tensor,
                     cohort_fraction: float) -> tuple[torch.Tensor, State | None]:
        """The aggregate with the head's coordinates zeroed: the global head never moves."""
        return delta.masked_fill(self.head_mask(self._layout).to(delta.device), 0.0), None

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        mask = self.head_mask(trainer.layout).to(global_params.device)
        result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                   algorithm=Frozen(mask))
        assert result.deltas is not None
        result.deltas[:, mask] = 0.0
        return result

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        frozen = None if self.adapt_part == "all" else ~self.head_mask(trainer.layout).to(global_params.device)
        return train_part(trainer, client_ids, global_params, self.adapt_steps, seed, round_index, frozen=frozen)
