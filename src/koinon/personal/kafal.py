"""KAFAL: knowledge-aware federated active learning (Cao et al. 2022,
https://arxiv.org/abs/2211.13579): clients start mostly unlabeled (`data.label_fraction`,
`data.unlabeled_clients`; `koinon.personal.labels`) and buy labels within a budget.

Each round a client trains on the samples it has labels for (local SGD from the received model,
the upload as FedAvg's) with the knowledge-compensatory federated update (KCFU): each sample's
loss gains kd * (sum_c p_global(c|x) weak_c) * KL(p_global(x) || p_local(x)), where
weak_c = 1 - n_c / max n is how weak the client is in class c by its labels - the global model
teaches the classes the client has few labels of. Then, while its budget lasts, asks the annotator
(`PartlyLabeled.reveal`) for the labels of `query_per_round` of its unlabeled samples, picked by
knowledge-specialized active sampling (KSAS): the samples on which its own freshly trained
model - specialized in the client's classes - and the global model it received disagree most,
score(x) = KL(p_local(x) || p_global(x)). The labels bought stay on the client (state `queried`:
their indices; in a deployment, the client's `--state`) and join its training set from the next
round on; `label_budget` caps the labels a client buys over the whole run (its initial labels
not counted). `sampling = "random"` buys the same number of labels uniformly at random (the
baseline the paper compares against), `"entropy"` by the global model's predictive entropy.

Where the paper leaves a detail open, our choices: the discrepancy is the KL divergence of the
local from the global prediction (the paper's KSAS also scales by the client's class
distribution, which the local model's specialization already carries); queries happen after
each round's training, one batch a round (the paper's cycles of several rounds each); the
knowledge-compensatory update (KCFU) is left out: local training is plain FedAvg, so the
sampling's effect is measured alone. Sampling costs one forward pass of two models over the
client's unlabeled pool per round.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.data.federated import FederatedData
from koinon.personal.labels import PartlyLabeled
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

SAMPLING = ("ksas", "random", "entropy")


def ksas_scores(local_logits: torch.Tensor, global_logits: torch.Tensor) -> torch.Tensor:
    """`[n]`: KL(p_local || p_global) per sample, the disagreement KSAS queries by."""
    lp = local_logits.float().log_softmax(dim=1)
    gp = global_logits.float().log_softmax(dim=1)
    return (lp.exp() * (lp - gp)).sum(dim=1)


def weak_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[C]`: how weak the client is in each class, 1 - n_c / max_c n_c over its labels (1 for a
    class it has no label of, 0 for its strongest)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return 1.0 - counts / counts.max().clamp_min(1.0)


def compensation(global_logits: torch.Tensor, local_logits: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """`[..., ]` per-sample KCFU term: KL(p_global || p_local), weighted by how much of the
    global model's prediction falls on the client's weak classes, sum_c p_global(c) weak_c."""
    log_g = global_logits.log_softmax(dim=-1)
    log_l = local_logits.log_softmax(dim=-1)
    p_g = log_g.exp()
    return (p_g * weak.unsqueeze(-2)).sum(dim=-1) * (p_g * (log_g - log_l)).sum(dim=-1)


class _Compensate(LocalSGD):
    """Local SGD plus KCFU's term (`compensation`, times `kd`) on every training sample."""

    name = "kafal_kcfu"

    def __init__(self, kd: float, global_params: torch.Tensor) -> None:
        self.kd = kd
        self.anchor = global_params

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        return {"weak": torch.stack([st["weak"] for st in client_states])}

    def extra_loss(self, trainer: CohortTrainer, params: dict[str, torch.Tensor], x: torch.Tensor, stacked: bool,
                   ctx: State) -> torch.Tensor:
        m = x.shape[0]
        with torch.no_grad():
            anchor = self.anchor if self.anchor.dim() == 1 else None
            if anchor is not None:
                g = functional_call(trainer.module, trainer.layout.views(anchor), (x.flatten(0, 1),))
                g = g.view(m, x.shape[1], -1)
            else:
                g = torch.stack([functional_call(trainer.module, trainer.layout.views(self.anchor[i]), (x[i],))
                                 for i in range(m)])
        local = (trainer.forward_many(params, x) if stacked
                 else functional_call(trainer.module, params, (x[0],)).unsqueeze(0))
        return self.kd * compensation(g, local, ctx["weak"][:m])


