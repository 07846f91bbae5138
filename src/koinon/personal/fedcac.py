"""FedCAC: per-parameter sensitivity decides what a client shares, and with whom.

Wu et al., "Bold but Cautious: Unlocking the Potential of Personalized Federated Learning through
Cautiously Aggressive Collaboration" (ICCV 2023).

A round of client k:
1. it starts from the global model, except on its *critical* parameters (its mask M_k from the
   round before), where it takes its customized model c_k: theta = (1 - M_k) global + M_k c_k;
2. local SGD; then the sensitivity of each parameter, |(theta_after - theta_before) * theta_after|,
   and M_k = the top `tau` share of each layer (its critical parameters);
3. it uploads its model (as the change from the received global model, so the global model is
   the FedAvg of the local models) and M_k (the `critical` upload, one value per parameter).

The server keeps every client's last model and mask. Overlap(i, j) = |M_i and M_j| / |M_i|; the
collaborators of i are the clients with overlap >= avg + (r / beta) (max - avg), avg and max over
all pairs (r: rounds done; a larger beta keeps the threshold near the average for longer), and
i itself; c_i is the mean of their models. c_i goes to client i alone (a per-client download:
`downlink_for`, encoded with the downlink codec and counted by the simulation driver).

Choices of ours where the paper leaves room: the overlap normalization (by |M_i|), a parameter
whose sensitivity is 0 is never critical, only trainable parameters can be critical, and a client
without a mask or a customized model (its first round, a new client) serves the global model
after `adapt_steps` SGD steps on its data. Runs in simulation and in `koinon server`, whose
tasks carry each client's own customized model (`TaskHeader.own`); the mask stays in the
client's `--state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout
from koinon.personal.base import train_part
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def critical_mask(layout: Layout, before: torch.Tensor, after: torch.Tensor, tau: float) -> torch.Tensor:
    """`[K, P]` float 0/1: each client's top-`tau` share of each trainable layer by sensitivity
    |(after - before) * after|; zero sensitivity is never critical."""
    sens = ((after - before) * after).abs()
    mask = torch.zeros_like(sens)
    for e in layout.entries:
        if not e.trainable:
            continue
        vals = sens[:, e.offset : e.offset + e.numel]
        k = max(1, int(tau * e.numel))
        thresh = vals.topk(k, dim=1).values[:, -1:]
        mask[:, e.offset : e.offset + e.numel] = ((vals >= thresh) & (vals > 0)).float()
    return mask


def customized_models(models: torch.Tensor, masks: torch.Tensor, rounds: int, beta: float) -> torch.Tensor:
    """`[n, P]`: each client's mean over its collaborators' models (see the module docstring)."""
    n = models.shape[0]
    m = masks.float()
    overlap = (m @ m.T) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    if n < 2:
        return models.clone()
    off = ~torch.eye(n, dtype=torch.bool)
    avg, top = overlap[off].mean(), overlap[off].max()
    threshold = avg + min(rounds / beta, 1.0) * (top - avg)
    together = (overlap >= threshold) | torch.eye(n, dtype=torch.bool)
    weights = together.float() / together.float().sum(dim=1, keepdim=True)
    return weights @ models


@CLIENT_ALGORITHMS.register("fedcac")
class FedCAC(LocalSGD):
    """FedCAC (Wu et al. 2023): critical parameters from a customized model of similar clients."""

    name = "fedcac"
    uploads: tuple[str, ...] = ("critical",)

    def __init__(self, tau: float = 0.5, beta: float = 170.0, adapt_steps: int = 20) -> None:
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"client.tau must be in (0, 1], got {tau}")
        if not beta > 0:
            raise ValueError(f"client.beta must be > 0, got {beta}")
        if not isinstance(adapt_steps, int) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.tau, self.beta, self.adapt_steps = float(tau), float(beta), adapt_steps

    def init_server_state(self, numel: int) -> State:
        return {"rounds": torch.zeros(1)}

    def downlink_for(self, server_state: State, client: int) -> State:
        """What the server sends to `client` alone: its customized model, once it has one."""
        key = f"customized_{client}"
        return {"customized": server_state[key]} if key in server_state else {}

    def starts(self, global_params: torch.Tensor, client_states: list[State]) -> torch.Tensor:
        """`[K, P]`: the global model, with the customized model on each client's critical parameters."""
        stack = global_params.unsqueeze(0).repeat(len(client_states), 1)
        for i, st in enumerate(client_states):
            if "customized" in st and "critical" in st:
                m = st["critical"] > 0.5
                stack[i, m] = st["customized"][m]
        return stack

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        starts = self.starts(global_params, client_states)
        result = trainer.run_steps(client_ids, starts, server_state, client_states, idx, steps, algorithm=LocalSGD())
        assert result.deltas is not None
        final = starts + result.deltas
        critical = critical_mask(trainer.layout, starts, final, self.tau)
        result.deltas = final - global_params  # the local model, as a change of the received global one
        result.uploads = {"critical": critical}
        result.client_states = [{"critical": critical[i].clone()} for i in range(len(client_ids))]
        return result

    def server_update_rows(self, server_state: State, old: torch.Tensor, new: torch.Tensor,
                           rows: dict[str, torch.Tensor], weights: torch.Tensor, client_ids: list[int]) -> State:
        out = dict(server_state)
        rounds = int(server_state["rounds"][0]) + 1
        out["rounds"] = torch.tensor([float(rounds)])
        for i, c in enumerate(client_ids):
            out[f"model_{c}"] = old + rows["model"][i]
            out[f"mask_{c}"] = (rows["critical"][i] > 0.5).to(torch.uint8)
        known = sorted(int(k[6:]) for k in out if k.startswith("model_"))
        custom = customized_models(torch.stack([out[f"model_{c}"] for c in known]),
                                   torch.stack([out[f"mask_{c}"] for c in known]).bool(), rounds, self.beta)
        for j, c in enumerate(known):
            out[f"customized_{c}"] = custom[j]
        return out

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        raise ValueError("client.algorithm = 'fedcac' needs the server's per-client rows (server_update_rows); "
                         "one update at a time (apply_update) is not supported")

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        """The model a client would start its next round from; without a mask or a customized
        model, the global model after `adapt_steps` SGD steps."""
        states = [{**st, **self.downlink_for(server_state, c)} for c, st in zip(client_ids, client_states)]
        models = self.starts(global_params, states)
        fresh = [i for i, st in enumerate(states) if not ("customized" in st and "critical" in st)]
        if fresh and self.adapt_steps:
            models[fresh] = train_part(trainer, [client_ids[i] for i in fresh], global_params, self.adapt_steps,
                                       seed, round_index)
        return models
