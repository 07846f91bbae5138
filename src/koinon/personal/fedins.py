"""FedIns: a pool of scale-and-shift modules, chosen per instance at inference.

"Towards Instance-adaptive Inference for Federated Learning" (FedIns, 2023). Clients differ, and so do the samples within one client.
Scale-and-shift of deep features (SSF) adapts a model with two vectors per layer: a hidden
unit's output h becomes gamma * h + beta. FedIns keeps a *pool* of `pool_size` SSF modules, each
with a key; for an instance x the query q(x) picks the `top` modules whose keys are most
cosine-similar, and their average SSF adapts the model for that instance alone. Each client
trains the pool on its data, the server averages the pools, and every client (and a new one)
serves the global model with the instance-chosen SSF.

A round of client k, from the received model and pool: for each batch, the queries q(x) are the
embeddings (the head's inputs) of the received model, held fixed through the round; the loss is
the cross-entropy of the SSF-adapted model plus `key_weight` times the mean of 1 - cos(q, key)
over the chosen keys (the keys move towards the queries that choose them). The model, the pool
and the keys train by SGD; the model's change is the update, and the trained pool an extra
upload (`pool`, packed into one vector of the model's size) that the server averages over the
cohort and sends back (a download).

Choices of ours where the paper leaves room or where we simplified: the paper adapts a frozen
pretrained backbone (only the SSF pool and the head train); koinon's benchmark models are not
pretrained, so the backbone trains by FedAvg as well (`model.init` gives a pretrained one; the
method does not freeze it); SSF acts on every hidden Linear / convolution layer's units, not on
the head; the pool starts from gamma = 1, beta = 0 (the model itself) and keys drawn N(0, 1)
from a fixed seed (the same for every run: `init_server_state` has no seed; the pool is still
reproducible); the server averages pools uniformly over the cohort; the pool trains at
`pool_lr` times the model's learning rate (0 freezes it: the method is then FedAvg).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.personal.hetero import Predictor, check_plain_sgd, mean_ce, sgd_loop
from koinon.personal.pfedgate import gated_modules, gating
from koinon.personal.recon import body_of, embed
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

POOL_SEED = 0xF1D5


def choose(queries: torch.Tensor, keys: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, top]` indices of the keys most cosine-similar to each query (ties towards the lower
    index) and `[B, top]` their similarities."""
    sim = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    order = torch.sort(sim.detach(), dim=1, descending=True, stable=True).indices[:, :top]
    return order, sim.gather(1, order)


def scale_shift(layers: list[tuple[nn.Module, int]], gamma: torch.Tensor, beta: torch.Tensor):
    """While open, each layer's output units are scaled by their columns of `gamma` (`[B, U]`)
    and shifted by those of `beta` (pFedGate's `gating` with shifts)."""
    return gating(layers, gamma, beta)