def pick(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` highest scores (ties: the earlier position), in ascending order."""
    count = min(count, len(scores))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values


@CLIENT_ALGORITHMS.register("kafal")
class KAFAL(LocalSGD):
    """Federated active learning under a label budget (see the module docstring)."""

    name = "kafal"

    def __init__(self, label_budget: int = 40, query_per_round: int = 8, sampling: str = "ksas",
                 kd: float = 1.0) -> None:
        if not kd >= 0:
            raise ValueError(f"client.kd must be >= 0, got {kd}")
        self.kd = float(kd)
        for key, value in (("label_budget", label_budget), ("query_per_round", query_per_round)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"client.{key} must be an integer >= 0, got {value!r}")
        if sampling not in SAMPLING:
            raise ValueError(f"client.sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.label_budget = label_budget
        self.query_per_round = query_per_round
        self.sampling = sampling

    @torch.no_grad()
    def _logits(self, trainer: CohortTrainer, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        trainer.module.eval()
        out = functional_call(trainer.module, trainer.layout.views(params[: trainer.layout.numel]), (x,))
        trainer.module.train()
        return out.cpu()

    def query(self, trainer: CohortTrainer, client: int, pool: torch.Tensor, local: torch.Tensor,
              global_params: torch.Tensor, count: int, seed: int, round_index: int) -> torch.Tensor:
        """The sample indices (from `pool`) whose labels `client` buys this round."""
        if count <= 0 or len(pool) == 0:
            return torch.zeros(0, dtype=torch.long)
        if self.sampling == "random":
            g = generator(seed, round_index, client, 0xAC71)
            return pool[torch.randperm(len(pool), generator=g)[: min(count, len(pool))].sort().values]
        x = trainer.x_train[pool.to(trainer.x_train.device)]
        g_logits = self._logits(trainer, global_params, x)
        if self.sampling == "entropy":
            logp = g_logits.float().log_softmax(dim=1)
            scores = -(logp.exp() * logp).sum(dim=1)
        else:
            scores = ksas_scores(self._logits(trainer, local, x), g_logits)
        return pool[pick(scores, count)]

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        data = trainer.data
        if not isinstance(data, PartlyLabeled):  # every label known: nothing to buy, FedAvg
            return trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                     algorithm=LocalSGD())
        from koinon.personal.evaluate import with_steps

        ds = data.dataset
        y = ds.y_train.clone()
        indices = list(data.client_indices)
        bought = []
        for c, st in zip(client_ids, client_states):
            queried = st.get("queried", torch.zeros(0, dtype=torch.long)).cpu().long()
            bought.append(queried)
            if len(queried):
                y[queried] = data.reveal(queried)
                indices[c] = torch.cat([data.client_indices[c], queried]).sort().values
        view = with_steps(trainer, data=FederatedData(dataclasses.replace(ds, y_train=y), indices))
        own_idx, own_steps = view.schedule(client_ids, seed, round_index)
        algorithm: LocalSGD = LocalSGD()
        if self.kd:
            weak = [{"weak": weak_classes(y[indices[c]].cpu(), ds.num_classes).to(global_params.device)}
                    for c in client_ids]
            algorithm = _Compensate(self.kd, global_params)
            client_states = weak
        result = view.run_steps(client_ids, global_params, server_state, client_states, own_idx, own_steps,
                                algorithm=algorithm)
        assert result.deltas is not None
        states = []
        for i, c in enumerate(client_ids):
            have = bought[i]
            pool = data.unlabeled[c]
            if len(have):
                pool = pool[~torch.isin(pool, have)]
            count = min(self.query_per_round, self.label_budget - len(have))
            local = (global_params + result.deltas[i]) if global_params.dim() == 1 else global_params[i] + result.deltas[i]
            new = self.query(trainer, c, pool, local, global_params if global_params.dim() == 1 else global_params[i],
                             count, seed, round_index)
            states.append({"queried": torch.cat([have, new]).sort().values})
        result.client_states = states
        return result


def labels_used(data: FederatedData, client_states: dict[int, State]) -> int:
    """Labels a run has used: the clients' initial labels and every label bought since."""
    initial = data.labeled_count if isinstance(data, PartlyLabeled) else int(data.sizes.sum())
    return initial + sum(len(st.get("queried", ())) for st in client_states.values())
