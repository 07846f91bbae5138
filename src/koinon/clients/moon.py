"""MOON: model-contrastive federated learning.

Li, He & Song 2021, "Model-Contrastive Federated Learning", https://arxiv.org/abs/2103.16111.
Each local step adds mu * l_con to the loss, where for a sample's representation z (here: the
output of every layer but the last, the model's features before its classifier), the global
model's z_glob and the client's previous local model's z_prev (both fixed during the round),
    l_con = -log( exp(cos(z, z_glob) / tau) / (exp(cos(z, z_glob) / tau) + exp(cos(z, z_prev) / tau)) ),
pulling the local representation towards the global one and away from the last local one. The
previous local model is persistent client state (a model-sized tensor, as in the paper); a
client's first round uses the global model for it (l_con is then the constant log 2). Models:
`nn.Sequential` ones whose last layer is the classifier (the MLPs and CNNs of koinon).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def _features(trainer: CohortTrainer) -> nn.Module:
    module = trainer.module
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        raise ValueError("moon needs an nn.Sequential model whose last layer is the classifier")
    return module[:-1]


@CLIENT_ALGORITHMS.register("moon")
class MOON(LocalSGD):
    """Model-contrastive local training (Li et al. 2021): representations pulled to the global model's."""

    name = "moon"

    def __init__(self, mu_con: float = 1.0, tau: float = 0.5) -> None:
        # mu_con, because client.mu is FedProx's fixed key.
        if mu_con < 0:
            raise ValueError(f"client.mu_con must be >= 0, got {mu_con}")
        if tau <= 0:
            raise ValueError(f"client.tau must be > 0, got {tau}")
        self.mu, self.tau = mu_con, tau

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        k = len(client_states)
        rows = global_params.unsqueeze(0).expand(k, -1) if global_params.dim() == 1 else global_params
        previous = torch.stack([s["previous"] if "previous" in s else rows[i] for i, s in enumerate(client_states)])
        return {"global": rows.clone(), "previous": previous}

    def extra_loss(self, trainer: CohortTrainer, params: dict[str, torch.Tensor], x: torch.Tensor, stacked: bool,
                   ctx: State) -> torch.Tensor:
        features = _features(trainer)
        names = {n for n, _ in features.named_parameters()} | {n for n, _ in features.named_buffers()}
        pt = trainer.num_trainable

        def represent(p: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(features, {n: v for n, v in p.items() if n in names}, (inputs,)).flatten(1)

        def fixed(flat: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return vmap(represent)(trainer.stack_params(flat[:, :pt], flat[:, pt:]), x)

        m = x.shape[0]
        z = vmap(represent)(params, x) if stacked else represent(params, x[0]).unsqueeze(0)
        near = F.cosine_similarity(z, fixed(ctx["global"][:m]), dim=-1)
        far = F.cosine_similarity(z, fixed(ctx["previous"][:m]), dim=-1)
        return self.mu * F.softplus((far - near) / self.tau)  # -log(e^near / (e^near + e^far)), per sample

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        return {}, [{"previous": row.clone()} for row in theta]