@CLIENT_ALGORITHMS.register("fedins")
class FedIns(LocalSGD):
    """FedIns (2023): an averaged pool of SSF modules, chosen per instance."""

    name = "fedins"
    uploads: tuple[str, ...] = ("pool",)
    downloads: tuple[str, ...] = ("pool",)

    def __init__(self, pool_size: int = 8, top: int = 2, key_weight: float = 0.1, pool_lr: float = 1.0) -> None:
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise ValueError(f"client.pool_size must be an integer >= 1, got {pool_size!r}")
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= pool_size:
            raise ValueError(f"client.top must be an integer in [1, pool_size = {pool_size}], got {top!r}")
        if not key_weight >= 0:
            raise ValueError(f"client.key_weight must be >= 0, got {key_weight}")
        if not pool_lr >= 0:
            raise ValueError(f"client.pool_lr must be >= 0, got {pool_lr}")
        self.pool_size, self.top, self.key_weight, self.pool_lr = pool_size, top, float(key_weight), float(pool_lr)

    def init_server_state(self, numel: int) -> State:
        return {"pool": torch.zeros(numel)}  # gammas [N, U], betas [N, U], keys [N, D]; last value 1 once made

    def shapes(self, trainer: CohortTrainer) -> tuple[list[tuple[nn.Module, int]], int, int]:
        layers = gated_modules(trainer.module)
        units = sum(u for _, u in layers)
        _, head = body_of(trainer.module)
        d = int(trainer.layout.views(torch.zeros(trainer.layout.numel))[f"{head}.weight"].shape[1])
        if self.pool_size * (2 * units + d) + 1 > trainer.layout.numel:
            raise ValueError(f"client.algorithm = 'fedins': a pool of {self.pool_size} x ({2 * units} + {d}) values "
                             f"does not fit the model's {trainer.layout.numel} parameters; lower client.pool_size")
        return layers, units, d

    def unpack(self, packed: torch.Tensor, units: int, d: int) -> list[torch.Tensor]:
        """(gammas, betas, keys) of a packed pool; a pool not yet made: the identity SSFs and seeded keys."""
        n = self.pool_size
        if float(packed[-1]) < 0.5:
            gen = torch.Generator().manual_seed(POOL_SEED)
            return [torch.ones(n, units), torch.zeros(n, units), torch.randn(n, d, generator=gen)]
        a, b = n * units, 2 * n * units
        return [packed[:a].view(n, units), packed[a:b].view(n, units), packed[b : b + n * d].view(n, d)]

    def pack(self, pool: list[torch.Tensor], numel: int) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in pool])
        out = torch.zeros(numel)
        out[: len(flat)] = flat
        out[-1] = 1.0
        return out

    def logits(self, trainer: CohortTrainer, layers: list[tuple[nn.Module, int]], flat: torch.Tensor,
               pool: list[torch.Tensor], queries: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The instance-adapted outputs and the chosen keys' similarities `[B, top]`."""
        gammas, betas, keys = pool
        idx, sim = choose(queries, keys, self.top)
        gamma, beta = gammas[idx].mean(dim=1), betas[idx].mean(dim=1)
        with scale_shift(layers, gamma, beta):
            out = functional_call(trainer.module, trainer.layout.views(flat), (x,))
        return out, sim

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        check_plain_sgd(trainer.local, self.name)
        layers, units, d = self.shapes(trainer)
        numel, pt = trainer.layout.numel, trainer.num_trainable
        pool = self.unpack(server_state.get("pool", torch.zeros(numel)), units, d)
        frozen = global_params[pt:]
        received = trainer.layout.views(global_params)

        def loss_of(ts: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                q = embed(trainer.module, received, x)
            out, sim = self.logits(trainer, layers, torch.cat([ts[0], frozen]), ts[1:], q, x)
            return mean_ce(out, y) + self.key_weight * (1.0 - sim).mean()

        deltas, losses, pools = [], [], []
        for i in range(len(client_ids)):
            trained, loss = sgd_loop(trainer.local, trainer.x_train, trainer.y_train, idx[i], int(steps[i]),
                                     [global_params[:pt], *pool], loss_of, [1.0] + [self.pool_lr] * 3)
            deltas.append(torch.cat([trained[0], frozen]) - global_params)
            pools.append(self.pack(trained[1:], numel))
            losses.append(loss)
        return CohortResult(list(client_ids), torch.stack(deltas), {"pool": torch.stack(pools)},
                            trainer.sizes(client_ids), steps.clone(), torch.tensor(losses), [{} for _ in client_ids])

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        if "pool" not in uploads:
            return server_state
        # The cohort's mean pool; divided by its flag (1 for a round's mean; an asynchronous
        # schedule's staleness-weighted single update scales the flag with the pool).
        pool = uploads["pool"] / uploads["pool"][-1].clamp_min(1e-12)
        return {**server_state, "pool": pool}

    def personal_predictors(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                            server_state: State, client_states: list[State], seed: int,
                            round_index: int) -> list[Predictor]:
        """Every client: the global model with each instance's SSF from the averaged pool."""
        layers, units, d = self.shapes(trainer)
        pool = self.unpack(server_state.get("pool", torch.zeros(trainer.layout.numel)), units, d)
        views = trainer.layout.views(global_params)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.logits(trainer, layers, global_params, pool, embed(trainer.module, views, x), x)[0]

        return [predict for _ in client_ids]


__all__ = ["FedIns", "choose", "scale_shift"]
