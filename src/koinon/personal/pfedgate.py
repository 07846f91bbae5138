"""pFedGate: a client's gating layer picks a sparse personalized sub-model under its budget.

"Efficient Personalized Federated Learning via Sparse Model-Adaptation" (pFedGate, 2023). The
global model is shared (FedAvg); each client keeps a
lightweight gating layer that, from the input, scores the model's blocks; the client runs the
global model with only its top-scoring blocks, each scaled by its score, so a client of budget
b runs about a share b of the gated layers. The model and the gating layer train together on
the client's data; the model's change is uploaded, the gating layer never leaves the client
(its persistent state: `gate_weight`, `gate_bias`; in a deployment, the client's `--state`).

For a sample x, block j (an output unit of a Linear layer, an output channel of a convolution;
every such layer but the last, the head) gets the score g_j(x) = 2 sigmoid(w_j . x + b_j), and
in each gated layer with u units the top max(1, ceil(b u)) scores are kept and the others are
zero: the unit's pre-activation is multiplied by its score (for a unit that is the same as
scaling its weight row, the paper's gated weights).

Choices of ours where the paper leaves room or where we simplified:
- blocks are output units / channels (the paper splits parameters into blocks of a set size);
  the per-layer top-k with ties broken towards the lower unit index is our budgeted selection
  (all blocks of one layer have the same size, so within a layer the best-scoring blocks under
  a size budget are the top-k);
- the gating layer is one Linear on the flattened input (our choice of
  architecture), initialized to zero with the factor 2, so every kept score starts at exactly 1: with budget 1 a
  client starts from the global model itself;
- the gating layer trains at `gate_lr` times the model's learning rate (default 5, our choice:
  on digits a gating layer at the model's rate barely moves within a round; 0 freezes it);
- the model a client serves: the global model under its gating layer after `adapt_steps` more
  gate-only steps against that global model (a new client starts them from a fresh gating layer);
- sparsity is simulated by zeroing: the FLOPs of a pruned unit are not skipped, and the whole
  model crosses the wire (the paper sends the dense model as well). Each input keeps its own
  units, so skipping them takes a per-sample gather of weight rows (`[B, k, in]`), which on a
  CPU at these widths costs more than the dense product, and a LayerNorm after a gated layer
  still needs the whole width's statistics; left as it is.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.personal.evaluate import with_steps
from koinon.personal.hetero import (
    Predictor,
    budget_of,
    check_budgets,
    check_plain_sgd,
    mean_ce,
    sgd_loop,
)
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

GATED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def gated_modules(module: nn.Module) -> list[tuple[nn.Module, int]]:
    """The gated layers (every Linear / convolution but the last) and their unit counts."""
    layers = [m for m in module.modules() if isinstance(m, GATED)]
    if len(layers) < 2:
        raise ValueError("client.algorithm = 'pfedgate' needs a model with at least two Linear or convolution "
                         "layers (it gates every one but the head)")
    return [(m, m.out_features if isinstance(m, nn.Linear) else m.out_channels) for m in layers[:-1]]


def gate_scores(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, units: list[int],
                budget: float) -> torch.Tensor:
    """`[B, G]`: each sample's kept block scores, 2 sigmoid(W x + b) on each layer's top
    max(1, ceil(budget u)) units (ties towards the lower index), zero elsewhere."""
    scores = 2.0 * torch.sigmoid(x.flatten(1) @ weight.T + bias)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    start = 0
    for u in units:
        k = max(1, math.ceil(budget * u - 1e-9))
        part = scores[:, start : start + u].detach()
        order = torch.sort(part, dim=1, descending=True, stable=True).indices[:, :k]
        keep[:, start : start + u].scatter_(1, order, True)
        start += u
    return torch.where(keep, scores, torch.zeros_like(scores))


@contextlib.contextmanager
def gating(layers: list[tuple[nn.Module, int]], gates: torch.Tensor, shifts: torch.Tensor | None = None):
    """While open, each gated layer's output units are multiplied by their columns of `gates`
    (`[B, G]`), then shifted by those of `shifts` if given (FedIns' scale-and-shift)."""
    handles, start = [], 0
    for m, u in layers:
        cols = slice(start, start + u)

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, cols: slice = cols) -> torch.Tensor:
            g, extra = gates[:, cols], [1] * (out.dim() - 2)
            out = out * g.view(*g.shape, *extra)
            if shifts is not None:
                b = shifts[:, cols]
                out = out + b.view(*b.shape, *extra)
            return out

        handles.append(m.register_forward_hook(hook))
        start += u
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@CLIENT_ALGORITHMS.register("pfedgate")
class PFedGate(LocalSGD):
    """pFedGate (2023): a shared model, a private gating layer, a sparse model per input."""

    name = "pfedgate"

    def __init__(self, budgets: list = [1.0], gate_lr: float = 5.0, adapt_steps: int = 20) -> None:  # noqa: B006
        self.budgets = check_budgets(budgets, self.name)
        if not gate_lr >= 0:
            raise ValueError(f"client.gate_lr must be >= 0, got {gate_lr}")
        if not isinstance(adapt_steps, int) or isinstance(adapt_steps, bool) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.gate_lr, self.adapt_steps = float(gate_lr), adapt_steps

    def _gate_init(self, trainer: CohortTrainer, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        if "gate_weight" in st:
            return st["gate_weight"], st["gate_bias"]
        total = sum(u for _, u in gated_modules(trainer.module))
        features = trainer.x_train[0].numel()
        return torch.zeros(total, features), torch.zeros(total)

    def logits(self, trainer: CohortTrainer, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               x: torch.Tensor, budget: float) -> torch.Tensor:
        """The gated model's outputs: the model `flat` (`[P]`) with the scores of (`weight`, `bias`)."""
        layers = gated_modules(trainer.module)
        gates = gate_scores(weight, bias, x, [u for _, u in layers], budget)
        with gating(layers, gates):
            return functional_call(trainer.module, trainer.layout.views(flat), (x,))

    def _train(self, trainer: CohortTrainer, client: int, flat: torch.Tensor, st: State, batches: torch.Tensor,
               steps: int, model_lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        budget = budget_of(self.budgets, client)
        weight, bias = self._gate_init(trainer, st)
        pt = trainer.num_trainable
        frozen = flat[pt:]

        def loss_of(ts: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return mean_ce(self.logits(trainer, torch.cat([ts[0], frozen]), ts[1], ts[2], x, budget), y)

        (theta, w, b), loss = sgd_loop(trainer.local, trainer.x_train, trainer.y_train, batches, steps,
                                       [flat[:pt], weight, bias], loss_of, [model_lr, self.gate_lr, self.gate_lr])
        return torch.cat([theta, frozen]), w, b, loss

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        check_plain_sgd(trainer.local, self.name)
        deltas, states, losses = [], [], []
        for i, c in enumerate(client_ids):
            model, w, b, loss = self._train(trainer, c, global_params, client_states[i], idx[i], int(steps[i]), 1.0)
            deltas.append(model - global_params)
            states.append({"gate_weight": w, "gate_bias": b})
            losses.append(loss)
        return CohortResult(list(client_ids), torch.stack(deltas), {}, trainer.sizes(client_ids), steps.clone(),
                            torch.tensor(losses), states)

    def personal_predictors(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                            server_state: State, client_states: list[State], seed: int,
                            round_index: int) -> list[Predictor]:
        """Each client's gated model: its gating layer (a new client's: a fresh one) trained for
        `adapt_steps` more steps on its data against the current global model, which stays frozen
        (our choice: the stored gating layer was trained against the client's last local model)."""
        out: list[Predictor] = []
        other = with_steps(trainer, self.adapt_steps)
        for c, st in zip(client_ids, client_states):
            batches = other.client_batches(c, seed, round_index)
            _, w, b, _ = self._train(trainer, c, global_params, st, batches, self.adapt_steps, 0.0)
            budget = budget_of(self.budgets, c)

            def predict(x: torch.Tensor, w: torch.Tensor = w, b: torch.Tensor = b, budget: float = budget) -> torch.Tensor:
                with torch.no_grad():
                    return self.logits(trainer, global_params, w, b, x, budget)

            out.append(predict)
        return out


__all__ = ["PFedGate", "gate_scores", "gated_modules", "gating"]
